package chunk

import (
	"fmt"
	"sort"

	"github.com/hcache/hcache/chunk/format"
	"github.com/hcache/hcache/lsm"
	"github.com/hcache/hcache/state"
)

// Repair of token-addressed state: a group record is adopted iff the chain
// of an adopted (live: not tombstoned, newest generation) token-addressed
// context reaches it; reference counts are derived from those chains at
// the next Open, as always.

// tokenAddressed reports whether a picked context's records are version 3
// (its tail and tip records carry the chain section).
func (p *ctxPick) tokenAddressed() bool {
	for _, c := range p.groups {
		if c.h.Version == format.VersionV3 {
			return true
		}
	}
	return false
}

// repairTokenContext adopts a token-addressed context: its latest state is
// its record (tail or tip) with the most tokens (a context only grows
// within a generation); its chain is walked back from that record's tip
// through the group records. It returns whether the context was adopted.
func repairTokenContext(b *lsm.Batch, ct int, p *ctxPick, groups map[gid]*repairCand, adopted map[gid]*repairCand, live map[uint32]uint64, rep *RepairReport) bool {
	var best *repairCand
	total := func(c *repairCand) uint64 { return uint64(c.h.Group)*uint64(ct) + uint64(c.h.Tokens) }
	for _, c := range p.groups {
		if c.h.Version != format.VersionV3 {
			continue
		}
		if best == nil || total(c) > total(best) || total(c) == total(best) && (c.seg > best.seg || c.seg == best.seg && c.off > best.off) {
			best = c
		}
	}
	if n := len(p.groups) - 1; n > 0 {
		rep.Superseded += n
	}
	tip := best.h.Parent
	if best.h.Flags&format.RecordTip != 0 {
		tip = best.h.Key
	}
	full := int(best.h.Group)
	chain := make([]*repairCand, full)
	k := tip
	for i := full - 1; i >= 0; i-- {
		g := groups[gid{p.ns, k}]
		if g == nil || int(g.h.Group) != i || string(g.h.Identity) != string(p.ident) || string(g.h.Salt) != string(best.h.Salt) {
			rep.SetAside = append(rep.SetAside, fmt.Sprintf("%s/%s: group %d (key %x) of its chain is not in the segments (or is another chain's); the context is not adopted", p.ns, p.id, i, k[:8]))
			return false
		}
		chain[i] = g
		k = g.h.Parent
	}
	if k != ([32]byte{}) {
		rep.SetAside = append(rep.SetAside, fmt.Sprintf("%s/%s: its chain's first group has a parent; the context is not adopted", p.ns, p.id))
		return false
	}
	for _, g := range chain {
		adopted[gid{g.h.Namespace, g.h.Key}] = g
	}
	ch := lsm.Chunk{Segment: best.seg, Offset: best.off, Length: uint32(best.h.RecordBytes), Tokens: best.h.Tokens, Slices: best.h.Slices}
	b.PutChunk(p.ns, p.id, best.h.Group, &ch)
	live[best.seg] += best.h.RecordBytes
	tokens := total(best)
	rec := lsm.Context{Identity: p.ident, Tokens: tokens, Gen: p.gen, Flags: lsm.FlagTokens, Salt: best.h.Salt, Tip: tip, TailIDs: best.h.TokenIDs}
	b.PutContext(p.ns, p.id, &rec)
	rep.Contexts++
	rep.Groups += full
	if best.h.Tokens > 0 {
		rep.Groups++
	}
	rep.Tokens += tokens
	rep.Adopted = append(rep.Adopted, fmt.Sprintf("%s/%s: %d tokens, %d shared groups and a %d-token tail (generation %d)", p.ns, p.id, tokens, full, best.h.Tokens, p.gen))
	return true
}

// repairPutGroups indexes the adopted group records; the others are set
// aside (no live context's chain reaches them: their last sharer was
// deleted, or they were never referenced by a commit).
func repairPutGroups(b *lsm.Batch, groups, adopted map[gid]*repairCand, live map[uint32]uint64, rep *RepairReport) {
	ids := make([]gid, 0, len(adopted))
	for k := range adopted {
		ids = append(ids, k)
	}
	sort.Slice(ids, func(i, j int) bool {
		if ids[i].ns != ids[j].ns {
			return ids[i].ns < ids[j].ns
		}
		return string(ids[i].key[:]) < string(ids[j].key[:])
	})
	for _, k := range ids {
		c := adopted[k]
		g := lsm.Group{
			Chunk: lsm.Chunk{Segment: c.seg, Offset: c.off, Length: uint32(c.h.RecordBytes), Tokens: c.h.Tokens, Slices: c.h.Slices},
			Index: c.h.Group, Parent: c.h.Parent, Bind: c.h.Binding, Digest: state.TokensDigest(c.h.TokenIDs), IDs: c.h.TokenIDs,
		}
		b.PutGroup(k.ns, k.key, &g)
		live[c.seg] += c.h.RecordBytes
	}
	rep.SharedGroups = len(adopted)
	if n := len(groups) - len(adopted); n > 0 {
		rep.SetAside = append(rep.SetAside, fmt.Sprintf("%d shared group records that no live context's chain reaches (their last sharer was deleted, or no commit referenced them)", n))
	}
}
