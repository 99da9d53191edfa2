package chunk

import (
	"errors"
	"fmt"
	"syscall"

	"github.com/hcache/hcache/chunk/format"
	"github.com/hcache/hcache/lsm"
	"github.com/hcache/hcache/state"
)

// The flusher's side of token-addressed contexts: dedup at hand-off and
// the commit of group records and references.

// startChain handles an op of a token-addressed context in the flusher
// (startWrite): a reference op, or a full group whose key is stored or
// being written, completes at once without a write (done); a new group
// gets its entry (pinned by the job) and its group binding, which the
// record's checksums start from; a tail keeps the context's binding.
func (f *flusher) startChain(j *writeJob, c *ctxState, binding Binding) (Binding, bool) {
	s := f.s
	co := j.chain
	if co.refs != nil {
		f.compl <- j
		return binding, true
	}
	if j.tokens != s.ct {
		return binding, false // a tail: a context-owned record
	}
	digest := state.TokensDigest(co.ids)
	s.mu.Lock()
	e := s.groups[gid{c.ns, co.key}]
	if e != nil && !e.failed {
		if e.digest != digest || e.index != j.group {
			s.mu.Unlock()
			s.stats.collisions.Add(1)
			j.err = fmt.Errorf("%w: %s/%s group %d: key %v is stored for other tokens; not written", ErrCollision, c.ns, c.id, j.group, co.key)
			f.compl <- j
			return binding, true
		}
		e.pending++
		co.ent = e
		s.mu.Unlock()
		s.stats.groupsDeduped.Add(1)
		f.compl <- j
		return binding, true
	}
	// New, or a failed write not yet unpinned (which stays out of the
	// table: it is dropped once its jobs are through).
	e = &groupEnt{ns: c.ns, key: co.key, parent: co.parent, index: j.group, digest: digest, sum: tokensSum(co.ids), pending: 1, writer: j}
	s.groups[gid{c.ns, co.key}] = e
	co.ent, co.wrote = e, true
	ident := c.ident
	s.mu.Unlock()
	co.bind = state.NewGroupBinding(c.ns, ident, co.key)
	return co.bind, false
}

// chainHeader makes h the version 3 header of a chain op's record: a group
// record (no context id, generation 0, the group binding) or a
// token-addressed context's tail.
func chainHeader(h *RecordHeader, c *ctxState, co *chainOp) {
	h.Version = format.VersionV3
	h.Salt = c.rec.Salt
	h.Parent = co.parent
	h.TokenIDs = co.ids
	if co.wrote {
		h.Flags = format.RecordGroup
		h.ContextID = ""
		h.Gen = 0
		h.Key = co.key
	}
}

// indexChainJob is indexJobs for an op of a token-addressed context: a
// reference op takes on stored groups; a group op indexes the group it
// wrote (its entry) or takes on the one it found, and supersedes the
// context's earlier partial record of that group; a tail op is indexed as
// a legacy context's. The job's pins are dropped in every case (a group no
// one references any more is dropped with them). Call with s.mu held.
func (s *Store) indexChainJob(b *lsm.Batch, j *writeJob, syncErr error, stored, superseded map[groupKey]*lsm.Chunk,
	newTokens map[*ctxState]uint64, segTouched map[uint32]bool, ctxTouched map[*ctxState]bool) {
	c, co := j.c, j.chain
	pins := co.refs
	if co.ent != nil {
		pins = []*groupEnt{co.ent}
	}
	defer func() {
		if co.wrote && !co.ent.committed {
			co.ent.failed, co.ent.writer = true, nil
		}
		s.unpinLocked(b, pins)
	}()
	err := j.err
	if err == nil && j.seg != nil && j.seg.syncFailed {
		err = errSyncFailed
	}
	if errors.Is(err, syscall.ENOSPC) && !errors.Is(err, ErrDiskFull) {
		s.enterDiskFullLocked(err)
	}
	if err == nil {
		err = syncErr
	}
	if err == nil {
		for i, e := range pins {
			if !e.committed && !(co.wrote && i == 0) {
				err = fmt.Errorf("chunk: %s/%s group %d: the shared group %v it references was never stored (its write failed)", c.ns, c.id, int(j.group)+i, e.key)
				break
			}
		}
	}
	if err != nil {
		if err != errSkipped && c.writeErr == nil {
			c.writeErr = err
		}
		return
	}
	if c.deleted || c.writeErr != nil {
		return
	}
	if _, ok := newTokens[c]; !ok {
		newTokens[c] = c.rec.Tokens
	}
	ct := uint64(s.ct)
	cur, start := newTokens[c], uint64(j.group)*ct
	if !s.invariant(j.wseq == c.writerSeq, "group %d of %s/%s committed for writer %d, which is gone: writer %d has opened the context since", j.group, c.ns, c.id, j.wseq, c.writerSeq) {
		c.writeErr = s.brokenErr()
		return
	}
	key := groupKey{c, j.group}
	// dropOld makes the context's earlier record of group g dead (a
	// partial tail flushed before).
	dropOld := func(g uint32, deleteKey bool) {
		k := groupKey{c, g}
		old, ok := superseded[k]
		if !ok && uint64(g)*ct <= c.rec.Tokens {
			old = stored[k]
		}
		if old == nil {
			return
		}
		if rec := s.segRecs[old.Segment]; rec != nil {
			s.invariant(rec.Live >= uint64(old.Length), "segment %d: %d live bytes, less than the %d-byte record of group %d of %s/%s that a rewrite supersedes", old.Segment, rec.Live, old.Length, g, c.ns, c.id)
			rec.Live -= min(rec.Live, uint64(old.Length))
			segTouched[old.Segment] = true
		}
		c.live -= int64(old.Length)
		s.live -= int64(old.Length)
		if deleteKey {
			b.DeleteChunk(c.ns, c.id, g)
			superseded[k] = nil
		}
	}
	// dropKept makes the records this tail or tip op replaces as the
	// context's name dead (keptRecords); its own record is durable by now
	// (this commit synced it), so one durable record names the context at
	// every point.
	dropKept := func() {
		for _, kr := range co.kept {
			k := groupKey{c, kr.g}
			old, ok := superseded[k]
			if kr.g >= j.group || ok && old == nil {
				continue // not below it, or dropped by this batch already
			}
			if !ok {
				superseded[k] = kr.ch
			}
			dropOld(kr.g, true)
		}
	}
	switch {
	case co.refs != nil:
		if !s.invariant(start == cur && cur%ct == 0, "%s/%s: a reference to groups from %d with %d tokens indexed", c.ns, c.id, j.group, cur) {
			c.writeErr = s.brokenErr()
			return
		}
		for _, e := range co.refs {
			e.refs++
		}
		c.ptip, c.ptail = co.refs[len(co.refs)-1].key, nil
		newTokens[c] = start + uint64(len(co.refs))*ct
	case j.tokens == s.ct:
		if !s.invariant(cur/ct == uint64(j.group), "%s/%s: full group %d committed with %d tokens indexed", c.ns, c.id, j.group, cur) {
			c.writeErr = s.brokenErr()
			return
		}
		e := co.ent
		if co.wrote {
			e.committed, e.writer = true, nil
			e.seg, e.length = j.seg.id, j.length
			b.PutGroup(c.ns, e.key, &lsm.Group{Chunk: j.chunk, Index: e.index, Parent: e.parent, Bind: co.bind, Digest: e.digest, IDs: co.ids})
			s.segRecs[j.seg.id].Live += uint64(j.length)
			segTouched[j.seg.id] = true
			s.live += int64(j.length)
			s.groupBytes += int64(j.length)
			s.groupCount++
			s.stats.groupsWritten.Add(1)
			s.stats.groupBytesWritten.Add(uint64(j.length))
			if s.cache != nil && s.cache.limit > 0 {
				for _, sl := range j.chunk.Slices {
					l := int(sl.Layer)
					s.cache.add(sliceKey{gkey: e.key, at: recordAt(j.seg.id, j.off), group: j.group, layer: sl.Layer, tokens: uint16(j.tokens)}, j.slab[j.layerOff[l]:j.layerOff[l]+int(sl.Raw)])
				}
			}
		}
		e.refs++
		// The context's record of this group (a tail, or a tip record
		// at this position) is superseded, but it stays indexed and
		// live: it is the newest durable record naming the context
		// (repair finds a context only through its own records), until
		// a tail or tip record written after it is durable (dropKept).
		c.ptip, c.ptail = e.key, nil
		newTokens[c] = start + ct
	case co.tip:
		if !s.invariant(start == cur, "%s/%s: a tip record at group %d with %d tokens indexed", c.ns, c.id, j.group, cur) {
			c.writeErr = s.brokenErr()
			return
		}
		dropOld(j.group, false)
		dropKept()
		ch := j.chunk
		superseded[key] = &ch
		b.PutChunk(c.ns, c.id, j.group, &ch)
		s.segRecs[j.seg.id].Live += uint64(j.length)
		c.live += int64(j.length)
		s.live += int64(j.length)
		c.ptail = nil
	default:
		end := start + uint64(j.tokens)
		if !s.invariant(start <= cur && end >= cur, "tail group %d of %s/%s (tokens %d-%d) with %d tokens indexed", j.group, c.ns, c.id, start, end, cur) {
			c.writeErr = s.brokenErr()
			return
		}
		dropOld(j.group, false)
		dropKept()
		ch := j.chunk
		superseded[key] = &ch
		b.PutChunk(c.ns, c.id, j.group, &ch)
		s.segRecs[j.seg.id].Live += uint64(j.length)
		c.live += int64(j.length)
		s.live += int64(j.length)
		c.ptail = co.ids
		newTokens[c] = max(newTokens[c], end)
		if s.cache != nil && s.cache.limit > 0 {
			s.cacheGroup(c, j)
		}
	}
	ctxTouched[c] = true
}

// keptRecords reads, for a tail or tip job of a token-addressed context
// (on the flusher, at commit, without the store lock), the context's chunk
// keys below the job's group into j.chain.kept: a tail or tip record that
// a full group superseded, kept indexed and live because it was the newest
// durable record naming the context (indexChainJob). A chunk value that
// does not decode fails the job, as in supersededRecords.
//
// A tail or tip op is the last op of its context in a commit (the writer
// waits for that commit before handing over more), so every record it
// replaces was indexed by an earlier commit and this read finds it.
func (s *Store) keptRecords(j *writeJob) {
	co := j.chain
	if co.refs != nil || j.tokens == s.ct || j.group == 0 {
		return
	}
	err := s.db.ScanChunks(j.c.ns, j.c.id, func(g uint32, ch *lsm.Chunk) error {
		if g < j.group {
			co.kept = append(co.kept, keptRec{g, ch})
		}
		return nil
	})
	if err != nil {
		j.err = fmt.Errorf("chunk: read the records %s/%s's group %d replaces: %w", j.c.ns, j.c.id, j.group, err)
	}
}

// keptChainSection is the chain section of a kept tail or tip record at
// group g of c (chain is c's committed chain, g below its length): the
// tip it names (group g-1's key) and, for a tail of tokens tokens, their
// ids, which are the first ids of group g (the tail grew into it). GC
// rebuilds a damaged header from it (headerFromIndex).
func (s *Store) keptChainSection(c *ctxState, chain []*groupEnt, g uint32, tokens int) (ChainKey, []uint32, error) {
	var tip ChainKey
	if g > 0 {
		tip = chain[g-1].key
	} else if tokens == 0 {
		return tip, nil, fmt.Errorf("%w: %s/%s: a tip record at group 0", ErrCorrupt, c.ns, c.id)
	}
	if tokens == 0 {
		return tip, nil, nil
	}
	e, err := s.db.GetGroup(c.ns, chain[g].key)
	if err != nil {
		return tip, nil, fmt.Errorf("%s/%s group %d: %w", c.ns, c.id, g, err)
	}
	if len(e.IDs) < tokens {
		return tip, nil, fmt.Errorf("%w: %s/%s group %d holds %d token ids, its kept tail %d", ErrCorrupt, c.ns, c.id, g, len(e.IDs), tokens)
	}
	return tip, e.IDs[:tokens], nil
}

// itemSrc is the binding and cache name of a fetched record that is not
// the fetching context's own (fetchItem.src).
type itemSrc struct {
	bind Binding
	gen  uint64   // a context's tail: its generation
	key  ChainKey // a shared group: its key (gen 0)
}

// cacheKey is the DRAM tier's name of an item's slice.
func (it *fetchItem) cacheKey(gen uint64) sliceKey {
	k := sliceKey{gen: gen, group: it.group, layer: it.sl.Layer, tokens: it.ch.Tokens}
	if it.src != nil {
		k.gen, k.gkey = it.src.gen, it.src.key
		if it.src.gen == 0 {
			k.at = recordAt(it.ch.Segment, it.ch.Offset)
		}
	}
	return k
}

// recordAt names a record's place for the DRAM tier.
func recordAt(seg uint32, off uint64) uint64 { return uint64(seg)<<40 | off/BlockBytes }

// liveGroupRecord reports whether the group record h at (segment id, off)
// is the one its entry points at, and its GC move.
func (s *Store) liveGroupRecord(h *RecordHeader, id uint32, off uint64) (gcMove, bool, error) {
	g, err := s.db.GetGroup(h.Namespace, h.Key)
	switch {
	case errors.Is(err, lsm.ErrNotFound):
		return gcMove{}, false, nil
	case err != nil:
		return gcMove{}, false, err
	case g.Segment != id || g.Offset != off:
		return gcMove{}, false, nil
	}
	s.mu.Lock()
	e := s.groups[gid{h.Namespace, h.Key}]
	s.mu.Unlock()
	if e == nil {
		return gcMove{}, false, fmt.Errorf("%w: group %v of %s is indexed but not in the table", ErrCorrupt, ChainKey(h.Key), h.Namespace)
	}
	return gcMove{g: g.Index, ch: &g.Chunk, grp: g, ge: e}, true, nil
}

// scanLiveGroups is scanLiveRecords for group records: those of the table
// in segment id, located through their entries.
func (s *Store) scanLiveGroups(id uint32) ([]gcMove, error) {
	s.mu.Lock()
	var ents []*groupEnt
	for _, e := range s.groups {
		if e.committed && e.seg == id {
			ents = append(ents, e)
		}
	}
	s.mu.Unlock()
	var moves []gcMove
	for _, e := range ents {
		g, err := s.db.GetGroup(e.ns, e.key)
		if err != nil {
			return nil, fmt.Errorf("group %v of %s: %w", e.key, e.ns, err)
		}
		if g.Segment == id {
			moves = append(moves, gcMove{g: g.Index, ch: &g.Chunk, grp: g, ge: e})
		}
	}
	return moves, nil
}

// moveGroup rewrites a group record (its header already checked) at the
// append point and re-points its entry in b. Runs on the flusher (GC).
func (s *Store) moveGroup(m gcMove, h *RecordHeader, rec []byte, b *lsm.Batch, touched map[*segFile]bool) error {
	if h.Flags&format.RecordGroup == 0 || h.Key != [32]byte(m.ge.key) || h.Namespace != m.ge.ns {
		return fmt.Errorf("%w: the record at segment %d offset %d is not the group its entry names", ErrCorrupt, m.ch.Segment, m.ch.Offset)
	}
	seg, off, err := s.allocate(uint64(m.ch.Length), true)
	if err != nil {
		return err
	}
	h.Segment = seg.id
	h.Encode(rec[:h.HeaderBytes])
	if err := seg.write([][]byte{rec}, int64(off)); err != nil {
		return err
	}
	touched[seg] = true
	ng := *m.grp
	ng.Segment, ng.Offset = seg.id, off
	b.PutGroup(m.ge.ns, m.ge.key, &ng)
	s.mu.Lock()
	s.segRecs[seg.id].Live += uint64(m.ch.Length)
	m.ge.seg = seg.id
	s.mu.Unlock()
	return nil
}

// startTip writes a tip record: a header naming the context generation,
// its full group count (op.group) and its tip key, no rows. It is indexed
// as the context's chunk key at that group (where a tail would be), so GC
// keeps it and repair finds the context even when it has no tail.
func (f *flusher) startTip(j *writeJob, c *ctxState, binding Binding, gen uint64, encIdent []byte) {
	s := f.s
	fail := func(err error) {
		j.err = err
		f.compl <- j
	}
	h := RecordHeader{Version: format.VersionV3, Flags: format.RecordTip, ChunkTokens: uint16(s.ct), Group: j.group, Gen: gen,
		Binding: binding, Namespace: c.ns, ContextID: c.id, Identity: encIdent, Salt: c.rec.Salt, Key: j.chain.key}
	hb := format.HeaderBytesFor(0, h.DescBytes())
	seg, off, err := s.allocate(uint64(hb), false)
	if err != nil {
		fail(err)
		return
	}
	s.mu.Lock()
	c.noteWrite(seg.id)
	s.mu.Unlock()
	j.seg, j.off, j.length = seg, off, uint32(hb)
	j.chunk = lsm.Chunk{Segment: seg.id, Offset: off, Length: uint32(hb)}
	if j.header, err = s.scratch.get(hb); err != nil {
		fail(err)
		return
	}
	h.HeaderBytes, h.RecordBytes, h.Segment = uint32(hb), uint64(hb), seg.id
	h.Encode(j.header.Bytes())
	s.stats.bytesWritten.Add(uint64(hb))
	seg.writeAsync([][]byte{j.header.Bytes()[:hb]}, int64(off), func(err error) {
		j.err = err
		f.compl <- j
	})
}
