// Package profiler measures a platform profile on this machine: the store's
// read bandwidth on a data directory, a memory copy (the CPU backend's
// "host to device"), GEMM throughput, and per-model cost curves
// (recomputation, projection, KV load) at a few token counts, with the
// projection backend in use. `hcache profile` writes its result; `hcache
// bench pipeline` uses it to pick a plan. On the CUDA backend the curves are
// hcache's own device paths (MeasureDeviceCurves: the device recompute, the
// pipelined hidden and KV restores into a device cache) and the copy figure
// is the PCIe copy, so plans on a GPU use measured curves rather than
// PyTorch's.
package profiler

import (
	"fmt"
	"io"
	"math/rand"
	"os"
	"path/filepath"
	"sort"
	"time"

	"github.com/hcache/hcache/chunk"
	"github.com/hcache/hcache/gpu"
	"github.com/hcache/hcache/gpu/cuda"
	"github.com/hcache/hcache/internal/tensor"
	"github.com/hcache/hcache/model"
	"github.com/hcache/hcache/profiles"
	"github.com/hcache/hcache/serve/sched"
	"github.com/hcache/hcache/state"
	"github.com/hcache/hcache/state/codec"
)

// LoadModel returns a preset with seeded synthetic weights, or a model
// directory (config.json + safetensors) with all its weights.
func LoadModel(name string, seed, maxParams int64) (*model.Config, *model.Weights, error) {
	if c, err := model.Preset(name); err == nil {
		if n := c.ParamCount(); maxParams > 0 && n > maxParams {
			return nil, nil, fmt.Errorf("preset %s has %d parameters; the CPU reference forward pass is meant for small models (raise --max-params to try)", name, n)
		}
		return c, model.Synthesize(c, seed), nil
	}
	if st, err := os.Stat(name); err != nil || !st.IsDir() {
		return nil, nil, fmt.Errorf("model %q is neither a preset (%v) nor a model directory", name, model.PresetNames())
	}
	c, err := model.LoadConfig(name)
	if err != nil {
		return nil, nil, err
	}
	w, err := model.LoadWeights(name, c, model.WeightsAll)
	if err != nil {
		return nil, nil, err
	}
	return c, w, nil
}

// Options of a measurement.
type Options struct {
	Dir       string // data directory whose read bandwidth is measured
	Model     string
	Seed      int64
	MaxParams int64
	Tokens    []int // token counts of the curves
	ReadBytes int64 // bytes of the read-bandwidth context (default 64 MiB)
	Rounds    int   // repetitions; medians are kept (default 3)
	// Backend is "cpu", "cuda" or "auto" (CUDA when a device can be used,
	// else the CPU backend). With CUDA every curve is hcache's own device
	// path (MeasureDeviceCurves: the device recompute, the pipelined
	// hidden and KV restores into a device cache) and the copy figure is
	// the PCIe copy; presets get model.SynthesizeParallel (no MaxParams bound: the CPU
	// forward pass does not run) and their positions raised to the largest
	// token count.
	Backend  string
	CUDA     cuda.Options
	Name     string // the profile's name (default "measured-<host>")
	Progress io.Writer
}

func median(d []time.Duration) time.Duration {
	s := append([]time.Duration(nil), d...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[len(s)/2]
}

func timeIt(rounds int, fn func() error) (time.Duration, error) {
	var ds []time.Duration
	for i := 0; i < rounds; i++ {
		t0 := time.Now()
		if err := fn(); err != nil {
			return 0, err
		}
		ds = append(ds, time.Since(t0))
	}
	return median(ds), nil
}

func ms(d time.Duration) float64 { return float64(d.Nanoseconds()) / 1e6 }

// RandomRows returns n rows of layer-input-like values in the model dtype.
func RandomRows(c *model.Config, rng *rand.Rand, n, width int) []byte {
	f := make([]float32, n*width)
	for i := range f {
		f[i] = float32(rng.NormFloat64())
	}
	b := make([]byte, n*width*c.ElemBytes())
	c.EncodeRow(b, f)
	return b
}

// DecodeCodecs are the codecs whose host decode a profile records.
var DecodeCodecs = []state.Codec{state.CodecFP8Token, state.CodecFP8Block, state.CodecInt8Channel}

// DecodeGBps times the host decode of 256 hidden rows stored under codec cd
// (encoded from position 0, as a save of a prefill encodes them: under int8
// four whole groups) into the model dtype, in GB/s of output: what serve
// does for every stored layer of a state saved under cd when the backend
// does not decode it on the device.
func DecodeGBps(c *model.Config, cd state.Codec, rounds int) (float64, error) {
	const n = 256
	rng := rand.New(rand.NewSource(1))
	x := make([]float32, n*c.HiddenSize)
	for i := range x {
		x[i] = float32(rng.NormFloat64())
	}
	enc := make([]byte, n*codec.HiddenRowBytes(cd, c.DType, c.HiddenSize))
	if err := codec.EncodeRows(cd, c.DType, enc, 1, c.HiddenSize, 0, x); err != nil {
		return 0, err
	}
	out := make([]byte, n*c.HiddenRowBytes())
	d, err := timeIt(rounds, func() error {
		return codec.TranscodeRows(cd, c.DType, out, enc, 1, c.HiddenSize)
	})
	if err != nil {
		return 0, err
	}
	return float64(len(out)) / d.Seconds() / 1e9, nil
}

// DecodeRates is DecodeGBps of every codec of DecodeCodecs.
func DecodeRates(c *model.Config, rounds int, say func(string)) (map[state.Codec]float64, error) {
	r := map[state.Codec]float64{}
	for _, cd := range DecodeCodecs {
		g, err := DecodeGBps(c, cd, rounds)
		if err != nil {
			return nil, fmt.Errorf("profile: %s decode: %w", cd, err)
		}
		say(fmt.Sprintf("%s decode into %s on the host %.2f GB/s", cd, c.DType, g))
		r[cd] = g
	}
	return r, nil
}

// setDecodeRates writes the measured rates into the profile's decode figures
// (fp8's is decode_gbps, the others codec_decode_gbps), each with its source.
func setDecodeRates(p *profiles.Profile, c *model.Config, rates map[state.Codec]float64, src func(string) string, note string) {
	for _, cd := range DecodeCodecs {
		g, ok := rates[cd]
		if !ok {
			continue
		}
		f := profiles.Figure{Value: g, Source: src(fmt.Sprintf("host decode (state/codec, one core) of 256 %s hidden rows into %s, GB/s of output; %s", cd, c.DType, note))}
		if cd == state.CodecFP8Token {
			p.DecodeGBps = &f
			continue
		}
		if p.CodecDecodeGBps == nil {
			p.CodecDecodeGBps = map[string]profiles.Figure{}
		}
		p.CodecDecodeGBps[cd.String()] = f
	}
}

// StoreReadGBps writes one context of about bytes bytes (hidden rows of
// every layer) to a fresh store under dir, then times restores of it with
// no consumer work: the store's read bandwidth from disk (O_DIRECT, DRAM
// tier off) or, with dram, from its DRAM tier (sized to hold the context).
func StoreReadGBps(dir string, c *model.Config, bytes int64, rounds int, dram bool) (float64, string, error) {
	sdir := filepath.Join(dir, "hcache-profile-store")
	os.RemoveAll(sdir)
	defer os.RemoveAll(sdir)
	cache := int64(0)
	if dram {
		cache = 2*bytes + 64<<20
	}
	st, err := chunk.Open(chunk.Options{Dir: sdir, CacheBytes: cache, GCInterval: -1, Logf: func(string, ...any) {}})
	if err != nil {
		return 0, "", err
	}
	defer st.Close()
	plan := sched.PlanOf(c, chunk.LayerHidden)
	ident := &chunk.Identity{Model: model.ShapeFingerprint(c), Plan: plan}
	tokens := int(bytes / int64(c.Layers*c.HiddenRowBytes()))
	tokens = max(st.ChunkTokens(), tokens/st.ChunkTokens()*st.ChunkTokens())
	wr, err := st.Create("profile", "read", ident, chunk.CreateOptions{})
	if err != nil {
		return 0, "", err
	}
	rows := RandomRows(c, rand.New(rand.NewSource(1)), tokens, c.HiddenSize)
	for l := 0; l < c.Layers; l++ {
		if err := wr.AppendLayer(l, rows); err != nil {
			return 0, "", err
		}
	}
	if err := wr.Close(); err != nil {
		return 0, "", err
	}
	var n int64
	d, err := timeIt(rounds, func() error {
		n = 0
		_, err := st.Restore("profile", "read", ident, func(_ int, r []byte) error { n += int64(len(r)); return nil })
		return err
	})
	if err != nil {
		return 0, "", err
	}
	return float64(n) / d.Seconds() / 1e9, st.EngineName(), nil
}

// CopyGBps times a memory copy of 64 MiB.
func CopyGBps(rounds int) float64 {
	src, dst := make([]byte, 64<<20), make([]byte, 64<<20)
	for i := range src {
		src[i] = byte(i)
	}
	d, _ := timeIt(rounds, func() error { copy(dst, src); return nil })
	return float64(len(src)) / d.Seconds() / 1e9
}

// GemmTFLOPs times the float32 GEMM of the CPU reference (tensor.MatMulT)
// on [n x d] x [d x d].
func GemmTFLOPs(d, n, rounds int) float64 {
	x, w, out := make([]float32, n*d), make([]float32, d*d), make([]float32, n*d)
	for i := range x {
		x[i] = float32(i%7) * 0.1
	}
	for i := range w {
		w[i] = float32(i%5) * 0.1
	}
	t, _ := timeIt(rounds, func() error { tensor.MatMulT(out, x, n, d, w, d, nil); return nil })
	return 2 * float64(n) * float64(d) * float64(d) / t.Seconds() / 1e12
}

// Curves are the per-model measurements at each token count: ms for all
// layers.
type Curves struct {
	Recompute, Project, KVLoad []profiles.Point
}

// MeasureCurves times, at each token count, the forward pass over all
// layers (recomputation), the backend's projection of every layer, and its
// KV load of every layer.
func MeasureCurves(m *model.Model, b gpu.Backend, tokens []int, rounds int, bar func(string)) (Curves, error) {
	c := m.Cfg
	var cv Curves
	rng := rand.New(rand.NewSource(2))
	for _, n := range tokens {
		if n > c.MaxPositions {
			return cv, fmt.Errorf("profile: %d tokens exceed the model's %d positions", n, c.MaxPositions)
		}
		ids := make([]int, n)
		for i := range ids {
			ids[i] = rng.Intn(c.Vocab)
		}
		d, err := timeIt(rounds, func() error { return m.Prefill(ids, c.Layers, nil) })
		if err != nil {
			return cv, err
		}
		cv.Recompute = append(cv.Recompute, profiles.Point{Tokens: n, MS: ms(d)})
		bar(fmt.Sprintf("recompute %d tokens: %.1f ms", n, ms(d)))
		positions := make([]int, n)
		for i := range positions {
			positions[i] = i
		}
		dst, err := gpu.NewPagedKV(c, 16, (n+15)/16)
		if err != nil {
			return cv, err
		}
		hidden := RandomRows(c, rng, n, c.HiddenSize)
		kv := RandomRows(c, rng, n, 2*c.KVDim())
		d, err = timeIt(rounds, func() error {
			for l := 0; l < c.Layers; l++ {
				if err := b.Project(l, hidden, positions, dst); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			return cv, err
		}
		cv.Project = append(cv.Project, profiles.Point{Tokens: n, MS: ms(d)})
		d, err = timeIt(rounds, func() error {
			for l := 0; l < c.Layers; l++ {
				if err := b.LoadKV(l, kv, positions, dst); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			return cv, err
		}
		cv.KVLoad = append(cv.KVLoad, profiles.Point{Tokens: n, MS: ms(d)})
		bar(fmt.Sprintf("projection %d tokens: %.2f ms, kv load %.2f ms (all layers)", n, cv.Project[len(cv.Project)-1].MS, ms(d)))
	}
	return cv, nil
}

// Measure measures a whole profile of this machine for one model with the
// backend chosen (the CPU one when no CUDA device can be used).
func Measure(o Options) (*profiles.Profile, error) {
	if o.Rounds <= 0 {
		o.Rounds = 3
	}
	if o.ReadBytes <= 0 {
		o.ReadBytes = 64 << 20
	}
	if len(o.Tokens) == 0 {
		o.Tokens = []int{64, 128, 256}
	}
	for i, n := range o.Tokens {
		if n <= 0 || (i > 0 && n <= o.Tokens[i-1]) {
			return nil, fmt.Errorf("profile: token counts %v must be positive and increasing", o.Tokens)
		}
	}
	say := func(s string) {
		if o.Progress != nil {
			fmt.Fprintf(o.Progress, "profile: %s\n", s)
		}
	}
	if o.Backend == "" {
		o.Backend = gpu.SelectAuto
	}
	switch o.Backend {
	case gpu.SelectCUDA:
		return measureCUDA(o, say)
	case gpu.SelectAuto:
		if _, _, err := cuda.Probe(o.CUDA.CublasPath); err == nil {
			return measureCUDA(o, say)
		}
	}
	c, w, err := LoadModel(o.Model, o.Seed, o.MaxParams)
	if err != nil {
		return nil, err
	}
	m, err := model.New(c, w)
	if err != nil {
		return nil, err
	}
	b, note, err := gpu.Select(o.Backend, c, w, o.CUDA)
	if err != nil {
		return nil, err
	}
	defer b.Close()
	say("backend: " + note)
	backendName := "cpu"
	if b.Name() == "cuda" {
		backendName = "cuda"
	}
	say(fmt.Sprintf("store read bandwidth on %s (%d MiB context)", o.Dir, o.ReadBytes>>20))
	readGBps, engine, err := StoreReadGBps(o.Dir, c, o.ReadBytes, o.Rounds, false)
	if err != nil {
		return nil, err
	}
	dramGBps, _, err := StoreReadGBps(o.Dir, c, o.ReadBytes, o.Rounds, true)
	if err != nil {
		return nil, err
	}
	say(fmt.Sprintf("store read: %.2f GB/s from disk (%s engine), %.2f GB/s from the DRAM tier", readGBps, engine, dramGBps))
	copyGBps := CopyGBps(o.Rounds)
	gemm := GemmTFLOPs(c.HiddenSize, 256, o.Rounds)
	say(fmt.Sprintf("memory copy %.2f GB/s, float32 GEMM %.4f TFLOP/s", copyGBps, gemm))
	decRates, err := DecodeRates(c, o.Rounds, say)
	if err != nil {
		return nil, err
	}
	cv, err := MeasureCurves(m, b, o.Tokens, o.Rounds, say)
	if err != nil {
		return nil, err
	}
	host, _ := os.Hostname()
	when := time.Now().UTC().Format(time.RFC3339)
	src := func(what string) string {
		return fmt.Sprintf("measured by hcache profile on %s at %s: %s (median of %d)", host, when, what, o.Rounds)
	}
	shape := sched.ShapeOf(c)
	shape.Name = o.Model
	curve := func(pts []profiles.Point, what string) *profiles.Curve {
		return &profiles.Curve{Model: o.Model, Shape: &shape, Points: pts, Source: src(what)}
	}
	name := o.Name
	if name == "" {
		name = "measured-" + host
	}
	p := &profiles.Profile{
		Name:            name,
		Description:     fmt.Sprintf("This machine, %s, model %s (%s engine on %s).", note, o.Model, engine, o.Dir),
		Backend:         backendName,
		Tiers:           []profiles.Tier{{Name: "dir", ReadGBps: profiles.Figure{Value: readGBps, Source: src("store restore of one context, O_DIRECT, no DRAM cache, on " + o.Dir)}}},
		H2DGBps:         profiles.Figure{Value: copyGBps, Source: src("64 MiB host memory copy (the cpu backend's host-to-device step; with the cuda backend this is a host copy, not the PCIe copy, which this command does not measure)")},
		GemmTFLOPs:      profiles.Figure{Value: gemm, Source: src(fmt.Sprintf("float32 GEMM [256 x %d] x [%d x %d] of the CPU reference", c.HiddenSize, c.HiddenSize, c.HiddenSize))},
		MemGBps:         profiles.Figure{Value: copyGBps, Source: src("64 MiB memory copy")},
		LayerOverheadUS: profiles.Figure{Value: 0, Source: "measured curves include per-layer overheads"},
		Recompute:       curve(cv.Recompute, "forward pass over all layers"),
		Project:         curve(cv.Project, backendName+" backend projection of every layer through gpu.Backend"),
		KVLoad:          curve(cv.KVLoad, backendName+" backend KV load of every layer through gpu.Backend"),
	}
	setDecodeRates(p, c, decRates, src, "what serve does on this backend")
	if err := p.Validate(); err != nil {
		return nil, fmt.Errorf("profile: the measurement is not a valid profile: %w", err)
	}
	return p, nil
}
