package peer

import (
	"fmt"
	"path/filepath"

	"github.com/hcache/hcache/chunk"
	"github.com/hcache/hcache/state"
)

// Hcache is hcache's own store: the product, measured as a peer of the
// others. Plan decides what it keeps (hidden states, KV); CacheBytes > 0
// turns its DRAM tier on (restores then hit memory).
type Hcache struct {
	name  string
	spec  Spec
	st    *chunk.Store
	ident *chunk.Identity
}

// HcacheOptions configure the hcache peer.
type HcacheOptions struct {
	Name       string
	Model      []byte // model fingerprint
	Plan       []chunk.LayerPlan
	Codec      state.Codec // the rows' codec (its row sizes are in Plan)
	CacheBytes int64
	// StagingBytes bounds the DRAM staging (0: the store's default). A
	// prefill stages a whole context until its last layer arrives, so
	// concurrent long prefills need room for all of them.
	StagingBytes int64
	// NoPriority turns off the store's restore admission and write
	// yielding (issue 20) and keeps the write queue and idle restore
	// buffers at their earlier sizes, to measure what they do in the same
	// run (system "hcache-noprio").
	NoPriority bool
}

// NewHcache opens a fresh store in spec.Dir.
func NewHcache(spec Spec, o HcacheOptions) (*Hcache, error) {
	if err := spec.check(); err != nil {
		return nil, err
	}
	if len(o.Plan) != spec.Layers {
		return nil, fmt.Errorf("peer %s: plan of %d layers for %d", o.Name, len(o.Plan), spec.Layers)
	}
	for _, p := range o.Plan {
		if int(p.RowBytes) != spec.RowBytes {
			return nil, fmt.Errorf("peer %s: plan row %d bytes, spec %d", o.Name, p.RowBytes, spec.RowBytes)
		}
	}
	opts := chunk.Options{Dir: filepath.Join(spec.Dir, "store"), CacheBytes: o.CacheBytes, StagingBytes: o.StagingBytes, CapacityBytes: -1,
		GCInterval: -1, Logf: func(string, ...any) {}}
	if o.NoPriority {
		opts.RestoreQueueBytes, opts.IdleReadBufferBytes = -1, 256<<20
		opts.WriteBytes, opts.WriteBytesUnderRestores = 1<<40, 1<<40
	}
	st, err := chunk.Open(opts)
	if err != nil {
		return nil, err
	}
	return &Hcache{name: o.Name, spec: spec, st: st, ident: &chunk.Identity{Model: o.Model, Plan: o.Plan, Codec: o.Codec}}, nil
}

// Name implements System.
func (h *Hcache) Name() string { return h.name }

// RowBytes implements System.
func (h *Hcache) RowBytes() int { return h.spec.RowBytes }

// Save implements System: a new context is created, a later turn appended,
// each layer handed over whole (prefill-style), and Close returns once the
// rows are durable.
func (h *Hcache) Save(id string, from, to int, rows Rows) error {
	var w *chunk.Writer
	var err error
	if from == 0 {
		w, err = h.st.Create("bench", id, h.ident, chunk.CreateOptions{})
	} else {
		w, err = h.st.Append("bench", id, h.ident)
	}
	if err != nil {
		return err
	}
	for l := 0; l < h.spec.Layers; l++ {
		if err := w.AppendLayer(l, rows(l, from, to)); err != nil {
			w.Close()
			return err
		}
	}
	return w.Close()
}

// Restore implements System.
func (h *Hcache) Restore(id string, tokens int, fn Deliver) error {
	n, err := h.st.Restore("bench", id, h.ident, func(l int, rows []byte) error {
		return fn(l, 0, rows[:tokens*h.spec.RowBytes])
	})
	if err == nil && n < tokens {
		err = fmt.Errorf("peer %s: %s restored %d tokens, want %d", h.name, id, n, tokens)
	}
	return err
}

// BytesOnDisk implements System: live record bytes of the segments (they
// are preallocated, so their file sizes say nothing) plus the index.
func (h *Hcache) BytesOnDisk() (int64, error) {
	var n int64
	for _, s := range h.st.Segments() {
		n += int64(s.Live)
	}
	idx, err := dirBytes(filepath.Join(h.spec.Dir, "store", "index"))
	return n + idx, err
}

// BytesInMemory implements MemoryUser: the DRAM tier.
func (h *Hcache) BytesInMemory() (int64, error) { return h.st.Stats().CacheBytes, nil }

// Store is the store under the peer (for its counters).
func (h *Hcache) Store() *chunk.Store { return h.st }

// Close implements System.
func (h *Hcache) Close() error { return h.st.Close() }
