package chunk

import (
	"fmt"
	"sort"

	"github.com/hcache/hcache/chunk/format"
	"github.com/hcache/hcache/lsm"
	"github.com/hcache/hcache/state"
)

// fsck of token-addressed state (read-only): every group entry against its
// record and slices, the reference counts against the contexts' chains,
// and each token-addressed context's chain and tail.

// checkGroups checks every group entry: its record's header names it
// (namespace, key, position, parent, token ids) and every slice passes its
// checksum under the group binding; the table's reference count equals the
// number of live token-addressed contexts whose chain (walked through the
// index entries) reaches it, and no group is unreferenced. Group bytes are
// added to the segments' live counts.
func (s *Store) checkGroups(r *CheckReport, ctxs []*ctxState, cs *checkedChunks) error {
	type entry struct {
		ns  string
		key [32]byte
		g   *lsm.Group
	}
	var entries []entry
	if err := s.db.ScanGroups(func(ns string, key [32]byte, g *lsm.Group, err error) error {
		if err != nil {
			r.errorf("%v", err)
			return nil
		}
		entries = append(entries, entry{ns, key, g})
		return nil
	}); err != nil {
		return err
	}
	byKey := map[gid]*lsm.Group{}
	for _, e := range entries {
		byKey[gid{e.ns, e.key}] = e.g
		cs.liveBySeg[e.g.Segment] += uint64(e.g.Length)
		cs.endBySeg[e.g.Segment] = max(cs.endBySeg[e.g.Segment], e.g.Offset+uint64(e.g.Length))
	}
	// References, from the contexts' chains through the index entries.
	refs := map[gid]int{}
	for _, c := range ctxs {
		s.mu.Lock()
		tok, deleted, rec := c.tokCtx(), c.deleted, c.rec
		s.mu.Unlock()
		if !tok || deleted || c.noRefs {
			continue
		}
		k := rec.Tip
		for i := int(rec.Tokens)/s.ct - 1; i >= 0; i-- {
			g := byKey[gid{c.ns, k}]
			if g == nil {
				r.errorf("%s/%s: group %d (key %x) of its chain has no entry", c.ns, c.id, i, k[:8])
				break
			}
			if g.Index != uint32(i) {
				r.errorf("%s/%s: group %d of its chain is entry of position %d", c.ns, c.id, i, g.Index)
				break
			}
			refs[gid{c.ns, k}]++
			k = g.Parent
		}
	}
	sort.Slice(entries, func(i, j int) bool {
		if entries[i].ns != entries[j].ns {
			return entries[i].ns < entries[j].ns
		}
		return string(entries[i].key[:]) < string(entries[j].key[:])
	})
	for _, e := range entries {
		name := fmt.Sprintf("group %s/%x", e.ns, e.key[:8])
		k := gid{e.ns, e.key}
		s.mu.Lock()
		ent := s.groups[k]
		var tableRefs int
		if ent != nil {
			tableRefs = ent.refs
		}
		s.mu.Unlock()
		switch {
		case refs[k] == 0:
			r.errorf("%s: no live context's chain reaches it", name)
		case ent == nil || !ent.committed:
			r.errorf("%s: indexed but not in the table", name)
		case tableRefs != refs[k]:
			r.errorf("%s: %d references counted, the contexts' chains make %d", name, tableRefs, refs[k])
		}
		r.Chunks++
		if err := s.checkGroupRecord(e.ns, e.key, e.g); err != nil {
			r.errorf("%s: %v", name, err)
			continue
		}
		r.Slices += len(e.g.Slices)
	}
	s.mu.Lock()
	for k, e := range s.groups {
		if e.committed && byKey[k] == nil {
			r.errorf("group %s/%x: in the table but not indexed", k.ns, k.key[:8])
		}
	}
	s.mu.Unlock()
	return nil
}

// checkGroupRecord reads a group's record header and slices and checks them
// against its entry.
func (s *Store) checkGroupRecord(ns string, key [32]byte, g *lsm.Group) error {
	if len(g.Slices) == 0 {
		return fmt.Errorf("entry has no slices")
	}
	h, err := s.readEntryHeader(&g.Chunk)
	if err != nil {
		return err
	}
	ident, err := DecodeIdentity(h.Identity)
	if err != nil {
		return err
	}
	switch {
	case h.Flags&format.RecordGroup == 0 || h.Namespace != ns || h.Key != key:
		return fmt.Errorf("record at segment %d offset %d is not this group's (flags %#x, %s/%x)", g.Segment, g.Offset, h.Flags, h.Namespace, h.Key[:8])
	case h.Group != g.Index || h.Parent != g.Parent || h.Segment != g.Segment || h.Tokens != g.Tokens || h.RecordBytes != uint64(g.Length):
		return fmt.Errorf("record header (position %d, segment %d, %d tokens in %d bytes) disagrees with the entry", h.Group, h.Segment, h.Tokens, h.RecordBytes)
	case h.Binding != state.NewGroupBinding(ns, ident, key) || h.Binding != g.Bind:
		return fmt.Errorf("record binding is not the group binding of its namespace, identity and key")
	case state.TokensDigest(h.TokenIDs) != g.Digest || fmt.Sprint(h.TokenIDs) != fmt.Sprint(g.IDs):
		return fmt.Errorf("record token ids disagree with the entry's")
	case len(h.Slices) != len(g.Slices):
		return fmt.Errorf("record has %d slices, index %d", len(h.Slices), len(g.Slices))
	}
	c := &ctxState{ns: ns, id: "(group)", probe: true}
	c.setIdentity(ident)
	src := &itemSrc{bind: g.Bind, key: key}
	items := make([]fetchItem, len(g.Slices))
	ch := g.Chunk
	for i, sl := range g.Slices {
		if h.Slices[i] != sl {
			return fmt.Errorf("slice %d differs between record and index", i)
		}
		items[i] = fetchItem{ch: &ch, sl: sl, group: g.Index, dst: make([]byte, sl.Raw), src: src}
	}
	return s.fetch(c, items, false)
}

// checkTokenCoverage checks a token-addressed context: its chain is whole
// in the table, and its chunk keys are one at its full group count (its
// tail, or a tip record) covering its tail, and at most one below it: an
// earlier tail or tip record that a full group superseded, kept as the
// newest durable record naming the context until a later one is (see
// indexChainJob).
func (s *Store) checkTokenCoverage(r *CheckReport, c *ctxState, cc *ctxChunks) {
	name := c.ns + "/" + c.id
	s.mu.Lock()
	_, err := s.chainLocked(c)
	full, tail := int(c.rec.Tokens)/s.ct, int(c.rec.Tokens)%s.ct
	ids := len(c.rec.TailIDs)
	s.mu.Unlock()
	if err != nil {
		r.errorf("%s: %v", name, err)
	}
	if ids != tail {
		r.errorf("%s: %d tail token ids for a %d-token tail", name, ids, tail)
	}
	var groups []uint32
	if cc != nil {
		groups = cc.groups
	}
	at, below := -1, 0
	bad := false
	for i, g := range groups {
		switch {
		case int(g) == full:
			at = i
		case int(g) < full && int(cc.tokens[i]) < s.ct:
			below++
		default:
			bad = true
		}
	}
	switch {
	case bad || below > 1:
		r.errorf("%s: chunk keys at groups %v, want one at group %d and at most one kept below it (a superseded tail or tip)", name, groups, full)
	case tail > 0 && (at < 0 || int(cc.tokens[at]) < tail):
		r.errorf("%s: its %d-token tail has no record covering it", name, tail)
	case at >= 0 && below > 0:
		r.errorf("%s: chunk keys at groups %v: a record kept below its tail or tip record, which replaced it", name, groups)
	}
}
