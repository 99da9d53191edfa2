package chunk

import (
	"fmt"
	"sort"
	"strings"

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
	total := func(c *repairCand) uint64 { return uint64(c.h.Group)*uint64(ct) + uint64(c.h.Tokens) }
	var cands []*repairCand
	for _, c := range p.groups {
		if c.h.Version == format.VersionV3 {
			cands = append(cands, c)
		}
	}
	// Newest state first (a context only grows within a generation); a
	// state whose chain the segments do not hold whole (a crash kept its
	// record but lost a group written with it, never acknowledged) gives
	// way to the next.
	sort.Slice(cands, func(i, j int) bool {
		a, b := cands[i], cands[j]
		if total(a) != total(b) {
			return total(a) > total(b)
		}
		return a.seg > b.seg || a.seg == b.seg && a.off > b.off
	})
	var best *repairCand
	var chain []*repairCand
	var tip [32]byte
	var why []string
	for _, c := range cands {
		var err error
		if chain, tip, err = repairChain(c, p, groups); err == nil {
			best = c
			break
		}
		why = append(why, err.Error())
	}
	if best == nil {
		rep.SetAside = append(rep.SetAside, fmt.Sprintf("%s/%s: no state whose chain the segments hold whole (%s); the context is not adopted", p.ns, p.id, strings.Join(why, "; ")))
		return false
	}
	if len(why) > 0 {
		rep.SetAside = append(rep.SetAside, fmt.Sprintf("%s/%s: %d newer states set aside (%s)", p.ns, p.id, len(why), strings.Join(why, "; ")))
	}
	if n := len(p.groups) - 1 - len(why); n > 0 {
		rep.Superseded += n
	}
	full := int(best.h.Group)
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

// repairChain walks the chain a tail or tip record names back through the
// group records, checking each one's position, identity and salt.
func repairChain(c *repairCand, p *ctxPick, groups map[gid]*repairCand) ([]*repairCand, [32]byte, error) {
	tip := c.h.Parent
	if c.h.Flags&format.RecordTip != 0 {
		tip = c.h.Key
	}
	chain := make([]*repairCand, c.h.Group)
	k := tip
	for i := int(c.h.Group) - 1; i >= 0; i-- {
		g := groups[gid{p.ns, k}]
		if g == nil || int(g.h.Group) != i || string(g.h.Identity) != string(p.ident) || string(g.h.Salt) != string(c.h.Salt) {
			return nil, tip, fmt.Errorf("the %d-token state's group %d (key %x) is not in the segments", uint64(c.h.Group)*uint64(c.h.ChunkTokens)+uint64(c.h.Tokens), i, k[:8])
		}
		chain[i] = g
		k = g.h.Parent
	}
	if k != ([32]byte{}) {
		return nil, tip, fmt.Errorf("the chain's first group has a parent")
	}
	return chain, tip, nil
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
