package chunk

import (
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"sync"
	"unsafe"

	"github.com/hcache/hcache/iouring"
	"github.com/hcache/hcache/lsm"
)

// snapshot is what a restore reads: chunk records of contiguous groups, with
// references on their segments so GC cannot delete the files under it.
type snapshot struct {
	c      *ctxState
	chunks []*lsm.Chunk // by group
	tokens int
	segs   []*segFile
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
		sn, err := s.scanChunks(c, want)
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
	err := s.db.Scan(lsm.ChunkPrefix(c.ns, c.id), lsm.ChunkPrefixEnd(c.ns, c.id), func(k, v []byte) error {
		_, _, g, err := lsm.ParseChunkKey(k)
		if err != nil {
			return err
		}
		ch, err := lsm.DecodeChunk(v)
		if err != nil {
			return fmt.Errorf("group %d: %w", g, err)
		}
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
	delete(s.segs, sg.id)
}

// fetchItem is one slice to bring into dst (len(dst) = raw bytes).
type fetchItem struct {
	ch    *lsm.Chunk
	sl    lsm.Slice
	group uint32
	dst   []byte
	// internal
	bounce *iouring.AlignedBuffer
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
	f := &fetchOp{s: s, c: c, items: items, useCache: useCache}
	s.mu.Lock()
	f.binding, f.gen = c.binding, c.rec.Gen
	s.mu.Unlock()
	var reqs []readReq
	for i := range items {
		it := &items[i]
		if int(it.sl.Raw) != len(it.dst) {
			f.release()
			return nil, fmt.Errorf("%w: %s/%s layer %d group %d: slice holds %d bytes, want %d", ErrCorrupt, c.ns, c.id, it.sl.Layer, it.group, it.sl.Raw, len(it.dst))
		}
		if v, ok := s.cache.get(sliceKey{f.gen, it.group, it.sl.Layer, it.ch.Tokens}); useCache && ok && len(v) == len(it.dst) {
			it.hit = v // cache entries are never written after add
			s.stats.cacheHits.Add(1)
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
		n := roundUp(int(it.sl.Stored))
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
		f.reads = startReads(s.eng, reqs)
	}
	return f, nil
}

func (f *fetchOp) release() {
	for i := range f.items {
		if f.items[i].bounce != nil {
			f.s.scratch.put(f.items[i].bounce)
			f.items[i].bounce = nil
		}
	}
}

// finish waits for the reads, decompresses and verifies.
func (f *fetchOp) finish() error {
	defer f.release()
	s, c := f.s, f.c
	if f.reads != nil {
		if err := f.reads.wait(); err != nil {
			if errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF) {
				// The index points past the end of the segment.
				return fmt.Errorf("%w: %s/%s: %v", ErrCorrupt, c.ns, c.id, err)
			}
			return fmt.Errorf("chunk: %s/%s: %w", c.ns, c.id, err)
		}
		s.stats.bytesRead.Add(uint64(f.bytes))
	}
	var tmp []byte
	for i := range f.items {
		it := &f.items[i]
		if it.hit != nil {
			copy(it.dst, it.hit)
			continue
		}
		if it.bounce != nil {
			stored := it.bounce.Bytes()[:it.sl.Stored]
			if it.sl.Flags&lsm.SliceLZ4 != 0 {
				if len(tmp) < len(it.dst) {
					tmp = make([]byte, len(it.dst))
				}
				if err := decompressSlice(it.dst, tmp, stored); err != nil {
					return fmt.Errorf("%s/%s layer %d group %d: %w", c.ns, c.id, it.sl.Layer, it.group, err)
				}
			} else {
				copy(it.dst, stored)
			}
		}
		if got := crc32.Update(sliceSeed(&f.binding, it.group, it.sl.Layer), castagnoli, it.dst); got != it.sl.CRC {
			return fmt.Errorf("%w: %s/%s layer %d group %d: checksum %08x, index says %08x", ErrCorrupt, c.ns, c.id, it.sl.Layer, it.group, got, it.sl.CRC)
		}
		if f.useCache {
			s.cache.add(sliceKey{f.gen, it.group, it.sl.Layer, it.ch.Tokens}, it.dst)
		}
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

// Restore streams the stored layers of a context, in layer order, to fn:
// rows holds tokens x RowBytes of that layer, valid only during the call (the
// buffer is reused). The reads of the next layer are in flight while fn runs.
// It returns the number of tokens restored. ident must equal the stored
// identity; every slice is verified before fn sees it. A context whose data
// fails a check is marked damaged and never served again.
func (s *Store) Restore(ns, id string, ident *Identity, fn func(layer int, rows []byte) error) (int, error) {
	if ident == nil || fn == nil {
		return 0, fmt.Errorf("chunk: Restore %s/%s: nil identity or callback", ns, id)
	}
	return s.RestoreOwned(ns, id, ident, 0, func(layer int, rows []byte, release func()) error {
		defer release()
		return fn(layer, rows)
	})
}

// DefaultRestoreAhead is the fewest buffers a restore holds: the one handed
// over and the one being read. With ahead 0, RestoreOwned takes
// max(DefaultRestoreAhead, Options.RestoreAheadBytes / layer bytes).
const DefaultRestoreAhead = 2

// RestoreOwned is Restore for consumers that finish with a layer after fn
// returns, such as a GPU backend whose host-to-device copy of rows is still
// in flight: fn takes ownership of rows and must call release exactly once
// (from any goroutine; later calls are no-ops) when nothing reads rows any
// more, also when fn returns an error. A consumer may keep each buffer until
// it receives the next one; if fn panics, the buffer is taken to be dropped
// (released) and the restore fails. The store never reuses a buffer
// before its release, and keeps reading the following layers meanwhile:
// at most ahead buffers (at least 2; when 0, as many as
// Options.RestoreAheadBytes holds of this context's layers, at least 2) are held at once,
// counting those given to fn and not yet released. RestoreOwned returns only
// after every buffer it handed out has been released, so release must not
// wait for RestoreOwned to return.
func (s *Store) RestoreOwned(ns, id string, ident *Identity, ahead int, fn func(layer int, rows []byte, release func()) error) (int, error) {
	if ident == nil {
		return 0, errors.New("chunk: restore needs an identity")
	}
	if fn == nil {
		return 0, errors.New("chunk: RestoreOwned needs a callback")
	}
	auto := ahead <= 0
	if auto {
		ahead = DefaultRestoreAhead
	}
	if ahead < 2 {
		return 0, fmt.Errorf("chunk: RestoreOwned ahead %d: at least 2 buffers (the one handed over and the one being read)", ahead)
	}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return 0, ErrClosed
	}
	s.restores.Add(1)
	defer s.restores.Done()
	c, err := s.lookup(ns, id)
	if err != nil {
		s.mu.Unlock()
		return 0, err
	}
	if c.rec.Flags&lsm.FlagDamaged != 0 || c.ident == nil {
		s.mu.Unlock()
		return 0, fmt.Errorf("%w: %s/%s", ErrDamaged, ns, id)
	}
	if !c.ident.Equal(ident) {
		s.mu.Unlock()
		s.stats.identityMismatch.Add(1)
		return 0, fmt.Errorf("%w: %s/%s", ErrIdentityMismatch, ns, id)
	}
	s.mu.Unlock()
	sn, err := s.snap(c)
	if err != nil {
		// Only bytes that fail their checks damage a context; an index
		// read that failed (I/O, a failed index) may succeed later.
		if errorsIsCorrupt(err) || (errors.Is(err, lsm.ErrCorrupt) && !errors.Is(err, lsm.ErrFatal)) {
			s.markDamaged(c)
		}
		return 0, fmt.Errorf("chunk: restore %s/%s: %w", ns, id, err)
	}
	if auto {
		maxRow := 0
		for _, l := range c.stored {
			maxRow = max(maxRow, int(c.ident.Plan[l].RowBytes))
		}
		if layer := int64(sn.tokens) * int64(maxRow); layer > 0 {
			ahead = int(max(DefaultRestoreAhead, min(int64(len(c.stored)), s.opts.RestoreAheadBytes/layer)))
		}
	}
	s.mu.Lock()
	c.lastUse = s.opts.Now()
	c.useDirty = true // persisted with the next index commit
	s.dirtyCtxs[c] = struct{}{}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		s.unref(sn.segs)
		s.mu.Unlock()
	}()

	// held counts the buffers taken and not yet given back: one slot per
	// buffer, so the producer blocks once ahead buffers are out.
	held := make(chan struct{}, ahead)
	freed := make(chan struct{}, 1) // a buffer was given back
	var outstanding sync.WaitGroup
	giveBack := func(buf *iouring.AlignedBuffer) func() {
		var once sync.Once
		return func() {
			once.Do(func() {
				s.readBufs.put(buf)
				<-held
				outstanding.Done()
				select {
				case freed <- struct{}{}:
				default:
				}
			})
		}
	}
	tryTake := func() bool {
		select {
		case held <- struct{}{}:
			outstanding.Add(1)
			return true
		default:
			return false
		}
	}
	take := func(stop <-chan struct{}) bool {
		select {
		case held <- struct{}{}:
			outstanding.Add(1)
			return true
		case <-stop:
			return false
		}
	}

	// layerOut is a layer whose reads have completed. This goroutine
	// verifies it (finish) before fn sees it, so checksums never hold up
	// the reads of the layers after it.
	type layerOut struct {
		layer int
		lr    *layerRead
	}
	out := make(chan layerOut, 1)
	stop := make(chan struct{})
	go func() {
		defer close(out)
		// Every layer a free buffer allows has its reads in flight at
		// once, so the disk works through a deep queue while the consumer
		// computes. This goroutine only starts reads and hands layers
		// over; whenever it waits (for a layer's reads, or for the
		// consumer to take one), a buffer given back starts the next
		// layer's reads at once.
		// With more than two buffers the first layer is read alone: the
		// consumer waits for it, so it does not share the disk with the
		// rest of the context, which goes out together once it is in. (With
		// two, the second is read beside it, as only two are ever in
		// flight.) The reads after the first start before it is handed
		// over, since once the consumer computes this goroutine may wait
		// long for a CPU.
		var started []*layerRead // in layer order, not yet handed over
		var last *layerRead      // the last layer started
		next := 0                // the next layer (index into c.stored) to start
		depth := 1               // layers in flight; ahead once the first is in
		if ahead <= 2 {
			depth = ahead
		}
		// start starts the next layer in a buffer slot just taken, unless
		// the restore has stopped: then it gives the slot back. Every slot
		// freed after the stop is freed after stop was closed, so once
		// stopped no layer starts.
		start := func() bool {
			select {
			case <-stop:
				<-held
				outstanding.Done()
				return false
			default:
			}
			last = s.startLayer(sn, next)
			started = append(started, last)
			next++
			return true
		}
		startMore := func() {
			for next < len(c.stored) && len(started) < depth && last.err == nil && tryTake() {
				if !start() {
					return
				}
			}
		}
		defer func() {
			// Stopped: wait for what is in flight, then free it.
			for _, lr := range started {
				if b, _, err := lr.finish(); err == nil {
					giveBack(b)()
				} else {
					<-held
					outstanding.Done()
				}
			}
		}()
		for _, l := range c.stored {
			if len(started) == 0 {
				// Every started layer has been handed over, so the
				// consumer can give one back: wait for it. (Never wait
				// with a layer still to hand over: a consumer may keep
				// its previous buffer until it receives the next one.)
				if !take(stop) || !start() {
					return
				}
			}
			startMore()
			cur := started[0]
		wait:
			for {
				select {
				case <-cur.ready():
					break wait
				case <-freed:
					startMore()
				case <-stop:
					return // cur is still in started: drained
				}
			}
			depth = ahead
			startMore()
			started = started[1:]
		send:
			for {
				select {
				case out <- layerOut{l, cur}:
					break send
				case <-freed:
					startMore()
				case <-stop:
					started = append(started, cur) // freed by the deferred drain
					return
				}
			}
			if cur.err != nil { // nothing was started after it
				return
			}
		}
	}()
	var firstErr error
	for lo := range out {
		buf, rows, err := lo.lr.finish()
		if err != nil { // finish freed the buffer
			<-held
			outstanding.Done()
			if errorsIsCorrupt(err) { // damaged whatever stopped the restore first
				s.markDamaged(c)
			}
			if firstErr == nil {
				firstErr = err
				close(stop)
			}
			continue
		}
		release := giveBack(buf)
		if firstErr != nil {
			release()
			continue
		}
		if s.closedFlag.Load() {
			// Close waits for this restore: stop at this layer.
			release()
			firstErr = ErrClosed
			close(stop)
			continue
		}
		if err := callOwned(fn, lo.layer, rows, release); err != nil {
			firstErr = err
			close(stop)
		}
	}
	outstanding.Wait()
	if firstErr != nil {
		return 0, firstErr
	}
	s.stats.restores.Add(1)
	return sn.tokens, nil
}

// ErrCallbackPanic is wrapped by Restore's error when its callback panicked.
var ErrCallbackPanic = errors.New("chunk: restore callback panicked")

// callOwned runs a restore callback; a panic in it becomes an error and the
// buffer is released, so a misbehaving consumer cannot wedge the store.
func callOwned(fn func(int, []byte, func()) error, layer int, rows []byte, release func()) (err error) {
	defer func() {
		if r := recover(); r != nil {
			release()
			err = fmt.Errorf("%w on layer %d: %v", ErrCallbackPanic, layer, r)
		}
	}()
	return fn(layer, rows, release)
}

// layerRead is one layer of a restore with its reads in flight.
type layerRead struct {
	s     *Store
	buf   *iouring.AlignedBuffer
	rows  []byte
	fetch *fetchOp
	err   error
}

// startLayer issues the reads of one layer of every group into one buffer.
func (s *Store) startLayer(sn *snapshot, si int) *layerRead {
	layer := sn.c.stored[si]
	rb := int(sn.c.ident.Plan[layer].RowBytes)
	total := sn.tokens * rb
	buf, err := s.readBufs.get(total + BlockBytes)
	if err != nil {
		return &layerRead{err: err}
	}
	mem := buf.Bytes()
	items := make([]fetchItem, len(sn.chunks))
	for g, ch := range sn.chunks {
		start := g * s.ct * rb
		n := int(ch.Tokens) * rb
		items[g] = fetchItem{ch: ch, sl: ch.Slices[si], group: uint32(g), dst: mem[start : start+n]}
	}
	f, err := s.fetchStart(sn.c, items, true)
	if err != nil {
		s.readBufs.put(buf)
		return &layerRead{err: err}
	}
	return &layerRead{s: s, buf: buf, rows: mem[:total], fetch: f}
}

// closedChan is a channel that is always ready.
var closedChan = func() chan struct{} { c := make(chan struct{}); close(c); return c }()

// ready is closed once the layer's reads have completed (finish then only
// verifies).
func (lr *layerRead) ready() <-chan struct{} {
	if lr.err != nil || lr.fetch.reads == nil {
		return closedChan
	}
	return lr.fetch.reads.ready()
}

// finish waits for the layer and verifies it; on error the buffer is freed.
func (lr *layerRead) finish() (*iouring.AlignedBuffer, []byte, error) {
	if lr.err != nil {
		return nil, nil, lr.err
	}
	if err := lr.fetch.finish(); err != nil {
		lr.s.readBufs.put(lr.buf)
		return nil, nil, err
	}
	return lr.buf, lr.rows, nil
}

// restoreGroupInto reads the first tokens rows of every stored layer of one
// group (Append uses it to reload a partial tail).
func (s *Store) restoreGroupInto(c *ctxState, g uint32, tokens int, fn func(layer int, rows []byte)) (int, error) {
	v, err := s.db.Get(lsm.ChunkKey(c.ns, c.id, g))
	if err != nil {
		return 0, fmt.Errorf("chunk: %s/%s group %d: %w", c.ns, c.id, g, err)
	}
	ch, err := lsm.DecodeChunk(v)
	if err != nil {
		return 0, err
	}
	if int(ch.Tokens) < tokens {
		return 0, fmt.Errorf("%w: %s/%s group %d holds %d tokens, want %d", ErrCorrupt, c.ns, c.id, g, ch.Tokens, tokens)
	}
	s.mu.Lock()
	sg := s.segs[ch.Segment]
	if sg == nil || sg.doomed {
		s.mu.Unlock()
		return 0, fmt.Errorf("%w: %s/%s group %d: segment %d missing", ErrCorrupt, c.ns, c.id, g, ch.Segment)
	}
	sg.refs++
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		s.unref([]*segFile{sg})
		s.mu.Unlock()
	}()
	items := make([]fetchItem, len(ch.Slices))
	for i, sl := range ch.Slices {
		items[i] = fetchItem{ch: ch, sl: sl, group: g, dst: make([]byte, sl.Raw)}
	}
	if err := s.fetch(c, items, true); err != nil {
		return 0, err
	}
	for _, it := range items {
		rb := int(c.ident.Plan[it.sl.Layer].RowBytes)
		fn(int(it.sl.Layer), it.dst[:tokens*rb])
	}
	return tokens, nil
}
