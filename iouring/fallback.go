package iouring

import (
	"sync"
	"sync/atomic"
	"syscall"

	"golang.org/x/sys/unix"
)

// Fallback is the engine used where io_uring is unavailable (seccomp filters in
// containers answer io_uring_setup with EPERM or ENOSYS) or when selected by
// Config.Kind. It runs pread/pwrite/preadv/pwritev/fsync on a bounded pool of
// worker goroutines; the queue in front of them is bounded too, so a burst of
// submissions waits instead of growing memory. A linked chain runs on one
// worker, in order, and stops at the first failure (the rest get ECANCELED).
type Fallback struct {
	queue   chan []*Request
	wg      sync.WaitGroup
	closeMu sync.RWMutex
	closed  bool
	stats   struct{ submitted, completed, resubmitted atomic.Uint64 }
}

// NewFallback starts workers goroutines behind a queue of queueLen chains.
func NewFallback(workers, queueLen int) *Fallback {
	f := &Fallback{queue: make(chan []*Request, queueLen)}
	f.wg.Add(workers)
	for i := 0; i < workers; i++ {
		go f.work()
	}
	return f
}

// Name implements Engine.
func (f *Fallback) Name() string { return "fallback" }

// RegisterBuffers implements Engine; plain syscalls need no registration.
func (f *Fallback) RegisterBuffers([][]byte) error { return nil }

// Stats implements Engine.
func (f *Fallback) Stats() Stats {
	return Stats{Submitted: f.stats.submitted.Load(), Completed: f.stats.completed.Load(), Resubmitted: f.stats.resubmitted.Load()}
}

// Do implements Engine.
func (f *Fallback) Do(reqs ...*Request) error { return doBatch(f, reqs) }

// Submit implements Engine.
func (f *Fallback) Submit(reqs []*Request, done func(*Request)) error {
	if err := validate(reqs); err != nil {
		return err
	}
	f.closeMu.RLock()
	defer f.closeMu.RUnlock()
	if f.closed {
		return ErrClosed
	}
	start := 0
	for i, q := range reqs {
		q.done = done
		q.N, q.Err = 0, nil
		q.total = q.length()
		if !q.Link || i == len(reqs)-1 {
			f.stats.submitted.Add(uint64(i + 1 - start))
			// A copy: the caller may reuse its slice once Submit returns.
			f.queue <- append([]*Request(nil), reqs[start:i+1]...)
			start = i + 1
		}
	}
	return nil
}

func (f *Fallback) work() {
	defer f.wg.Done()
	for chain := range f.queue {
		failed := false
		for _, q := range chain {
			if failed {
				q.Err = newIOError(q, syscall.ECANCELED)
			} else {
				f.run(q)
				failed = q.Err != nil
			}
			f.stats.completed.Add(1)
			q.done(q)
		}
	}
}

func (f *Fallback) run(q *Request) {
	for {
		var n int
		var err error
		off := q.Off + int64(q.N)
		switch q.Op {
		case OpNop:
			return
		case OpFsync:
			err = unix.Fsync(q.Fd)
		case OpFdatasync:
			err = unix.Fdatasync(q.Fd)
		case OpRead:
			n, err = unix.Pread(q.Fd, q.Buf[q.N:], off)
		case OpWrite:
			n, err = unix.Pwrite(q.Fd, q.Buf[q.N:], off)
		case OpReadv:
			n, err = unix.Preadv(q.Fd, remaining(q), off)
		case OpWritev:
			n, err = unix.Pwritev(q.Fd, remaining(q), off)
		}
		if err != nil {
			if err == syscall.EINTR || err == syscall.EAGAIN {
				f.stats.resubmitted.Add(1)
				continue
			}
			q.Err = newIOError(q, err)
			return
		}
		done, aerr := advance(q, n)
		if done {
			if aerr != nil {
				q.Err = newIOError(q, aerr)
			}
			return
		}
		f.stats.resubmitted.Add(1)
	}
}

// Close implements Engine: queued requests finish, then the workers stop.
func (f *Fallback) Close() error {
	f.closeMu.Lock()
	if f.closed {
		f.closeMu.Unlock()
		return nil
	}
	f.closed = true
	close(f.queue)
	f.closeMu.Unlock()
	f.wg.Wait()
	return nil
}
