package chunk

import (
	"bytes"
	"fmt"
	"sort"

	"github.com/hcache/hcache/chunk/format"
	"github.com/hcache/hcache/lsm"
)

// CheckReport is the result of Check.
type CheckReport struct {
	Contexts        int
	Chunks          int
	Slices          int
	Segments        int
	Errors          []string // inconsistencies: any makes fsck fail
	DamagedContexts []string // contexts already marked damaged (reported, not errors)
	Orphans         []string // unindexed data found (and discarded) on open
}

// OK reports whether no inconsistency was found.
func (r *CheckReport) OK() bool { return len(r.Errors) == 0 }

// Check verifies every index entry against the segment bytes: each chunk key
// must belong to a context, point inside a live segment at a record whose
// header matches it, and each slice must pass its checksum; each context's
// groups must be contiguous and cover its tokens; each segment's live count
// must equal the bytes its chunk keys reference. Run it with no writer
// active and background GC off (Options.GCInterval -1). On a writable store
// it first waits for the groups already handed to the flusher (an abandoned
// writer's, say) to be committed, so that a commit landing mid-check does not
// read as a mismatch. It reads everything and changes nothing.
func (s *Store) Check(progress func(done, total int)) *CheckReport {
	r := &CheckReport{}
	if !s.readOnly {
		_ = s.barrier(nil) // a closed or failed store: check what is there
	}
	r.addRecovery(s.Recovery())
	chunks, err := s.checkChunkKeys(r, progress)
	if err != nil {
		r.errorf("scan chunk keys: %v", err)
		return r
	}
	s.mu.Lock()
	ctxs := make([]*ctxState, 0, len(s.ctxs))
	for _, c := range s.ctxs {
		ctxs = append(ctxs, c)
	}
	segRecs := map[uint32]lsm.Segment{}
	for id, sr := range s.segRecs {
		segRecs[id] = *sr
	}
	s.mu.Unlock()
	sort.Slice(ctxs, func(i, j int) bool { return ctxMapKey(ctxs[i].ns, ctxs[i].id) < ctxMapKey(ctxs[j].ns, ctxs[j].id) })
	if err := s.checkGroups(r, ctxs, chunks); err != nil {
		r.errorf("scan group entries: %v", err)
		return r
	}
	s.checkCoverage(r, ctxs, chunks.byCtx)
	s.checkSegments(r, segRecs, chunks)
	for id := range chunks.liveBySeg {
		if _, ok := segRecs[id]; !ok {
			r.errorf("chunk keys reference segment %d, which is not indexed", id)
		}
	}
	sort.Strings(r.Errors)
	return r
}

func (r *CheckReport) errorf(format string, args ...any) {
	r.Errors = append(r.Errors, fmt.Sprintf(format, args...))
}

// addRecovery reports what Open found and did.
func (r *CheckReport) addRecovery(rec Recovery) {
	if rec.OrphanSegments > 0 {
		r.Orphans = append(r.Orphans, fmt.Sprintf("%d unindexed segment files holding no record (a read-write open removes them)", rec.OrphanSegments))
	}
	for _, n := range rec.KeptOrphans {
		r.Orphans = append(r.Orphans, fmt.Sprintf("segment file %s is not in the index but holds records (kept; `hcache repair` adopts what verifies)", n))
	}
	if rec.UnindexedRecords > 0 {
		r.Orphans = append(r.Orphans, fmt.Sprintf("%d unindexed records past the append point (discarded)", rec.UnindexedRecords))
	}
	if rec.TombstonesRolledForward > 0 {
		r.Orphans = append(r.Orphans, fmt.Sprintf("%d deletes whose tombstone was durable but not indexed (a crash); completed on open", rec.TombstonesRolledForward))
	}
	if rec.LiveRecounted > 0 {
		r.Orphans = append(r.Orphans, fmt.Sprintf("%d segment live counts disagreed with the chunk keys on open (recounted)", rec.LiveRecounted))
	}
	if rec.MissingSegments > 0 {
		r.errorf("%d indexed segments have no file", rec.MissingSegments)
	}
}

// ctxChunks are a context's chunk keys, in group order.
type ctxChunks struct {
	c      *ctxState
	groups []uint32
	tokens []uint16
}

// checkedChunks is what checkChunkKeys found: the chunk keys by context,
// and per segment the bytes they reference and where the last ends.
type checkedChunks struct {
	byCtx     map[string]*ctxChunks
	liveBySeg map[uint32]uint64
	endBySeg  map[uint32]uint64
}

// checkChunkKeys checks every chunk key against its context and its record
// (checkChunk). The error is the index scan's.
func (s *Store) checkChunkKeys(r *CheckReport, progress func(done, total int)) (*checkedChunks, error) {
	cs := &checkedChunks{byCtx: map[string]*ctxChunks{}, liveBySeg: map[uint32]uint64{}, endBySeg: map[uint32]uint64{}}
	// The keys are read first, then checked: no index iterator stays open
	// across the segment reads.
	type entry struct {
		ns, id string
		g      uint32
		ch     *lsm.Chunk
		err    error
	}
	var entries []entry
	if err := s.db.ScanAllChunks(func(ns, id string, g uint32, ch *lsm.Chunk, err error) error {
		entries = append(entries, entry{ns, id, g, ch, err})
		return nil
	}); err != nil {
		return nil, err
	}
	for i, e := range entries {
		if progress != nil {
			progress(i, len(entries))
		}
		ns, id, g, ch := e.ns, e.id, e.g, e.ch
		if e.err != nil && ns == "" {
			r.errorf("%v", e.err) // a key that does not parse
			continue
		}
		r.Chunks++
		if e.err != nil {
			r.errorf("%v", e.err)
			continue
		}
		cs.liveBySeg[ch.Segment] += uint64(ch.Length)
		cs.endBySeg[ch.Segment] = max(cs.endBySeg[ch.Segment], ch.Offset+uint64(ch.Length))
		s.mu.Lock()
		c := s.ctxs[ctxMapKey(ns, id)]
		s.mu.Unlock()
		if c == nil {
			r.errorf("%s/%s group %d: chunk key without a context", ns, id, g)
			continue
		}
		cc := cs.byCtx[ctxMapKey(ns, id)]
		if cc == nil {
			cc = &ctxChunks{c: c}
			cs.byCtx[ctxMapKey(ns, id)] = cc
		}
		cc.groups = append(cc.groups, g)
		cc.tokens = append(cc.tokens, ch.Tokens)
		if c.ident == nil {
			continue
		}
		if err := s.checkChunk(c, g, ch); err != nil {
			r.errorf("%s/%s group %d: %v", ns, id, g, err)
			continue
		}
		r.Slices += len(ch.Slices)
	}
	return cs, nil
}

// checkCoverage checks that each context's groups are contiguous, that
// only the last is partial, and that they cover its tokens.
func (s *Store) checkCoverage(r *CheckReport, ctxs []*ctxState, all map[string]*ctxChunks) {
	for _, c := range ctxs {
		r.Contexts++
		name := c.ns + "/" + c.id
		if c.rec.Flags&lsm.FlagDamaged != 0 {
			r.DamagedContexts = append(r.DamagedContexts, name)
			continue
		}
		tokens := uint64(0)
		if c.tokCtx() {
			s.checkTokenCoverage(r, c, all[ctxMapKey(c.ns, c.id)])
			continue
		}
		if cc := all[ctxMapKey(c.ns, c.id)]; cc != nil {
			for i, g := range cc.groups {
				if int(g) != i {
					r.errorf("%s: group %d missing", name, i)
					break
				}
				if int(cc.tokens[i]) != s.ct && i != len(cc.groups)-1 {
					r.errorf("%s: group %d holds %d tokens but is not the last", name, i, cc.tokens[i])
				}
				tokens += uint64(cc.tokens[i])
			}
		}
		if tokens < c.rec.Tokens {
			r.errorf("%s: chunks cover %d tokens, the context records %d", name, tokens, c.rec.Tokens)
		}
	}
}

// checkSegments checks each indexed segment's live count against its chunk
// keys, its file size and append point against its last record, and its
// header.
func (s *Store) checkSegments(r *CheckReport, segRecs map[uint32]lsm.Segment, cs *checkedChunks) {
	for id, sr := range segRecs {
		r.Segments++
		if cs.liveBySeg[id] != sr.Live {
			r.errorf("segment %d: live bytes %d, chunk keys reference %d", id, sr.Live, cs.liveBySeg[id])
		}
		s.mu.Lock()
		sg := s.segs[id]
		s.mu.Unlock()
		if sg == nil {
			continue
		}
		size, err := sg.size()
		if err != nil {
			r.errorf("segment %d: stat: %v", id, err)
		} else if uint64(size) < cs.endBySeg[id] {
			r.errorf("segment %d: file holds %d bytes, its last indexed record ends at %d", id, size, cs.endBySeg[id])
		}
		if cs.endBySeg[id] > sr.Written {
			r.errorf("segment %d: a record ends at %d, past the append point %d", id, cs.endBySeg[id], sr.Written)
		}
		hdr, err := s.scratch.get(format.SegmentHeaderBytes)
		if err == nil {
			if err := sg.readAt(hdr.Bytes()[:format.SegmentHeaderBytes], 0); err != nil {
				r.errorf("segment %d: read header: %v", id, err)
			} else if h, err := DecodeSegmentHeader(hdr.Bytes()); err != nil {
				r.errorf("segment %d: %v", id, err)
			} else if h.ID != id {
				r.errorf("segment %d: header names segment %d", id, h.ID)
			}
			s.scratch.put(hdr)
		}
	}
}

// readEntryHeader reads and decodes the header of the record an index
// entry locates, after checking that the entry lies inside its segment's
// written bytes and places its first slice on a block past a header of a
// plausible size (an entry without slices: one block of header).
func (s *Store) readEntryHeader(ch *lsm.Chunk) (*RecordHeader, error) {
	s.mu.Lock()
	sg := s.segs[ch.Segment]
	var written uint64
	if sr := s.segRecs[ch.Segment]; sr != nil {
		written = sr.Written
	}
	s.mu.Unlock()
	if sg == nil {
		return nil, fmt.Errorf("segment %d missing", ch.Segment)
	}
	if ch.Offset+uint64(ch.Length) > written {
		return nil, fmt.Errorf("record [%d, +%d) past segment %d's written end %d", ch.Offset, ch.Length, ch.Segment, written)
	}
	hb := BlockBytes
	if len(ch.Slices) > 0 {
		hb = int(ch.Slices[0].Off) // slices follow the header
		for _, sl := range ch.Slices {
			hb = min(hb, int(sl.Off))
		}
	}
	if hb <= 0 || hb > format.MaxHeaderBytes || hb%BlockBytes != 0 {
		return nil, fmt.Errorf("index places the first slice at %d", hb)
	}
	buf, err := s.scratch.get(hb)
	if err != nil {
		return nil, err
	}
	defer s.scratch.put(buf)
	if err := sg.readAt(buf.Bytes()[:hb], int64(ch.Offset)); err != nil {
		return nil, err
	}
	return DecodeRecordHeader(buf.Bytes()[:hb]) // copies what it keeps
}

// checkChunk reads one record's header and slices and checks them against the
// index entry.
func (s *Store) checkChunk(c *ctxState, g uint32, ch *lsm.Chunk) error {
	h, err := s.readEntryHeader(ch)
	if err != nil {
		return err
	}
	s.mu.Lock()
	binding, gen := c.binding, c.rec.Gen
	s.mu.Unlock()
	switch {
	case h.Group != g || h.Gen != gen || h.Segment != ch.Segment:
		return fmt.Errorf("record header names group %d gen %d segment %d", h.Group, h.Gen, h.Segment)
	case h.Tokens != ch.Tokens || h.RecordBytes != uint64(ch.Length):
		return fmt.Errorf("record header holds %d tokens in %d bytes, index says %d in %d", h.Tokens, h.RecordBytes, ch.Tokens, ch.Length)
	case !bytes.Equal(h.Binding[:], binding[:]):
		return fmt.Errorf("record is bound to another context")
	case h.Version != format.VersionV1 && (h.Namespace != c.ns || h.ContextID != c.id || !bytes.Equal(h.Identity, c.rec.Identity)):
		return fmt.Errorf("record describes context %s/%s", h.Namespace, h.ContextID)
	case len(h.Slices) != len(ch.Slices):
		return fmt.Errorf("record has %d slices, index %d", len(h.Slices), len(ch.Slices))
	}
	items := make([]fetchItem, len(ch.Slices))
	for i, sl := range ch.Slices {
		if h.Slices[i] != sl {
			return fmt.Errorf("slice %d differs between record and index", i)
		}
		items[i] = fetchItem{ch: ch, sl: sl, group: g, dst: make([]byte, sl.Raw)}
	}
	return s.fetch(c, items, false)
}
