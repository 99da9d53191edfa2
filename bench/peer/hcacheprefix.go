package peer

import (
	"fmt"
	"path/filepath"
	"sync"

	"github.com/hcache/hcache/chunk"
)

// HcachePrefix is hcache's token-addressed store as a PrefixSystem. Each
// conversation (ctx) is a named context: a request's save creates a new
// context for its tokens (Store.CreateTokens: the stored prefix is
// referenced, the rest written, each full group once per namespace), then
// deletes the conversation's previous context, so the store keeps every
// conversation's latest state and the groups something references, as a
// serving engine that names conversations would. Lookups and restores name
// the conversation's context, so its partial tail counts.
type HcachePrefix struct {
	spec  Spec
	st    *chunk.Store
	ident *chunk.Identity
	ns    string

	mu  sync.Mutex
	cur map[string]string // ctx -> its current context id
	seq int
}

// NewHcachePrefix opens a fresh store in spec.Dir (groups of the store's
// default chunk size; spec.ChunkTokens is not used) for contexts of ident
// in namespace ns.
func NewHcachePrefix(spec Spec, ident *chunk.Identity, ns string) (*HcachePrefix, error) {
	if err := spec.check(); err != nil {
		return nil, err
	}
	st, err := chunk.Open(chunk.Options{Dir: filepath.Join(spec.Dir, "store"), CapacityBytes: -1, GCInterval: -1, Logf: func(string, ...any) {}})
	if err != nil {
		return nil, err
	}
	return &HcachePrefix{spec: spec, st: st, ident: ident, ns: ns, cur: map[string]string{}}, nil
}

// Store is the store (for fills that use another identity).
func (h *HcachePrefix) Store() *chunk.Store { return h.st }

// Name implements PrefixSystem.
func (h *HcachePrefix) Name() string { return "hcache" }

// GroupTokens implements PrefixSystem.
func (h *HcachePrefix) GroupTokens() int { return h.st.ChunkTokens() }

func (h *HcachePrefix) prefix(ctx string, tokens []uint32) chunk.Prefix {
	h.mu.Lock()
	id := h.cur[ctx]
	h.mu.Unlock()
	return chunk.Prefix{Namespace: h.ns, Identity: h.ident, Tokens: tokens, Context: id}
}

// SaveTokens implements PrefixSystem: it reports the group records the
// store wrote meanwhile (Stats().GroupsWritten; exact when saves do not
// overlap).
func (h *HcachePrefix) SaveTokens(ctx string, tokens []uint32, rows Rows) (int, error) {
	h.mu.Lock()
	h.seq++
	id := fmt.Sprintf("%s.%d", ctx, h.seq)
	prev := h.cur[ctx]
	h.mu.Unlock()
	before := h.st.Stats().GroupsWritten
	w, stored, err := h.st.CreateTokens(h.ns, id, h.ident, tokens, chunk.CreateOptions{})
	if err != nil {
		return 0, err
	}
	if stored < len(tokens) {
		for l := 0; l < h.spec.Layers; l++ {
			if err := w.AppendLayer(l, rows(l, stored, len(tokens))); err != nil {
				w.Close()
				return 0, err
			}
		}
	}
	if err := w.Close(); err != nil {
		return 0, err
	}
	h.mu.Lock()
	h.cur[ctx] = id
	h.mu.Unlock()
	if prev != "" {
		if err := h.st.Delete(h.ns, prev); err != nil {
			return 0, fmt.Errorf("peer hcache: delete %s's previous context %s: %w", ctx, prev, err)
		}
	}
	return int(h.st.Stats().GroupsWritten - before), nil
}

// Lookup implements PrefixSystem.
func (h *HcachePrefix) Lookup(ctx string, tokens []uint32) (int, error) {
	return h.st.Lookup(h.prefix(ctx, tokens))
}

// RestoreTokens implements PrefixSystem: the store restores the longest
// stored prefix of tokens, which must be n tokens.
func (h *HcachePrefix) RestoreTokens(ctx string, tokens []uint32, n int, fn Deliver) error {
	got, err := h.st.RestoreTokens(h.prefix(ctx, tokens), func(l int, rows []byte) error {
		return fn(l, 0, rows)
	})
	if err == nil && got != n {
		err = fmt.Errorf("peer hcache: restored %d tokens, want %d", got, n)
	}
	return err
}

// BytesOnDisk implements PrefixSystem: live record bytes of the segments
// (they are preallocated, so their file sizes say nothing) plus the index.
func (h *HcachePrefix) BytesOnDisk() (int64, error) {
	var n int64
	for _, s := range h.st.Segments() {
		n += int64(s.Live)
	}
	idx, err := h.IndexBytes()
	return n + idx, err
}

// IndexBytes is what the index (Pebble) takes on the disk.
func (h *HcachePrefix) IndexBytes() (int64, error) {
	return dirBytes(filepath.Join(h.spec.Dir, "store", "index"))
}

// StoredGroups is the shared groups the store holds.
func (h *HcachePrefix) StoredGroups() int64 { return int64(h.st.Stats().Groups) }

// Close implements PrefixSystem.
func (h *HcachePrefix) Close() error { return h.st.Close() }
