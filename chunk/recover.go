package chunk

import (
	"fmt"
	"sort"
	"time"

	"github.com/hcache/hcache/lsm"
	"github.com/hcache/hcache/state"
)

// Recovery describes what Open found.
type Recovery struct {
	Contexts         int
	Segments         int
	OrphanSegments   int      // segment files not in the index holding no record (removed by a read-write open)
	KeptOrphans      []string // segment files not in the index that hold records (kept, never opened)
	MissingSegments  int      // indexed segments without a file
	UnindexedRecords int      // records past the append point (discarded)
	LiveRecounted    int      // segments whose stored live count disagreed with the chunk keys (recounted)
	// TombstonesRolledForward counts deletes whose tombstone was durable but
	// whose index commit a crash lost: completed on open.
	TombstonesRolledForward int
	Duration                time.Duration
}

// recover loads the index into memory, reconciles it with the segment files
// and positions the append point.
func (s *Store) recover() error {
	if err := s.loadSegments(); err != nil {
		return err
	}
	onDisk, err := s.listSegmentFiles()
	if err != nil {
		return err
	}
	ids := make([]uint32, 0, len(s.segRecs))
	for id := range s.segRecs {
		ids = append(ids, id)
	}
	sort.Slice(ids, func(i, j int) bool { return ids[i] < ids[j] })
	if err := s.openSegments(ids, onDisk); err != nil {
		return err
	}
	s.findActive(ids)
	if err := s.loadContexts(); err != nil {
		return err
	}
	if err := s.loadGroups(); err != nil {
		return err
	}
	if err := s.loadLastUse(); err != nil {
		return err
	}
	return s.countLive()
}

// loadSegments loads the index's segment records.
func (s *Store) loadSegments() error {
	err := s.db.ScanSegments(func(id uint32, rec *lsm.Segment) error {
		s.segRecs[id] = rec
		s.nextSeg = max(s.nextSeg, id+1)
		return nil
	})
	if err != nil {
		return fmt.Errorf("chunk: load segments: %w", err)
	}
	return nil
}

// listSegmentFiles returns the segment files on disk. A file the index does
// not list is removed if it holds no record and kept (unopened) otherwise.
func (s *Store) listSegmentFiles() (map[uint32]bool, error) {
	names, err := s.fs.List(s.segDir)
	if err != nil {
		return nil, fmt.Errorf("chunk: list %s: %w", s.segDir, err)
	}
	onDisk := map[uint32]bool{}
	for _, n := range names {
		id, ok := parseSegName(n)
		if !ok {
			continue
		}
		onDisk[id] = true
		s.nextSeg = max(s.nextSeg, id+1)
		if _, indexed := s.segRecs[id]; !indexed {
			// Not in the index: normally created and never committed
			// (a crash before its first commit). It is removed only if it
			// holds no record at all; otherwise it is kept, unopened,
			// for Repair to adopt what verifies.
			path := s.fs.PathJoin(s.segDir, n)
			recs, err := scanSegmentFile(s.fs, path, 1)
			if err == nil && recs == 0 {
				if !s.readOnly {
					if err := s.fs.Remove(path); err != nil {
						return nil, fmt.Errorf("chunk: remove empty orphan segment %s: %w", n, err)
					}
				}
				s.recovery.OrphanSegments++
				continue
			}
			s.recovery.KeptOrphans = append(s.recovery.KeptOrphans, n)
			s.opts.Logf("chunk: segment file %s is not in the index but holds records; kept (hcache repair adopts what verifies)", n)
		}
	}
	return onDisk, nil
}

// openSegments opens the indexed segments (ids ascending): those another
// provider holds through it, the others from their files, counting those
// whose file is missing.
func (s *Store) openSegments(ids []uint32, onDisk map[uint32]bool) error {
	for _, id := range ids {
		if loc := s.segRecs[id].Location; loc != "" {
			sg, err := s.openObjectSeg(id, loc)
			if err != nil {
				return err
			}
			sg.allocated = sg.obj.Size()
			s.segs[id] = sg
			s.recovery.Segments++
			continue
		}
		if !onDisk[id] {
			s.recovery.MissingSegments++
			s.opts.Logf("chunk: segment %d is indexed but its file is missing; its contexts are damaged", id)
			continue
		}
		sg, err := openSegMode(s.fs, s.segDir, id, s.eng, !s.opts.DisableDirect, s.readOnly)
		if err != nil {
			return err
		}
		if size, err := sg.size(); err == nil {
			sg.allocated = size
			if size >= s.opts.SegmentBytes {
				s.wholeSegments = true // alloc.go: this store fills segments
			}
		}
		s.segs[id] = sg
		s.recovery.Segments++
	}
	return nil
}

// findActive makes the newest unsealed segment the active one (records
// past its append point were never indexed: they are counted and
// discarded) and seals every other.
func (s *Store) findActive(ids []uint32) {
	for i := len(ids) - 1; i >= 0; i-- {
		rec := s.segRecs[ids[i]]
		sg := s.segs[ids[i]]
		if rec.Sealed || sg == nil || sg.obj != nil {
			continue
		}
		s.active = sg
		s.recovery.UnindexedRecords = s.countTail(sg, rec.Written)
		break
	}
	// Every other segment takes no more appends (a seal is recorded in the
	// index only when its record is next written).
	for id, rec := range s.segRecs {
		if s.active == nil || id != s.active.id {
			rec.Sealed = true
		}
	}
}

// loadContexts loads the context records; one that fails to decode is
// marked damaged.
func (s *Store) loadContexts() error {
	err := s.db.ScanContexts(func(ns, id string, rec *lsm.Context, err error) error {
		c := &ctxState{ns: ns, id: id}
		if err == nil {
			c.rec = *rec
			c.ident, err = DecodeIdentity(rec.Identity)
		}
		if err != nil {
			s.opts.Logf("chunk: context %s/%s: %v; marked damaged", ns, id, err)
			c.rec.Flags |= lsm.FlagDamaged
			c.ident = nil
		} else {
			c.setIdentity(c.ident)
			c.ptip, c.ptail = c.rec.Tip, c.rec.TailIDs
			if c.tokCtx() {
				if c.chain, err = state.NewChain(ns, c.rec.Salt, c.ident); err != nil {
					s.opts.Logf("chunk: context %s/%s: %v; marked damaged", ns, id, err)
					c.rec.Flags |= lsm.FlagDamaged
				}
			}
		}
		s.nextGen = max(s.nextGen, c.rec.Gen+1)
		s.namespaces[ns] = true
		s.ctxs[ctxMapKey(ns, id)] = c
		s.recovery.Contexts++
		return nil
	})
	if err != nil {
		return fmt.Errorf("chunk: load contexts: %w", err)
	}
	return nil
}

// loadLastUse loads the contexts' last-use times. One that does not decode
// is logged and taken as never used (it orders eviction, nothing more).
func (s *Store) loadLastUse() error {
	return s.db.ScanLastUse(func(ns, id string, t int64, err error) error {
		if err != nil {
			s.opts.Logf("chunk: %v; taken as never used", err)
			return nil
		}
		if c := s.ctxs[ctxMapKey(ns, id)]; c != nil {
			c.lastUse = t
		}
		return nil
	})
}

// countLive sums per-context live bytes, for eviction; chunks of a missing
// segment damage their context. Segment live counts are derived from the
// same scan: the chunk keys are the truth, the stored count a summary that
// the next commit of the segment rewrites.
func (s *Store) countLive() error {
	liveBySeg := map[uint32]uint64{}
	err := s.db.ScanAllChunks(func(ns, id string, _ uint32, ch *lsm.Chunk, derr error) error {
		if derr != nil && ns == "" {
			return derr // a key that does not parse
		}
		c := s.ctxs[ctxMapKey(ns, id)]
		if derr != nil {
			// Its bytes cannot be located: the context is damaged.
			s.opts.Logf("chunk: %v; the context is marked damaged", derr)
			if c != nil {
				c.rec.Flags |= lsm.FlagDamaged
			}
			return nil
		}
		liveBySeg[ch.Segment] += uint64(ch.Length)
		if c == nil {
			return nil
		}
		if s.segs[ch.Segment] == nil {
			c.rec.Flags |= lsm.FlagDamaged
			return nil
		}
		c.live += int64(ch.Length)
		s.live += int64(ch.Length)
		return nil
	})
	if err != nil {
		return err
	}
	for _, e := range s.groups {
		liveBySeg[e.seg] += uint64(e.length)
	}
	s.live += s.groupBytes
	for id, rec := range s.segRecs {
		if rec.Live != liveBySeg[id] {
			s.recovery.LiveRecounted++
			s.opts.Logf("chunk: segment %d: stored live count %d, chunk keys reference %d; using the latter", id, rec.Live, liveBySeg[id])
			rec.Live = liveBySeg[id]
		}
	}
	return nil
}

// countTail counts the valid records a crash left past the append point.
func (s *Store) countTail(sg *segFile, written uint64) int {
	size, err := sg.size()
	if err != nil || uint64(size) <= written {
		return 0
	}
	const window = 8 << 20
	n := min(uint64(size)-written, window)
	buf, err := s.scratch.get(int(n))
	if err != nil {
		return 0
	}
	defer s.scratch.put(buf)
	b := buf.Bytes()[:n]
	// A tail that is not whole blocks is refused by an O_DIRECT read:
	// then there is nothing to count.
	if err := sg.readAt(b, int64(written)); err != nil {
		return 0
	}
	return len(ScanRecords(b, written))
}
