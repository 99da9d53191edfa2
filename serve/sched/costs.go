package sched

import (
	"fmt"
	"math"

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
	// (CostsCodec); under a codec other than none ProjectMS and KVLoadMS include
	// the decode into the model dtype (DecodeHiddenMS, DecodeKVMS), at
	// the codec's own rate.
	Codec          string  `json:"codec,omitempty"`
	DecodeHiddenMS float64 `json:"decode_hidden_ms,omitempty"`
	DecodeKVMS     float64 `json:"decode_kv_ms,omitempty"`
	// DecodeSource says where the decode rate comes from: the profile's
	// measured rate of the codec, or an estimate (Platform.DecodeGBps).
	DecodeSource string `json:"decode_source,omitempty"`
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

// DecodeGBps is the rate, in GB/s of model-dtype output, at which rows
// stored under codec cd decode into the model dtype, and where the figure
// comes from. It is the profile's measured rate of that codec (decode_gbps
// for fp8, codec_decode_gbps for fp8-block and int8). A codec the profile
// has no rate for gets an estimate that is meant to be conservative, never
// another codec's figure in its place:
//
//   - memory-bound: fp8 and fp8-block read one byte per value and write it
//     in the dtype at mem_gbps (on CUDA a dequantize kernel does just that;
//     unchanged from when one figure priced every codec, so profiles that
//     give no rate choose as they did). int8 has no device decoder: it is
//     decoded on the host, whose reference decodes a group into float32
//     (1 byte read, 4 written per value) and then converts it (4 read, the
//     dtype written), so it is priced at 1 + 4 + 4 + dtype bytes per value
//     at the slower of mem_gbps and h2d_gbps (a host-memory read: the host
//     is at least that fast, and a CUDA profile's mem_gbps is the device's).
//     So int8's estimate is always below fp8's.
//   - and no faster than the slowest rate the profile did measure: a codec
//     not measured on this platform is assumed to decode no faster than the
//     codecs that were (every decode does at least fp8's work per value, a
//     code converted and scaled, and on the host fp8 is the fastest: the
//     state/codec benchmarks of 4096 values on one core of a loaded 2-core
//     VM, 2026-12-03, gave fp8 0.75-1.0, fp8-block 0.43-0.49, int8 0.19-0.35
//     GB/s). The measured rate only bounds the estimate: the source says
//     so. A profile that measured only fp8 (the old decode_gbps) so prices
//     fp8-block and int8 as before or slower, and chooses among the codecs
//     it could choose before as it did (TestOldProfilesChooseAsBefore).
//
// cd is a codec other than none. The source says which figure applies;
// Costs.DecodeSource carries it into a plan.
func (pl *Platform) DecodeGBps(c *model.Config, cd state.Codec) (float64, string) {
	p := pl.Profile
	if f := p.Decode(cd.String()); f != nil {
		return f.Value, cd.String() + " measured: " + f.Source
	}
	eb := float64(c.ElemBytes())
	rate := p.MemGBps.Value * eb / (1 + eb)
	src := fmt.Sprintf("%s estimate: memory-bound, 1 byte read and %g written per value at mem_gbps", cd, eb)
	if cd == state.CodecInt8Channel {
		bw := min(p.MemGBps.Value, p.H2DGBps.Value)
		rate = bw * eb / (9 + eb)
		src = fmt.Sprintf("%s estimate: host decode through float32, %g bytes moved per value at min(mem_gbps, h2d_gbps) = %g GB/s", cd, 9+eb, bw)
	}
	slowest, from := math.Inf(1), ""
	for _, name := range profiles.DecodeCodecs {
		if f := p.Decode(name); f != nil && f.Value < slowest {
			slowest, from = f.Value, name
		}
	}
	if slowest < rate {
		rate = slowest
		src += fmt.Sprintf(", capped at the slowest measured decode (%s's %g GB/s): no rate measured for %s", from, slowest, cd)
	}
	return rate, src
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
	gbps, src := pl.DecodeGBps(c, cd)
	dec := gbps * 1e9
	cs.DecodeSource = src
	cs.DecodeHiddenMS = nf * float64(c.HiddenRowBytes()) / dec * 1e3
	cs.DecodeKVMS = nf * float64(c.KVRowBytes()) / dec * 1e3
	cs.ProjectMS += cs.DecodeHiddenMS
	cs.KVLoadMS += cs.DecodeKVMS
	return cs, nil
}
