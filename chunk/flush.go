package chunk

import (
	"time"

	"github.com/hcache/hcache/chunk/format"
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
	opMove                  // switch a sealed segment to a provider (MoveSegment)
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
	owned      bool     // the slab returns to staging after the write
	wseq       uint64   // opWrite: the writer's number (ctxState.writerSeq)
	chain      *chainOp // opWrite of a token-addressed context (prefix.go)
	done       chan error
	gcDone     chan GCResult
	settled    chan struct{} // Options.Synchronous: closed once the flusher is done with the op
	loc        string        // opMove: the provider (its segment id in group)
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
	// inflight is the bytes this job counts in flusher.inflightBytes
	// until it completes (0 if it wrote nothing).
	inflight int64
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
	s        *Store
	inflight int
	// inflightBytes is the bytes of the writes in flight: the flusher
	// takes no new op while they reach writeBytes() (priority.go).
	inflightBytes int64
	compl         chan *writeJob
	queue         []*writeJob // submitted, in order, not yet committed
	seq           uint64      // jobs submitted so far
	committed     uint64      // every job up to this seq is committed
	waiters       []waiter
	// Commits run on the committer goroutine, one at a time, so the
	// flusher keeps the disk busy with new writes while an fdatasync and
	// an index commit are under way.
	committing bool
	commitQ    chan commitReq
	commitDone chan struct{}
	busySince  time.Time // when the writes in flight went from 0 to 1 (SaveStages.Busy)
}

// started and completed count a write in and out of flight.
func (f *flusher) started() {
	if f.inflight == 0 {
		f.busySince = time.Now()
	}
	f.inflight++
}

func (f *flusher) completed(j *writeJob) {
	f.inflight--
	f.inflightBytes -= j.inflight
	f.s.invariant(f.inflight >= 0 && f.inflightBytes >= 0, "flusher: %d writes (%d bytes) in flight after one completed", f.inflight, f.inflightBytes)
	if f.inflight == 0 {
		f.s.saveStages.busyNanos.Add(since(f.busySince))
	}
	j.done = true
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
		if f.inflight >= s.opts.QueueDepth || f.inflightBytes >= s.writeBytes() { // less while restores read (priority.go)
			ops = nil
		}
		select {
		case j := <-f.compl:
			f.completed(j)
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
		f.completed(<-f.compl)
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
	f.started()
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
	if o.chain != nil && o.chain.tip {
		f.startTip(j, c, binding, gen, encIdent)
		return
	}
	if o.chain != nil {
		// A token-addressed context's op (prefix_write.go): a reference
		// or a group already stored completes here, without a write.
		var done bool
		if binding, done = f.startChain(j, c, binding); done {
			return
		}
	}
	h := RecordHeader{ChunkTokens: uint16(s.ct), Tokens: uint16(o.tokens), Group: o.group, Gen: gen, Binding: binding,
		Version: format.Version, Namespace: c.ns, ContextID: c.id, Identity: encIdent}
	if o.chain != nil {
		chainHeader(&h, c, o.chain)
	}
	hb := format.HeaderBytesFor(len(stored), h.DescBytes())
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
				CRC: format.SliceCRC(binding, o.group, uint16(l), rows)}
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
				CRC: format.SliceCRC(binding, o.group, uint16(l), rows)}
			payload = append(payload, o.slab[o.layerOff[l]:o.layerOff[l]+format.RoundUp(raw)])
			pos += format.RoundUp(raw)
		}
	}
	length := hb
	for _, p := range payload {
		length += len(p)
	}
	seg, off, err := s.allocate(uint64(length), false)
	if err != nil {
		fail(err)
		return
	}
	s.mu.Lock()
	c.noteWrite(seg.id)
	s.mu.Unlock()
	j.seg, j.off, j.length = seg, off, uint32(length)
	j.inflight = int64(length)
	f.inflightBytes += j.inflight
	j.chunk.Segment, j.chunk.Offset, j.chunk.Length = seg.id, off, uint32(length)
	if j.header, err = s.scratch.get(hb); err != nil {
		fail(err)
		return
	}
	h.HeaderBytes, h.RecordBytes, h.Segment, h.Slices = uint32(hb), uint64(length), seg.id, j.chunk.Slices
	h.Encode(j.header.Bytes())
	bufs := append([][]byte{j.header.Bytes()[:hb]}, payload...)
	s.stats.bytesWritten.Add(uint64(length))
	t0 := time.Now()
	seg.writeAsync(bufs, int64(off), func(err error) {
		s.saveStages.writes.Add(1)
		s.saveStages.writeBytes.Add(uint64(length))
		s.saveStages.writeNanos.Add(since(t0))
		j.err = err
		f.compl <- j
	})
}

// maxIovecs bounds the iovecs of one write (the kernel's IOV_MAX is 1024).
const maxIovecs = 1000

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
	case opMove:
		o.done <- s.moveSegment(o.group, o.loc)
	}
}
