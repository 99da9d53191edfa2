package model

import (
	"errors"
	"fmt"
	"math"

	"github.com/hcache/hcache/internal/half"
	"github.com/hcache/hcache/internal/tensor"
)

func roundF16(f float32) float32  { return half.Round(f) }
func roundBF16(f float32) float32 { return half.RoundBF16(f) }

// Model is a loaded model ready for the reference forward pass.
type Model struct {
	Cfg     *Config
	W       *Weights
	InvFreq []float32
	round   func(float32) float32
	stop    <-chan struct{} // set only on PrefillStop's copy
}

// New checks that w holds every tensor the forward pass needs.
func New(c *Config, w *Weights) (*Model, error) {
	if err := c.Validate(); err != nil {
		return nil, err
	}
	if c.MLA != nil {
		return nil, fmt.Errorf("model: %s (multi-head latent attention) is described and planned, but has no forward pass yet", c.Arch)
	}
	if len(w.Embed) != c.Vocab*c.HiddenSize || len(w.LMHead) != c.Vocab*c.HiddenSize || len(w.Layers) != c.Layers {
		return nil, fmt.Errorf("model: weights do not match the config (load them with WeightsAll)")
	}
	for i, l := range w.Layers {
		if len(l.Wq) == 0 || len(l.Wo) == 0 || len(l.Wk) == 0 || len(l.MLPNormW) == 0 {
			return nil, fmt.Errorf("model: layer %d lacks tensors the forward pass needs", i)
		}
	}
	return &Model{Cfg: c, W: w, InvFreq: c.InvFreq(), round: roundFunc(c.DType)}, nil
}

// KVCache is the K and V of every token so far, per layer: [tokens x kv_dim],
// values rounded to the model dtype (what a GPU cache would hold).
type KVCache struct {
	K, V   [][]float32
	Tokens int
}

// NewKVCache returns an empty cache.
func NewKVCache(c *Config) *KVCache {
	return &KVCache{K: make([][]float32, c.Layers), V: make([][]float32, c.Layers)}
}

// Trace receives, per layer, the hidden states of the new tokens (the layer
// input after the pre-attention norm, rounded to the dtype: what hcache
// saves) and the K and V computed from them.
type Trace func(layer int, hidden, k, v []float32)

// ProjectKV rebuilds K and V of n tokens from their saved hidden states:
// K = rope(h Wk^T + bk, pos), V = h Wv^T + bv, each rounded to the dtype. It
// is the arithmetic the forward pass itself runs, so the result is bit-exact.
func ProjectKV(c *Config, invFreq []float32, lw *LayerWeights, hidden []float32, positions []int, k, v []float32) {
	n, d, kvd := len(positions), c.HiddenSize, c.KVDim()
	round := roundFunc(c.DType)
	tensor.MatMulT(k, hidden, n, d, lw.Wk, kvd, lw.Bk)
	tensor.MatMulT(v, hidden, n, d, lw.Wv, kvd, lw.Bv)
	for i := 0; i < n; i++ {
		ki := k[i*kvd : (i+1)*kvd]
		if c.UsesRope() {
			for h := 0; h < c.KVHeads; h++ {
				tensor.Rope(ki[h*c.HeadDim:(h+1)*c.HeadDim], positions[i], invFreq, c.RotaryInterleaved)
			}
		}
		for j := range ki {
			ki[j] = round(ki[j])
		}
		vi := v[i*kvd : (i+1)*kvd]
		for j := range vi {
			vi[j] = round(vi[j])
		}
	}
}

// normRows applies the pre-attention (or pre-MLP) norm to n rows.
func (m *Model) normRows(out, x []float32, n int, w, b []float32) {
	d := m.Cfg.HiddenSize
	for i := 0; i < n; i++ {
		if m.Cfg.Norm == "layernorm" {
			tensor.LayerNorm(out[i*d:(i+1)*d], x[i*d:(i+1)*d], w, b, float32(m.Cfg.NormEps))
		} else {
			tensor.RMSNorm(out[i*d:(i+1)*d], x[i*d:(i+1)*d], w, float32(m.Cfg.NormEps))
		}
	}
}

// Forward runs tokens (appended after cache.Tokens) through the model,
// extends the cache and returns the logits [len(tokens) x vocab].
func (m *Model) Forward(tokens []int, cache *KVCache, trace Trace) ([]float32, error) {
	c := m.Cfg
	x, err := m.layers(tokens, cache, trace, c.Layers)
	if err != nil {
		return nil, err
	}
	n, d := len(tokens), c.HiddenSize
	h := make([]float32, n*d)
	m.normRows(h, x, n, m.W.FinalNormW, m.W.FinalNormB)
	logits := make([]float32, n*c.Vocab)
	tensor.MatMulT(logits, h, n, d, m.W.LMHead, c.Vocab, nil)
	cache.Tokens += n
	return logits, nil
}

// Prefill runs tokens (positions 0..len-1) through the first layers layers
// only, calling trace after each with the layer's hidden states and the K
// and V it computed: the same arithmetic, in the same order, as Forward, so
// the K and V are bit for bit those of a full forward pass. It is how a
// restore recomputes a plan's prefix of unstored layers.
func (m *Model) Prefill(tokens []int, layers int, trace Trace) error {
	return m.PrefillStop(tokens, layers, trace, nil)
}

// ErrStopped is returned by PrefillStop when it was stopped.
var ErrStopped = errors.New("model: prefill stopped")

// PrefillStop is Prefill that returns ErrStopped before the next layer once
// stop is closed (a restore whose reads failed stops recomputing).
func (m *Model) PrefillStop(tokens []int, layers int, trace Trace, stop <-chan struct{}) error {
	if layers < 0 || layers > m.Cfg.Layers {
		return fmt.Errorf("model: prefill of %d layers, the model has %d", layers, m.Cfg.Layers)
	}
	m2 := *m
	m2.stop = stop
	_, err := m2.layers(tokens, NewKVCache(m.Cfg), trace, layers)
	return err
}

// layers runs the embedding and the first upto layers, extending cache's
// K/V of those layers, and returns the residual stream.
func (m *Model) layers(tokens []int, cache *KVCache, trace Trace, upto int) ([]float32, error) {
	c := m.Cfg
	n, d, kvd, qd := len(tokens), c.HiddenSize, c.KVDim(), c.Heads*c.HeadDim
	start := cache.Tokens
	if start+n > c.MaxPositions {
		return nil, fmt.Errorf("model: %d tokens exceed max_position_embeddings %d", start+n, c.MaxPositions)
	}
	positions := make([]int, n)
	for i := range positions {
		positions[i] = start + i
	}
	x := make([]float32, n*d)
	for i, t := range tokens {
		if t < 0 || t >= c.Vocab {
			return nil, fmt.Errorf("model: token %d out of vocabulary [0, %d)", t, c.Vocab)
		}
		copy(x[i*d:], m.W.Embed[t*d:(t+1)*d])
		if c.Arch == ArchOPT {
			p := positions[i] + 2
			for j := 0; j < d; j++ {
				x[i*d+j] += m.W.PosEmbed[p*d+j]
			}
		}
	}
	h := make([]float32, n*d)
	q := make([]float32, n*qd)
	k := make([]float32, n*kvd)
	v := make([]float32, n*kvd)
	attn := make([]float32, n*qd)
	o := make([]float32, n*d)
	scale := float32(1 / math.Sqrt(float64(c.HeadDim)))
	group := c.Heads / c.KVHeads
	for l := 0; l < upto; l++ {
		if m.stop != nil {
			select {
			case <-m.stop:
				return nil, ErrStopped
			default:
			}
		}
		lw := &m.W.Layers[l]
		m.normRows(h, x, n, lw.AttnNormW, lw.AttnNormB)
		for i := range h {
			h[i] = m.round(h[i])
		}
		ProjectKV(c, m.InvFreq, lw, h, positions, k, v)
		if trace != nil {
			trace(l, h, k, v)
		}
		cache.K[l] = append(cache.K[l], k...)
		cache.V[l] = append(cache.V[l], v...)
		if l == upto-1 && upto < c.Layers {
			// A prefill that stops here needs this layer's K and V
			// only, not its output.
			break
		}
		tensor.MatMulT(q, h, n, d, lw.Wq, qd, lw.Bq)
		if c.UsesRope() {
			for i := 0; i < n; i++ {
				for hh := 0; hh < c.Heads; hh++ {
					tensor.Rope(q[i*qd+hh*c.HeadDim:i*qd+(hh+1)*c.HeadDim], positions[i], m.InvFreq, c.RotaryInterleaved)
				}
			}
		}
		K, V := cache.K[l], cache.V[l]
		scores := make([]float32, start+n)
		for i := 0; i < n; i++ {
			ctx := positions[i] + 1
			for hh := 0; hh < c.Heads; hh++ {
				qv := q[i*qd+hh*c.HeadDim : i*qd+(hh+1)*c.HeadDim]
				kh := (hh / group) * c.HeadDim
				for j := 0; j < ctx; j++ {
					scores[j] = tensor.Dot(qv, K[j*kvd+kh:j*kvd+kh+c.HeadDim]) * scale
				}
				tensor.Softmax(scores[:ctx])
				out := attn[i*qd+hh*c.HeadDim : i*qd+(hh+1)*c.HeadDim]
				clear(out)
				for j := 0; j < ctx; j++ {
					p := scores[j]
					vj := V[j*kvd+kh : j*kvd+kh+c.HeadDim]
					for e := range out {
						out[e] += p * vj[e]
					}
				}
			}
		}
		tensor.MatMulT(o, attn, n, qd, lw.Wo, d, lw.Bo)
		for i := range x {
			x[i] += o[i]
		}
		m.normRows(h, x, n, lw.MLPNormW, lw.MLPNormB)
		m.mlp(x, h, n, lw)
	}
	return x, nil
}

// mlp adds the MLP output of the normed rows h to x.
func (m *Model) mlp(x, h []float32, n int, lw *LayerWeights) {
	c := m.Cfg
	d, im := c.HiddenSize, c.Intermediate
	a := make([]float32, n*im)
	out := make([]float32, n*d)
	if c.Arch == ArchOPT {
		tensor.MatMulT(a, h, n, d, lw.Fc1, im, lw.Fc1B)
		for i := range a {
			a[i] = max(a[i], 0)
		}
		tensor.MatMulT(out, a, n, im, lw.Fc2, d, lw.Fc2B)
	} else {
		up := make([]float32, n*im)
		tensor.MatMulT(a, h, n, d, lw.Wgate, im, nil)
		tensor.MatMulT(up, h, n, d, lw.Wup, im, nil)
		for i := range a {
			a[i] = tensor.SiLU(a[i]) * up[i]
		}
		tensor.MatMulT(out, a, n, im, lw.Wdown, d, nil)
	}
	for i := range x {
		x[i] += out[i]
	}
}

// Argmax returns the index of the largest logit of the last row.
func Argmax(logits []float32, vocab int) int {
	last := logits[len(logits)-vocab:]
	best := 0
	for i, v := range last {
		if v > last[best] {
			best = i
		}
	}
	return best
}

// Generate greedily decodes steps tokens after feeding prompt (which may be
// empty when the cache already holds the context and next is the first
// token to feed). trace sees every layer of every forward.
func (m *Model) Generate(cache *KVCache, prompt []int, steps int, trace Trace) ([]int, error) {
	logits, err := m.Forward(prompt, cache, trace)
	if err != nil {
		return nil, err
	}
	var out []int
	for i := 0; i < steps; i++ {
		t := Argmax(logits, m.Cfg.Vocab)
		out = append(out, t)
		if i == steps-1 {
			break
		}
		if logits, err = m.Forward([]int{t}, cache, trace); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// AttentionAt is layer's attention output (before o_proj: [heads x
// head_dim]) of one query at position pos, whose normed hidden state is h,
// over positions 0..pos of cache (which must hold them): the arithmetic of
// the forward pass for that query. Codec error measurements compare it
// between an exact cache and a restored one.
func (m *Model) AttentionAt(cache *KVCache, layer int, h []float32, pos int) ([]float32, error) {
	c := m.Cfg
	d, kvd, qd := c.HiddenSize, c.KVDim(), c.Heads*c.HeadDim
	if layer < 0 || layer >= c.Layers || len(h) != d || pos < 0 || len(cache.K[layer]) < (pos+1)*kvd || len(cache.V[layer]) < (pos+1)*kvd {
		return nil, fmt.Errorf("model: attention of layer %d at position %d: bad arguments (%d hidden values, %d cached K values)", layer, pos, len(h), len(cache.K[layer]))
	}
	lw := &m.W.Layers[layer]
	q := make([]float32, qd)
	tensor.MatMulT(q, h, 1, d, lw.Wq, qd, lw.Bq)
	if c.UsesRope() {
		for hh := 0; hh < c.Heads; hh++ {
			tensor.Rope(q[hh*c.HeadDim:(hh+1)*c.HeadDim], pos, m.InvFreq, c.RotaryInterleaved)
		}
	}
	scale := float32(1 / math.Sqrt(float64(c.HeadDim)))
	group := c.Heads / c.KVHeads
	K, V := cache.K[layer], cache.V[layer]
	scores := make([]float32, pos+1)
	out := make([]float32, qd)
	for hh := 0; hh < c.Heads; hh++ {
		qv := q[hh*c.HeadDim : (hh+1)*c.HeadDim]
		kh := (hh / group) * c.HeadDim
		for j := range scores {
			scores[j] = tensor.Dot(qv, K[j*kvd+kh:j*kvd+kh+c.HeadDim]) * scale
		}
		tensor.Softmax(scores)
		o := out[hh*c.HeadDim : (hh+1)*c.HeadDim]
		for j, p := range scores {
			vj := V[j*kvd+kh : j*kvd+kh+c.HeadDim]
			for e := range o {
				o[e] += p * vj[e]
			}
		}
	}
	return out, nil
}
