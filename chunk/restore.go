package chunk

import (
	"errors"
	"fmt"
	"sort"
	"sync"
	"time"

	"github.com/hcache/hcache/iouring"
	"github.com/hcache/hcache/lsm"
)

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
	c, err := s.beginRestore(ns, id, ident)
	if err != nil {
		return 0, err
	}
	defer s.restores.Done()
	t0 := time.Now()
	defer func() {
		s.stages.restores.Add(1)
		s.stages.wall.Add(since(t0))
	}()
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
		ahead = s.autoAhead(c, sn)
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

	if err := s.streamLayers(c, sn, ahead, fn); err != nil {
		return 0, err
	}
	return sn.tokens, nil
}

// streamLayers reads a snapshot's layers ahead of the consumer (at most
// ahead buffers out) and hands them to fn in layer order; it returns once
// every buffer is released, with the first error, and counts a restore.
func (s *Store) streamLayers(c *ctxState, sn *snapshot, ahead int, fn func(layer int, rows []byte, release func()) error) error {
	sl := newBufSlots(s, ahead)
	out := make(chan layerOut, 1)
	stop := make(chan struct{})
	go s.readLayers(c, sn, sl, out, stop)
	firstErr := s.handLayers(c, sl, out, stop, fn)
	sl.outstanding.Wait()
	if firstErr != nil {
		return firstErr
	}
	s.stats.restores.Add(1)
	return nil
}

// beginRestore looks up a context that may be restored with ident and
// counts the restore (Close waits for it; the caller calls
// s.restores.Done once it has returned).
func (s *Store) beginRestore(ns, id string, ident *Identity) (*ctxState, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil, ErrClosed
	}
	c, err := s.lookup(ns, id)
	if err != nil {
		return nil, err
	}
	if c.rec.Flags&lsm.FlagDamaged != 0 || c.ident == nil {
		return nil, fmt.Errorf("%w: %s/%s", ErrDamaged, ns, id)
	}
	if !c.ident.Equal(ident) {
		s.stats.identityMismatch.Add(1)
		return nil, fmt.Errorf("%w: %s/%s", ErrIdentityMismatch, ns, id)
	}
	s.restores.Add(1)
	return c, nil
}

// autoAhead is the buffers a restore of ahead 0 holds: as many of this
// context's layers as Options.RestoreAheadBytes holds, at least
// DefaultRestoreAhead.
func (s *Store) autoAhead(c *ctxState, sn *snapshot) int {
	ahead, _ := s.restoreBuffers(c, sn.tokens)
	return ahead
}

// prepareRestoreBuffers has the restore buffers of the most recently used
// contexts mapped in huge pages in the background (see alignedScratch),
// within IdleReadBufferBytes, so that the first restores after a restart do
// not map them on their critical path.
func (s *Store) prepareRestoreBuffers() {
	type want struct {
		lastUse      int64
		ahead, layer int
	}
	var ws []want
	s.mu.Lock()
	for _, c := range s.ctxs {
		if c.deleted || c.probe || c.ident == nil || c.rec.Flags&lsm.FlagDamaged != 0 || c.rec.Tokens == 0 {
			continue
		}
		if ahead, layer := s.restoreBuffers(c, int(c.rec.Tokens)); layer > 0 {
			ws = append(ws, want{c.lastUse, ahead, layer})
		}
	}
	s.mu.Unlock()
	sort.Slice(ws, func(i, j int) bool { return ws[i].lastUse > ws[j].lastUse })
	prepared := map[int]int{} // class -> buffers asked for
	var bytes int64
	for _, w := range ws {
		n := sizeClass(w.layer)
		if n < iouring.HugePageBytes || w.ahead <= prepared[n] {
			continue
		}
		add := int64(n) * int64(w.ahead-prepared[n])
		if bytes+add > s.readBufs.limit {
			continue
		}
		bytes += add
		prepared[n] = w.ahead
		s.readBufs.prepare(w.layer, w.ahead)
	}
}

// restoreBuffers is what a restore of tokens tokens of c with ahead 0
// takes: that many buffers, each of at least layer bytes.
func (s *Store) restoreBuffers(c *ctxState, tokens int) (ahead, layer int) {
	maxRow := 0
	for _, l := range c.stored {
		maxRow = max(maxRow, int(c.ident.Plan[l].RowBytes))
	}
	if l := int64(tokens) * int64(maxRow); l > 0 {
		return int(max(DefaultRestoreAhead, min(int64(len(c.stored)), s.opts.RestoreAheadBytes/l))), int(l) + BlockBytes
	}
	return DefaultRestoreAhead, 0
}

// bufSlots counts a restore's buffers taken and not yet given back: one
// slot per buffer, so the reader blocks once ahead buffers are out.
type bufSlots struct {
	s           *Store
	held        chan struct{}
	freed       chan struct{} // a buffer was given back
	outstanding sync.WaitGroup
}

func newBufSlots(s *Store, ahead int) *bufSlots {
	return &bufSlots{s: s, held: make(chan struct{}, ahead), freed: make(chan struct{}, 1)}
}

// giveBack returns the release of buf: it puts buf back and frees its
// slot, once.
func (sl *bufSlots) giveBack(buf *iouring.AlignedBuffer) func() {
	var once sync.Once
	return func() {
		once.Do(func() {
			sl.s.readBufs.put(buf)
			<-sl.held
			sl.outstanding.Done()
			select {
			case sl.freed <- struct{}{}:
			default:
			}
		})
	}
}

// drop frees a slot whose buffer is already gone.
func (sl *bufSlots) drop() {
	<-sl.held
	sl.outstanding.Done()
}

func (sl *bufSlots) tryTake() bool {
	select {
	case sl.held <- struct{}{}:
		sl.outstanding.Add(1)
		return true
	default:
		return false
	}
}

func (sl *bufSlots) take(stop <-chan struct{}) bool {
	select {
	case sl.held <- struct{}{}:
		sl.outstanding.Add(1)
		return true
	case <-stop:
		return false
	}
}

// layerOut is a layer whose reads have completed. The consumer's goroutine
// verifies it (finish) before fn sees it, so checksums never hold up the
// reads of the layers after it.
type layerOut struct {
	layer int
	lr    *layerRead
}

// readLayers starts the layers' reads and hands them over on out, in
// layer order, until stop; it closes out.
//
// Every layer a free buffer allows has its reads in flight at once, so the
// disk works through a deep queue while the consumer computes. This
// goroutine only starts reads and hands layers over; whenever it waits (for
// a layer's reads, or for the consumer to take one), a buffer given back
// starts the next layer's reads at once. With more than two buffers the
// first layer is read alone: the consumer waits for it, so it does not
// share the disk with the rest of the context, which goes out together once
// it is in. (With two, the second is read beside it, as only two are ever
// in flight.) The reads after the first start before it is handed over,
// since once the consumer computes this goroutine may wait long for a CPU.
//
// It first waits for admission (priority.go) and leaves it once the reads
// of the last layer have landed, or the restore stopped.
func (s *Store) readLayers(c *ctxState, sn *snapshot, sl *bufSlots, out chan<- layerOut, stop chan struct{}) {
	defer close(out)
	leave := s.admitRestore(c, sn, cap(sl.held))
	ahead := cap(sl.held)
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
			sl.drop()
			return false
		default:
		}
		last = s.startLayer(sn, next)
		started = append(started, last)
		next++
		return true
	}
	startMore := func() {
		for next < len(c.stored) && len(started) < depth && last.err == nil && sl.tryTake() {
			if !start() {
				return
			}
		}
	}
	defer func() {
		// Stopped: wait for what is in flight, then free it.
		for _, lr := range started {
			if b, _, err := lr.finish(); err == nil {
				sl.giveBack(b)()
			} else {
				sl.drop()
			}
		}
		leave()
	}()
	for _, l := range c.stored {
		if len(started) == 0 {
			// Every started layer has been handed over, so the
			// consumer can give one back: wait for it. (Never wait
			// with a layer still to hand over: a consumer may keep
			// its previous buffer until it receives the next one.)
			if !sl.take(stop) || !start() {
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
			case <-sl.freed:
				startMore()
			case <-stop:
				return // cur is still in started: drained
			}
		}
		depth = ahead
		startMore()
		started = started[1:]
		if next == len(c.stored) && len(started) == 0 {
			leave() // every read has landed
		}
	send:
		for {
			select {
			case out <- layerOut{l, cur}:
				break send
			case <-sl.freed:
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
}

// handLayers verifies each layer read and hands it to fn, until out is
// closed. It returns the first error (closing stop): a failed check (the
// context is marked damaged), a store closing, or fn's error.
func (s *Store) handLayers(c *ctxState, sl *bufSlots, out <-chan layerOut, stop chan struct{}, fn func(layer int, rows []byte, release func()) error) error {
	var firstErr error
	for lo := range out {
		buf, rows, err := lo.lr.finish()
		if err != nil { // finish freed the buffer
			sl.drop()
			if errorsIsCorrupt(err) { // damaged whatever stopped the restore first
				s.markDamaged(c)
			}
			if firstErr == nil {
				firstErr = err
				close(stop)
			}
			continue
		}
		release := sl.giveBack(buf)
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
	return firstErr
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
	t0 := time.Now()
	buf, err := s.readBufs.get(total + BlockBytes)
	s.stages.bufferNanos.Add(since(t0))
	s.stages.layers.Add(1)
	if err != nil {
		return &layerRead{err: err}
	}
	mem := buf.Bytes()
	items := make([]fetchItem, len(sn.chunks))
	for g, ch := range sn.chunks {
		start := g * s.ct * rb
		n := int(ch.Tokens) * rb
		items[g] = fetchItem{ch: ch, sl: ch.Slices[si], group: uint32(g), dst: mem[start : start+n]}
		if sn.srcs != nil {
			items[g].src = sn.srcs[g]
		}
	}
	if sn.serve > 0 {
		total = sn.serve * rb
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
	ch, err := s.db.GetChunk(c.ns, c.id, g)
	if err != nil {
		return 0, fmt.Errorf("chunk: %s/%s group %d: %w", c.ns, c.id, g, err)
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
