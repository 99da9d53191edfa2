package serve

import (
	"crypto/sha256"
	"fmt"

	"github.com/hcache/hcache/gpu"
	"github.com/hcache/hcache/model"
	"github.com/hcache/hcache/state"
	"github.com/hcache/hcache/state/codec"
)

// RowLayout names how Saver lays rows out; it is part of every identity, so
// states saved under another layout are never served.
const RowLayout = "hcache rows v1: hidden = layer input after the pre-attention norm, rounded to the model dtype; kv = K then V, [kv_heads x head_dim] each, K after rope"

// Identity is the store identity of a model's states under a plan: the model
// fingerprint (architecture, dtype, rope and K/V weights) bound to the row
// layout, and the plan.
func Identity(c *model.Config, w *model.Weights, plan []state.LayerPlan) *state.Identity {
	h := sha256.New()
	h.Write(model.Fingerprint(c, w))
	h.Write([]byte(RowLayout))
	return &state.Identity{Model: h.Sum(nil), Plan: plan}
}

// IdentityCodec is Identity for states whose rows are encoded by a codec:
// the plan's row sizes must be the codec's (sched.PlanOfCodec). Codec none
// gives Identity's value, byte for byte.
func IdentityCodec(c *model.Config, w *model.Weights, plan []state.LayerPlan, cd state.Codec) *state.Identity {
	id := Identity(c, w, plan)
	id.Codec = cd
	return id
}

// Appender is where a Saver appends: a context's writer (*chunk.Writer).
type Appender interface {
	// AppendLayer appends one layer's rows of the next tokens.
	AppendLayer(layer int, rows []byte) error
	// AppendToken appends one token's rows of every layer (nil for a
	// layer that stores nothing).
	AppendToken(rows [][]byte) error
}

// Saver turns forward-pass traces into store appends: a prefill (many
// tokens) appends layer by layer; a decode step (one token) gathers every
// layer and appends them as one token.
type Saver struct {
	cfg     *model.Config
	plan    []state.LayerPlan
	codec   state.Codec
	w       Appender
	pending [][]byte // decode step rows by layer
	pos     []int    // tokens traced per layer: the position of the next row (int8 groups align to it)
	err     error
}

// NewSaver wraps a writer of a context stored under plan, rows in the model
// dtype (codec none).
func NewSaver(c *model.Config, plan []state.LayerPlan, w Appender) *Saver {
	return NewCodecSaver(c, plan, state.CodecNone, w)
}

// NewCodecSaver wraps a writer of a context stored under plan with rows
// encoded by cd (the identity's codec): hidden rows as one segment, KV rows
// as K then V segments (state/codec).
func NewCodecSaver(c *model.Config, plan []state.LayerPlan, cd state.Codec, w Appender) *Saver {
	return &Saver{cfg: c, plan: plan, codec: cd, w: w, pending: make([][]byte, len(plan)), pos: make([]int, len(plan))}
}

// Trace is the model.Trace to pass to Forward/Generate.
func (s *Saver) Trace(layer int, hidden, k, v []float32) {
	if s.err != nil {
		return
	}
	c := s.cfg
	n := len(hidden) / c.HiddenSize
	var rows []byte
	switch s.plan[layer].Kind {
	case state.LayerHidden:
		rb := codec.HiddenRowBytes(s.codec, c.DType, c.HiddenSize)
		rows = make([]byte, n*rb)
		// Rows from this layer's position: int8 encodes whole aligned
		// groups of tokens together (codec.EncodeRows).
		s.err = codec.EncodeRows(s.codec, c.DType, rows, 1, c.HiddenSize, s.pos[layer], hidden[:n*c.HiddenSize])
	case state.LayerKV:
		kvd := c.KVDim()
		rb := codec.KVRowBytes(s.codec, c.DType, kvd)
		rows = make([]byte, n*rb)
		kv := make([]float32, 2*n*kvd) // per token: K then V
		for i := 0; i < n; i++ {
			copy(kv[2*i*kvd:], k[i*kvd:(i+1)*kvd])
			copy(kv[(2*i+1)*kvd:], v[i*kvd:(i+1)*kvd])
		}
		s.err = codec.EncodeRows(s.codec, c.DType, rows, 2, kvd, s.pos[layer], kv)
	}
	s.pos[layer] += n
	if s.err != nil {
		s.err = fmt.Errorf("serve: save layer %d under codec %s: %w", layer, s.codec, s.err)
		return
	}
	if n == 1 {
		s.pending[layer] = rows
		if layer == c.Layers-1 {
			s.err = s.w.AppendToken(s.pending)
			s.pending = make([][]byte, len(s.plan))
		}
		return
	}
	if rows != nil {
		s.err = s.w.AppendLayer(layer, rows)
	}
}

// Err returns the first append error.
func (s *Saver) Err() error { return s.err }

// Restore streams a context whose plan stores every layer from src into dst
// (one paged cache per layer, positions 0..tokens-1) through the backend:
// hidden layers are projected, KV layers copied, each projection
// overlapping the reads of later layers. It is a Restorer of its own with
// default settings; plans that recompute a prefix (they need token ids),
// and restores that share a store and backend, use a Restorer.
func Restore(src Source, ns, id string, ident *state.Identity, b gpu.Backend, dst []*gpu.PagedKV) (RestoreStats, error) {
	return NewRestorer(src, b, Settings{}).Restore(Request{NS: ns, ID: id, Ident: ident, Dst: gpu.HostCache(dst)})
}

// PagedToCache copies tokens positions of per-layer paged caches into a
// model.KVCache, so the reference forward pass can continue from a restore.
func PagedToCache(c *model.Config, layers []*gpu.PagedKV, tokens int) (*model.KVCache, error) {
	kc := model.NewKVCache(c)
	kvd := c.KVDim()
	for l, p := range layers {
		kc.K[l] = make([]float32, tokens*kvd)
		kc.V[l] = make([]float32, tokens*kvd)
		for t := 0; t < tokens; t++ {
			k, v, err := p.Token(t)
			if err != nil {
				return nil, err
			}
			c.DecodeRow(kc.K[l][t*kvd:(t+1)*kvd], k)
			c.DecodeRow(kc.V[l][t*kvd:(t+1)*kvd], v)
		}
	}
	kc.Tokens = tokens
	return kc, nil
}
