package model

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/hcache/hcache/internal/half"
)

// Arch is a model family.
type Arch string

// Supported architectures.
const (
	ArchLlama   Arch = "llama"   // LlamaForCausalLM, MistralForCausalLM
	ArchQwen2   Arch = "qwen2"   // Qwen2ForCausalLM (q/k/v biases)
	ArchOPT     Arch = "opt"     // OPTForCausalLM (biases, learned positions, LayerNorm, ReLU)
	ArchMistral Arch = "mistral" // as llama
	// ArchDeepSeekV3 is multi-head latent attention (DeepSeek-V3): its
	// states are described and planned (store the latent), but there is no
	// forward pass for it yet: New refuses it.
	ArchDeepSeekV3 Arch = "deepseek_v3"
)

// MLA is the shape of multi-head latent attention: per token and layer the
// cache holds a compressed latent of KVLoraRank values and one rotary key of
// QKRopeDim values shared by every head; K (nope part) and V are rebuilt
// from the latent by the kv_b projection (or absorbed into the query and
// output projections, as vLLM does).
type MLA struct {
	QLoraRank  int // the query's low-rank dimension
	KVLoraRank int // the latent stored per token (512 for DeepSeek-V3)
	QKNopeDim  int // per head, the part of q/k without rope
	QKRopeDim  int // per token, the rotary key shared by the heads (64)
	VHeadDim   int // per head
}

// RopeScaling is the rope_scaling block of config.json.
type RopeScaling struct {
	Type                 string  `json:"rope_type"` // "" (none), "linear", "llama3"
	Factor               float64 `json:"factor"`
	LowFreqFactor        float64 `json:"low_freq_factor"`
	HighFreqFactor       float64 `json:"high_freq_factor"`
	OriginalMaxPositions int     `json:"original_max_position_embeddings"`
}

// Config is what hcache needs of a model.
type Config struct {
	Arch              Arch
	HiddenSize        int
	Layers            int
	Heads             int
	KVHeads           int
	HeadDim           int
	Intermediate      int
	Vocab             int
	MaxPositions      int
	RopeTheta         float64
	RopeScaling       RopeScaling
	RotaryInterleaved bool   // pairs (2i, 2i+1) instead of rotate-half
	QKVBias           bool   // q/k/v projections have biases
	OBias             bool   // o_proj has a bias
	MLPBias           bool   // MLP projections have biases
	Norm              string // "rms" or "layernorm"
	NormEps           float64
	DType             string // "float16", "bfloat16" or "float32"
	TieEmbeddings     bool
	// MLA is set for multi-head latent attention (ArchDeepSeekV3) only:
	// a "KV" row is then the latent and the rotary key.
	MLA *MLA
}

// hfConfig mirrors the fields of a Hugging Face config.json that matter.
type hfConfig struct {
	Architectures         []string        `json:"architectures"`
	ModelType             string          `json:"model_type"`
	HiddenSize            int             `json:"hidden_size"`
	NumHiddenLayers       int             `json:"num_hidden_layers"`
	NumAttentionHeads     int             `json:"num_attention_heads"`
	NumKeyValueHeads      int             `json:"num_key_value_heads"`
	HeadDim               int             `json:"head_dim"`
	IntermediateSize      int             `json:"intermediate_size"`
	FFNDim                int             `json:"ffn_dim"`
	VocabSize             int             `json:"vocab_size"`
	MaxPositionEmbeddings int             `json:"max_position_embeddings"`
	RopeTheta             float64         `json:"rope_theta"`
	RopeScaling           json.RawMessage `json:"rope_scaling"`
	RMSNormEps            float64         `json:"rms_norm_eps"`
	LayerNormEps          float64         `json:"layer_norm_eps"`
	TorchDType            string          `json:"torch_dtype"`
	AttentionBias         *bool           `json:"attention_bias"`
	MLPBias               bool            `json:"mlp_bias"`
	TieWordEmbeddings     *bool           `json:"tie_word_embeddings"`
	HiddenAct             string          `json:"hidden_act"`
	ActivationFunction    string          `json:"activation_function"`
	DoLayerNormBefore     *bool           `json:"do_layer_norm_before"`
	WordEmbedProjDim      int             `json:"word_embed_proj_dim"`
	EnableBias            *bool           `json:"enable_bias"`
	RotaryInterleaved     bool            `json:"rotary_interleaved"` // hcache extension
}

// ErrConfig is wrapped by every configuration error.
var ErrConfig = errors.New("model: bad config")

// ParseHFConfig parses a Hugging Face config.json.
func ParseHFConfig(data []byte) (*Config, error) {
	var h hfConfig
	if err := json.Unmarshal(data, &h); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrConfig, err)
	}
	arch := ""
	if len(h.Architectures) > 0 {
		arch = h.Architectures[0]
	}
	c := &Config{
		HiddenSize: h.HiddenSize, Layers: h.NumHiddenLayers, Heads: h.NumAttentionHeads, KVHeads: h.NumKeyValueHeads,
		HeadDim: h.HeadDim, Intermediate: h.IntermediateSize, Vocab: h.VocabSize, MaxPositions: h.MaxPositionEmbeddings,
		RopeTheta: h.RopeTheta, RotaryInterleaved: h.RotaryInterleaved, DType: h.TorchDType, MLPBias: h.MLPBias,
	}
	switch arch {
	case "LlamaForCausalLM", "MistralForCausalLM":
		c.Arch = ArchLlama
		if arch == "MistralForCausalLM" {
			c.Arch = ArchMistral
		}
		c.Norm, c.NormEps = "rms", h.RMSNormEps
		if h.AttentionBias != nil && *h.AttentionBias {
			c.QKVBias, c.OBias = true, true
		}
		c.TieEmbeddings = h.TieWordEmbeddings != nil && *h.TieWordEmbeddings
		if h.HiddenAct != "" && h.HiddenAct != "silu" {
			return nil, fmt.Errorf("%w: hidden_act %q (this build runs silu)", ErrConfig, h.HiddenAct)
		}
		if h.MLPBias {
			return nil, fmt.Errorf("%w: mlp_bias is not supported", ErrConfig)
		}
	case "Qwen2ForCausalLM":
		c.Arch = ArchQwen2
		c.Norm, c.NormEps = "rms", h.RMSNormEps
		c.QKVBias = true
		c.TieEmbeddings = h.TieWordEmbeddings != nil && *h.TieWordEmbeddings
		if h.HiddenAct != "" && h.HiddenAct != "silu" {
			return nil, fmt.Errorf("%w: hidden_act %q (this build runs silu)", ErrConfig, h.HiddenAct)
		}
	case "OPTForCausalLM":
		c.Arch = ArchOPT
		c.Norm, c.NormEps = "layernorm", 1e-5
		c.KVHeads = c.Heads
		c.Intermediate = h.FFNDim
		c.QKVBias, c.OBias, c.MLPBias = true, true, true
		if h.EnableBias != nil && !*h.EnableBias {
			c.QKVBias, c.OBias, c.MLPBias = false, false, false
		}
		c.TieEmbeddings = h.TieWordEmbeddings == nil || *h.TieWordEmbeddings
		if h.DoLayerNormBefore != nil && !*h.DoLayerNormBefore {
			return nil, fmt.Errorf("%w: OPT with do_layer_norm_before=false (opt-350m) is not supported", ErrConfig)
		}
		if h.WordEmbedProjDim != 0 && h.WordEmbedProjDim != h.HiddenSize {
			return nil, fmt.Errorf("%w: OPT word_embed_proj_dim %d != hidden_size %d is not supported", ErrConfig, h.WordEmbedProjDim, h.HiddenSize)
		}
		if h.ActivationFunction != "" && h.ActivationFunction != "relu" {
			return nil, fmt.Errorf("%w: OPT activation_function %q (this build runs relu)", ErrConfig, h.ActivationFunction)
		}
	case "":
		return nil, fmt.Errorf("%w: no architectures entry", ErrConfig)
	default:
		return nil, fmt.Errorf("%w: architecture %q is not supported (Llama, Mistral, Qwen2, OPT are)", ErrConfig, arch)
	}
	if c.KVHeads == 0 {
		c.KVHeads = c.Heads
	}
	if c.HeadDim == 0 && c.Heads > 0 {
		c.HeadDim = c.HiddenSize / c.Heads
	}
	if c.Arch != ArchOPT && c.RopeTheta == 0 {
		c.RopeTheta = 10000
	}
	if c.DType == "" {
		c.DType = "float16"
	}
	if len(h.RopeScaling) > 0 && string(h.RopeScaling) != "null" {
		var rs struct {
			RopeScaling
			Type string `json:"type"`
		}
		if err := json.Unmarshal(h.RopeScaling, &rs); err != nil {
			return nil, fmt.Errorf("%w: rope_scaling: %v", ErrConfig, err)
		}
		c.RopeScaling = rs.RopeScaling
		if c.RopeScaling.Type == "" {
			c.RopeScaling.Type = rs.Type
		}
		if c.RopeScaling.Type == "" {
			return nil, fmt.Errorf("%w: rope_scaling names no rope_type (or type): %s", ErrConfig, h.RopeScaling)
		}
		if c.RopeScaling.Type == "default" {
			c.RopeScaling = RopeScaling{}
		}
	}
	if err := c.Validate(); err != nil {
		return nil, err
	}
	return c, nil
}

// LoadConfig reads dir/config.json.
func LoadConfig(dir string) (*Config, error) {
	data, err := os.ReadFile(filepath.Join(dir, "config.json"))
	if err != nil {
		return nil, fmt.Errorf("model: %w", err)
	}
	c, err := ParseHFConfig(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", filepath.Join(dir, "config.json"), err)
	}
	return c, nil
}

// Limits on configurations.
const (
	MaxHidden = 1 << 16
	MaxLayers = 1024
	MaxVocab  = 1 << 21
)

// Validate checks the configuration's consistency.
func (c *Config) Validate() error {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%w: "+format, append([]any{ErrConfig}, args...)...)
	}
	switch {
	case c.HiddenSize <= 0 || c.HiddenSize > MaxHidden:
		return bad("hidden_size %d not in [1, %d]", c.HiddenSize, MaxHidden)
	case c.Layers <= 0 || c.Layers > MaxLayers:
		return bad("num_hidden_layers %d not in [1, %d]", c.Layers, MaxLayers)
	case c.Heads <= 0 || c.KVHeads <= 0 || c.Heads%c.KVHeads != 0:
		return bad("num_attention_heads %d must be a positive multiple of num_key_value_heads %d", c.Heads, c.KVHeads)
	case c.HeadDim <= 0 || c.HeadDim%2 != 0:
		return bad("head_dim %d must be positive and even", c.HeadDim)
	case c.Intermediate <= 0:
		return bad("intermediate size %d must be positive", c.Intermediate)
	case c.Vocab <= 0 || c.Vocab > MaxVocab:
		return bad("vocab_size %d not in [1, %d]", c.Vocab, MaxVocab)
	case c.MaxPositions <= 0:
		return bad("max_position_embeddings %d must be positive", c.MaxPositions)
	case c.NormEps <= 0 || c.NormEps > 1e-2:
		return bad("norm epsilon %v not in (0, 1e-2]", c.NormEps)
	}
	switch c.DType {
	case "float16", "bfloat16", "float32":
	default:
		return bad("torch_dtype %q (want float16, bfloat16 or float32)", c.DType)
	}
	if (c.Arch == ArchDeepSeekV3) != (c.MLA != nil) {
		return bad("architecture %q with MLA dimensions %v: multi-head latent attention is deepseek_v3's, and deepseek_v3 needs them", c.Arch, c.MLA != nil)
	}
	if m := c.MLA; m != nil && (m.QLoraRank <= 0 || m.KVLoraRank <= 0 || m.QKNopeDim <= 0 || m.QKRopeDim <= 0 || m.QKRopeDim%2 != 0 || m.VHeadDim <= 0) {
		return bad("MLA dimensions %+v must be positive (rope even)", *m)
	}
	if c.Arch != ArchOPT {
		if c.RopeTheta <= 0 || math.IsInf(c.RopeTheta, 0) || math.IsNaN(c.RopeTheta) {
			return bad("rope_theta %v must be positive", c.RopeTheta)
		}
		switch c.RopeScaling.Type {
		case "":
			if c.RopeScaling != (RopeScaling{}) {
				return bad("rope_scaling %+v has no type", c.RopeScaling)
			}
		case "linear":
			if c.RopeScaling.Factor < 1 {
				return bad("linear rope_scaling factor %v < 1", c.RopeScaling.Factor)
			}
		case "llama3":
			rs := c.RopeScaling
			if rs.Factor < 1 || rs.LowFreqFactor <= 0 || rs.HighFreqFactor <= rs.LowFreqFactor || rs.OriginalMaxPositions <= 0 {
				return bad("llama3 rope_scaling %+v is inconsistent", rs)
			}
		default:
			return bad("rope_scaling type %q (none, linear and llama3 are supported)", c.RopeScaling.Type)
		}
	}
	return nil
}

// ElemBytes is the size of one stored value (the model dtype).
func (c *Config) ElemBytes() int {
	if c.DType == "float32" {
		return 4
	}
	return 2
}

// HiddenRowBytes is one token's hidden state in one layer.
func (c *Config) HiddenRowBytes() int { return c.HiddenSize * c.ElemBytes() }

// KVRowBytes is one token's K and V in one layer (for MLA, its latent and
// rotary key: what the cache holds).
func (c *Config) KVRowBytes() int {
	if c.MLA != nil {
		return (c.MLA.KVLoraRank + c.MLA.QKRopeDim) * c.ElemBytes()
	}
	return 2 * c.KVHeads * c.HeadDim * c.ElemBytes()
}

// KVDim is kv_heads x head_dim.
func (c *Config) KVDim() int { return c.KVHeads * c.HeadDim }

// UsesRope reports whether K is rotated (all but OPT).
func (c *Config) UsesRope() bool { return c.Arch != ArchOPT }

// ArchFingerprint hashes the fields that decide what a stored row means:
// architecture, dimensions, dtype, norm, rope settings and layout.
func (c *Config) ArchFingerprint() [32]byte {
	s := fmt.Sprintf("hcache arch v1|%s|h%d|l%d|qh%d|kvh%d|hd%d|i%d|v%d|dt%s|norm%s:%g|rope%g:%s:%g:%g:%g:%d|il%v|bias%v%v%v|tie%v",
		c.Arch, c.HiddenSize, c.Layers, c.Heads, c.KVHeads, c.HeadDim, c.Intermediate, c.Vocab, c.DType, c.Norm, c.NormEps,
		c.RopeTheta, c.RopeScaling.Type, c.RopeScaling.Factor, c.RopeScaling.LowFreqFactor, c.RopeScaling.HighFreqFactor,
		c.RopeScaling.OriginalMaxPositions, c.RotaryInterleaved, c.QKVBias, c.OBias, c.MLPBias, c.TieEmbeddings)
	if m := c.MLA; m != nil {
		s += fmt.Sprintf("|mla%d:%d:%d:%d:%d", m.QLoraRank, m.KVLoraRank, m.QKNopeDim, m.QKRopeDim, m.VHeadDim)
	}
	return sha256.Sum256([]byte(s))
}

// Fingerprint is the model identity the store binds states to: the
// architecture fingerprint and a hash of the K/V projection weights, biases
// and pre-attention norms, which are everything a restore computes with.
func Fingerprint(c *Config, w *Weights) []byte {
	h := sha256.New()
	a := c.ArchFingerprint()
	h.Write(a[:])
	var buf [4]byte
	put := func(v []float32) {
		binary.LittleEndian.PutUint32(buf[:], uint32(len(v)))
		h.Write(buf[:])
		for _, f := range v {
			binary.LittleEndian.PutUint32(buf[:], math.Float32bits(f))
			h.Write(buf[:])
		}
	}
	for _, l := range w.Layers {
		put(l.AttnNormW)
		put(l.AttnNormB)
		put(l.Wk)
		put(l.Bk)
		put(l.Wv)
		put(l.Bv)
	}
	return h.Sum(nil)
}

// ShapeFingerprint identifies a preset's shape alone (for benchmarks that
// store states without weights).
func ShapeFingerprint(c *Config) []byte {
	a := c.ArchFingerprint()
	return a[:]
}

// Presets are built-in model shapes.
var presets = map[string]Config{
	"llama2-7b":  {Arch: ArchLlama, HiddenSize: 4096, Layers: 32, Heads: 32, KVHeads: 32, HeadDim: 128, Intermediate: 11008, Vocab: 32000, MaxPositions: 4096, RopeTheta: 10000, Norm: "rms", NormEps: 1e-5, DType: "float16"},
	"llama2-13b": {Arch: ArchLlama, HiddenSize: 5120, Layers: 40, Heads: 40, KVHeads: 40, HeadDim: 128, Intermediate: 13824, Vocab: 32000, MaxPositions: 4096, RopeTheta: 10000, Norm: "rms", NormEps: 1e-5, DType: "float16"},
	"llama3-8b": {Arch: ArchLlama, HiddenSize: 4096, Layers: 32, Heads: 32, KVHeads: 8, HeadDim: 128, Intermediate: 14336, Vocab: 128256, MaxPositions: 131072, RopeTheta: 500000, Norm: "rms", NormEps: 1e-5, DType: "bfloat16",
		RopeScaling: RopeScaling{Type: "llama3", Factor: 8, LowFreqFactor: 1, HighFreqFactor: 4, OriginalMaxPositions: 8192}},
	"opt-30b":    {Arch: ArchOPT, HiddenSize: 7168, Layers: 48, Heads: 56, KVHeads: 56, HeadDim: 128, Intermediate: 28672, Vocab: 50272, MaxPositions: 2048, Norm: "layernorm", NormEps: 1e-5, DType: "float16", QKVBias: true, OBias: true, MLPBias: true, TieEmbeddings: true},
	"qwen2.5-7b": {Arch: ArchQwen2, HiddenSize: 3584, Layers: 28, Heads: 28, KVHeads: 4, HeadDim: 128, Intermediate: 18944, Vocab: 152064, MaxPositions: 32768, RopeTheta: 1000000, Norm: "rms", NormEps: 1e-6, DType: "bfloat16", QKVBias: true},
	// Tiny shapes for tests and the CPU demo.
	"tiny-llama": {Arch: ArchLlama, HiddenSize: 128, Layers: 4, Heads: 4, KVHeads: 4, HeadDim: 32, Intermediate: 256, Vocab: 256, MaxPositions: 1024, RopeTheta: 10000, Norm: "rms", NormEps: 1e-5, DType: "float16"},
	"tiny-gqa": {Arch: ArchLlama, HiddenSize: 128, Layers: 4, Heads: 8, KVHeads: 2, HeadDim: 16, Intermediate: 256, Vocab: 256, MaxPositions: 4096, RopeTheta: 500000, Norm: "rms", NormEps: 1e-5, DType: "bfloat16",
		RopeScaling: RopeScaling{Type: "llama3", Factor: 8, LowFreqFactor: 1, HighFreqFactor: 4, OriginalMaxPositions: 64}},
	"demo-llama":       {Arch: ArchLlama, HiddenSize: 256, Layers: 6, Heads: 8, KVHeads: 8, HeadDim: 32, Intermediate: 512, Vocab: 512, MaxPositions: 4096, RopeTheta: 10000, Norm: "rms", NormEps: 1e-5, DType: "float16"},
	"tiny-qwen2":       {Arch: ArchQwen2, HiddenSize: 96, Layers: 3, Heads: 6, KVHeads: 2, HeadDim: 16, Intermediate: 192, Vocab: 200, MaxPositions: 1024, RopeTheta: 1000000, Norm: "rms", NormEps: 1e-6, DType: "float16", QKVBias: true},
	"tiny-opt":         {Arch: ArchOPT, HiddenSize: 128, Layers: 3, Heads: 4, KVHeads: 4, HeadDim: 32, Intermediate: 512, Vocab: 256, MaxPositions: 512, Norm: "layernorm", NormEps: 1e-5, DType: "float16", QKVBias: true, OBias: true, MLPBias: true, TieEmbeddings: true},
	"tiny-linear-rope": {Arch: ArchMistral, HiddenSize: 64, Layers: 2, Heads: 4, KVHeads: 4, HeadDim: 16, Intermediate: 128, Vocab: 128, MaxPositions: 1024, RopeTheta: 10000, Norm: "rms", NormEps: 1e-5, DType: "float32", RopeScaling: RopeScaling{Type: "linear", Factor: 4}, RotaryInterleaved: true},
}

// planOnly are shapes the scheduler plans for but the forward pass cannot
// run (no weights can be synthesized or checked for them): not in
// PresetNames, which the device checks and tests run, but found by Preset.
var planOnly = map[string]Config{
	// DeepSeek-V3 (config.json of deepseek-ai/DeepSeek-V3): 61 layers,
	// hidden 7168, 128 heads, MLA with a 512-value latent and a 64-value
	// rotary key per token and layer. The MoE MLP is described by its
	// active width (8 routed + 1 shared experts of 2048 = 18432, the dense
	// layers' width too); yarn rope scaling is left out (not supported).
	"deepseek-v3": {Arch: ArchDeepSeekV3, HiddenSize: 7168, Layers: 61, Heads: 128, KVHeads: 128, HeadDim: 128, Intermediate: 18432, Vocab: 129280,
		MaxPositions: 163840, RopeTheta: 10000, Norm: "rms", NormEps: 1e-6, DType: "bfloat16",
		MLA: &MLA{QLoraRank: 1536, KVLoraRank: 512, QKNopeDim: 128, QKRopeDim: 64, VHeadDim: 128}},
}

// PlanOnlyNames lists the shapes Preset knows that have no forward pass
// (deepseek-v3): for planning.
func PlanOnlyNames() []string {
	var n []string
	for k := range planOnly {
		n = append(n, k)
	}
	sort.Strings(n)
	return n
}

// Preset returns a built-in configuration by name (PresetNames, or a
// plan-only shape of PlanOnlyNames).
func Preset(name string) (*Config, error) {
	if c, ok := planOnly[name]; ok {
		m := *c.MLA
		c.MLA = &m
		return &c, nil
	}
	c, ok := presets[name]
	if !ok {
		return nil, fmt.Errorf("model: unknown preset %q (have %s)", name, strings.Join(PresetNames(), ", "))
	}
	return &c, nil
}

// PresetNames lists the presets.
func PresetNames() []string {
	var n []string
	for k := range presets {
		n = append(n, k)
	}
	sort.Strings(n)
	return n
}

// ParamCount estimates the parameters (for refusing huge synthetic models).
func (c *Config) ParamCount() int64 {
	d, kv, i := int64(c.HiddenSize), int64(c.KVDim()), int64(c.Intermediate)
	mlp := 3 * d * i
	if c.Arch == ArchOPT {
		mlp = 2 * d * i
	}
	per := 2*d*int64(c.Heads*c.HeadDim) + 2*d*kv + mlp
	emb := int64(c.Vocab) * d
	if !c.TieEmbeddings {
		emb *= 2
	}
	return int64(c.Layers)*per + emb
}

// HFJSON renders the configuration as a Hugging Face config.json.
func (c *Config) HFJSON() ([]byte, error) {
	m := map[string]any{
		"hidden_size": c.HiddenSize, "num_hidden_layers": c.Layers, "num_attention_heads": c.Heads,
		"vocab_size": c.Vocab, "max_position_embeddings": c.MaxPositions, "torch_dtype": c.DType,
		"tie_word_embeddings": c.TieEmbeddings,
	}
	switch c.Arch {
	case ArchOPT:
		m["architectures"] = []string{"OPTForCausalLM"}
		m["model_type"] = "opt"
		m["ffn_dim"] = c.Intermediate
		m["do_layer_norm_before"] = true
		m["word_embed_proj_dim"] = c.HiddenSize
		m["activation_function"] = "relu"
		m["enable_bias"] = c.QKVBias
	default:
		arch := map[Arch]string{ArchLlama: "LlamaForCausalLM", ArchMistral: "MistralForCausalLM", ArchQwen2: "Qwen2ForCausalLM"}[c.Arch]
		m["architectures"] = []string{arch}
		m["model_type"] = string(c.Arch)
		m["num_key_value_heads"] = c.KVHeads
		m["head_dim"] = c.HeadDim
		m["intermediate_size"] = c.Intermediate
		m["rope_theta"] = c.RopeTheta
		m["rms_norm_eps"] = c.NormEps
		m["hidden_act"] = "silu"
		if c.Arch == ArchLlama || c.Arch == ArchMistral {
			m["attention_bias"] = c.QKVBias
		}
		if c.RotaryInterleaved {
			m["rotary_interleaved"] = true
		}
		if c.RopeScaling.Type != "" {
			rs := map[string]any{"rope_type": c.RopeScaling.Type, "factor": c.RopeScaling.Factor}
			if c.RopeScaling.Type == "llama3" {
				rs["low_freq_factor"] = c.RopeScaling.LowFreqFactor
				rs["high_freq_factor"] = c.RopeScaling.HighFreqFactor
				rs["original_max_position_embeddings"] = c.RopeScaling.OriginalMaxPositions
			}
			m["rope_scaling"] = rs
		}
	}
	return json.MarshalIndent(m, "", "  ")
}

// InvFreq returns the rotary inverse frequencies (head_dim/2 values) after
// rope scaling, computed as Hugging Face does.
func (c *Config) InvFreq() []float32 {
	half := c.HeadDim / 2
	out := make([]float32, half)
	for i := 0; i < half; i++ {
		// HF: 1.0 / (base ** (arange(0, dim, 2).float() / dim)), in float32.
		exp := float32(2*i) / float32(c.HeadDim)
		f := float32(1 / math.Pow(c.RopeTheta, float64(exp)))
		rs := c.RopeScaling
		switch rs.Type {
		case "linear":
			f /= float32(rs.Factor)
		case "llama3":
			lowWavelen := float64(rs.OriginalMaxPositions) / rs.LowFreqFactor
			highWavelen := float64(rs.OriginalMaxPositions) / rs.HighFreqFactor
			wavelen := 2 * math.Pi / float64(f)
			switch {
			case wavelen < highWavelen:
			case wavelen > lowWavelen:
				f = float32(float64(f) / rs.Factor)
			default:
				smooth := (float64(rs.OriginalMaxPositions)/wavelen - rs.LowFreqFactor) / (rs.HighFreqFactor - rs.LowFreqFactor)
				f = float32((1-smooth)*float64(f)/rs.Factor + smooth*float64(f))
			}
		}
		out[i] = f
	}
	return out
}

// EncodeRow writes values in the model dtype (little-endian).
func (c *Config) EncodeRow(dst []byte, src []float32) {
	switch c.DType {
	case "float32":
		for i, f := range src {
			binary.LittleEndian.PutUint32(dst[4*i:], math.Float32bits(f))
		}
	case "bfloat16":
		for i, f := range src {
			binary.LittleEndian.PutUint16(dst[2*i:], half.BF16FromFloat32(f))
		}
	default:
		half.Encode(dst, src)
	}
}

// DecodeRow reads values stored in the model dtype.
func (c *Config) DecodeRow(dst []float32, src []byte) {
	switch c.DType {
	case "float32":
		for i := range dst {
			dst[i] = math.Float32frombits(binary.LittleEndian.Uint32(src[4*i:]))
		}
	case "bfloat16":
		for i := range dst {
			dst[i] = half.BF16ToFloat32(binary.LittleEndian.Uint16(src[2*i:]))
		}
	default:
		half.Decode(dst, src)
	}
}
