package peer

import (
	"fmt"
	"hash/fnv"
	"sync"

	"github.com/hcache/hcache/model"
)

// Recompute keeps only the token ids and rebuilds K/V on restore by running
// the reference forward pass (CPU, float32) over the whole context: what a
// server without a state store does. It runs a small model shape; its times
// are that shape's, not the benchmark model's.
type Recompute struct {
	m      *model.Model
	mu     sync.Mutex
	tokens map[string]int
}

// NewRecompute builds the model of preset (seeded synthetic weights) with
// room for maxTokens positions.
func NewRecompute(preset string, maxTokens int, seed int64) (*Recompute, error) {
	c, err := model.Preset(preset)
	if err != nil {
		return nil, err
	}
	c.MaxPositions = max(c.MaxPositions, maxTokens)
	m, err := model.New(c, model.Synthesize(c, seed))
	if err != nil {
		return nil, err
	}
	return &Recompute{m: m, tokens: map[string]int{}}, nil
}

// Name implements System.
func (r *Recompute) Name() string { return "recompute" }

// Shape names the model the forward pass runs.
func (r *Recompute) Shape() *model.Config { return r.m.Cfg }

// RowBytes implements System: the K||V row of the small model.
func (r *Recompute) RowBytes() int { return r.m.Cfg.KVRowBytes() }

// TokenIDs returns the deterministic token ids of a context.
func (r *Recompute) TokenIDs(id string, n int) []int {
	h := fnv.New64a()
	h.Write([]byte(id))
	x := h.Sum64()
	ids := make([]int, n)
	for i := range ids {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		ids[i] = int(x % uint64(r.m.Cfg.Vocab))
	}
	return ids
}

// Save implements System: only the token count is kept (the ids are a
// function of the context id here; a server keeps them anyway).
func (r *Recompute) Save(id string, from, to int, _ Rows) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.tokens[id] != from {
		return fmt.Errorf("peer recompute: %s holds %d tokens, save starts at %d", id, r.tokens[id], from)
	}
	r.tokens[id] = to
	return nil
}

// Restore implements System: a prefill of the first tokens tokens.
func (r *Recompute) Restore(id string, tokens int, fn Deliver) error {
	r.mu.Lock()
	have := r.tokens[id]
	r.mu.Unlock()
	if have < tokens {
		return fmt.Errorf("peer recompute: %s holds %d tokens, %d asked", id, have, tokens)
	}
	c := r.m.Cfg
	kvd, half := c.KVDim(), c.KVRowBytes()/2
	rows := make([]byte, tokens*c.KVRowBytes())
	var ferr error
	_, err := r.m.Forward(r.TokenIDs(id, tokens), model.NewKVCache(c), func(l int, _, k, v []float32) {
		if ferr != nil {
			return
		}
		for i := 0; i < tokens; i++ {
			c.EncodeRow(rows[i*2*half:], k[i*kvd:(i+1)*kvd])
			c.EncodeRow(rows[i*2*half+half:], v[i*kvd:(i+1)*kvd])
		}
		ferr = fn(l, 0, rows)
	})
	if err == nil {
		err = ferr
	}
	return err
}

// BytesOnDisk implements System: 4 bytes of token id per token.
func (r *Recompute) BytesOnDisk() (int64, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for _, t := range r.tokens {
		n += t
	}
	return int64(4 * n), nil
}

// Close implements System.
func (r *Recompute) Close() error { return nil }
