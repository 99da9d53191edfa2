package profiles

import (
	"bytes"
	"embed"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"os"
	"path"
	"sort"
	"strings"
)

//go:embed *.json
var shipped embed.FS

// Figure is one number and where it comes from.
type Figure struct {
	Value  float64 `json:"value"`
	Source string  `json:"source"`
}

// Point is one measurement of a curve: ms for all layers at a token count.
type Point struct {
	Tokens int     `json:"tokens"`
	MS     float64 `json:"ms"`
}

// Shape is the model shape a curve was measured on (the scheduler scales a
// curve to other shapes by their FLOP or byte ratio).
type Shape struct {
	HiddenSize   int `json:"hidden_size"`
	Layers       int `json:"layers"`
	Heads        int `json:"heads"`
	KVHeads      int `json:"kv_heads"`
	HeadDim      int `json:"head_dim"`
	Intermediate int `json:"intermediate"`
	MLPMatrices  int `json:"mlp_matrices"` // 3 (gated SiLU) or 2 (OPT)
	ElemBytes    int `json:"elem_bytes"`
	// Multi-head latent attention (DeepSeek-V3), all 0 otherwise: the
	// query's low rank, the latent and rotary key stored per token, and
	// the per-head q/k (without rope) and v widths.
	QLoraRank int    `json:"q_lora_rank,omitempty"`
	KVLatent  int    `json:"kv_latent,omitempty"`
	RopeDim   int    `json:"rope_dim,omitempty"`
	NopeDim   int    `json:"nope_dim,omitempty"`
	VHeadDim  int    `json:"v_head_dim,omitempty"`
	Name      string `json:"name,omitempty"`
}

// Curve is a measured cost in milliseconds for all layers of a model at
// several token counts. Between points it is interpolated as a power law
// (linear in log-log); beyond the ends the nearest segment's power law is
// extended, so a superlinear cost keeps growing superlinearly.
type Curve struct {
	Model  string  `json:"model"` // a preset name (the shape is then optional)
	Shape  *Shape  `json:"shape,omitempty"`
	Points []Point `json:"points"`
	Source string  `json:"source"`
}

// Tier is one place states can be read from.
type Tier struct {
	Name     string `json:"name"`
	ReadGBps Figure `json:"read_gbps"`
	Note     string `json:"note,omitempty"`
}

// Profile describes one platform.
type Profile struct {
	Name        string `json:"name"`
	Description string `json:"description"`
	Backend     string `json:"backend"` // "cuda" or "cpu"
	Tiers       []Tier `json:"storage_tiers"`
	// H2DGBps is host-to-device bandwidth (the copy every stored row
	// takes after it is read; for the CPU backend a memory copy).
	H2DGBps Figure `json:"h2d_gbps"`
	// GemmTFLOPs is the dense fp16 GEMM throughput reached by the backend.
	GemmTFLOPs Figure `json:"gemm_tflops"`
	// MemGBps is the device memory bandwidth (RoPE, KV scatter).
	MemGBps Figure `json:"mem_gbps"`
	// ComputeEfficiency is the fraction of GemmTFLOPs a full layer forward
	// reaches; used only when no recompute curve is given.
	ComputeEfficiency *Figure `json:"compute_efficiency,omitempty"`
	// LayerOverheadUS is a fixed cost per layer and operation (launches).
	LayerOverheadUS Figure `json:"layer_overhead_us"`
	// DecodeGBps is the decode of rows stored under the fp8 codec
	// (per-token scale) into the model dtype, in GB/s of model-dtype
	// output (on a GPU the dequantize kernel after the copy; on the CPU
	// backend the host decode). Profiles written before the other codecs
	// had rates of their own carry only this one, measured on fp8 rows;
	// it keeps that meaning.
	DecodeGBps *Figure `json:"decode_gbps,omitempty"`
	// CodecDecodeGBps is the same figure for the other codecs, by name
	// ("fp8-block", "int8"; fp8's own is DecodeGBps, and the loader
	// refuses it here so that one figure has one place). All optional:
	// the scheduler prices a codec without a rate by a conservative
	// estimate (sched.Platform.DecodeGBps says which), never by another
	// codec's figure alone.
	CodecDecodeGBps map[string]Figure `json:"codec_decode_gbps,omitempty"`
	// Measured curves; each optional (figures above stand in for a missing one).
	Recompute *Curve `json:"recompute,omitempty"`
	Project   *Curve `json:"project,omitempty"`
	KVLoad    *Curve `json:"kv_load,omitempty"`
}

// DecodeCodecs are the codecs (state.Codec's names) a profile gives decode
// rates for: fp8 in decode_gbps, the others in codec_decode_gbps.
var DecodeCodecs = []string{"fp8", "fp8-block", "int8"}

// Decode returns the profile's measured decode rate of the codec named
// (decode_gbps for "fp8", codec_decode_gbps for the others), or nil when
// the profile gives none: the caller estimates, it does not borrow another
// codec's figure.
func (p *Profile) Decode(codec string) *Figure {
	if codec == "fp8" {
		return p.DecodeGBps
	}
	if f, ok := p.CodecDecodeGBps[codec]; ok {
		return &f
	}
	return nil
}

// ErrProfile is wrapped by every validation error.
var ErrProfile = errors.New("bad profile")

// Parse decodes and validates a profile; unknown fields are refused.
func Parse(data []byte) (*Profile, error) {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	var p Profile
	if err := dec.Decode(&p); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrProfile, err)
	}
	if err := p.Validate(); err != nil {
		return nil, err
	}
	return &p, nil
}

// Validate checks every field and names the first bad one.
func (p *Profile) Validate() error {
	bad := func(field, format string, args ...any) error {
		name := p.Name
		if name == "" {
			name = "(unnamed)"
		}
		return fmt.Errorf("%w %s: %s: "+format, append([]any{ErrProfile, name, field}, args...)...)
	}
	fig := func(field string, f Figure, positive bool) error {
		if math.IsNaN(f.Value) || math.IsInf(f.Value, 0) || f.Value < 0 || (positive && f.Value == 0) {
			return bad(field+".value", "must be a finite number > 0 (got %v)", f.Value)
		}
		if strings.TrimSpace(f.Source) == "" {
			return bad(field+".source", "is empty: every figure names its source")
		}
		return nil
	}
	if p.Name == "" {
		return bad("name", "is empty")
	}
	switch p.Backend {
	case "cuda", "cpu":
	default:
		return bad("backend", "%q (want cuda or cpu)", p.Backend)
	}
	if len(p.Tiers) == 0 {
		return bad("storage_tiers", "is empty: name at least one tier")
	}
	seen := map[string]bool{}
	for i, t := range p.Tiers {
		f := fmt.Sprintf("storage_tiers[%d]", i)
		if t.Name == "" || seen[t.Name] {
			return bad(f+".name", "%q is empty or repeated", t.Name)
		}
		seen[t.Name] = true
		if err := fig(f+".read_gbps", t.ReadGBps, true); err != nil {
			return err
		}
	}
	if err := fig("h2d_gbps", p.H2DGBps, true); err != nil {
		return err
	}
	if err := fig("gemm_tflops", p.GemmTFLOPs, true); err != nil {
		return err
	}
	if err := fig("mem_gbps", p.MemGBps, true); err != nil {
		return err
	}
	if err := fig("layer_overhead_us", p.LayerOverheadUS, false); err != nil {
		return err
	}
	if p.ComputeEfficiency != nil {
		if err := fig("compute_efficiency", *p.ComputeEfficiency, true); err != nil {
			return err
		}
		if p.ComputeEfficiency.Value > 1 {
			return bad("compute_efficiency.value", "%v is above 1", p.ComputeEfficiency.Value)
		}
	} else if p.Recompute == nil {
		return bad("recompute", "is missing and so is compute_efficiency: one of them must say what recomputation costs")
	}
	if p.DecodeGBps != nil {
		if err := fig("decode_gbps", *p.DecodeGBps, true); err != nil {
			return err
		}
	}
	keys := make([]string, 0, len(p.CodecDecodeGBps))
	for k := range p.CodecDecodeGBps {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		f := fmt.Sprintf("codec_decode_gbps[%q]", k)
		switch k {
		case "fp8":
			return bad(f, "fp8's decode rate is decode_gbps: give it there")
		case "fp8-block", "int8":
		default:
			return bad(f, "is not a codec with a decode (have %s; fp8's rate is decode_gbps)", strings.Join(DecodeCodecs[1:], ", "))
		}
		if err := fig(f, p.CodecDecodeGBps[k], true); err != nil {
			return err
		}
	}
	for _, c := range []struct {
		field string
		c     *Curve
	}{{"recompute", p.Recompute}, {"project", p.Project}, {"kv_load", p.KVLoad}} {
		if c.c == nil {
			continue
		}
		if err := c.c.validate(c.field, bad); err != nil {
			return err
		}
	}
	return nil
}

func (c *Curve) validate(field string, bad func(field, format string, args ...any) error) error {
	if c.Model == "" && c.Shape == nil {
		return bad(field+".model", "is empty and no shape is given: a curve must say which model it was measured on")
	}
	if strings.TrimSpace(c.Source) == "" {
		return bad(field+".source", "is empty: every figure names its source")
	}
	if len(c.Points) == 0 {
		return bad(field+".points", "is empty")
	}
	for i, pt := range c.Points {
		f := fmt.Sprintf("%s.points[%d]", field, i)
		if pt.Tokens <= 0 {
			return bad(f+".tokens", "must be positive (got %d)", pt.Tokens)
		}
		if i > 0 && pt.Tokens <= c.Points[i-1].Tokens {
			return bad(f+".tokens", "%d does not increase over the previous point's %d", pt.Tokens, c.Points[i-1].Tokens)
		}
		if !(pt.MS > 0) || math.IsInf(pt.MS, 0) {
			return bad(f+".ms", "must be a finite number > 0 (got %v)", pt.MS)
		}
	}
	if s := c.Shape; s != nil {
		if s.HiddenSize <= 0 || s.Layers <= 0 || s.Heads <= 0 || s.KVHeads <= 0 || s.HeadDim <= 0 || s.Intermediate <= 0 || s.ElemBytes <= 0 {
			return bad(field+".shape", "has a non-positive dimension: %+v", *s)
		}
		if s.MLPMatrices != 2 && s.MLPMatrices != 3 {
			return bad(field+".shape.mlp_matrices", "%d (want 2 or 3)", s.MLPMatrices)
		}
	}
	return nil
}

// At returns the curve's cost in ms at n tokens (all layers).
func (c *Curve) At(n int) float64 {
	pts := c.Points
	x := float64(n)
	if len(pts) == 1 {
		return pts[0].MS * x / float64(pts[0].Tokens)
	}
	i := sort.Search(len(pts), func(i int) bool { return pts[i].Tokens >= n })
	switch {
	case i == 0:
		i = 1
	case i == len(pts):
		i = len(pts) - 1
	}
	a, b := pts[i-1], pts[i]
	slope := math.Log(b.MS/a.MS) / math.Log(float64(b.Tokens)/float64(a.Tokens))
	return a.MS * math.Pow(x/float64(a.Tokens), slope)
}

// Names lists the shipped profiles.
func Names() []string {
	ents, _ := shipped.ReadDir(".")
	var n []string
	for _, e := range ents {
		n = append(n, strings.TrimSuffix(e.Name(), ".json"))
	}
	sort.Strings(n)
	return n
}

// Load returns a shipped profile by name, or reads a JSON file when name
// is a path (contains a slash or ends in .json).
func Load(name string) (*Profile, error) {
	var data []byte
	var err error
	if strings.ContainsRune(name, '/') || strings.HasSuffix(name, ".json") {
		data, err = os.ReadFile(name)
	} else {
		data, err = shipped.ReadFile(path.Clean(name) + ".json")
		if err != nil {
			return nil, fmt.Errorf("profiles: no shipped profile %q (have %s; or give a path to a JSON file)", name, strings.Join(Names(), ", "))
		}
	}
	if err != nil {
		return nil, fmt.Errorf("profiles: %w", err)
	}
	p, err := Parse(data)
	if err != nil {
		return nil, fmt.Errorf("profiles: %s: %w", name, err)
	}
	return p, nil
}

// Tier returns the named tier (the first when name is empty).
func (p *Profile) Tier(name string) (*Tier, error) {
	if name == "" {
		return &p.Tiers[0], nil
	}
	var names []string
	for i := range p.Tiers {
		if p.Tiers[i].Name == name {
			return &p.Tiers[i], nil
		}
		names = append(names, p.Tiers[i].Name)
	}
	return nil, fmt.Errorf("profile %s has no tier %q (have %s)", p.Name, name, strings.Join(names, ", "))
}

// Marshal renders a profile as indented JSON.
func (p *Profile) Marshal() ([]byte, error) {
	b, err := json.MarshalIndent(p, "", "  ")
	if err != nil {
		return nil, err
	}
	return append(b, '\n'), nil
}
