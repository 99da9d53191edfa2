package model

import (
	"errors"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestParseHFConfig(t *testing.T) {
	cases := []struct {
		name string
		json string
		want func(*Config) bool
		err  string
	}{
		{"llama2", `{"architectures":["LlamaForCausalLM"],"hidden_size":4096,"num_hidden_layers":32,"num_attention_heads":32,"intermediate_size":11008,"vocab_size":32000,"max_position_embeddings":4096,"rms_norm_eps":1e-5,"torch_dtype":"float16"}`,
			func(c *Config) bool {
				return c.Arch == ArchLlama && c.KVHeads == 32 && c.HeadDim == 128 && c.RopeTheta == 10000 && !c.QKVBias
			}, ""},
		{"llama3 scaling", `{"architectures":["LlamaForCausalLM"],"hidden_size":4096,"num_hidden_layers":32,"num_attention_heads":32,"num_key_value_heads":8,"intermediate_size":14336,"vocab_size":128256,"max_position_embeddings":131072,"rms_norm_eps":1e-5,"rope_theta":500000,"rope_scaling":{"factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192,"rope_type":"llama3"},"torch_dtype":"bfloat16"}`,
			func(c *Config) bool {
				return c.KVHeads == 8 && c.RopeScaling.Type == "llama3" && c.RopeScaling.OriginalMaxPositions == 8192 && c.DType == "bfloat16"
			}, ""},
		{"linear legacy type", `{"architectures":["MistralForCausalLM"],"hidden_size":64,"num_hidden_layers":2,"num_attention_heads":4,"intermediate_size":128,"vocab_size":100,"max_position_embeddings":64,"rms_norm_eps":1e-5,"rope_scaling":{"type":"linear","factor":2.0}}`,
			func(c *Config) bool {
				return c.Arch == ArchMistral && c.RopeScaling.Type == "linear" && c.RopeScaling.Factor == 2
			}, ""},
		{"qwen2 bias", `{"architectures":["Qwen2ForCausalLM"],"hidden_size":3584,"num_hidden_layers":28,"num_attention_heads":28,"num_key_value_heads":4,"intermediate_size":18944,"vocab_size":152064,"max_position_embeddings":32768,"rms_norm_eps":1e-6,"rope_theta":1000000.0,"torch_dtype":"bfloat16"}`,
			func(c *Config) bool { return c.Arch == ArchQwen2 && c.QKVBias && !c.OBias && c.HeadDim == 128 }, ""},
		{"opt", `{"architectures":["OPTForCausalLM"],"hidden_size":7168,"num_hidden_layers":48,"num_attention_heads":56,"ffn_dim":28672,"vocab_size":50272,"max_position_embeddings":2048,"do_layer_norm_before":true,"word_embed_proj_dim":7168,"torch_dtype":"float16"}`,
			func(c *Config) bool {
				return c.Arch == ArchOPT && c.QKVBias && c.Norm == "layernorm" && c.TieEmbeddings && !c.UsesRope()
			}, ""},
		{"unknown arch", `{"architectures":["GPT2LMHeadModel"]}`, nil, "not supported"},
		{"bad json", `{`, nil, "bad config"},
		{"heads mismatch", `{"architectures":["LlamaForCausalLM"],"hidden_size":64,"num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":3,"intermediate_size":128,"vocab_size":100,"max_position_embeddings":64,"rms_norm_eps":1e-5}`, nil, "multiple"},
		{"bad rope", `{"architectures":["LlamaForCausalLM"],"hidden_size":64,"num_hidden_layers":2,"num_attention_heads":4,"intermediate_size":128,"vocab_size":100,"max_position_embeddings":64,"rms_norm_eps":1e-5,"rope_scaling":{"rope_type":"yarn","factor":4}}`, nil, "yarn"},
		{"opt-350m", `{"architectures":["OPTForCausalLM"],"hidden_size":1024,"num_hidden_layers":24,"num_attention_heads":16,"ffn_dim":4096,"vocab_size":50272,"max_position_embeddings":2048,"do_layer_norm_before":false,"word_embed_proj_dim":512}`, nil, "do_layer_norm_before"},
		{"bad dtype", `{"architectures":["LlamaForCausalLM"],"hidden_size":64,"num_hidden_layers":2,"num_attention_heads":4,"intermediate_size":128,"vocab_size":100,"max_position_embeddings":64,"rms_norm_eps":1e-5,"torch_dtype":"int8"}`, nil, "int8"},
	}
	for _, c := range cases {
		got, err := ParseHFConfig([]byte(c.json))
		if c.err != "" {
			if err == nil || !errors.Is(err, ErrConfig) || !strings.Contains(err.Error(), c.err) {
				t.Errorf("%s: err = %v, want one mentioning %q", c.name, err, c.err)
			}
			continue
		}
		if err != nil {
			t.Errorf("%s: %v", c.name, err)
			continue
		}
		if !c.want(got) {
			t.Errorf("%s: parsed %+v", c.name, got)
		}
	}
}

func TestPresetsRoundTripThroughHFJSON(t *testing.T) {
	for _, name := range PresetNames() {
		c, _ := Preset(name)
		j, err := c.HFJSON()
		if err != nil {
			t.Fatal(err)
		}
		back, err := ParseHFConfig(j)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if back.ArchFingerprint() != c.ArchFingerprint() {
			t.Fatalf("%s: config.json round trip changed the model: %+v vs %+v", name, back, c)
		}
	}
}

func TestPlanRatios(t *testing.T) {
	cases := map[string]float64{"llama2-7b": 0.5, "llama3-8b": 2, "qwen2.5-7b": 3.5, "opt-30b": 0.5}
	for name, ratio := range cases {
		c, _ := Preset(name)
		if got := float64(c.HiddenRowBytes()) / float64(c.KVRowBytes()); got != ratio {
			t.Errorf("%s: hidden/KV = %v, want %v", name, got, ratio)
		}
	}
	c, _ := Preset("llama2-7b")
	if c.HiddenRowBytes() != 8192 {
		t.Fatalf("llama2-7b hidden row %d bytes, want 8192", c.HiddenRowBytes())
	}
}

func TestInvFreqLlama3Scaling(t *testing.T) {
	// transformers' llama3 rule: wavelengths under original/high_freq keep
	// their frequency, over original/low_freq are divided by factor, and the
	// band between is interpolated.
	c, _ := Preset("llama3-8b")
	f := c.InvFreq()
	band := 0
	for i := range f {
		unscaled := 1 / math.Pow(500000, float64(2*i)/128)
		wavelen := 2 * math.Pi / unscaled
		got := float64(f[i])
		switch {
		case wavelen < 8192.0/4:
			if math.Abs(got-unscaled) > 1e-6*unscaled {
				t.Errorf("inv_freq[%d] = %v, want unscaled %v", i, got, unscaled)
			}
		case wavelen > 8192.0/1:
			if math.Abs(got-unscaled/8) > 1e-6*unscaled {
				t.Errorf("inv_freq[%d] = %v, want %v / 8", i, got, unscaled)
			}
		default:
			band++
			if got <= unscaled/8 || got >= unscaled {
				t.Errorf("inv_freq[%d] = %v not between %v and %v", i, got, unscaled/8, unscaled)
			}
		}
		if i > 0 && f[i] > f[i-1] {
			t.Errorf("inv_freq not decreasing at %d", i)
		}
	}
	if band == 0 {
		t.Fatal("no frequency fell in the interpolated band")
	}
	lin, _ := Preset("tiny-linear-rope")
	if got, want := lin.InvFreq()[1], float32(1/math.Pow(10000, 2.0/16)/4); math.Abs(float64(got-want)) > 1e-7 {
		t.Fatalf("linear scaling: %v, want %v", got, want)
	}
}

func TestSafetensorsRoundTripAndErrors(t *testing.T) {
	dir := t.TempDir()
	c, _ := Preset("tiny-qwen2")
	w := Synthesize(c, 7)
	if err := WriteModel(dir, c, w); err != nil {
		t.Fatal(err)
	}
	c2, err := LoadConfig(dir)
	if err != nil {
		t.Fatal(err)
	}
	w2, err := LoadWeights(dir, c2, WeightsAll)
	if err != nil {
		t.Fatal(err)
	}
	if string(Fingerprint(c, w)) != string(Fingerprint(c2, w2)) {
		t.Fatal("fingerprint changed through safetensors")
	}
	for i := range w.Layers {
		if !equalF32(w.Layers[i].Wq, w2.Layers[i].Wq) || !equalF32(w.Layers[i].Bk, w2.Layers[i].Bk) {
			t.Fatalf("layer %d tensors changed through safetensors", i)
		}
	}
	kvOnly, err := LoadWeights(dir, c2, WeightsKV)
	if err != nil {
		t.Fatal(err)
	}
	if kvOnly.Layers[0].Wq != nil || kvOnly.Layers[0].Wk == nil || kvOnly.Embed != nil {
		t.Fatal("WeightsKV read more (or less) than the K/V tensors")
	}
	// Another seed gives another fingerprint.
	if string(Fingerprint(c, Synthesize(c, 8))) == string(Fingerprint(c, w)) {
		t.Fatal("different weights, same fingerprint")
	}
	// Damaged files give clear errors.
	st := filepath.Join(dir, "model.safetensors")
	data, _ := os.ReadFile(st)
	bad := []struct {
		name string
		data []byte
		want string
	}{
		{"huge header", append([]byte{0xff, 0xff, 0xff, 0xff, 0xff, 0, 0, 0}, data[8:]...), "header of"},
		{"truncated", data[:len(data)/2], "data"},
		{"garbage json", append([]byte{64, 0, 0, 0, 0, 0, 0, 0}, []byte(strings.Repeat("x", 64))...), "JSON"},
	}
	for _, b := range bad {
		os.WriteFile(st, b.data, 0o644)
		_, err := LoadWeights(dir, c2, WeightsAll)
		if err == nil || !strings.Contains(err.Error(), b.want) {
			t.Errorf("%s: err = %v, want one mentioning %q", b.name, err, b.want)
		}
	}
}

func TestShardedSafetensors(t *testing.T) {
	dir := t.TempDir()
	c, _ := Preset("tiny-llama")
	w := Synthesize(c, 3)
	var a, b []Tensor
	idx := `{"weight_map":{`
	for i, sp := range c.specs(w) {
		t := Tensor{Name: sp.name, Shape: sp.shape, Data: *sp.dst}
		file := "model-00001-of-00002.safetensors"
		if i%2 == 1 {
			b = append(b, t)
			file = "model-00002-of-00002.safetensors"
		} else {
			a = append(a, t)
		}
		if i > 0 {
			idx += ","
		}
		idx += `"` + sp.name + `":"` + file + `"`
	}
	idx += "}}"
	WriteSafetensors(filepath.Join(dir, "model-00001-of-00002.safetensors"), "F16", a)
	WriteSafetensors(filepath.Join(dir, "model-00002-of-00002.safetensors"), "F16", b)
	os.WriteFile(filepath.Join(dir, "model.safetensors.index.json"), []byte(idx), 0o644)
	w2, err := LoadWeights(dir, c, WeightsAll)
	if err != nil {
		t.Fatal(err)
	}
	if string(Fingerprint(c, w)) != string(Fingerprint(c, w2)) || !equalF32(w.Layers[3].Wdown, w2.Layers[3].Wdown) {
		t.Fatal("sharded load differs")
	}
}

func equalF32(a, b []float32) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if math.Float32bits(a[i]) != math.Float32bits(b[i]) {
			return false
		}
	}
	return true
}

// TestMLAPlanOnly: DeepSeek-V3's shape is found by Preset but is not a
// runnable preset; its cache row is the 512-value latent and the 64-value
// rotary key, 12.4x smaller than its hidden row; the forward pass refuses
// it; an MLA shape without the architecture (or the reverse) is refused.
func TestMLAPlanOnly(t *testing.T) {
	c, err := Preset("deepseek-v3")
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range PresetNames() {
		if n == "deepseek-v3" {
			t.Fatal("deepseek-v3 is listed among the runnable presets")
		}
	}
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	if got := c.KVRowBytes(); got != (512+64)*2 {
		t.Fatalf("MLA cache row %d bytes, want %d", got, (512+64)*2)
	}
	if r := float64(c.HiddenRowBytes()) / float64(c.KVRowBytes()); r < 12 || r > 12.5 {
		t.Errorf("hidden/latent = %.2f, want about 12.4", r)
	}
	if _, err := New(c, &Weights{}); err == nil || !strings.Contains(err.Error(), "no forward pass") {
		t.Errorf("New(deepseek-v3) = %v, want a refusal naming the missing forward pass", err)
	}
	l, _ := Preset("llama2-7b")
	l.MLA = c.MLA
	if err := l.Validate(); err == nil {
		t.Error("a llama config with MLA dimensions validates")
	}
	d := *c
	d.MLA = nil
	if err := d.Validate(); err == nil {
		t.Error("deepseek_v3 without MLA dimensions validates")
	}
	a, _ := Preset("deepseek-v3")
	a.MLA.KVLoraRank = 256
	if b, _ := Preset("deepseek-v3"); b.MLA.KVLoraRank != 512 || a.ArchFingerprint() == b.ArchFingerprint() {
		t.Error("Preset shares its MLA dimensions between callers, or the fingerprint ignores them")
	}
}
