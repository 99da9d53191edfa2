package serve

import "sync"

// fifoSem is a counting semaphore that admits waiters strictly in arrival
// order: a release hands its slot to the oldest waiter directly, so a
// caller that releases and acquires again goes to the back of the queue and
// nobody can barge ahead of a waiter (no starvation).
type fifoSem struct {
	mu    sync.Mutex
	free  int
	queue []chan struct{}
}

func newFIFOSem(n int) *fifoSem { return &fifoSem{free: n} }

func (s *fifoSem) acquire() {
	s.mu.Lock()
	if s.free > 0 && len(s.queue) == 0 {
		s.free--
		s.mu.Unlock()
		return
	}
	ch := make(chan struct{})
	s.queue = append(s.queue, ch)
	s.mu.Unlock()
	<-ch
}

func (s *fifoSem) release() {
	s.mu.Lock()
	if len(s.queue) > 0 {
		ch := s.queue[0]
		s.queue = s.queue[1:]
		s.mu.Unlock()
		close(ch)
		return
	}
	s.free++
	s.mu.Unlock()
}

// waiting is the number of queued waiters.
func (s *fifoSem) waiting() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.queue)
}

// byteBudget bounds the bytes one restore holds between its reads and its
// compute stream. A request larger than the whole budget is admitted when
// nothing else is held, so one oversized layer cannot deadlock.
type byteBudget struct {
	mu     sync.Mutex
	cond   *sync.Cond
	limit  int64
	held   int64
	peak   int64
	closed bool
}

func newByteBudget(limit int64) *byteBudget {
	b := &byteBudget{limit: limit}
	b.cond = sync.NewCond(&b.mu)
	return b
}

// acquire waits for n bytes; false when the budget was closed.
func (b *byteBudget) acquire(n int64) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	for !b.closed && b.held > 0 && b.held+n > b.limit {
		b.cond.Wait()
	}
	if b.closed {
		return false
	}
	b.held += n
	b.peak = max(b.peak, b.held)
	return true
}

func (b *byteBudget) release(n int64) {
	b.mu.Lock()
	b.held -= n
	b.mu.Unlock()
	b.cond.Broadcast()
}

func (b *byteBudget) close() {
	b.mu.Lock()
	b.closed = true
	b.mu.Unlock()
	b.cond.Broadcast()
}
