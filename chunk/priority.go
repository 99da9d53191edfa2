package chunk

import (
	"fmt"
	"sync"
	"sync/atomic"
	"time"
)

// Restore admission: reads in arrival order, within a bound.
//
// A restore reads its layers into whole-layer buffers, and every restore
// being read at once shares the disk with the others. Left alone, sixteen
// concurrent restores of long contexts each held their own buffers (16 x
// two 128 MiB layers, far past IdleReadBufferBytes, so nearly every
// restore mapped and populated new ones) and shared the disk evenly, so
// each took as long as all of them together. The store therefore admits
// restores to reading in arrival order (FIFO) while the buffers of the
// restores being read stay within Options.RestoreQueueBytes: a restore
// reserves what it will hold (ahead x its layer buffer) and waits while the
// restores before it fill the bound. A restore that does not fit alone is
// admitted once nothing else is being read, so every restore is served.
//
// Admission covers reading only: a restore leaves the gate once the reads
// of its last layer have landed, so a restore whose consumer is slow (a
// remote client, a device copy) holds back no other restore. The disk
// stays busy across restores: the next restore is admitted while the one
// before verifies and hands over its last layer, and with room for
// several, several are read side by side.
//
// Limit: a restore callback that itself waits for another restore of the
// same store can deadlock when the two do not fit the bound together; no
// caller in this repository does that.
// Defaults of the settings in this file.
const (
	// DefaultRestoreQueueBytes bounds the buffers of the restores being
	// read at once.
	DefaultRestoreQueueBytes = 256 << 20
	// DefaultWriteBytes bounds the bytes of the flusher's writes in
	// flight, DefaultWriteBytesUnderRestores while restores are being read.
	DefaultWriteBytes              = 64 << 20
	DefaultWriteBytesUnderRestores = 8 << 20
)

// fillPriority fills and checks the settings of this file.
func (o *Options) fillPriority() error {
	if o.WriteBytes == 0 {
		o.WriteBytes = DefaultWriteBytes
	}
	if o.WriteBytesUnderRestores == 0 {
		o.WriteBytesUnderRestores = DefaultWriteBytesUnderRestores
	}
	if o.WriteBytes < 0 || o.WriteBytesUnderRestores < 0 {
		return fmt.Errorf("chunk: WriteBytes %d, WriteBytesUnderRestores %d: negative", o.WriteBytes, o.WriteBytesUnderRestores)
	}
	if o.RestoreQueueBytes == 0 {
		o.RestoreQueueBytes = DefaultRestoreQueueBytes
	}
	if o.RestoreQueueBytes < 0 {
		o.RestoreQueueBytes = 0
	}
	return nil
}

type readGate struct {
	reading atomic.Int32 // restores admitted and still reading (the flusher polls it)
	mu      sync.Mutex
	limit   int64 // <= 0: no bound
	used    int64
	active  int
	queue   []*gateWaiter
}

type gateWaiter struct {
	need  int64
	ready chan struct{}
}

// acquire waits for room for need bytes, behind every earlier waiter. It
// returns how long it waited.
func (g *readGate) acquire(need int64) time.Duration {
	g.mu.Lock()
	if g.limit <= 0 || (len(g.queue) == 0 && g.fits(need)) {
		g.used += need
		g.active++
		g.reading.Add(1)
		g.mu.Unlock()
		return 0
	}
	w := &gateWaiter{need: need, ready: make(chan struct{})}
	g.queue = append(g.queue, w)
	g.mu.Unlock()
	t0 := time.Now()
	<-w.ready
	return time.Since(t0)
}

// fits reports whether need bytes may be admitted now. Call with g.mu held.
func (g *readGate) fits(need int64) bool {
	return g.active == 0 || g.used+need <= g.limit
}

// release gives back need bytes and admits the waiters that now fit, in
// order.
func (g *readGate) release(need int64) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.used -= need
	g.active--
	g.reading.Add(-1)
	for len(g.queue) > 0 && g.fits(g.queue[0].need) {
		w := g.queue[0]
		g.queue = g.queue[1:]
		g.used += w.need
		g.active++
		g.reading.Add(1)
		close(w.ready)
	}
}

// waiting is the number of restores waiting for admission.
func (g *readGate) waiting() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return len(g.queue)
}

// admitRestore reserves a restore's buffers (ahead layers of its largest
// layer) and returns the release, to be called once its reads are done
// (more calls are no-ops).
func (s *Store) admitRestore(c *ctxState, sn *snapshot, ahead int) func() {
	maxRow := 0
	for _, l := range c.stored {
		maxRow = max(maxRow, int(c.ident.Plan[l].RowBytes))
	}
	need := int64(min(ahead, max(1, len(c.stored)))) * int64(sizeClass(sn.tokens*maxRow+BlockBytes))
	waited := s.gate.acquire(need)
	s.stages.queuedNanos.Add(int64(waited))
	var once sync.Once
	return func() { once.Do(func() { s.gate.release(need) }) }
}

// Writes in flight, and writes yielding to restores.
//
// The flusher keeps group writes in flight up to Options.QueueDepth and
// Options.WriteBytes (whichever comes first; one write always goes). A
// group of a real model is large (Llama2-7B: 64 tokens x 32 layers x 8 KiB
// = 16 MiB), and 32 of them, half a gigabyte, sat in the disk's queue in
// front of everything else: an fdatasync (the device's cache flush) and
// the index's own WAL sync waited behind them, so with four writers each
// Flush took ~10x as long in syncs as with one and the save ran well below
// fio (`bench store`'s save_sync_ms_total). A bound in bytes keeps the disk
// as busy as fio's best write (which needs a few tens of MiB in flight)
// without that queue.
//
// While any restore is being read (admitted and not yet past its last
// read), the bound is Options.WriteBytesUnderRestores instead, so a
// restore's reads queue behind a few megabytes of writes, not a
// QueueDepth of groups. Saves still progress (at least one write is always
// in flight), staging keeps its backpressure (appends wait for slabs as
// before), and nothing about durability moves: a Flush is still answered
// only after the fdatasync of every segment it wrote and the index commit
// after it; only how many writes are in flight at once changes, never
// their order or what a commit covers.

// writeBytes is the bytes of writes the flusher may have in flight now.
func (s *Store) writeBytes() int64 {
	if s.gate.reading.Load() > 0 {
		return min(s.opts.WriteBytes, s.opts.WriteBytesUnderRestores)
	}
	return s.opts.WriteBytes
}
