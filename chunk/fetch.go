package chunk

import (
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"time"
	"unsafe"

	"github.com/hcache/hcache/chunk/format"
	"github.com/hcache/hcache/iouring"
	"github.com/hcache/hcache/lsm"
)

// snapshot is what a restore reads: chunk records of contiguous groups, with
// references on their segments so GC cannot delete the files under it.
type snapshot struct {
	c      *ctxState
	chunks []*lsm.Chunk // by group
	tokens int
	// srcs[g], when srcs is set, is chunk g's binding and cache name
	// (token-addressed state: shared groups, a tail); serve, when not 0,
	// is the tokens handed over (a tail matched only in part).
	srcs  []*itemSrc
	serve int
	segs  []*segFile
}

// snap takes a restore snapshot of c. Call without s.mu: the index scan
// runs unlocked (no store-wide lock is held across a Pebble scan), then the
// segments are referenced under the lock. GC may move the records between
// the two (and doom their old segment): the scan is then taken again.
func (s *Store) snap(c *ctxState) (*snapshot, error) {
	if s.snapFault != nil {
		if err := s.snapFault(); err != nil {
			return nil, err
		}
	}
	for attempt := 0; ; attempt++ {
		// The token count is read before the scan: the index is committed
		// before the count advances, so the scan covers at least it.
		s.mu.Lock()
		want := c.rec.Tokens
		s.mu.Unlock()
		var sn *snapshot
		var err error
		if s.isTokCtx(c) {
			sn, err = s.scanChainChunks(c)
		} else {
			sn, err = s.scanChunks(c, want)
		}
		if err != nil {
			// A context deleted or evicted during the scan lost its
			// chunk keys to that: it is gone, not corrupt (deleted is set
			// before the keys go).
			s.mu.Lock()
			gone := c.deleted
			s.mu.Unlock()
			if gone {
				return nil, fmt.Errorf("%w: %s/%s", ErrNotFound, c.ns, c.id)
			}
			return nil, err
		}
		s.mu.Lock()
		if c.deleted {
			s.mu.Unlock()
			return nil, fmt.Errorf("%w: %s/%s", ErrNotFound, c.ns, c.id)
		}
		missing, ok := uint32(0), true
		seen := map[uint32]bool{}
		for _, ch := range sn.chunks {
			if seen[ch.Segment] {
				continue
			}
			seen[ch.Segment] = true
			sg := s.segs[ch.Segment]
			if sg == nil || sg.doomed {
				missing, ok = ch.Segment, false
				break
			}
			sg.refs++
			sn.segs = append(sn.segs, sg)
		}
		if !ok {
			s.unref(sn.segs)
		}
		s.mu.Unlock()
		if ok {
			return sn, nil
		}
		if attempt == 2 {
			return nil, fmt.Errorf("%w: segment %d of this context is missing", ErrCorrupt, missing)
		}
	}
}

// scanChunks reads c's chunk keys (without s.mu) and checks that they form
// a contiguous prefix covering at least want tokens.
func (s *Store) scanChunks(c *ctxState, want uint64) (*snapshot, error) {
	sn := &snapshot{c: c}
	err := s.db.ScanChunks(c.ns, c.id, func(g uint32, ch *lsm.Chunk) error {
		if int(g) != len(sn.chunks) {
			return fmt.Errorf("%w: group %d missing", ErrCorrupt, len(sn.chunks))
		}
		if len(ch.Slices) != len(c.stored) {
			return fmt.Errorf("%w: group %d has %d slices, the plan stores %d layers", ErrCorrupt, g, len(ch.Slices), len(c.stored))
		}
		sn.chunks = append(sn.chunks, ch)
		return nil
	})
	if err != nil {
		return nil, err
	}
	for i, ch := range sn.chunks {
		if int(ch.Tokens) != s.ct && i != len(sn.chunks)-1 {
			return nil, fmt.Errorf("%w: group %d holds %d of %d tokens but is not the last", ErrCorrupt, i, ch.Tokens, s.ct)
		}
		sn.tokens += int(ch.Tokens)
	}
	if uint64(sn.tokens) < want {
		return nil, fmt.Errorf("%w: index holds %d tokens, the context has %d", ErrCorrupt, sn.tokens, want)
	}
	return sn, nil
}

// unref drops references; a doomed segment with none left is deleted. Call
// with s.mu held.
func (s *Store) unref(segs []*segFile) {
	for _, sg := range segs {
		sg.refs--
		if !s.invariant(sg.refs >= 0, "segment %d: %d restores reading it after one finished", sg.id, sg.refs) {
			sg.refs = 0
		}
		if sg.refs == 0 && sg.doomed {
			s.removeSegment(sg)
		}
	}
}

func (s *Store) removeSegment(sg *segFile) {
	sg.close()
	if err := s.fs.Remove(sg.name); err != nil {
		s.opts.Logf("chunk: remove segment %s: %v", sg.name, err)
	}
	if s.segs[sg.id] == sg { // not replaced by its object (MoveSegment)
		delete(s.segs, sg.id)
	}
}

// fetchItem is one slice to bring into dst (len(dst) = raw bytes).
type fetchItem struct {
	ch    *lsm.Chunk
	sl    lsm.Slice
	group uint32
	dst   []byte
	// internal
	bounce *iouring.AlignedBuffer
	// src, when set, is the record's own binding and cache name (a
	// shared group's, or another context's tail in a restore by tokens);
	// otherwise the fetch's context's.
	src *itemSrc
	// hit is the DRAM tier's verified copy of the slice, copied into dst
	// only once every read of the fetch has landed: a direct read is
	// rounded up to whole blocks and may write past its own item into the
	// next items' place in the same buffer.
	hit []byte
}

func aligned(b []byte) bool {
	return len(b) > 0 && uintptr(unsafe.Pointer(&b[0]))%BlockBytes == 0
}

// fetchOp is a fetch whose reads are in flight.
type fetchOp struct {
	s        *Store
	c        *ctxState
	items    []fetchItem
	useCache bool
	binding  Binding
	gen      uint64
	reads    *readBatch
	bytes    int
	// need[i] is the number of leading reads of the batch that must have
	// landed before item i can be checked: its own and every earlier
	// item's (a direct read rounded up to whole blocks may write into the
	// next items' place, never into an earlier one's).
	need []int
	// The early checker (verifyEarly), when running, checks items in order
	// as their reads land, so that a layer's checksums are mostly verified
	// by the time its last read completes; it owns items[:checked] and
	// closes checkedDone on exit (finish waits for it, then goes on from
	// checked). checkErr is its failed check.
	checkedDone chan struct{}
	checked     int
	checkErr    error
}

// fetch reads the items (all at once, so the queue depth is the item count,
// capped by the engine), decompresses, and verifies every slice's checksum.
func (s *Store) fetch(c *ctxState, items []fetchItem, useCache bool) error {
	f, err := s.fetchStart(c, items, useCache)
	if err != nil {
		return err
	}
	return f.finish()
}

// fetchStart serves cache hits and issues the reads of the other items.
func (s *Store) fetchStart(c *ctxState, items []fetchItem, useCache bool) (*fetchOp, error) {
	f := &fetchOp{s: s, c: c, items: items, useCache: useCache, need: make([]int, len(items))}
	s.mu.Lock()
	f.binding, f.gen = c.binding, c.rec.Gen
	s.mu.Unlock()
	var reqs []readReq
	for i := range items {
		// Each path below either continues having appended this item's
		// read, or is a hit (no read).
		f.need[i] = len(reqs) + 1
		it := &items[i]
		if int(it.sl.Raw) != len(it.dst) {
			f.release()
			return nil, fmt.Errorf("%w: %s/%s layer %d group %d: slice holds %d bytes, want %d", ErrCorrupt, c.ns, c.id, it.sl.Layer, it.group, it.sl.Raw, len(it.dst))
		}
		if v, ok := s.cache.get(it.cacheKey(f.gen)); useCache && ok && len(v) == len(it.dst) {
			it.hit = v // cache entries are never written after add
			s.stats.cacheHits.Add(1)
			f.need[i] = len(reqs)
			continue
		}
		s.mu.Lock()
		sg := s.segs[it.ch.Segment]
		s.mu.Unlock()
		if sg == nil {
			f.release()
			return nil, fmt.Errorf("%w: %s/%s layer %d group %d: segment %d missing", ErrCorrupt, c.ns, c.id, it.sl.Layer, it.group, it.ch.Segment)
		}
		off := int64(it.ch.Offset) + int64(it.sl.Off)
		compressed := it.sl.Flags&lsm.SliceLZ4 != 0
		if !compressed && sg.fd < 0 {
			reqs = append(reqs, readReq{sg, it.dst, off})
			continue
		}
		n := format.RoundUp(int(it.sl.Stored))
		if !compressed && aligned(it.dst) && cap(it.dst) >= n {
			reqs = append(reqs, readReq{sg, it.dst[:n], off})
			continue
		}
		b, err := s.scratch.get(n)
		if err != nil {
			f.release()
			return nil, err
		}
		it.bounce = b
		if sg.fd < 0 {
			n = int(it.sl.Stored)
		}
		reqs = append(reqs, readReq{sg, b.Bytes()[:n], off})
	}
	f.bytes = sumLen(reqs)
	if len(reqs) > 0 {
		t0 := time.Now()
		f.reads = startReads(s.eng, reqs)
		s.stages.submitNanos.Add(since(t0))
		if len(f.reads.direct) == len(reqs) && len(items) > 1 {
			// Every read goes through the engine, so each one's landing
			// is known: check items as they land.
			f.checkedDone = make(chan struct{})
			go f.verifyEarly()
		}
	}
	return f, nil
}

// verifyEarly checks items in order as the reads they need land (see
// need), until every item is checked, a check fails, a read fails (finish
// reports it), or the batch is complete with nothing more to check.
func (f *fetchOp) verifyEarly() {
	defer close(f.checkedDone)
	rb := f.reads
	var tmp []byte
	landed := 0 // leading reads landed without error
	complete := false
	var spent time.Duration
	defer func() { f.s.stages.verifyNanos.Add(int64(spent)) }()
	for f.checked < len(f.items) {
		for landed < len(rb.direct) && rb.landed[landed].Load() {
			if rb.direct[landed].Err != nil {
				return
			}
			landed++
		}
		if f.need[f.checked] <= landed {
			t0 := time.Now()
			for f.checked < len(f.items) && f.need[f.checked] <= landed {
				if err := f.verifyItem(f.checked, &tmp); err != nil {
					f.checkErr = err
					break
				}
				f.checked++
			}
			spent += time.Since(t0)
			if f.checkErr != nil {
				return
			}
			continue
		}
		if complete {
			return // a failed submission: nothing more lands
		}
		select {
		case <-rb.progress:
		case <-rb.done:
			complete = true // every landing is now visible: look once more
		}
	}
}

func (f *fetchOp) release() {
	for i := range f.items {
		if f.items[i].bounce != nil {
			f.s.scratch.put(f.items[i].bounce)
			f.items[i].bounce = nil
		}
	}
}

// finish waits for the reads, decompresses and verifies what the early
// checker has not.
func (f *fetchOp) finish() error {
	defer f.release()
	s, c := f.s, f.c
	if f.reads != nil {
		err := f.reads.wait()
		if f.checkedDone != nil {
			<-f.checkedDone // it may still be copying out of a bounce buffer
		}
		if err != nil {
			if errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF) {
				// The index points past the end of the segment.
				return fmt.Errorf("%w: %s/%s: %v", ErrCorrupt, c.ns, c.id, err)
			}
			return fmt.Errorf("chunk: %s/%s: %w", c.ns, c.id, err)
		}
		s.stats.bytesRead.Add(uint64(f.bytes))
		s.stages.readNanos.Add(f.reads.elapsed())
		if f.checkErr != nil {
			return f.checkErr
		}
	}
	defer func(t0 time.Time) { s.stages.verifyNanos.Add(since(t0)) }(time.Now())
	var tmp []byte
	for i := f.checked; i < len(f.items); i++ {
		if err := f.verifyItem(i, &tmp); err != nil {
			return err
		}
	}
	return nil
}

// verifyItem brings item i into its place (a cache hit's copy, a bounce
// buffer's bytes, decompressed) and checks its checksum; call once every
// read it needs has landed. tmp is decompression scratch.
func (f *fetchOp) verifyItem(i int, tmp *[]byte) error {
	s, c := f.s, f.c
	it := &f.items[i]
	if it.hit != nil {
		copy(it.dst, it.hit)
		return nil
	}
	if it.bounce != nil {
		stored := it.bounce.Bytes()[:it.sl.Stored]
		if it.sl.Flags&lsm.SliceLZ4 != 0 {
			if len(*tmp) < len(it.dst) {
				*tmp = make([]byte, len(it.dst))
			}
			if err := decompressSlice(it.dst, *tmp, stored); err != nil {
				return fmt.Errorf("%s/%s layer %d group %d: %w", c.ns, c.id, it.sl.Layer, it.group, err)
			}
		} else {
			copy(it.dst, stored)
		}
	}
	binding := f.binding
	if it.src != nil {
		binding = it.src.bind
	}
	if got := crc32.Update(format.SliceSeed(binding, it.group, it.sl.Layer), format.Castagnoli, it.dst); got != it.sl.CRC {
		return fmt.Errorf("%w: %s/%s layer %d group %d: checksum %08x, index says %08x", ErrCorrupt, c.ns, c.id, it.sl.Layer, it.group, got, it.sl.CRC)
	}
	if f.useCache {
		s.cache.add(it.cacheKey(f.gen), it.dst)
	}
	return nil
}

func sumLen(reqs []readReq) int {
	n := 0
	for _, r := range reqs {
		n += len(r.buf)
	}
	return n
}
