package serve

import (
	"fmt"
	"math"
	"math/rand"

	"github.com/hcache/hcache/gpu"
	"github.com/hcache/hcache/model"
	"github.com/hcache/hcache/state"
	"github.com/hcache/hcache/state/codec"
)

// LayerError is one layer's error after a restore under a codec, against
// the never-evicted cache. Relative errors are normalised by the exact
// values of the layer: MaxRel = max|x'-x| / max|x|, RMSRel = ||x'-x|| / ||x||
// (over every token and value of the layer).
type LayerError struct {
	Layer      int     `json:"layer"`
	KMaxRel    float64 `json:"k_max_rel"`
	KRMSRel    float64 `json:"k_rms_rel"`
	VMaxRel    float64 `json:"v_max_rel"`
	VRMSRel    float64 `json:"v_rms_rel"`
	AttnMaxRel float64 `json:"attn_max_rel"` // attention output (before o_proj) of the last position
	AttnRMSRel float64 `json:"attn_rms_rel"`
}

// CodecReport is what MeasureCodec measured for one model, codec and plan
// kind.
type CodecReport struct {
	Model  string `json:"model"`
	Codec  string `json:"codec"`
	Kind   string `json:"kind"` // what every layer stores: hidden or kv
	Tokens int    `json:"tokens"`
	// BytesPerToken is the stored bytes of one token over every layer, and
	// ModelBytesPerToken the same plan's in the model dtype (codec none).
	BytesPerToken      int          `json:"bytes_per_token"`
	ModelBytesPerToken int          `json:"model_bytes_per_token"`
	Layers             []LayerError `json:"layers"`
	// Worst over the layers.
	KMaxRel    float64 `json:"k_max_rel"`
	KRMSRel    float64 `json:"k_rms_rel"`
	VMaxRel    float64 `json:"v_max_rel"`
	VRMSRel    float64 `json:"v_rms_rel"`
	AttnMaxRel float64 `json:"attn_max_rel"`
	AttnRMSRel float64 `json:"attn_rms_rel"`
	// Greedy continuation after the restore against the exact cache's:
	// Agree is the steps equal before the first difference (Steps when
	// none), Same the steps equal at their position.
	Steps int `json:"steps"`
	Agree int `json:"agree"`
	Same  int `json:"same"`
	// ControlAgree is the same agreement for a control: the exact cache
	// with every K and V value moved by 2^-8 of itself (random sign,
	// seeded, then rounded to the dtype), 16x less than fp8's bound. A
	// control that also diverges early says the model's greedy choices
	// are nearly tied (random synthetic weights), not that the codec is
	// poor. LogitRel is the first decode step's logits error after the
	// restore, ||l'-l|| / ||l||.
	ControlAgree int     `json:"control_agree"`
	LogitRel     float64 `json:"logit_rel"`
	// FP8Bound is E4M3's rounding bound, 2^-4 of a value (half an ulp of
	// 3 mantissa bits): the reference for KV errors "as expected".
	FP8Bound float64 `json:"fp8_bound"`
}

// memState is a context held in memory: an Appender for a Saver and a
// Source for a Restorer (one context; names are ignored).
type memState struct {
	plan   []state.LayerPlan
	layers [][]byte
}

func (s *memState) AppendLayer(layer int, rows []byte) error {
	s.layers[layer] = append(s.layers[layer], rows...)
	return nil
}

func (s *memState) AppendToken(rows [][]byte) error {
	for l, r := range rows {
		if r != nil {
			s.layers[l] = append(s.layers[l], r...)
		}
	}
	return nil
}

func (s *memState) RestoreOwned(_, _ string, ident *state.Identity, _ int, fn func(int, []byte, func()) error) (int, error) {
	n := 0
	for l, p := range ident.Plan {
		if p.Kind == state.LayerNone {
			continue
		}
		n = len(s.layers[l]) / int(p.RowBytes)
		if err := fn(l, s.layers[l], func() {}); err != nil {
			return 0, err
		}
	}
	return n, nil
}

// MeasureCodec saves the prefill of prompt with every layer stored as kind
// under codec cd (through a Saver), restores it through the CPU backend (the
// Restorer: decode, then projection or load), and compares against the cache
// that was never evicted: K and V per layer, the attention output of the
// last position per layer, and steps greedy tokens decoded from each cache.
// Codec none measures the lossless path (every error 0).
func MeasureCodec(c *model.Config, w *model.Weights, cd state.Codec, kind state.LayerKind, prompt []int, steps int) (*CodecReport, error) {
	m, err := model.New(c, w)
	if err != nil {
		return nil, err
	}
	if kind != state.LayerHidden && kind != state.LayerKV {
		return nil, fmt.Errorf("serve: measure a plan of %s layers", kind)
	}
	n := len(prompt)
	if n == 0 {
		return nil, fmt.Errorf("serve: measure with an empty prompt")
	}
	plan := make([]state.LayerPlan, c.Layers)
	modelBytes := 0
	for l := range plan {
		switch kind {
		case state.LayerHidden:
			plan[l] = state.LayerPlan{Kind: kind, RowBytes: uint32(codec.HiddenRowBytes(cd, c.DType, c.HiddenSize))}
			modelBytes += c.HiddenRowBytes()
		default:
			plan[l] = state.LayerPlan{Kind: kind, RowBytes: uint32(codec.KVRowBytes(cd, c.DType, c.KVDim()))}
			modelBytes += c.KVRowBytes()
		}
	}
	ident := IdentityCodec(c, w, plan, cd)
	if err := ident.Validate(); err != nil {
		return nil, err
	}
	mem := &memState{plan: plan, layers: make([][]byte, c.Layers)}
	saver := NewCodecSaver(c, plan, cd, mem)
	lastH := make([][]float32, c.Layers)
	ref := model.NewKVCache(c)
	logits, err := m.Forward(prompt, ref, func(l int, h, k, v []float32) {
		saver.Trace(l, h, k, v)
		lastH[l] = append([]float32(nil), h[(n-1)*c.HiddenSize:]...)
	})
	if err != nil {
		return nil, err
	}
	if err := saver.Err(); err != nil {
		return nil, err
	}
	b, err := gpu.NewCPU(c, w)
	if err != nil {
		return nil, err
	}
	dst := make(gpu.HostCache, c.Layers)
	for l := range dst {
		if dst[l], err = gpu.NewPagedKV(c, 16, (n+15)/16); err != nil {
			return nil, err
		}
	}
	if _, err := NewRestorer(mem, b, Settings{}).Restore(Request{NS: "measure", ID: "measure", Ident: ident, Dst: dst}); err != nil {
		return nil, err
	}
	got, err := PagedToCache(c, dst, n)
	if err != nil {
		return nil, err
	}
	rep := &CodecReport{Model: fmt.Sprintf("%s h%d l%d kvh%d %s", c.Arch, c.HiddenSize, c.Layers, c.KVHeads, c.DType), Codec: cd.String(), Kind: kind.String(),
		Tokens: n, BytesPerToken: ident.TokenBytes(), ModelBytesPerToken: modelBytes, Steps: steps, FP8Bound: 1.0 / 16}
	for l := 0; l < c.Layers; l++ {
		le := LayerError{Layer: l}
		le.KMaxRel, le.KRMSRel = relErr(got.K[l], ref.K[l])
		le.VMaxRel, le.VRMSRel = relErr(got.V[l], ref.V[l])
		ae, err := m.AttentionAt(ref, l, lastH[l], n-1)
		if err != nil {
			return nil, err
		}
		ag, err := m.AttentionAt(got, l, lastH[l], n-1)
		if err != nil {
			return nil, err
		}
		le.AttnMaxRel, le.AttnRMSRel = relErr(ag, ae)
		rep.Layers = append(rep.Layers, le)
		rep.KMaxRel, rep.KRMSRel = max(rep.KMaxRel, le.KMaxRel), max(rep.KRMSRel, le.KRMSRel)
		rep.VMaxRel, rep.VRMSRel = max(rep.VMaxRel, le.VMaxRel), max(rep.VRMSRel, le.VRMSRel)
		rep.AttnMaxRel, rep.AttnRMSRel = max(rep.AttnMaxRel, le.AttnMaxRel), max(rep.AttnRMSRel, le.AttnRMSRel)
	}
	if steps > 0 {
		next := model.Argmax(logits, c.Vocab)
		ctl := perturbed(c, ref, n)
		lw, err := m.Forward([]int{next}, cloneCache(ref), nil)
		if err != nil {
			return nil, err
		}
		lg, err := m.Forward([]int{next}, cloneCache(got), nil)
		if err != nil {
			return nil, err
		}
		_, rep.LogitRel = relErr(lg, lw)
		want, err := m.Generate(ref, []int{next}, steps, nil)
		if err != nil {
			return nil, err
		}
		have, err := m.Generate(got, []int{next}, steps, nil)
		if err != nil {
			return nil, err
		}
		control, err := m.Generate(ctl, []int{next}, steps, nil)
		if err != nil {
			return nil, err
		}
		rep.Agree, rep.Same = agreement(want, have)
		rep.ControlAgree, _ = agreement(want, control)
	}
	return rep, nil
}

// agreement is the steps equal before the first difference, and the steps
// equal at their position.
func agreement(want, have []int) (prefix, same int) {
	prefix = len(want)
	for i := range want {
		if want[i] == have[i] {
			same++
		} else if prefix == len(want) {
			prefix = i
		}
	}
	return prefix, same
}

func cloneCache(kc *model.KVCache) *model.KVCache {
	out := &model.KVCache{K: make([][]float32, len(kc.K)), V: make([][]float32, len(kc.V)), Tokens: kc.Tokens}
	for l := range kc.K {
		out.K[l] = append([]float32(nil), kc.K[l]...)
		out.V[l] = append([]float32(nil), kc.V[l]...)
	}
	return out
}

// perturbed is the control cache: every value of the first n tokens moved
// by 2^-8 of itself with a seeded random sign, rounded to the dtype.
func perturbed(c *model.Config, kc *model.KVCache, n int) *model.KVCache {
	out := cloneCache(kc)
	rng := rand.New(rand.NewSource(1))
	buf := make([]byte, 4)
	one := make([]float32, 1)
	for l := range out.K {
		for _, x := range [][]float32{out.K[l], out.V[l]} {
			for i := range x[:n*c.KVDim()] {
				s := float32(1.0 / 256)
				if rng.Intn(2) == 0 {
					s = -s
				}
				one[0] = x[i] * (1 + s)
				c.EncodeRow(buf, one)
				c.DecodeRow(one, buf)
				x[i] = one[0]
			}
		}
	}
	return out
}

// relErr is max|a-b| / max|b| and ||a-b|| / ||b|| (0 when b is all zeros
// and a equals it).
func relErr(a, b []float32) (maxRel, rmsRel float64) {
	var dmax, bmax, d2, b2 float64
	for i := range b {
		d := float64(a[i]) - float64(b[i])
		dmax = max(dmax, math.Abs(d))
		bmax = max(bmax, math.Abs(float64(b[i])))
		d2 += d * d
		b2 += float64(b[i]) * float64(b[i])
	}
	if bmax == 0 {
		if dmax == 0 {
			return 0, 0
		}
		return math.Inf(1), math.Inf(1)
	}
	return dmax / bmax, math.Sqrt(d2 / b2)
}
