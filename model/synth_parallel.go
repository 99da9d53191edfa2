package model

import (
	"math"
	"math/rand"

	"github.com/hcache/hcache/internal/par"
)

// SynthesizeParallel makes seeded weights of every tensor the forward pass of c
// needs (WeightsAll), each layer and each tensor from its own
// generator, in parallel: what a device recompute of a 7B shape needs,
// in seconds rather than Synthesize's minutes (one generator, one
// core). The tensors and their lengths are Synthesize's (read from a
// one-layer, one-token-vocabulary synthesis of the same config); the values
// are uniform, rounded to the dtype: norm weights 1 +- 0.17, biases +- 0.035,
// matrices with a standard deviation of 1/sqrt(fan-in), embeddings of 1.
// Deterministic for a seed, whatever the core count.
func SynthesizeParallel(c *Config, seed int64) *Weights {
	tc := *c
	tc.Layers, tc.Vocab = 1, 1
	tmpl := Synthesize(&tc, seed)
	d := c.HiddenSize
	w := &Weights{Layers: make([]LayerWeights, c.Layers)}
	type job struct {
		dst       *[]float32
		n         int
		base, std float32
	}
	var jobs []job
	add := func(dst *[]float32, like []float32, n int, base, std float32) {
		if like != nil {
			jobs = append(jobs, job{dst, n, base, std})
		}
	}
	mat := func(fanIn int) float32 { return float32(1 / math.Sqrt(float64(fanIn))) }
	add(&w.Embed, tmpl.Embed, c.Vocab*d, 0, 1)
	add(&w.PosEmbed, tmpl.PosEmbed, len(tmpl.PosEmbed), 0, 1)
	add(&w.FinalNormW, tmpl.FinalNormW, d, 1, 0.1)
	add(&w.FinalNormB, tmpl.FinalNormB, d, 0, 0.02)
	if !c.TieEmbeddings {
		add(&w.LMHead, tmpl.LMHead, c.Vocab*d, 0, mat(d))
	}
	t := &tmpl.Layers[0]
	for l := range w.Layers {
		lw := &w.Layers[l]
		for _, f := range []struct {
			dst       *[]float32
			like      []float32
			base, std float32
		}{
			{&lw.AttnNormW, t.AttnNormW, 1, 0.1}, {&lw.AttnNormB, t.AttnNormB, 0, 0.02},
			{&lw.Wq, t.Wq, 0, mat(d)}, {&lw.Wk, t.Wk, 0, mat(d)}, {&lw.Wv, t.Wv, 0, mat(d)},
			{&lw.Wo, t.Wo, 0, mat(c.Heads * c.HeadDim)},
			{&lw.Bq, t.Bq, 0, 0.02}, {&lw.Bk, t.Bk, 0, 0.02}, {&lw.Bv, t.Bv, 0, 0.02}, {&lw.Bo, t.Bo, 0, 0.02},
			{&lw.MLPNormW, t.MLPNormW, 1, 0.1}, {&lw.MLPNormB, t.MLPNormB, 0, 0.02},
			{&lw.Wgate, t.Wgate, 0, mat(d)}, {&lw.Wup, t.Wup, 0, mat(d)}, {&lw.Wdown, t.Wdown, 0, mat(c.Intermediate)},
			{&lw.Fc1, t.Fc1, 0, mat(d)}, {&lw.Fc1B, t.Fc1B, 0, 0.02}, {&lw.Fc2, t.Fc2, 0, mat(c.Intermediate)}, {&lw.Fc2B, t.Fc2B, 0, 0.02},
		} {
			add(f.dst, f.like, len(f.like), f.base, f.std)
		}
	}
	par.Each(len(jobs), func(i int) {
		j := jobs[i]
		rng := rand.New(rand.NewSource(seed + int64(i)*104729))
		v := make([]float32, j.n)
		for k := range v {
			v[k] = j.base + (rng.Float32()*2-1)*j.std*1.7320508
		}
		roundToDtype(c, v)
		*j.dst = v
	})
	if c.TieEmbeddings {
		w.LMHead = w.Embed
	}
	return w
}

// roundTo rounds v to c's dtype in place, a slice at a time.
func roundToDtype(c *Config, v []float32) {
	const part = 1 << 20
	buf := make([]byte, part*4)
	for lo := 0; lo < len(v); lo += part {
		s := v[lo:min(len(v), lo+part)]
		b := buf[:len(s)*c.ElemBytes()]
		c.EncodeRow(b, s)
		c.DecodeRow(s, b)
	}
}
