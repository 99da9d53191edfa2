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
