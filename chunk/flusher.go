package chunk

import (
	"errors"
	"fmt"
	"sort"
	"syscall"

	"github.com/cockroachdb/pebble/v2/vfs"

	"github.com/hcache/hcache/iouring"
	"github.com/hcache/hcache/lsm"
)

type opKind uint8

const (
	opWrite   opKind = iota // write one chunk group
	opBarrier               // commit everything before it durably, then answer
	opDelete                // delete a context
	opGC                    // compact segments
	opDamage                // mark a context damaged
	opEvict                 // evict one context (EvictOne)
	opClose                 // stop
)

type op struct {
	kind       opKind
	c          *ctxState
	group      uint32
	tokens     int
	slab       []byte
	groupBytes int
	layerOff   []int
	owned      bool   // the slab returns to staging after the write
	wseq       uint64 // opWrite: the writer's number (ctxState.writerSeq)
	done       chan error
	gcDone     chan GCResult
	settled    chan struct{} // Options.Synchronous: closed once the flusher is done with the op
}

// writeJob is a group write in flight or awaiting its commit.
type writeJob struct {
	op
	seg    *segFile
	off    uint64
	length uint32
	header *iouring.AlignedBuffer
	packed *iouring.AlignedBuffer // compressed payload, when used
	chunk  lsm.Chunk
	err    error
	seq    uint64 // submission order
	done   bool   // the write completed (successfully or not)
}

// submit hands an op to the flusher. The check that the store is open and
// the send happen under opsMu's read lock, and Close takes its write lock
// before it sends its own op, so no op is sent after the flusher stopped.
// The flusher never calls submit (it could wait on itself).
func (s *Store) submit(o op) error {
	s.opsMu.RLock()
	defer s.opsMu.RUnlock()
	s.mu.Lock()
	err := s.writable()
	s.mu.Unlock()
	if err != nil {
		return err
	}
	if s.opts.Synchronous {
		o.settled = make(chan struct{})
	}
	s.ops <- o
	if o.settled != nil {
		<-o.settled
	}
	return nil
}

// markDirty records that c's record must be written at the next commit.
// Call with s.mu held.
func (s *Store) markDirty(c *ctxState) {
	c.dirty = true
	s.dirtyCtxs[c] = struct{}{}
}

// barrier waits until every write submitted before it is durable and indexed;
// it returns c's first write error, if any.
func (s *Store) barrier(c *ctxState) error {
	done := make(chan error, 1)
	if err := s.submit(op{kind: opBarrier, c: c, done: done}); err != nil {
		return err
	}
	return <-done
}

// flusher state, owned by the flusher goroutine.
//
// Writes complete in any order, but a context's groups must be indexed in
// order (the token count covers a prefix), so commits take the longest
// prefix of completed jobs in submission order. A barrier waits for every
// job submitted before it, not for the pipeline to empty: writes submitted
// after it stay in flight while it commits.
type flusher struct {
	s         *Store
	inflight  int
	compl     chan *writeJob
	queue     []*writeJob // submitted, in order, not yet committed
	seq       uint64      // jobs submitted so far
	committed uint64      // every job up to this seq is committed
	waiters   []waiter
	// Commits run on the committer goroutine, one at a time, so the
	// flusher keeps the disk busy with new writes while an fdatasync and
	// an index commit are under way.
	committing bool
	commitQ    chan commitReq
	commitDone chan struct{}
}

type commitReq struct {
	jobs    []*writeJob
	waiters []waiter
}

type waiter struct {
	op
	need uint64 // the seq of the last job submitted before the barrier
}

func (s *Store) flushLoop() {
	defer s.flusherWG.Done()
	f := &flusher{s: s, compl: make(chan *writeJob, s.opts.QueueDepth), commitQ: make(chan commitReq), commitDone: make(chan struct{})}
	go func() {
		for req := range f.commitQ {
			f.commit(req.jobs, req.waiters)
			f.commitDone <- struct{}{}
		}
	}()
	defer close(f.commitQ)
	var settle []chan struct{} // Options.Synchronous: submitters waiting for a still flusher
	for {
		f.maybeCommit()
		if len(settle) > 0 && f.inflight == 0 && !f.committing {
			for _, ch := range settle {
				close(ch)
			}
			settle = nil
		}
		ops := s.ops
		if f.inflight >= s.opts.QueueDepth {
			ops = nil
		}
		select {
		case j := <-f.compl:
			f.inflight--
			s.invariant(f.inflight >= 0, "flusher: %d writes in flight after one completed", f.inflight)
			j.done = true
		case <-f.commitDone:
			f.committing = false
		case o := <-ops:
			if o.settled != nil {
				settle = append(settle, o.settled)
			}
			switch o.kind {
			case opWrite:
				f.startWrite(o)
			case opBarrier:
				f.waiters = append(f.waiters, waiter{o, f.seq})
			default:
				f.drain()
				if o.kind == opClose {
					f.commit(nil, nil) // last-use times not yet written
					o.done <- nil
					return
				}
				f.control(o)
			}
		}
	}
}

// donePrefix returns how many jobs at the front of the queue are complete,
// and their bytes.
func (f *flusher) donePrefix() (int, int64) {
	n, b := 0, int64(0)
	for n < len(f.queue) && f.queue[n].done {
		b += int64(f.queue[n].length)
		n++
	}
	return n, b
}

// maybeCommit commits the completed prefix when a waiter can be answered,
// when enough bytes await, or when the flusher is idle.
func (f *flusher) maybeCommit() {
	if f.committing {
		return
	}
	n, bytes := f.donePrefix()
	upTo := f.committed
	if n > 0 {
		upTo = f.queue[n-1].seq
	}
	var ready []waiter
	var rest []waiter
	for _, w := range f.waiters {
		if w.need <= upTo {
			ready = append(ready, w)
		} else {
			rest = append(rest, w)
		}
	}
	idle := f.inflight == 0 && len(f.s.ops) == 0 && !f.s.opts.Synchronous
	if len(ready) == 0 && !(n > 0 && (bytes >= f.s.opts.CommitBytes || idle)) {
		return
	}
	jobs := f.queue[:n:n]
	f.queue = f.queue[n:]
	f.waiters = rest
	f.committed = upTo
	f.committing = true
	f.commitQ <- commitReq{jobs, ready}
}

// drain waits for every write in flight and commits everything.
func (f *flusher) drain() {
	if f.committing {
		<-f.commitDone
		f.committing = false
	}
	for f.inflight > 0 {
		j := <-f.compl
		f.inflight--
		j.done = true
	}
	jobs, ws := f.queue, f.waiters
	f.queue, f.waiters = nil, nil
	f.committed = f.seq
	if len(jobs) > 0 || len(ws) > 0 {
		f.commit(jobs, ws)
	}
}

// startWrite builds the record of a group and starts writing it.
func (f *flusher) startWrite(o op) {
	s := f.s
	f.seq++
	j := &writeJob{op: o, seq: f.seq}
	f.queue = append(f.queue, j)
	f.inflight++
	fail := func(err error) {
		j.err = err
		f.compl <- j
	}
	c := o.c
	s.mu.Lock()
	binding, gen, stored := c.binding, c.rec.Gen, c.stored
	plan := c.ident.Plan
	encIdent := c.rec.Identity
	skip := c.deleted || c.writeErr != nil
	s.mu.Unlock()
	if skip {
		fail(errSkipped)
		return
	}
	h := RecordHeader{ChunkTokens: uint16(s.ct), Tokens: uint16(o.tokens), Group: o.group, Gen: gen, Binding: binding,
		Version: formatVersion, Namespace: c.ns, ContextID: c.id, Identity: encIdent}
	hb := headerBytesFor(len(stored), h.descBytes())
	j.chunk = lsm.Chunk{Tokens: uint16(o.tokens), Slices: make([]lsm.Slice, len(stored))}
	payload := [][]byte{}
	var err error
	if s.opts.Compression == "lz4" {
		payload, err = f.packCompressed(j, binding, stored, plan, hb)
		if err != nil {
			fail(err)
			return
		}
	} else if o.tokens == s.ct || len(stored) >= maxIovecs {
		// A full group: the slab is written as it is.
		for i, l := range stored {
			raw := o.tokens * int(plan[l].RowBytes)
			rows := o.slab[o.layerOff[l] : o.layerOff[l]+raw]
			j.chunk.Slices[i] = lsm.Slice{Layer: uint16(l), Off: uint32(hb + o.layerOff[l]), Stored: uint32(raw), Raw: uint32(raw),
				CRC: sliceCRC(&binding, o.group, uint16(l), rows)}
		}
		payload = [][]byte{o.slab[:o.groupBytes]}
	} else {
		// A partial group: each layer's slice takes its rows rounded up
		// to a block, not the full chunk's room (one iovec per layer).
		pos := 0
		for i, l := range stored {
			raw := o.tokens * int(plan[l].RowBytes)
			rows := o.slab[o.layerOff[l] : o.layerOff[l]+raw]
			j.chunk.Slices[i] = lsm.Slice{Layer: uint16(l), Off: uint32(hb + pos), Stored: uint32(raw), Raw: uint32(raw),
				CRC: sliceCRC(&binding, o.group, uint16(l), rows)}
			payload = append(payload, o.slab[o.layerOff[l]:o.layerOff[l]+roundUp(raw)])
			pos += roundUp(raw)
		}
	}
	length := hb
	for _, p := range payload {
		length += len(p)
	}
	seg, off, err := s.reserve(uint64(length), false)
	if err != nil {
		fail(err)
		return
	}
	s.mu.Lock()
	c.noteWrite(seg.id)
	s.mu.Unlock()
	j.seg, j.off, j.length = seg, off, uint32(length)
	j.chunk.Segment, j.chunk.Offset, j.chunk.Length = seg.id, off, uint32(length)
	if j.header, err = s.scratch.get(hb); err != nil {
		fail(err)
		return
	}
	h.HeaderBytes, h.RecordBytes, h.Segment, h.Slices = uint32(hb), uint64(length), seg.id, j.chunk.Slices
	h.Encode(j.header.Bytes())
	bufs := append([][]byte{j.header.Bytes()[:hb]}, payload...)
	s.stats.bytesWritten.Add(uint64(length))
	seg.writeAsync(bufs, int64(off), func(err error) {
		j.err = err
		f.compl <- j
	})
}

// maxIovecs bounds the iovecs of one write (the kernel's IOV_MAX is 1024).
const maxIovecs = 1000

var (
	errSkipped    = errors.New("chunk: write skipped")
	errSyncFailed = errors.New("chunk: an fdatasync of the segment failed earlier")
)

// reserve allocates length bytes at the append point, rotating to a new
// segment when the active one is full. Writes are refused while the disk is
// full (ErrDiskFull); GC (gc true) may still allocate, with the room the
// released emergency reserve left. It runs only on the flusher (the one
// allocator; evictions' tombstones on the committer take allocMu too), and
// holds no store-wide lock across fallocate, fdatasync or file creation.
func (s *Store) reserve(length uint64, gc bool) (*segFile, uint64, error) {
	s.allocMu.Lock()
	defer s.allocMu.Unlock()
	if length+segHeaderBytes > uint64(s.opts.SegmentBytes) {
		return nil, 0, fmt.Errorf("chunk: a %d-byte record does not fit a %d-byte segment; raise SegmentBytes", length, s.opts.SegmentBytes)
	}
	s.mu.Lock()
	if s.diskFull && !gc && !s.spaceFreedLocked() {
		s.mu.Unlock()
		return nil, 0, errDiskFull()
	}
	sg := s.active
	var end uint64
	if sg != nil {
		rec := s.segRecs[sg.id]
		if end = rec.Written + length; end > uint64(s.opts.SegmentBytes) {
			rec.Sealed = true
			s.active, sg = nil, nil
		}
	}
	s.mu.Unlock()
	if sg == nil {
		var err error
		if sg, err = s.newSegment(); err != nil {
			return nil, 0, err
		}
		end = segHeaderBytes + length
	}
	if err := s.grow(sg, end); err != nil {
		return nil, 0, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	rec := s.segRecs[sg.id]
	off := rec.Written
	rec.Written += length
	return sg, off, nil
}

// initialSegmentBytes is the size a new segment is preallocated with; it
// doubles as records arrive, up to SegmentBytes, so a small store takes
// little space.
const initialSegmentBytes = 1 << 20

// grow makes sure sg has at least need bytes allocated (flusher only; no
// lock held across fallocate).
func (s *Store) grow(sg *segFile, need uint64) error {
	if int64(need) <= sg.allocated {
		return nil
	}
	size := min(s.opts.SegmentBytes, max(2*sg.allocated, int64(roundUp(int(need)))))
	if err := sg.preallocate(size); err != nil {
		if errors.Is(err, syscall.ENOSPC) {
			s.mu.Lock()
			s.enterDiskFullLocked(err)
			s.mu.Unlock()
		}
		return fmt.Errorf("chunk: grow %s to %d bytes: %w", sg.name, size, err)
	}
	sg.allocated = size
	return nil
}

// ErrDiskFull is wrapped (with syscall.ENOSPC) by writes refused because
// the file system is full. Restores, deletes and GC go on; writes resume
// once GC has freed space.
var ErrDiskFull = errors.New("chunk: the disk is full: writes are refused until deleting contexts and GC free space")

func errDiskFull() error { return fmt.Errorf("%w (%w)", ErrDiskFull, syscall.ENOSPC) }

// spaceFreedLocked leaves the disk-full state when the file system reports
// room for the reserve and two new segments again (space freed from
// outside); it takes the reserve back first. Call with s.mu held.
func (s *Store) spaceFreedLocked() bool {
	du, err := s.fs.GetDiskUsage(s.dir)
	if err != nil || int64(du.AvailBytes) < s.opts.ReserveBytes+2*initialSegmentBytes {
		return false
	}
	if err := s.takeReserve(); err != nil {
		return false
	}
	s.diskFull = false
	s.opts.Logf("chunk: %s: %d bytes free again; writes resume", s.dir, du.AvailBytes)
	return true
}

// enterDiskFullLocked switches to refusing writes after an ENOSPC: the
// emergency reserve file is released, so that the index (deletes) and GC
// have room, and the active segment is sealed so GC may compact it. Call
// with s.mu held.
func (s *Store) enterDiskFullLocked(cause error) {
	if s.diskFull {
		return
	}
	s.diskFull = true
	s.stats.diskFull.Add(1)
	if s.active != nil {
		if rec := s.segRecs[s.active.id]; rec != nil {
			rec.Sealed = true
		}
		s.active = nil
	}
	released := s.releaseReserve()
	s.opts.Logf("chunk: %s: disk full (%v): writes refused until deletes and GC free space; emergency reserve released: %v", s.dir, cause, released)
}

// newSegment creates, preallocates and syncs a segment file (and its
// directory entry), then makes it the active one. It becomes durable in the
// index at the next commit; until then a crash leaves an orphan file that
// Open removes (it holds no record) or keeps. Flusher only; call without
// s.mu.
func (s *Store) newSegment() (*segFile, error) {
	s.mu.Lock()
	id := s.nextSeg
	s.nextSeg++
	s.mu.Unlock()
	sg, err := openSeg(s.fs, s.segDir, id, s.eng, !s.opts.DisableDirect)
	if err != nil {
		return nil, err
	}
	fail := func(err error) (*segFile, error) {
		sg.close()
		s.fs.Remove(sg.name)
		return nil, err
	}
	size := min(s.opts.SegmentBytes, initialSegmentBytes)
	if err := sg.preallocate(size); err != nil {
		if errors.Is(err, syscall.ENOSPC) {
			s.mu.Lock()
			s.enterDiskFullLocked(err)
			s.mu.Unlock()
		}
		return fail(fmt.Errorf("chunk: preallocate %s: %w", sg.name, err))
	}
	sg.allocated = size
	hdr, err := s.scratch.get(segHeaderBytes)
	if err != nil {
		return fail(err)
	}
	(&SegmentHeader{ID: id, CreatedNanos: s.opts.Now()}).Encode(hdr.Bytes())
	err = sg.write([][]byte{hdr.Bytes()[:segHeaderBytes]}, 0)
	s.scratch.put(hdr)
	if err == nil {
		err = sg.datasync()
	}
	if err == nil {
		err = syncDir(s.fs, s.segDir)
	}
	if err != nil {
		return fail(err)
	}
	s.mu.Lock()
	s.segs[id] = sg
	s.segRecs[id] = &lsm.Segment{Written: segHeaderBytes}
	s.active = sg
	s.mu.Unlock()
	return sg, nil
}

func syncDir(fs vfs.FS, dir string) error {
	d, err := fs.OpenDir(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// commit makes the completed writes durable (fdatasync of each touched
// segment), indexes them in one Pebble batch (synced when someone waits), and
// answers the waiters.
func (f *flusher) commit(jobs []*writeJob, waiters []waiter) {
	s := f.s
	// 1. Durability of the data.
	touched := map[*segFile]bool{}
	for _, j := range jobs {
		if j.err == nil {
			touched[j.seg] = true
		}
	}
	var syncErr error
	for _, sg := range segsByID(touched) {
		if err := sg.datasync(); err != nil {
			syncErr = err
			s.opts.Logf("chunk: fdatasync of segment %d failed (%v); its unindexed writes are dropped and the segment is sealed", sg.id, err)
			s.mu.Lock()
			sg.syncFailed = true
			if rec := s.segRecs[sg.id]; rec != nil {
				rec.Sealed = true
			}
			if s.active == sg {
				s.active = nil
			}
			s.mu.Unlock()
		}
	}
	// 2. The index batch. The records a job supersedes (a partial group
	// written before) are read from the index first, without the store
	// lock. Token counts change only here, on this goroutine.
	stored := map[string]*lsm.Chunk{}
	for _, j := range jobs {
		if j.err == nil && uint64(j.group)*uint64(s.ct) < j.c.rec.Tokens {
			key := lsm.ChunkKey(j.c.ns, j.c.id, j.group)
			if v, err := s.db.Get(key); err == nil {
				stored[string(key)], _ = lsm.DecodeChunk(v)
			}
		}
	}
	b := s.db.NewBatch()
	s.mu.Lock()
	segTouched := map[uint32]bool{}
	ctxTouched := map[*ctxState]bool{}
	for sg := range touched {
		segTouched[sg.id] = true
	}
	superseded := map[string]*lsm.Chunk{}
	// Token counts advance in memory only after the index commit, so a
	// restore never expects chunks the index does not have yet.
	newTokens := map[*ctxState]uint64{}
	for _, j := range jobs {
		c := j.c
		if j.err == nil && syncErr == nil && j.seg.syncFailed {
			// Written before an fdatasync of its segment failed, even if
			// a later one succeeded: the kernel may have dropped it
			// (fsyncgate). Never index it.
			j.err = errSyncFailed
		}
		if errors.Is(j.err, syscall.ENOSPC) && !errors.Is(j.err, ErrDiskFull) {
			s.enterDiskFullLocked(j.err)
		}
		if j.err != nil || syncErr != nil {
			if j.err != errSkipped && c.writeErr == nil {
				if j.err == nil {
					c.writeErr = syncErr
				} else {
					c.writeErr = j.err
				}
			}
			continue
		}
		if c.deleted || c.writeErr != nil {
			continue
		}
		if _, ok := newTokens[c]; !ok {
			newTokens[c] = c.rec.Tokens
		}
		// What is indexed stays a prefix of whole groups and at most
		// one partial last group, written by the context's current
		// writer. A job that breaks this is a bug: it is not indexed,
		// and its writer's Flush fails with ErrInvariant.
		cur, start, end := newTokens[c], uint64(j.group)*uint64(s.ct), uint64(j.group)*uint64(s.ct)+uint64(j.tokens)
		if !s.invariant(j.wseq == c.writerSeq, "group %d of %s/%s committed for writer %d, which is gone: writer %d has opened the context since", j.group, c.ns, c.id, j.wseq, c.writerSeq) ||
			!s.invariant(start <= cur, "group %d of %s/%s (tokens %d-%d) would leave a gap after the %d tokens indexed", j.group, c.ns, c.id, start, end, cur) ||
			!s.invariant(j.tokens == s.ct || end >= cur, "group %d of %s/%s holds %d of %d tokens but would not be the last (%d tokens indexed)", j.group, c.ns, c.id, j.tokens, s.ct, cur) {
			c.writeErr = s.brokenErr()
			continue
		}
		key := lsm.ChunkKey(c.ns, c.id, j.group)
		// The group may already be stored (a partial tail flushed
		// earlier): its old record becomes dead.
		old := superseded[string(key)]
		if old == nil && uint64(j.group)*uint64(s.ct) < c.rec.Tokens {
			old = stored[string(key)]
		}
		if old != nil {
			if rec := s.segRecs[old.Segment]; rec != nil {
				s.invariant(rec.Live >= uint64(old.Length), "segment %d: %d live bytes, less than the %d-byte record of group %d of %s/%s that a rewrite supersedes", old.Segment, rec.Live, old.Length, j.group, c.ns, c.id)
				rec.Live -= min(rec.Live, uint64(old.Length))
				segTouched[old.Segment] = true
			}
			c.live -= int64(old.Length)
			s.live -= int64(old.Length)
			s.invariant(c.live >= 0 && s.live >= 0, "live bytes below zero (%s/%s: %d, store: %d) after group %d's old record was superseded", c.ns, c.id, c.live, s.live, j.group)
		}
		ch := j.chunk
		superseded[string(key)] = &ch
		b.Set(key, ch.Encode())
		s.segRecs[j.seg.id].Live += uint64(j.length)
		c.live += int64(j.length)
		s.live += int64(j.length)
		if t := uint64(j.group)*uint64(s.ct) + uint64(j.tokens); t > newTokens[c] {
			newTokens[c] = t
		}
		ctxTouched[c] = true
		if s.cache != nil && s.cache.limit > 0 {
			s.cacheGroup(c, j)
		}
	}
	// Only contexts marked dirty since the last commit: the work of a
	// commit does not grow with the number of contexts.
	for c := range s.dirtyCtxs {
		if c.dirty {
			ctxTouched[c] = true
		}
		if c.useDirty && !c.deleted {
			b.Set(lsm.LastUseKey(c.ns, c.id), lsm.EncodeNanos(lsm.KindLastUse, c.lastUse))
			c.useDirty = false
		}
	}
	clear(s.dirtyCtxs)
	for c := range ctxTouched {
		if c.deleted {
			continue
		}
		if !s.namespaces[c.ns] {
			s.namespaces[c.ns] = true
			b.Set(lsm.NamespaceKey(c.ns), lsm.EncodeNanos(lsm.KindNamespace, s.opts.Now()))
		}
		rec := c.rec
		if t, ok := newTokens[c]; ok {
			rec.Tokens = t
		}
		b.Set(lsm.ContextKey(c.ns, c.id), rec.Encode())
		c.dirty = false
	}
	for id := range segTouched {
		if rec := s.segRecs[id]; rec != nil {
			b.Set(lsm.SegmentKey(id), rec.Encode())
		}
	}
	if s.active != nil {
		b.Set(lsm.SegmentKey(s.active.id), s.segRecs[s.active.id].Encode())
	}
	s.mu.Unlock()
	// Every index batch is synced, waiters or not, and the store writes
	// nothing else to the index: unsynced writes can reach the disk out of
	// order, and Pebble, finding a lost WAL record followed by later ones,
	// reports corruption rather than replaying a prefix. With each batch
	// synced before the next is built, at most the last one is ever
	// unsynced. (A sync costs ~0.2 ms here; batches without waiters are
	// rare: idle or CommitBytes.) Last-use times ride along with the next
	// commit.
	var err error
	if b.Empty() {
		b.Discard()
	} else {
		err = b.Commit(true)
	}
	if err != nil {
		s.mu.Lock()
		s.failed = err
		s.mu.Unlock()
		s.opts.Logf("chunk: index commit failed: %v; the store refuses further writes", err)
	}
	s.stats.commits.Add(1)
	s.mu.Lock()
	if err == nil {
		for c, t := range newTokens {
			s.invariant(t >= c.rec.Tokens, "%s/%s: a commit would shrink the token count from %d to %d", c.ns, c.id, c.rec.Tokens, t)
			c.rec.Tokens = max(c.rec.Tokens, t)
		}
	}
	// The jobs are dealt with only now that the token counts show them:
	// an Append that sees none pending reads the count a restore sees.
	for _, j := range jobs {
		j.c.pending--
		s.invariant(j.c.pending >= 0, "%s/%s: %d groups pending with the flusher after one was committed", j.c.ns, j.c.id, j.c.pending)
	}
	s.mu.Unlock()
	// Staging slabs go back before anyone is answered, so a writer that
	// flushed finds them free.
	for _, j := range jobs {
		f.release(j)
	}
	// Evict before answering: when a Flush returns, the capacity bound
	// holds again.
	if err == nil {
		f.evict()
	}
	for _, w := range waiters {
		s.mu.Lock()
		werr := err
		if werr == nil && w.c != nil {
			werr = w.c.writeErr
		}
		s.mu.Unlock()
		w.done <- werr
	}
}

// release frees a job's buffers once it is committed (or failed).
func (f *flusher) release(j *writeJob) {
	if j.header != nil {
		f.s.scratch.put(j.header)
	}
	if j.packed != nil {
		f.s.scratch.put(j.packed)
	}
	if j.owned {
		f.s.staging.put(j.slab)
		f.s.staging.handOff(-1)
	}
}

// control runs a delete, GC or damage op with no write in flight.
func (f *flusher) control(o op) {
	s := f.s
	switch o.kind {
	case opDelete:
		s.mu.Lock()
		gone := o.c.deleted
		s.mu.Unlock()
		var err error
		if !gone { // evicted (or deleted) while the op waited: done already
			err = s.deleteCtxs([]*ctxState{o.c})
		}
		o.done <- err
	case opDamage:
		s.mu.Lock()
		o.c.rec.Flags |= lsm.FlagDamaged
		s.markDirty(o.c)
		s.mu.Unlock()
		f.commit(nil, nil)
		if o.done != nil {
			o.done <- nil
		}
	case opGC:
		o.gcDone <- s.gcNow()
	case opEvict:
		f.evictOne()
		o.done <- nil
	}
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

// evict deletes least recently used, unpinned contexts without an open
// writer while the live bytes exceed CapacityBytes.
func (f *flusher) evict() {
	s := f.s
	s.mu.Lock()
	if s.live <= s.opts.CapacityBytes {
		s.mu.Unlock()
		return // the common case: O(1) per commit
	}
	// Over capacity: rank the candidates once, with their last-use times
	// read under the lock (Restore writes them).
	type cand struct {
		c       *ctxState
		lastUse int64
		gen     uint64
	}
	var cands []cand
	for _, c := range s.ctxs {
		if !c.deleted && c.writer == nil && c.rec.Flags&lsm.FlagPinned == 0 {
			cands = append(cands, cand{c, c.lastUse, c.rec.Gen})
		}
	}
	s.mu.Unlock()
	sort.Slice(cands, func(i, j int) bool {
		if cands[i].lastUse != cands[j].lastUse {
			return cands[i].lastUse < cands[j].lastUse
		}
		return cands[i].gen < cands[j].gen
	})
	// The victims, least recently used first, until the live bytes fit;
	// their tombstones go out together (one append each, one fdatasync,
	// one index batch), not one fsync per context.
	s.mu.Lock()
	over := s.live - s.opts.CapacityBytes
	var victims []*ctxState
	for _, cd := range cands {
		if over <= 0 {
			break
		}
		c := cd.c
		if c.deleted || c.writer != nil || c.rec.Flags&lsm.FlagPinned != 0 {
			continue
		}
		victims = append(victims, c)
		over -= c.live
	}
	s.mu.Unlock()
	if err := s.deleteCtxs(victims); err != nil {
		s.opts.Logf("chunk: evicting %d contexts: %v", len(victims), err)
		return
	}
	for _, v := range victims {
		s.stats.evictions.Add(1)
		if s.opts.OnEvict != nil {
			s.opts.OnEvict(v.ns, v.id)
		}
	}
}
