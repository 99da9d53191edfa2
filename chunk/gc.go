package chunk

import (
	"errors"
	"fmt"
	"hash/crc32"
	"sort"
	"time"

	"github.com/hcache/hcache/chunk/format"
	"github.com/hcache/hcache/lsm"
)

// GCResult reports one garbage collection.
type GCResult struct {
	Segments     int    // segments compacted and removed
	MovedRecords int    // live records rewritten
	MovedBytes   uint64 // their bytes
	Err          error
}

// GC compacts segments other than the active one whose live fraction is below GCLiveRatio: their
// live records are rewritten at the append point, the index is switched to
// the new locations in one synced batch, and the old files are deleted once
// no restore reads them. Restores are not blocked; writes wait while it runs.
func (s *Store) GC() GCResult {
	done := make(chan GCResult, 1)
	if err := s.submit(op{kind: opGC, gcDone: done}); err != nil {
		return GCResult{Err: err}
	}
	return <-done
}

// gcVictims lists the segments worth compacting. Call with s.mu held.
func (s *Store) gcVictims() []uint32 {
	var victims []uint32
	for id, rec := range s.segRecs {
		if (s.active != nil && s.active.id == id) || s.segs[id] == nil || rec.Location != "" {
			// GC compacts local segments; one another provider holds is
			// that tier's to compact.
			continue
		}
		used := rec.Written - min(rec.Written, format.SegmentHeaderBytes)
		if used == 0 || float64(rec.Live) < s.opts.GCLiveRatio*float64(used) {
			victims = append(victims, id)
		}
	}
	return victims
}

// gcLoop runs GC every interval when a segment is worth compacting.
// maybeLeaveDiskFull ends the disk-full state after a GC: when the file
// system reports enough free space for the ballast and a segment
// (or, where it reports nothing, when the GC removed a segment), the ballast
// is taken again and writes resume.
func (s *Store) maybeLeaveDiskFull(res *GCResult) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.diskFull {
		return
	}
	if du, err := s.fs.GetDiskUsage(s.dir); err == nil {
		if int64(du.AvailBytes) < s.opts.BallastBytes+2*initialSegmentBytes {
			return
		}
	} else if res.Err != nil {
		return // no usage reported: a GC that completed is the best sign
	}
	if err := s.takeBallast(); err != nil {
		s.opts.Logf("chunk: %s: GC freed space but the ballast could not be taken again (%v); writes stay refused", s.dir, err)
		return
	}
	s.diskFull = false
	s.opts.Logf("chunk: %s: GC freed space; ballast taken again; writes resume", s.dir)
}

func (s *Store) gcLoop(interval time.Duration) {
	defer s.gcWG.Done()
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-s.gcStop:
			return
		case <-t.C:
		}
		s.mu.Lock()
		n := len(s.gcVictims())
		s.mu.Unlock()
		if n == 0 {
			continue
		}
		if res := s.GC(); res.Err != nil && !errors.Is(res.Err, ErrClosed) {
			s.opts.Logf("chunk: background GC: %v", res.Err)
		}
	}
}

func (s *Store) gcNow() GCResult {
	var res GCResult
	defer s.maybeLeaveDiskFull(&res)
	s.mu.Lock()
	victims := s.gcVictims()
	// Segments with nothing live first: dropping them needs no space.
	sort.Slice(victims, func(i, j int) bool {
		ei, ej := s.segRecs[victims[i]].Live == 0, s.segRecs[victims[j]].Live == 0
		if ei != ej {
			return ei
		}
		return victims[i] < victims[j]
	})
	s.mu.Unlock()
	for _, id := range victims {
		moved, bytes, err := s.compact(id)
		res.MovedRecords += moved
		res.MovedBytes += bytes
		if err != nil {
			res.Err = fmt.Errorf("chunk: gc of segment %d: %w", id, err)
			return res
		}
		res.Segments++
		s.stats.gcRuns.Add(1)
		s.stats.gcMoved.Add(bytes)
	}
	return res
}

type gcMove struct {
	g  uint32
	ch *lsm.Chunk
	c  *ctxState
	// grp: a shared group record (c nil), moved with its entry.
	grp *lsm.Group
	ge  *groupEnt
}

// compact moves the live records out of segment id and drops it. A segment
// with no live record moves nothing and is dropped without allocating
// anything (so GC frees space on a full disk).
func (s *Store) compact(id uint32) (int, uint64, error) {
	moves, err := s.liveRecords(id)
	if err != nil {
		return 0, 0, err
	}
	s.mu.Lock()
	old := s.segs[id]
	s.mu.Unlock()
	b := s.db.NewBatch()
	touched := map[*segFile]bool{}
	var movedBytes uint64
	moved := 0
	for _, m := range moves {
		buf, err := s.scratch.get(int(m.ch.Length))
		if err != nil {
			b.Discard()
			return moved, movedBytes, err
		}
		rec := buf.Bytes()[:m.ch.Length]
		if err := old.readAt(rec, int64(m.ch.Offset)); err != nil {
			s.scratch.put(buf)
			b.Discard()
			return moved, movedBytes, err
		}
		h, err := DecodeRecordHeader(rec)
		if m.grp != nil {
			// A shared group record: moved whole, its entry re-pointed.
			// One whose header does not check stops the GC (no context
			// to mark damaged; its bytes are kept).
			if err == nil {
				err = s.moveGroup(m, h, rec, b, touched)
			}
			s.scratch.put(buf)
			if err != nil {
				b.Discard()
				return moved, movedBytes, fmt.Errorf("group %v of %s: %w", m.ge.key, m.ge.ns, err)
			}
			moved++
			movedBytes += uint64(m.ch.Length)
			continue
		}
		if err != nil {
			// The header does not check: rebuild it from the index, if
			// every slice still verifies against the index's checksums.
			h, err = s.headerFromIndex(m, rec)
		}
		if err != nil {
			// Unreadable: the context is damaged; its bytes stay dead.
			// Marked in place and written with this GC's batch (GC runs
			// on the flusher, which must not submit to itself).
			s.scratch.put(buf)
			s.mu.Lock()
			if m.c.rec.Flags&lsm.FlagDamaged == 0 {
				m.c.rec.Flags |= lsm.FlagDamaged
				s.stats.damaged.Add(1)
			}
			if !m.c.deleted {
				rec := m.c.rec
				b.PutContext(m.c.ns, m.c.id, &rec)
			}
			s.mu.Unlock()
			continue
		}
		seg, off, err := s.allocate(uint64(m.ch.Length), true)
		if err != nil {
			s.scratch.put(buf)
			b.Discard()
			return moved, movedBytes, err
		}
		h.Segment = seg.id
		h.Encode(rec[:h.HeaderBytes])
		err = seg.write([][]byte{rec}, int64(off))
		s.scratch.put(buf)
		if err != nil {
			b.Discard()
			return moved, movedBytes, err
		}
		touched[seg] = true
		nch := *m.ch
		nch.Segment, nch.Offset = seg.id, off
		b.PutChunk(m.c.ns, m.c.id, m.g, &nch)
		s.mu.Lock()
		s.segRecs[seg.id].Live += uint64(m.ch.Length)
		m.c.noteWrite(seg.id)
		s.mu.Unlock()
		moved++
		movedBytes += uint64(m.ch.Length)
	}
	if err := s.carryTombstones(id, b, touched); err != nil {
		b.Discard()
		return moved, movedBytes, err
	}
	for _, sg := range segsByID(touched) {
		if err := sg.datasync(); err != nil {
			b.Discard()
			return moved, movedBytes, err
		}
	}
	s.mu.Lock()
	for sg := range touched {
		b.PutSegment(sg.id, s.segRecs[sg.id])
	}
	b.DeleteSegment(id)
	s.mu.Unlock()
	if err := b.Commit(true); err != nil {
		return moved, movedBytes, err
	}
	s.mu.Lock()
	delete(s.segRecs, id)
	old.doomed = true
	if old.refs == 0 {
		s.removeSegment(old)
	}
	s.mu.Unlock()
	return moved, movedBytes, nil
}

// carryTombstones handles the deletion records in segment id, which GC is
// about to drop: one that still matters (a segment file that held the
// deleted context's records still exists) is rewritten at the append point
// and re-keyed in b; compact makes the copy durable before the index batch
// and removes segment id only after it. The others are dropped from the
// index, once the removal of their segments is durable.
func (s *Store) carryTombstones(id uint32, b *lsm.Batch, touched map[*segFile]bool) error {
	type tomb struct {
		off uint64
		t   *lsm.Tombstone
	}
	var tombs []tomb
	// A tombstone that does not decode fails the GC: dropping it could
	// bring a deleted context back at the next repair.
	err := s.db.ScanSegmentTombstones(id, func(off uint64, t *lsm.Tombstone) error {
		tombs = append(tombs, tomb{off, t})
		return nil
	})
	if err != nil {
		return err
	}
	dropped := false
	for _, tb := range tombs {
		b.DeleteTombstone(id, tb.off)
		keep := false
		s.mu.Lock()
		for _, sid := range tb.t.Segments {
			// A segment removed from the index whose file a restore still
			// holds open (doomed, refs > 0) exists on disk: keep.
			if sg := s.segs[sid]; sid != id && sg != nil {
				keep = true
			}
		}
		s.mu.Unlock()
		if !keep {
			dropped = true
			continue
		}
		seg, off, _, err := s.appendTombstoneRecord(tb.t.Gen, tb.t.Namespace, tb.t.ID)
		if err != nil {
			return err
		}
		touched[seg] = true
		b.PutTombstone(seg.id, off, tb.t)
	}
	if dropped {
		// A tombstone is dropped (with segment id) only once the segments
		// holding its context's records are gone for good: their removal
		// (an unlink) is made durable first, so a crash cannot bring back
		// a deleted segment file without its tombstone.
		if err := syncDir(s.fs, s.segDir); err != nil {
			return err
		}
	}
	return nil
}

// headerFromIndex rebuilds the header of a record whose own header is
// damaged, from the chunk key and the context, after checking every slice
// of rec against the index's checksums (so GC never drops data it can still
// prove, and never moves data it cannot).
func (s *Store) headerFromIndex(m gcMove, rec []byte) (*RecordHeader, error) {
	s.mu.Lock()
	c := m.c
	if c.ident == nil || c.rec.Flags&lsm.FlagDamaged != 0 {
		s.mu.Unlock()
		return nil, fmt.Errorf("%w: context has no usable identity", ErrCorrupt)
	}
	binding, gen, enc := c.binding, c.rec.Gen, c.rec.Identity
	tok, salt, tip, tail := c.tokCtx(), c.rec.Salt, c.rec.Tip, c.rec.TailIDs
	g := m.g
	var chain []*groupEnt
	kept := tok && uint64(g) < c.rec.Tokens/uint64(s.ct)
	if kept {
		// A tail or tip record a full group superseded, kept as the
		// newest durable record naming the context (prefix_write.go
		// keptRecords): its chain section is that of the state it
		// named, an earlier point of the context's chain.
		var err error
		if chain, err = s.chainLocked(c); err != nil {
			s.mu.Unlock()
			return nil, err
		}
	}
	s.mu.Unlock()
	if kept {
		var err error
		if tip, tail, err = s.keptChainSection(c, chain, g, int(m.ch.Tokens)); err != nil {
			return nil, err
		}
	}
	h := &RecordHeader{Version: format.Version, RecordBytes: uint64(m.ch.Length), ChunkTokens: uint16(s.ct), Tokens: m.ch.Tokens,
		Group: g, Gen: gen, Binding: binding, Slices: m.ch.Slices, Namespace: c.ns, ContextID: c.id, Identity: enc}
	if tok {
		// A token-addressed context's tail or tip record: the chain
		// section from its context record (the tail's ids are its own).
		if len(tail) < int(m.ch.Tokens) {
			return nil, fmt.Errorf("%w: the context record holds %d tail token ids, the record %d tokens", ErrCorrupt, len(tail), m.ch.Tokens)
		}
		h.Version, h.Salt = format.VersionV3, salt
		if m.ch.Tokens == 0 {
			h.Flags, h.Key = format.RecordTip, tip
		} else {
			h.Parent, h.TokenIDs = tip, tail[:m.ch.Tokens]
		}
	}
	hb := format.HeaderBytesFor(len(m.ch.Slices), h.DescBytes())
	h.HeaderBytes = uint32(hb)
	var tmp []byte
	for _, sl := range m.ch.Slices {
		if int(sl.Off) < hb {
			return nil, fmt.Errorf("%w: a rebuilt header (%d bytes) would overlap slice data at %d", ErrCorrupt, hb, sl.Off)
		}
		data := rec[sl.Off : sl.Off+sl.Stored]
		raw := data
		if sl.Flags&lsm.SliceLZ4 != 0 {
			if len(tmp) < 2*int(sl.Raw) {
				tmp = make([]byte, 2*int(sl.Raw))
			}
			raw = tmp[:sl.Raw]
			if err := decompressSlice(raw, tmp[sl.Raw:], data); err != nil {
				return nil, err
			}
		}
		if got := crc32.Update(format.SliceSeed(binding, g, sl.Layer), format.Castagnoli, raw); got != sl.CRC {
			return nil, fmt.Errorf("%w: layer %d checksum %08x, index says %08x", ErrCorrupt, sl.Layer, got, sl.CRC)
		}
	}
	return h, nil
}

// liveRecords finds the records of segment id that the index still points
// at, without decoding the whole key space: it walks the segment's own
// record headers and looks each one up by its chunk key (live iff the index
// points at this segment and offset). The index's live count of the segment
// proves the walk found every live record; when the bytes found fall short
// (a damaged header ends the walk early, or version 1 records, which name
// no context), every chunk key is read instead. Runs on the flusher: no
// commit changes the segment's records meanwhile.
func (s *Store) liveRecords(id uint32) ([]gcMove, error) {
	s.mu.Lock()
	sg := s.segs[id]
	var live, written uint64
	if rec := s.segRecs[id]; rec != nil {
		live, written = rec.Live, rec.Written
	}
	s.mu.Unlock()
	if sg != nil {
		moves, found, complete, err := s.walkLiveRecords(sg, id, written)
		if err != nil {
			return nil, err
		}
		if complete && found == live {
			return moves, nil
		}
	}
	return s.scanLiveRecords(id)
}

// walkLiveRecords reads the record headers of segment sg up to its append
// point and returns the records the index points at and their bytes;
// complete is false when the walk could not attribute every record. A chunk
// value that does not decode is an error.
func (s *Store) walkLiveRecords(sg *segFile, id uint32, written uint64) (moves []gcMove, found uint64, complete bool, err error) {
	buf, err := s.scratch.get(format.MaxHeaderBytes)
	if err != nil {
		return nil, 0, false, err
	}
	defer s.scratch.put(buf)
	for off := uint64(format.SegmentHeaderBytes); off < written; {
		if off+format.BlockBytes > written || sg.readAt(buf.Bytes()[:format.BlockBytes], int64(off)) != nil {
			return moves, found, false, nil
		}
		hb, ok := format.RecordHeaderBytes(buf.Bytes())
		if !ok || off+uint64(hb) > written {
			return moves, found, false, nil
		}
		if hb > format.BlockBytes && sg.readAt(buf.Bytes()[:hb], int64(off)) != nil {
			return moves, found, false, nil
		}
		h, err := format.DecodeRecordHeader(buf.Bytes()[:hb])
		if err != nil || h.Version == format.VersionV1 || off+h.RecordBytes > written {
			return moves, found, false, nil
		}
		if h.Flags&format.RecordGroup != 0 {
			m, ok, err := s.liveGroupRecord(h, id, off)
			if err != nil {
				return nil, 0, false, err
			}
			if ok {
				found += uint64(m.ch.Length)
				moves = append(moves, m)
			}
		} else if h.Flags&format.RecordTombstone == 0 {
			ch, err := s.db.GetChunk(h.Namespace, h.ContextID, h.Group)
			switch {
			case errors.Is(err, lsm.ErrNotFound):
			case err != nil:
				return nil, 0, false, err
			case ch.Segment == id && ch.Offset == off:
				found += uint64(ch.Length)
				s.mu.Lock()
				c := s.ctxs[ctxMapKey(h.Namespace, h.ContextID)]
				s.mu.Unlock()
				if c != nil {
					moves = append(moves, gcMove{g: h.Group, ch: ch, c: c})
				}
			}
		}
		off += h.RecordBytes
	}
	return moves, found, true, nil
}

// scanLiveRecords reads every chunk key for those in segment id. A key or
// value that does not decode is an error.
func (s *Store) scanLiveRecords(id uint32) ([]gcMove, error) {
	var moves []gcMove
	err := s.db.ScanAllChunks(func(ns, cid string, g uint32, ch *lsm.Chunk, err error) error {
		if err != nil {
			return err
		}
		if ch.Segment != id {
			return nil
		}
		s.mu.Lock()
		c := s.ctxs[ctxMapKey(ns, cid)]
		s.mu.Unlock()
		if c != nil {
			moves = append(moves, gcMove{g: g, ch: ch, c: c})
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	gm, err := s.scanLiveGroups(id)
	return append(moves, gm...), err
}
