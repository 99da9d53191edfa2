package model

import (
	"fmt"
	"math"
	"math/rand"
	"os"
	"path/filepath"
	"strings"
)

// LayerWeights are one decoder layer's tensors, as float32 in the Hugging
// Face [out, in] layout. Bias and norm-bias fields are nil where the
// architecture has none.
type LayerWeights struct {
	AttnNormW, AttnNormB []float32
	Wq, Wk, Wv, Wo       []float32
	Bq, Bk, Bv, Bo       []float32
	MLPNormW, MLPNormB   []float32
	Wgate, Wup, Wdown    []float32 // llama-style MLP
	Fc1, Fc1B, Fc2, Fc2B []float32 // OPT MLP
}

// Weights are a model's tensors.
type Weights struct {
	Embed      []float32 // [vocab, hidden]
	PosEmbed   []float32 // OPT: [max_positions + 2, hidden]
	FinalNormW []float32
	FinalNormB []float32
	LMHead     []float32 // [vocab, hidden]; = Embed when tied
	Layers     []LayerWeights
}

// WeightSet selects which tensors to read.
type WeightSet int

// Weight sets.
const (
	WeightsAll WeightSet = iota // everything the forward pass needs
	WeightsKV                   // pre-attention norms and K/V projections: what a restore needs
)

// tensorName gives the Hugging Face name of a tensor.
type tensorSpec struct {
	name  string
	shape []int64
	dst   *[]float32
	kv    bool // part of WeightsKV
}

func (c *Config) specs(w *Weights) []tensorSpec {
	d, q, kv, im := int64(c.HiddenSize), int64(c.Heads*c.HeadDim), int64(c.KVDim()), int64(c.Intermediate)
	v := int64(c.Vocab)
	var s []tensorSpec
	add := func(name string, dst *[]float32, kvSet bool, shape ...int64) {
		s = append(s, tensorSpec{name, shape, dst, kvSet})
	}
	if len(w.Layers) != c.Layers {
		w.Layers = make([]LayerWeights, c.Layers)
	}
	if c.Arch == ArchOPT {
		add("model.decoder.embed_tokens.weight", &w.Embed, false, v, d)
		add("model.decoder.embed_positions.weight", &w.PosEmbed, false, int64(c.MaxPositions)+2, d)
		add("model.decoder.final_layer_norm.weight", &w.FinalNormW, false, d)
		add("model.decoder.final_layer_norm.bias", &w.FinalNormB, false, d)
		if !c.TieEmbeddings {
			add("lm_head.weight", &w.LMHead, false, v, d)
		}
		for i := range w.Layers {
			l := &w.Layers[i]
			p := fmt.Sprintf("model.decoder.layers.%d.", i)
			add(p+"self_attn_layer_norm.weight", &l.AttnNormW, true, d)
			add(p+"self_attn_layer_norm.bias", &l.AttnNormB, true, d)
			add(p+"self_attn.q_proj.weight", &l.Wq, false, q, d)
			add(p+"self_attn.k_proj.weight", &l.Wk, true, kv, d)
			add(p+"self_attn.v_proj.weight", &l.Wv, true, kv, d)
			add(p+"self_attn.out_proj.weight", &l.Wo, false, d, q)
			if c.QKVBias {
				add(p+"self_attn.q_proj.bias", &l.Bq, false, q)
				add(p+"self_attn.k_proj.bias", &l.Bk, true, kv)
				add(p+"self_attn.v_proj.bias", &l.Bv, true, kv)
				add(p+"self_attn.out_proj.bias", &l.Bo, false, d)
				add(p+"fc1.bias", &l.Fc1B, false, im)
				add(p+"fc2.bias", &l.Fc2B, false, d)
			}
			add(p+"final_layer_norm.weight", &l.MLPNormW, false, d)
			add(p+"final_layer_norm.bias", &l.MLPNormB, false, d)
			add(p+"fc1.weight", &l.Fc1, false, im, d)
			add(p+"fc2.weight", &l.Fc2, false, d, im)
		}
		return s
	}
	add("model.embed_tokens.weight", &w.Embed, false, v, d)
	add("model.norm.weight", &w.FinalNormW, false, d)
	if !c.TieEmbeddings {
		add("lm_head.weight", &w.LMHead, false, v, d)
	}
	for i := range w.Layers {
		l := &w.Layers[i]
		p := fmt.Sprintf("model.layers.%d.", i)
		add(p+"input_layernorm.weight", &l.AttnNormW, true, d)
		add(p+"self_attn.q_proj.weight", &l.Wq, false, q, d)
		add(p+"self_attn.k_proj.weight", &l.Wk, true, kv, d)
		add(p+"self_attn.v_proj.weight", &l.Wv, true, kv, d)
		add(p+"self_attn.o_proj.weight", &l.Wo, false, d, q)
		if c.QKVBias {
			add(p+"self_attn.q_proj.bias", &l.Bq, false, q)
			add(p+"self_attn.k_proj.bias", &l.Bk, true, kv)
			add(p+"self_attn.v_proj.bias", &l.Bv, true, kv)
		}
		if c.OBias {
			add(p+"self_attn.o_proj.bias", &l.Bo, false, d)
		}
		add(p+"post_attention_layernorm.weight", &l.MLPNormW, false, d)
		add(p+"mlp.gate_proj.weight", &l.Wgate, false, im, d)
		add(p+"mlp.up_proj.weight", &l.Wup, false, im, d)
		add(p+"mlp.down_proj.weight", &l.Wdown, false, d, im)
	}
	return s
}

// LoadWeights reads the tensors of set from a model directory.
func LoadWeights(dir string, c *Config, set WeightSet) (*Weights, error) {
	ts, err := OpenTensors(dir)
	if err != nil {
		return nil, err
	}
	defer ts.Close()
	w := &Weights{}
	for _, sp := range c.specs(w) {
		if set == WeightsKV && !sp.kv {
			continue
		}
		v, err := ts.Read(sp.name, sp.shape...)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", dir, err)
		}
		*sp.dst = v
	}
	if set == WeightsAll && c.TieEmbeddings {
		w.LMHead = w.Embed
	}
	return w, nil
}

// Synthesize makes seeded random weights for c, rounded to its dtype (so
// what is written is exactly what is loaded back).
func Synthesize(c *Config, seed int64) *Weights {
	rng := rand.New(rand.NewSource(seed))
	w := &Weights{}
	round := roundFunc(c.DType)
	for _, sp := range c.specs(w) {
		n := int64(1)
		for _, d := range sp.shape {
			n *= d
		}
		v := make([]float32, n)
		switch {
		case len(sp.shape) == 1 && (strings.Contains(sp.name, "norm.weight") || strings.Contains(sp.name, "layernorm.weight")):
			for i := range v {
				v[i] = round(1 + 0.1*float32(rng.NormFloat64()))
			}
		case len(sp.shape) == 1:
			for i := range v {
				v[i] = round(0.02 * float32(rng.NormFloat64()))
			}
		default:
			std := float32(1 / math.Sqrt(float64(sp.shape[1])))
			if strings.Contains(sp.name, "embed") {
				std = 1
			}
			for i := range v {
				v[i] = round(std * float32(rng.NormFloat64()))
			}
		}
		*sp.dst = v
	}
	if c.TieEmbeddings {
		w.LMHead = w.Embed
	}
	return w
}

// WriteModel writes c and w as a Hugging Face directory (config.json and
// model.safetensors).
func WriteModel(dir string, c *Config, w *Weights) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	cj, err := c.HFJSON()
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "config.json"), cj, 0o644); err != nil {
		return err
	}
	var ts []Tensor
	for _, sp := range c.specs(w) {
		ts = append(ts, Tensor{Name: sp.name, Shape: sp.shape, Data: *sp.dst})
	}
	return WriteSafetensors(filepath.Join(dir, "model.safetensors"), STDType(c.DType), ts)
}

// roundFunc returns the rounding to a dtype.
func roundFunc(dtype string) func(float32) float32 {
	switch dtype {
	case "float16":
		return roundF16
	case "bfloat16":
		return roundBF16
	}
	return func(f float32) float32 { return f }
}
