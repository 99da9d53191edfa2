package chunk

import (
	"errors"
	"fmt"
	"sort"
	"syscall"

	"github.com/cockroachdb/pebble/v2/vfs"
	"golang.org/x/sys/unix"

	"github.com/hcache/hcache/chunk/format"
	"github.com/hcache/hcache/lsm"
)

// Deletes and evictions are facts of the segment log. Each deleted context
// generation gets a tombstone record (its namespace, id and generation),
// appended and made durable (fdatasync) BEFORE the index batch that removes
// the context's keys; that batch also indexes the tombstone under a "t" key
// and records the segment's new append point. So:
//
//   - a delete is acknowledged, or an eviction takes effect, only once its
//     tombstone is durable: Repair, which sees only segments, sets aside every
//     record of that generation or an older one;
//   - a crash after the tombstone is durable and before the index commit
//     leaves a tombstone past the indexed append point (or in a segment file
//     the index does not list yet); Open rolls such a delete forward
//     (rollForwardTombstones), so the index and a later Repair agree;
//   - if the tombstone cannot be written, the delete fails and nothing
//     changes; if its write or fdatasync fails after it may have reached the
//     disk, it is written once more on a fresh segment, and if that fails too
//     the store refuses further writes (a context left live beside a
//     tombstone that might be durable could lose later acknowledged rows to a
//     repair).
//
// GC carries a tombstone (gc.go carryTombstones) while a segment that held
// the context's records exists.

// tombPlan is one context generation being deleted.
type tombPlan struct {
	c      *ctxState
	gen    uint64
	chunks []*lsm.Chunk
	segs   []uint32 // segments holding its records (indexed, or written by this process)
	seg    *segFile // where its tombstone went
	off    uint64
}

// deleteCtxs deletes contexts durably: their tombstones are appended (one
// write each) and made durable (one fdatasync per touched segment), then one
// synced index batch removes their keys and indexes the tombstones. It runs
// on the flusher, or on the committer while the flusher keeps writing
// (evictions: allocate serializes allocation). On an error before the index
// commit nothing changed.
func (s *Store) deleteCtxs(cs []*ctxState) error {
	if len(cs) == 0 {
		return nil
	}
	plans := make([]*tombPlan, 0, len(cs))
	for _, c := range cs {
		p := &tombPlan{c: c}
		s.mu.Lock()
		p.gen = c.rec.Gen
		s.mu.Unlock()
		// A chunk value that does not decode fails the delete: its
		// segment's live count could not be kept right.
		err := s.db.ScanChunks(c.ns, c.id, func(_ uint32, ch *lsm.Chunk) error {
			p.chunks = append(p.chunks, ch)
			return nil
		})
		if err != nil {
			return err
		}
		seen := map[uint32]bool{}
		for _, ch := range p.chunks {
			if !seen[ch.Segment] {
				seen[ch.Segment] = true
				p.segs = append(p.segs, ch.Segment)
			}
		}
		// Records the index does not list (a partial group's earlier
		// versions, writes that failed) lie in segments this process
		// wrote the context to.
		s.mu.Lock()
		for id := range c.wroteSegs {
			if !seen[id] && s.segs[id] != nil {
				seen[id] = true
				p.segs = append(p.segs, id)
			}
		}
		s.mu.Unlock()
		sort.Slice(p.segs, func(i, j int) bool { return p.segs[i] < p.segs[j] })
		plans = append(plans, p)
	}
	if err := s.writeTombstones(plans); err != nil {
		return err
	}
	b := s.db.NewBatch()
	s.mu.Lock()
	segTouched := map[uint32]bool{}
	for _, p := range plans {
		c := p.c
		b.DeleteContext(c.ns, c.id)
		for _, ch := range p.chunks {
			if rec := s.segRecs[ch.Segment]; rec != nil {
				s.invariant(rec.Live >= uint64(ch.Length), "segment %d: %d live bytes, less than the %d-byte record of %s/%s being deleted", ch.Segment, rec.Live, ch.Length, c.ns, c.id)
				rec.Live -= min(rec.Live, uint64(ch.Length))
				segTouched[ch.Segment] = true
			}
		}
		t := lsm.Tombstone{Namespace: c.ns, ID: c.id, Gen: p.gen, Segments: p.segs}
		b.PutTombstone(p.seg.id, p.off, &t)
		segTouched[p.seg.id] = true
		if c.tokCtx() {
			s.releaseChainLocked(b, c)
		}
		c.deleted = true
		s.live -= c.live
		c.live = 0
		if s.ctxs[ctxMapKey(c.ns, c.id)] == c {
			delete(s.ctxs, ctxMapKey(c.ns, c.id))
		}
	}
	for id := range s.groupSegTouched {
		segTouched[id] = true
	}
	clear(s.groupSegTouched)
	for id := range segTouched {
		if rec := s.segRecs[id]; rec != nil {
			b.PutSegment(id, rec)
		}
	}
	s.mu.Unlock()
	if s.cache != nil {
		for _, p := range plans {
			s.cache.dropGen(p.gen)
		}
	}
	if err := b.Commit(true); err != nil {
		s.mu.Lock()
		s.failed = err
		s.mu.Unlock()
		s.opts.Logf("chunk: index commit of a delete failed: %v; the store refuses further writes", err)
		return err
	}
	return nil
}

// writeTombstones appends the plans' tombstone records and makes them
// durable. An allocation that fails (a full disk even with the
// ballast released) changes nothing. A write or fdatasync that fails may
// have left a tombstone on disk: the segment is sealed and every tombstone is
// written again on a fresh one; if that fails too the store refuses further
// writes.
func (s *Store) writeTombstones(plans []*tombPlan) error {
	var err error
	mayBeOnDisk := false
	for attempt := 0; attempt < 2; attempt++ {
		var written bool
		written, err = s.writeTombstonesOnce(plans)
		if err == nil {
			return nil
		}
		mayBeOnDisk = mayBeOnDisk || written
		if !mayBeOnDisk {
			return fmt.Errorf("chunk: delete: the tombstone could not be written (%w); nothing was deleted", err)
		}
		s.opts.Logf("chunk: writing a tombstone failed (%v); its segment is sealed and the tombstones are written again", err)
	}
	err = fmt.Errorf("chunk: delete: a tombstone may be on disk but could not be made durable (%w); nothing was deleted, and the store refuses further writes", err)
	s.mu.Lock()
	if s.failed == nil {
		s.failed = err
	}
	s.mu.Unlock()
	s.opts.Logf("%v", err)
	return err
}

// writeTombstonesOnce appends and syncs the plans' tombstones; written
// reports whether anything may have reached a segment.
func (s *Store) writeTombstonesOnce(plans []*tombPlan) (written bool, err error) {
	touched := map[*segFile]bool{}
	for _, p := range plans {
		seg, off, w, err := s.appendTombstoneRecord(p.gen, p.c.ns, p.c.id)
		written = written || w
		if err != nil {
			if seg != nil {
				s.sealFailed(seg)
			}
			return written, err
		}
		p.seg, p.off = seg, off
		touched[seg] = true
	}
	for sg := range touched {
		if err := sg.datasync(); err != nil {
			s.sealFailed(sg)
			return true, err
		}
	}
	return true, nil
}

// sealFailed seals a segment whose write or fdatasync failed: nothing
// written to it since is trusted, and new records go to a fresh one.
func (s *Store) sealFailed(sg *segFile) {
	s.mu.Lock()
	defer s.mu.Unlock()
	sg.syncFailed = true
	if rec := s.segRecs[sg.id]; rec != nil {
		rec.Sealed = true
	}
	if s.active == sg {
		s.active = nil
	}
}

// appendTombstoneRecord writes a tombstone record of generation gen of ns/id
// to the log (not synced) and returns where it went, and whether a write was
// attempted. Tombstones may use the room of a full disk (GC's allocation):
// when the allocation meets ENOSPC, the ballast is released and it
// is tried once more, so a delete does not fail because the disk is full.
func (s *Store) appendTombstoneRecord(gen uint64, ns, id string) (*segFile, uint64, bool, error) {
	h := RecordHeader{Version: format.Version, Flags: RecordTombstone, ChunkTokens: uint16(s.ct), Gen: gen, Namespace: ns, ContextID: id}
	hb := format.HeaderBytesFor(0, h.DescBytes())
	seg, off, err := s.allocate(uint64(hb), true)
	if err != nil && errors.Is(err, syscall.ENOSPC) {
		// allocate entered the disk-full state, which released the
		// ballast: there is room now.
		seg, off, err = s.allocate(uint64(hb), true)
	}
	if err != nil {
		return nil, 0, false, err
	}
	h.HeaderBytes, h.RecordBytes, h.Segment = uint32(hb), uint64(hb), seg.id
	buf, err := s.scratch.get(hb)
	if err != nil {
		return nil, 0, false, err
	}
	h.Encode(buf.Bytes()[:hb])
	err = seg.write([][]byte{buf.Bytes()[:hb]}, int64(off))
	s.scratch.put(buf)
	if err != nil {
		return seg, 0, true, err
	}
	return seg, off, true, nil
}

// noteWrite records that a record of c went to segment id. Call with s.mu
// held.
func (c *ctxState) noteWrite(id uint32) {
	if c.wroteSegs == nil {
		c.wroteSegs = map[uint32]bool{}
	}
	c.wroteSegs[id] = true
}

// scannedTomb is a tombstone record found by scanTombstones.
type scannedTomb struct {
	off uint64
	h   *RecordHeader
}

// scanTombstones lists the tombstone records of segment file path (id) at or
// past offset from, block by block as Repair reads them (a damaged block
// does not hide the records after it). Only headers are read.
func (s *Store) scanTombstones(path string, id uint32, from uint64) ([]scannedTomb, error) {
	f, err := s.fs.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	size := st.Size()
	defer scanAdvice(f)()
	var out []scannedTomb
	block := make([]byte, BlockBytes)
	for off := nextData(f, int64(max(from, format.SegmentHeaderBytes)), size); off+BlockBytes <= size; {
		if _, err := f.ReadAt(block, off); err != nil {
			return nil, err
		}
		hdr := block
		if leU32(block[12:]) > BlockBytes {
			if want := int(leU32(block[12:])); want <= format.MaxHeaderBytes && want%BlockBytes == 0 && off+int64(want) <= size {
				hdr = make([]byte, want)
				if _, err := f.ReadAt(hdr, off); err != nil {
					return nil, err
				}
			}
		}
		h, err := DecodeRecordHeader(hdr)
		if err != nil || off+int64(h.RecordBytes) > size || h.RecordBytes == 0 {
			off = nextData(f, off+BlockBytes, size)
			continue
		}
		if h.Flags&RecordTombstone != 0 && h.Segment == id && lsm.ValidateName("namespace", h.Namespace) == nil && lsm.ValidateName("context id", h.ContextID) == nil {
			out = append(out, scannedTomb{uint64(off), h})
		}
		off += int64(h.RecordBytes)
	}
	return out, nil
}

// nextData returns the first block at or after off (a block offset) that
// may hold data: the file system's SEEK_DATA, which reports never-written
// space (holes, and on ext4 preallocated unwritten extents) that reads as
// zeros and so holds no record; size when none follows. Where the file has
// no descriptor or the file system cannot say, it returns off (every block
// is read). A whole preallocated segment's unwritten tail took Open a block
// read per 4 KiB (seconds per GiB) without it.
func nextData(f vfs.File, off, size int64) int64 {
	fd := f.Fd()
	if fd == vfs.InvalidFd || off >= size {
		return off
	}
	n, err := unix.Seek(int(fd), off, unix.SEEK_DATA)
	switch {
	case errors.Is(err, unix.ENXIO):
		return size // no data past off
	case err != nil || n <= off:
		return off
	}
	return max(off, n-n%BlockBytes)
}

// scanAdvice readies f for a scan that skips never-written space with
// nextData: no readahead (on ext4 a page in the page cache counts as data
// for SEEK_DATA even over an unwritten extent, so pages read ahead of the
// scan made the rest of the file look written), and, when the scan is done,
// its pages dropped, so that a later scan is not misled by them either.
// Without a descriptor it does nothing.
func scanAdvice(f vfs.File) (done func()) {
	fd := f.Fd()
	if fd == vfs.InvalidFd {
		return func() {}
	}
	unix.Fadvise(int(fd), 0, 0, unix.FADV_RANDOM)
	return func() { unix.Fadvise(int(fd), 0, 0, unix.FADV_DONTNEED) }
}

// rollForwardTombstones completes the deletes whose tombstones are durable
// but whose index commit a crash lost: tombstones past the active segment's
// indexed append point, and in segment files the index does not list (kept
// orphans). A context whose generation such a tombstone covers is deleted
// from the index (Repair would set its records aside; so does Open now).
// Tombstones in the active segment's tail are indexed and the append point
// moves past them, so later records never overwrite them. Generations named
// by any tombstone are never handed out again. A read-only open applies the
// same deletes in memory and writes nothing.
func (s *Store) rollForwardTombstones() error {
	// Tombstones indexed already: their generations are used.
	err := s.db.ScanTombstones(func(_ uint32, _ uint64, t *lsm.Tombstone) error {
		s.nextGen = max(s.nextGen, t.Gen+1)
		return nil
	})
	if err != nil {
		return fmt.Errorf("chunk: load tombstones: %w", err)
	}
	type found struct {
		seg  uint32
		tail bool // in the active segment's tail (indexed, moves the append point)
		t    scannedTomb
	}
	var todo []found
	if s.active != nil {
		rec := s.segRecs[s.active.id]
		ts, err := s.scanTombstones(s.active.name, s.active.id, rec.Written)
		if err != nil {
			return fmt.Errorf("chunk: scan the tail of segment %d for tombstones: %w", s.active.id, err)
		}
		for _, t := range ts {
			todo = append(todo, found{s.active.id, true, t})
		}
	}
	for _, n := range s.recovery.KeptOrphans {
		id, _ := parseSegName(n)
		ts, err := s.scanTombstones(s.fs.PathJoin(s.segDir, n), id, 0)
		if err != nil {
			return fmt.Errorf("chunk: scan orphan segment %s for tombstones: %w", n, err)
		}
		for _, t := range ts {
			todo = append(todo, found{id, false, t})
		}
	}
	if len(todo) == 0 {
		return nil
	}
	b := s.db.NewBatch()
	segTouched := map[uint32]bool{}
	rolled := 0
	for _, f := range todo {
		h := f.t.h
		s.nextGen = max(s.nextGen, h.Gen+1)
		c := s.ctxs[ctxMapKey(h.Namespace, h.ContextID)]
		if c == nil || c.rec.Gen > h.Gen {
			continue // deleted already, or recreated since
		}
		rolled++
		var chunks []*lsm.Chunk
		segSet := map[uint32]bool{}
		err := s.db.ScanChunks(c.ns, c.id, func(_ uint32, ch *lsm.Chunk) error {
			chunks = append(chunks, ch)
			segSet[ch.Segment] = true
			return nil
		})
		if err != nil {
			return err
		}
		s.opts.Logf("chunk: %s/%s generation %d: its tombstone (segment %d offset %d) is durable but the delete was not indexed (a crash); the delete is completed", c.ns, c.id, c.rec.Gen, f.seg, f.t.off)
		b.DeleteContext(c.ns, c.id)
		for _, ch := range chunks {
			if rec := s.segRecs[ch.Segment]; rec != nil {
				s.invariant(rec.Live >= uint64(ch.Length), "segment %d: %d live bytes, less than the %d-byte record of %s/%s whose delete is rolled forward", ch.Segment, rec.Live, ch.Length, c.ns, c.id)
				rec.Live -= min(rec.Live, uint64(ch.Length))
				segTouched[ch.Segment] = true
			}
		}
		if f.tail {
			segs := make([]uint32, 0, len(segSet))
			for id := range segSet {
				segs = append(segs, id)
			}
			sort.Slice(segs, func(i, j int) bool { return segs[i] < segs[j] })
			t := lsm.Tombstone{Namespace: c.ns, ID: c.id, Gen: h.Gen, Segments: segs}
			b.PutTombstone(f.seg, f.t.off, &t)
			rec := s.segRecs[f.seg]
			rec.Written = max(rec.Written, f.t.off+h.RecordBytes)
			segTouched[f.seg] = true
		}
		if c.tokCtx() {
			s.releaseChainLocked(b, c)
		}
		s.live -= c.live
		c.live = 0
		c.deleted = true
		delete(s.ctxs, ctxMapKey(c.ns, c.id))
		s.recovery.Contexts--
	}
	s.recovery.TombstonesRolledForward = rolled
	if s.readOnly || rolled == 0 {
		b.Discard()
		return nil
	}
	for id := range s.groupSegTouched {
		segTouched[id] = true
	}
	clear(s.groupSegTouched)
	for id := range segTouched {
		if rec := s.segRecs[id]; rec != nil {
			b.PutSegment(id, rec)
		}
	}
	return b.Commit(true)
}

// Delete removes a context durably: it returns once the context's tombstone
// is durable in the segment log and the index no longer lists it (see
// deleteCtxs); no crash and no repair brings it back. When that cannot be
// done it returns the error and the context is unchanged. An open writer of
// it fails its next Flush.
func (s *Store) Delete(ns, id string) error {
	s.mu.Lock()
	c, err := s.lookup(ns, id)
	s.mu.Unlock()
	if err != nil {
		return err
	}
	done := make(chan error, 1)
	if err := s.submit(op{kind: opDelete, c: c, done: done}); err != nil {
		return err
	}
	return <-done
}

// markDamaged records that a context's data failed a check.
func (s *Store) markDamaged(c *ctxState) {
	if c.probe { // a restore by tokens' stand-in: nothing to mark
		return
	}
	s.mu.Lock()
	already := c.rec.Flags&lsm.FlagDamaged != 0
	c.rec.Flags |= lsm.FlagDamaged
	s.mu.Unlock()
	if already {
		return
	}
	s.stats.damaged.Add(1)
	// Persist it without waiting; best effort if the store is closing.
	_ = s.submit(op{kind: opDamage, c: c})
}
