package sched

import (
	"fmt"

	"github.com/hcache/hcache/model"
	"github.com/hcache/hcache/profiles"
	"github.com/hcache/hcache/state"
	"github.com/hcache/hcache/state/codec"
)

// Costs are the per-layer times, in milliseconds, of restoring one layer of
// a context of Tokens tokens on a platform, for one model.
type Costs struct {
	Tokens      int     `json:"tokens"`
	RecomputeMS float64 `json:"recompute_ms"` // T_rc: the full layer forward from the previous layer's output
	ProjectMS   float64 `json:"project_ms"`   // T_hc: K/V projection + RoPE from the hidden state
	KVLoadMS    float64 `json:"kv_load_ms"`   // scatter of loaded K/V rows into the paged cache
	HiddenIOMS  float64 `json:"hidden_io_ms"` // T_hio: read + host-to-device copy of the hidden rows
	KVIOMS      float64 `json:"kv_io_ms"`     // T_kvio: read + copy of the K/V rows
	// Codec is the encoding of the stored rows the I/O figures price
	// (CostsCodec); under an fp8 codec ProjectMS and KVLoadMS include
	// the decode into the model dtype (DecodeHiddenMS, DecodeKVMS).
	Codec          string  `json:"codec,omitempty"`
	DecodeHiddenMS float64 `json:"decode_hidden_ms,omitempty"`
	DecodeKVMS     float64 `json:"decode_kv_ms,omitempty"`
}

// Platform is a profile with a storage tier chosen: it prices layers.
type Platform struct {
	Profile *profiles.Profile
	Tier    *profiles.Tier
}

// NewPlatform selects a tier of a profile ("" is the first).
func NewPlatform(p *profiles.Profile, tier string) (*Platform, error) {
	t, err := p.Tier(tier)
	if err != nil {
		return nil, err
	}
	return &Platform{Profile: p, Tier: t}, nil
}

// IOGBps is the bandwidth a stored row moves at: the slower of the tier's
// read and the host-to-device copy (the two are pipelined by chunk).
func (pl *Platform) IOGBps() float64 {
	return min(pl.Tier.ReadGBps.Value, pl.Profile.H2DGBps.Value)
}

// ShapeOf describes a model's shape for the cost model.
func ShapeOf(c *model.Config) profiles.Shape {
	m := 3
	if c.Arch == model.ArchOPT {
		m = 2
	}
	s := profiles.Shape{HiddenSize: c.HiddenSize, Layers: c.Layers, Heads: c.Heads, KVHeads: c.KVHeads, HeadDim: c.HeadDim,
		Intermediate: c.Intermediate, MLPMatrices: m, ElemBytes: c.ElemBytes()}
	if a := c.MLA; a != nil {
		s.QLoraRank, s.KVLatent, s.RopeDim, s.NopeDim, s.VHeadDim = a.QLoraRank, a.KVLoraRank, a.QKRopeDim, a.QKNopeDim, a.VHeadDim
	}
	return s
}

// linFlops is the FLOPs of one token through one layer's matrices.
func linFlops(s profiles.Shape) float64 {
	d, qd, kvd, im := float64(s.HiddenSize), float64(s.Heads*s.HeadDim), float64(s.KVHeads*s.HeadDim), float64(s.Intermediate)
	if s.KVLatent > 0 { // MLA: q through its low rank, the latent, K/V rebuilt from it, o
		h, ql, lat, rope := float64(s.Heads), float64(s.QLoraRank), float64(s.KVLatent), float64(s.RopeDim)
		nope, vd := float64(s.NopeDim), float64(s.VHeadDim)
		return 2 * (d*ql + ql*h*(nope+rope) + d*(lat+rope) + lat*h*(nope+vd) + h*vd*d + float64(s.MLPMatrices)*d*im)
	}
	return 2 * (d*qd + 2*d*kvd + qd*d + float64(s.MLPMatrices)*d*im)
}

// recomputeFlops is one layer's forward over n tokens: the matrices plus
// causal attention (QK^T and PV over n(n+1)/2 pairs).
func recomputeFlops(s profiles.Shape, n int) float64 {
	nf := float64(n)
	if s.KVLatent > 0 { // QK over nope+rope, PV over v_head_dim
		return nf*linFlops(s) + float64(s.Heads*(s.NopeDim+s.RopeDim+s.VHeadDim))*nf*(nf+1)
	}
	return nf*linFlops(s) + 2*float64(s.Heads*s.HeadDim)*nf*(nf+1)
}

// projectFlops is the K and V GEMMs of one layer over n tokens.
func projectFlops(s profiles.Shape, n int) float64 {
	if s.KVLatent > 0 { // hidden -> latent and rotary key
		return 2 * float64(n) * float64(s.HiddenSize) * float64(s.KVLatent+s.RopeDim)
	}
	return 2 * float64(n) * float64(s.HiddenSize) * 2 * float64(s.KVHeads*s.HeadDim)
}

// kvRowBytes is one token's cache row of one layer: K and V, or for MLA the
// latent and the rotary key (what vLLM's MLA cache holds, so a stored
// latent is loaded as a copy).
func kvRowBytes(s profiles.Shape) float64 {
	if s.KVLatent > 0 {
		return float64((s.KVLatent + s.RopeDim) * s.ElemBytes)
	}
	return float64(2 * s.KVHeads * s.HeadDim * s.ElemBytes)
}

// curveShape is the shape a curve was measured on.
func curveShape(cv *profiles.Curve) (profiles.Shape, error) {
	if cv.Shape != nil {
		return *cv.Shape, nil
	}
	c, err := model.Preset(cv.Model)
	if err != nil {
		return profiles.Shape{}, fmt.Errorf("sched: curve measured on %q: %w (give its shape)", cv.Model, err)
	}
	return ShapeOf(c), nil
}

// Costs prices one layer of model c at n tokens. A measured curve is
// scaled to c by the FLOP ratio (recompute, projection) or the byte ratio
// (KV load); without one, the profile's figures are used.
func (pl *Platform) Costs(c *model.Config, n int) (Costs, error) {
	p := pl.Profile
	s := ShapeOf(c)
	ov := p.LayerOverheadUS.Value / 1000
	gemm := p.GemmTFLOPs.Value * 1e12
	mem := p.MemGBps.Value * 1e9
	io := pl.IOGBps() * 1e9
	nf := float64(n)
	cs := Costs{Tokens: n}
	scale := func(cv *profiles.Curve, work func(profiles.Shape) float64) (float64, error) {
		ref, err := curveShape(cv)
		if err != nil {
			return 0, err
		}
		return cv.At(n) / float64(ref.Layers) * work(s) / work(ref), nil
	}
	var err error
	if p.Recompute != nil {
		if cs.RecomputeMS, err = scale(p.Recompute, func(s profiles.Shape) float64 { return recomputeFlops(s, n) }); err != nil {
			return cs, err
		}
	} else {
		cs.RecomputeMS = recomputeFlops(s, n)/(gemm*p.ComputeEfficiency.Value)*1e3 + ov
	}
	if p.Project != nil {
		if cs.ProjectMS, err = scale(p.Project, func(s profiles.Shape) float64 { return projectFlops(s, n) }); err != nil {
			return cs, err
		}
	} else {
		// GEMMs, then RoPE and the scatter read and write K and V once.
		cs.ProjectMS = projectFlops(s, n)/gemm*1e3 + 2*nf*kvRowBytes(s)/mem*1e3 + ov
	}
	if p.KVLoad != nil {
		if cs.KVLoadMS, err = scale(p.KVLoad, kvRowBytes); err != nil {
			return cs, err
		}
	} else {
		cs.KVLoadMS = 2*nf*kvRowBytes(s)/mem*1e3 + ov
	}
	cs.HiddenIOMS = nf * float64(c.HiddenRowBytes()) / io * 1e3
	cs.KVIOMS = nf * float64(c.KVRowBytes()) / io * 1e3
	return cs, nil
}

// DecodeGBps is the rate the backend decodes fp8 rows into the model dtype,
// in GB/s of output: the profile's decode_gbps, else memory-bound (a value
// read as 1 byte and written as ElemBytes at mem_gbps).
func (pl *Platform) DecodeGBps(c *model.Config) float64 {
	if d := pl.Profile.DecodeGBps; d != nil {
		return d.Value
	}
	eb := float64(c.ElemBytes())
	return pl.Profile.MemGBps.Value * eb / (1 + eb)
}

// CostsCodec prices one layer of model c at n tokens with rows stored under
// codec cd: the reads and copies move the encoded rows (fewer bytes), and
// the projection and the KV load first decode them into the model dtype
// (on a GPU, a dequantize kernel after the copy). Codec none is Costs.
func (pl *Platform) CostsCodec(c *model.Config, n int, cd state.Codec) (Costs, error) {
	cs, err := pl.Costs(c, n)
	if err != nil || cd == state.CodecNone {
		return cs, err
	}
	if !cd.Known() {
		return cs, fmt.Errorf("sched: unknown codec %d", uint8(cd))
	}
	io := pl.IOGBps() * 1e9
	nf := float64(n)
	cs.Codec = cd.String()
	cs.HiddenIOMS = nf * float64(codec.HiddenRowBytes(cd, c.DType, c.HiddenSize)) / io * 1e3
	cs.KVIOMS = nf * float64(kvRowBytesCodec(c, cd)) / io * 1e3
	dec := pl.DecodeGBps(c) * 1e9
	cs.DecodeHiddenMS = nf * float64(c.HiddenRowBytes()) / dec * 1e3
	cs.DecodeKVMS = nf * float64(c.KVRowBytes()) / dec * 1e3
	cs.ProjectMS += cs.DecodeHiddenMS
	cs.KVLoadMS += cs.DecodeKVMS
	return cs, nil
}
