package gpubench

import (
	"fmt"
	"math/rand"

	"github.com/hcache/hcache/gpu/cuda"
	"github.com/hcache/hcache/model"
	"github.com/hcache/hcache/state"
	"github.com/hcache/hcache/state/codec"
)

// CodecResult is `hcache bench gpu --codec` for one token count: one
// hidden layer's rows copied in the model dtype against the same rows
// encoded under the codec, copied and decoded on the device (checked
// against state/codec), with the figures scaled to every layer.
type CodecResult struct {
	Model  string `json:"model"`
	Device string `json:"device"`
	Layers int    `json:"layers"`
	cuda.CodecCopyResult
	// AllLayersCopyMS and AllLayersCodecMS are the per-layer medians times
	// the model's layers: the copy-only floor of an all-hidden restore in
	// the model dtype, and the fp8 copy plus decode.
	AllLayersCopyMS  float64 `json:"all_layers_copy_ms"`
	AllLayersCodecMS float64 `json:"all_layers_codec_ms"`
	Target           float64 `json:"target"` // the bound on codec_vs_copy
}

// RunCodec measures cd's device decode against the model-dtype copy for
// each token count (hidden rows of o.Model; the backend holds one layer's
// K/V weights only: nothing is projected).
func RunCodec(o Options, cd state.Codec) ([]CodecResult, error) {
	if o.Reps <= 0 {
		o.Reps = 7
	}
	base, err := model.Preset(o.Model)
	if err != nil {
		return nil, err
	}
	c := *base
	c.Layers = 1
	if _, _, err := cuda.Probe(o.CUDA.CublasPath); err != nil {
		return nil, err
	}
	b, err := cuda.Open(&c, SynthKV(&c, o.Seed), o.CUDA)
	if err != nil {
		return nil, err
	}
	defer b.Close()
	var out []CodecResult
	for _, n := range o.Tokens {
		if n <= 0 {
			return nil, fmt.Errorf("gpubench: token count %d", n)
		}
		raw, err := allocPinned(b, n*c.HiddenRowBytes())
		if err != nil {
			return nil, err
		}
		rb := codec.HiddenRowBytes(cd, c.DType, c.HiddenSize)
		enc, err := allocPinned(b, n*rb)
		if err != nil {
			raw.free()
			return nil, err
		}
		rng := rand.New(rand.NewSource(o.Seed))
		x := make([]float32, c.HiddenSize)
		for t := 0; t < n; t++ {
			for i := range x {
				x[i] = float32(rng.NormFloat64())
			}
			c.EncodeRow(raw.mem[t*c.HiddenRowBytes():(t+1)*c.HiddenRowBytes()], x)
			if err := codec.EncodeRow(cd, c.DType, enc.mem[t*rb:(t+1)*rb], x); err != nil {
				return nil, err
			}
		}
		r, err := b.CodecCopy(cd, 1, c.HiddenSize, raw.mem, enc.mem, o.Reps)
		raw.free()
		enc.free()
		if err != nil {
			return nil, err
		}
		if o.Progress != nil {
			fmt.Fprintf(o.Progress, "%s %d tokens: copy %.3f ms, %s copy+decode %.3f ms (%.3fx)\n", o.Model, n, r.CopyMS, cd, r.CodecMS, r.Ratio)
		}
		out = append(out, CodecResult{Model: o.Model, Device: b.Device(), Layers: base.Layers, CodecCopyResult: *r,
			AllLayersCopyMS: r.CopyMS * float64(base.Layers), AllLayersCodecMS: r.CodecMS * float64(base.Layers), Target: 0.6})
	}
	return out, nil
}
