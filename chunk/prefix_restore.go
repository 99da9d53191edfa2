package chunk

import (
	"errors"
	"fmt"

	"github.com/hcache/hcache/lsm"
	"github.com/hcache/hcache/state"
)

// Restores of token-addressed state: by name (snap's chain scan) and by
// tokens (RestoreTokensOwned), through the one layer-pipelined read path.

// isTokCtx reports whether c is token-addressed (takes s.mu).
func (s *Store) isTokCtx(c *ctxState) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return c.tokCtx()
}

// scanChainChunks is scanChunks for a token-addressed context: the
// records of its chain's shared groups (walked back from its tip through
// the group table, located through their entries), then its tail's chunk
// key. Call without s.mu.
func (s *Store) scanChainChunks(c *ctxState) (*snapshot, error) {
	s.mu.Lock()
	chain, err := s.chainLocked(c)
	tokens := int(c.rec.Tokens)
	ident := c.ident
	binding, gen := c.binding, c.rec.Gen
	s.mu.Unlock()
	if err != nil {
		return nil, err
	}
	sn := &snapshot{c: c}
	for i, e := range chain {
		g, err := s.db.GetGroup(c.ns, e.key)
		if err != nil {
			if errors.Is(err, lsm.ErrNotFound) {
				err = fmt.Errorf("%w: group %d (key %v) has no index entry", ErrCorrupt, i, e.key)
			}
			return nil, err
		}
		if g.Index != uint32(i) || int(g.Tokens) != s.ct || len(g.Slices) != len(c.stored) {
			return nil, fmt.Errorf("%w: group %d (key %v): entry of position %d, %d tokens, %d slices", ErrCorrupt, i, e.key, g.Index, g.Tokens, len(g.Slices))
		}
		ch := g.Chunk
		sn.chunks = append(sn.chunks, &ch)
		sn.srcs = append(sn.srcs, &itemSrc{bind: state.NewGroupBinding(c.ns, ident, e.key), key: e.key})
		sn.tokens += s.ct
	}
	if tail := tokens - len(chain)*s.ct; tail > 0 {
		ch, err := s.db.GetChunk(c.ns, c.id, uint32(len(chain)))
		if err != nil {
			if errors.Is(err, lsm.ErrNotFound) {
				err = fmt.Errorf("%w: the tail (group %d) has no chunk key", ErrCorrupt, len(chain))
			}
			return nil, err
		}
		if int(ch.Tokens) < tail || len(ch.Slices) != len(c.stored) {
			return nil, fmt.Errorf("%w: tail group %d holds %d tokens in %d slices, want %d in %d", ErrCorrupt, len(chain), ch.Tokens, len(ch.Slices), tail, len(c.stored))
		}
		sn.chunks = append(sn.chunks, ch)
		sn.srcs = append(sn.srcs, &itemSrc{bind: binding, gen: gen})
		sn.tokens += int(ch.Tokens)
	}
	return sn, nil
}

// RestoreTokens is RestoreTokensOwned for a callback that is done with rows
// when it returns (Restore's contract).
func (s *Store) RestoreTokens(p Prefix, fn func(layer int, rows []byte) error) (int, error) {
	if fn == nil {
		return 0, errors.New("chunk: RestoreTokens needs a callback")
	}
	return s.RestoreTokensOwned(p, 0, func(layer int, rows []byte, release func()) error {
		defer release()
		return fn(layer, rows)
	})
}

// RestoreTokensOwned restores the longest stored prefix of p.Tokens (what
// Lookup(p) reports, group-aligned plus the named context's matching tail)
// with RestoreOwned's callback contract: fn gets each stored layer's rows
// of those tokens, in layer order, and returns the token count (0, with fn
// never called, when nothing is stored). Before anything is handed over,
// each group's stored token digest is compared with the request's tokens
// (a key collision serves nothing of that group or after it) and every
// slice is verified against its checksum, seeded from the group binding
// of the request's namespace, identity and key.
func (s *Store) RestoreTokensOwned(p Prefix, ahead int, fn func(layer int, rows []byte, release func()) error) (int, error) {
	if fn == nil {
		return 0, errors.New("chunk: RestoreTokensOwned needs a callback")
	}
	auto := ahead <= 0
	if auto {
		ahead = DefaultRestoreAhead
	}
	if ahead < 2 {
		return 0, fmt.Errorf("chunk: RestoreTokensOwned ahead %d: at least 2 buffers (the one handed over and the one being read)", ahead)
	}
	m, err := s.match(p)
	if err != nil || m.tokens == 0 {
		return 0, err
	}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return 0, ErrClosed
	}
	s.restores.Add(1)
	s.mu.Unlock()
	defer s.restores.Done()
	c := &ctxState{ns: p.Namespace, id: "(tokens)", probe: true}
	c.setIdentity(p.Identity)
	if m.ctx != nil {
		c.id = m.ctx.id
	}
	var sn *snapshot
	for attempt := 0; ; attempt++ {
		sn, err = s.tokenSnapshot(c, p, m)
		if err != nil {
			return 0, fmt.Errorf("chunk: restore by tokens in %s: %w", p.Namespace, err)
		}
		ok, missing := s.refSnapshot(sn)
		if ok {
			break
		}
		if attempt == 2 {
			return 0, fmt.Errorf("chunk: restore by tokens in %s: %w: segment %d is missing", p.Namespace, ErrCorrupt, missing)
		}
	}
	defer func() {
		s.mu.Lock()
		s.unref(sn.segs)
		s.mu.Unlock()
	}()
	if auto {
		ahead = s.autoAhead(c, sn)
	}
	// A use of what it serves: the named context whose tail it reads
	// (persisted with the next index commit, as Restore's), and the
	// shared groups, whichever contexts hold them (in memory: eviction
	// keeps the holder of a group's last reference by it; evict.go).
	s.mu.Lock()
	now := s.opts.Now()
	for _, e := range m.ents {
		if e.committed {
			e.lastUse = now
		}
	}
	if m.ctx != nil {
		m.ctx.lastUse = now
		m.ctx.useDirty = true
		s.dirtyCtxs[m.ctx] = struct{}{}
	}
	s.mu.Unlock()
	if err := s.streamLayers(c, sn, ahead, fn); err != nil {
		return 0, err
	}
	return m.tokens, nil
}

// tokenSnapshot reads the locations of a match's groups (and tail),
// checking each group's entry against the request before anything is read:
// position, token count, the token digest of the request's tokens, and the
// group binding of the request's namespace, identity and key.
func (s *Store) tokenSnapshot(c *ctxState, p Prefix, m *prefixMatch) (*snapshot, error) {
	sn := &snapshot{c: c}
	for i, key := range m.keys {
		g, err := s.db.GetGroup(p.Namespace, key)
		if err != nil {
			if errors.Is(err, lsm.ErrNotFound) {
				// Dropped since the lookup (its last sharer deleted).
				err = fmt.Errorf("%w: group %d (key %v) is no longer stored", ErrNotFound, i, key)
			}
			return nil, err
		}
		bind := state.NewGroupBinding(p.Namespace, p.Identity, key)
		want := state.TokensDigest(p.Tokens[i*s.ct : (i+1)*s.ct])
		if g.Digest != want || g.Index != uint32(i) || int(g.Tokens) != s.ct || g.Bind != [32]byte(bind) {
			s.stats.collisions.Add(1)
			return nil, fmt.Errorf("%w: group %d (key %v) is stored for other tokens, position or identity; nothing served", ErrCollision, i, key)
		}
		if len(g.Slices) != len(c.stored) {
			return nil, fmt.Errorf("%w: group %d has %d slices, the plan stores %d layers", ErrCorrupt, i, len(g.Slices), len(c.stored))
		}
		ch := g.Chunk
		sn.chunks = append(sn.chunks, &ch)
		sn.srcs = append(sn.srcs, &itemSrc{bind: bind, key: key})
		sn.tokens += s.ct
	}
	if m.ctx != nil {
		s.mu.Lock()
		binding, gen, deleted := m.ctx.binding, m.ctx.rec.Gen, m.ctx.deleted
		s.mu.Unlock()
		if deleted {
			return nil, fmt.Errorf("%w: %s/%s", ErrNotFound, p.Namespace, m.ctx.id)
		}
		ch, err := s.db.GetChunk(p.Namespace, m.ctx.id, uint32(len(m.keys)))
		if err != nil {
			return nil, fmt.Errorf("%s/%s tail: %w", p.Namespace, m.ctx.id, err)
		}
		if int(ch.Tokens) < m.tail || len(ch.Slices) != len(c.stored) {
			return nil, fmt.Errorf("%w: %s/%s tail holds %d tokens in %d slices, want %d", ErrCorrupt, p.Namespace, m.ctx.id, ch.Tokens, len(ch.Slices), m.tail)
		}
		sn.chunks = append(sn.chunks, ch)
		sn.srcs = append(sn.srcs, &itemSrc{bind: binding, gen: gen})
		sn.tokens += int(ch.Tokens)
		sn.serve = m.tokens
	}
	return sn, nil
}

// refSnapshot references the segments of a snapshot's records so that GC
// cannot remove them under the reads; false (nothing referenced) when one
// is gone or doomed (GC moved a record since its location was read: read
// the locations again).
func (s *Store) refSnapshot(sn *snapshot) (bool, uint32) {
	s.mu.Lock()
	defer s.mu.Unlock()
	seen := map[uint32]bool{}
	for _, ch := range sn.chunks {
		if seen[ch.Segment] {
			continue
		}
		seen[ch.Segment] = true
		sg := s.segs[ch.Segment]
		if sg == nil || sg.doomed {
			s.unref(sn.segs)
			sn.segs = nil
			return false, ch.Segment
		}
		sg.refs++
		sn.segs = append(sn.segs, sg)
	}
	return true, 0
}

// readGroupRows reads the first tokens rows of every stored layer of group
// g of token-addressed c: a shared group of its chain, or its tail (Fork).
func (s *Store) readGroupRows(c *ctxState, g, tokens int, fn func(layer int, rows []byte)) error {
	s.mu.Lock()
	chain, err := s.chainLocked(c)
	ident, binding, gen := c.ident, c.binding, c.rec.Gen
	s.mu.Unlock()
	if err != nil {
		return err
	}
	var ch *lsm.Chunk
	var src *itemSrc
	if g < len(chain) {
		e, err := s.db.GetGroup(c.ns, chain[g].key)
		if err != nil {
			return fmt.Errorf("chunk: %s/%s group %d: %w", c.ns, c.id, g, err)
		}
		ch, src = &e.Chunk, &itemSrc{bind: state.NewGroupBinding(c.ns, ident, chain[g].key), key: chain[g].key}
	} else {
		if ch, err = s.db.GetChunk(c.ns, c.id, uint32(g)); err != nil {
			return fmt.Errorf("chunk: %s/%s group %d: %w", c.ns, c.id, g, err)
		}
		src = &itemSrc{bind: binding, gen: gen}
	}
	if int(ch.Tokens) < tokens {
		return fmt.Errorf("%w: %s/%s group %d holds %d tokens, want %d", ErrCorrupt, c.ns, c.id, g, ch.Tokens, tokens)
	}
	sn := &snapshot{c: c, chunks: []*lsm.Chunk{ch}}
	if ok, missing := s.refSnapshot(sn); !ok {
		return fmt.Errorf("%w: %s/%s group %d: segment %d missing", ErrCorrupt, c.ns, c.id, g, missing)
	}
	defer func() {
		s.mu.Lock()
		s.unref(sn.segs)
		s.mu.Unlock()
	}()
	items := make([]fetchItem, len(ch.Slices))
	for i, sl := range ch.Slices {
		items[i] = fetchItem{ch: ch, sl: sl, group: uint32(g), dst: make([]byte, sl.Raw), src: src}
	}
	if err := s.fetch(c, items, true); err != nil {
		return err
	}
	for _, it := range items {
		rb := int(c.ident.Plan[it.sl.Layer].RowBytes)
		fn(int(it.sl.Layer), it.dst[:tokens*rb])
	}
	return nil
}
