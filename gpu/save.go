package gpu

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"sync"
	"unsafe"
)

// The save side of the device interface (issue 24): an engine's rows in
// device memory are copied to the host by hcache on its own copy stream,
// ordered after the caller's work by an event, so that the caller's stream
// never waits for hcache's copy or for the disk.

// DevicePtr is an address in a device's memory: a CUdeviceptr on CUDA; on
// the CPU backend an address inside memory CPUDevice.Alloc returned.
type DevicePtr uintptr

// Stream is a caller's stream: a CUstream on CUDA (0: the legacy default
// stream); on the CPU backend a handle CPUDevice.NewStream returned (0: no
// stream, work already complete).
type Stream uintptr

// Copy is one device-to-host copy of Bytes bytes from Src into Dst
// (len(Dst) == Bytes).
type Copy struct {
	Src   DevicePtr
	Bytes int
	Dst   []byte
}

// Event is the completion of one CopyToHost call (all of its copies).
type Event interface {
	// Query reports whether the copies are complete (non-blocking), or
	// the error that failed them.
	Query() (done bool, err error)
	// Wait blocks until the copies are complete and returns their error.
	Wait() error
	// Release hands the event back to its copier, after Wait (or a
	// Query that said done); the Event is not used again.
	Release()
}

// AsyncCopier copies device memory to the host off the caller's stream.
type AsyncCopier interface {
	// CopyToHost orders copies after the work queued on stream so far:
	// it records an event on stream, makes the copier's own copy stream
	// wait for it, queues the copies there and returns at once with the
	// Event that completes them. Nothing is queued on stream but the
	// event record, so stream never waits for the copies. Src must stay
	// unchanged, and Dst untouched, until the Event is complete. An error
	// means nothing was queued; ctx cancels a copy that has not started
	// (its Event then fails with ctx's error).
	CopyToHost(ctx context.Context, stream Stream, copies ...Copy) (Event, error)
	// AllocHost returns n bytes of host memory the copier copies into
	// asynchronously (page-locked on CUDA) and the function that frees
	// it, after every copy into it is complete.
	AllocHost(n int) (buf []byte, free func() error, err error)
	// Close waits for queued copies and releases the copy stream.
	Close() error
}

// CPUDevice is the CPU backend's device: host memory stands in for device
// memory, streams are ordered work queues each run by a goroutine, and the
// copier's copy stream is a goroutine of its own. CopyToHost is the real
// asynchronous path: the copy runs off the caller's goroutine, after the
// work queued on the caller's stream before the call, exactly as on CUDA
// (event record, stream wait, copy, completion event), so that serve's
// device saver runs and is tested on the CPU with the code it runs on a GPU.
type CPUDevice struct {
	mu      sync.Mutex
	allocs  []cpuAlloc // sorted by base
	streams map[Stream]*cpuStream
	next    Stream
	copyS   *cpuStream
	closed  bool
}

type cpuAlloc struct {
	base uintptr
	buf  []byte
}

// NewCPUDevice starts a CPU device and its copy stream.
func NewCPUDevice() *CPUDevice {
	return &CPUDevice{streams: map[Stream]*cpuStream{}, next: 1, copyS: newCPUStream()}
}

// Alloc returns n bytes of "device" memory: its address and the bytes (the
// caller's kernels write them through the slice).
func (d *CPUDevice) Alloc(n int) (DevicePtr, []byte, error) {
	if n <= 0 {
		return 0, nil, fmt.Errorf("gpu: device allocation of %d bytes", n)
	}
	buf := make([]byte, n)
	base := uintptr(unsafe.Pointer(&buf[0]))
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return 0, nil, errors.New("gpu: cpu device is closed")
	}
	i := sort.Search(len(d.allocs), func(i int) bool { return d.allocs[i].base >= base })
	d.allocs = append(d.allocs, cpuAlloc{})
	copy(d.allocs[i+1:], d.allocs[i:])
	d.allocs[i] = cpuAlloc{base: base, buf: buf}
	return DevicePtr(base), buf, nil
}

// Free releases memory Alloc returned.
func (d *CPUDevice) Free(p DevicePtr) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	i := sort.Search(len(d.allocs), func(i int) bool { return d.allocs[i].base >= uintptr(p) })
	if i == len(d.allocs) || d.allocs[i].base != uintptr(p) {
		return fmt.Errorf("gpu: Free of %#x, not an allocation of this device", uintptr(p))
	}
	d.allocs = append(d.allocs[:i], d.allocs[i+1:]...)
	return nil
}

// lookup returns the bytes [p, p+n) of an allocation.
func (d *CPUDevice) lookup(p DevicePtr, n int) ([]byte, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	i := sort.Search(len(d.allocs), func(i int) bool { return d.allocs[i].base > uintptr(p) }) - 1
	if n <= 0 || i < 0 {
		return nil, fmt.Errorf("gpu: copy of %d bytes from %#x: not inside an allocation of this device", n, uintptr(p))
	}
	a := d.allocs[i]
	off := uintptr(p) - a.base
	if off+uintptr(n) > uintptr(len(a.buf)) {
		return nil, fmt.Errorf("gpu: copy of %d bytes from %#x runs past the end of its %d-byte allocation at %#x", n, uintptr(p), len(a.buf), a.base)
	}
	return a.buf[off : off+uintptr(n)], nil
}

// NewStream creates a stream for the caller's work (Launch).
func (d *CPUDevice) NewStream() (Stream, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return 0, errors.New("gpu: cpu device is closed")
	}
	s := d.next
	d.next++
	d.streams[s] = newCPUStream()
	return s, nil
}

func (d *CPUDevice) stream(s Stream) (*cpuStream, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if s == 0 {
		return nil, nil
	}
	st := d.streams[s]
	if st == nil {
		return nil, fmt.Errorf("gpu: stream %d is not a stream of this cpu device", s)
	}
	return st, nil
}

// Launch queues f (a "kernel") on stream s: it runs after the work queued
// on s before it, on the stream's goroutine. Stream 0 runs f now.
func (d *CPUDevice) Launch(s Stream, f func()) error {
	st, err := d.stream(s)
	if err != nil {
		return err
	}
	if st == nil {
		f()
		return nil
	}
	st.push(f)
	return nil
}

// Synchronize waits for the work queued on s.
func (d *CPUDevice) Synchronize(s Stream) error {
	st, err := d.stream(s)
	if err != nil || st == nil {
		return err
	}
	done := make(chan struct{})
	st.push(func() { close(done) })
	<-done
	return nil
}

// CopyToHost implements AsyncCopier.
func (d *CPUDevice) CopyToHost(ctx context.Context, s Stream, copies ...Copy) (Event, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	srcs := make([][]byte, len(copies))
	for i, c := range copies {
		if len(c.Dst) != c.Bytes {
			return nil, fmt.Errorf("gpu: copy %d: %d bytes into a %d-byte destination", i, c.Bytes, len(c.Dst))
		}
		b, err := d.lookup(c.Src, c.Bytes)
		if err != nil {
			return nil, fmt.Errorf("gpu: copy %d: %w", i, err)
		}
		srcs[i] = b
	}
	st, err := d.stream(s)
	if err != nil {
		return nil, err
	}
	d.mu.Lock()
	closed := d.closed
	d.mu.Unlock()
	if closed {
		return nil, errors.New("gpu: cpu device is closed")
	}
	// The event recorded on the caller's stream: complete once the work
	// queued there before this call has run.
	recorded := make(chan struct{})
	if st == nil {
		close(recorded)
	} else {
		st.push(func() { close(recorded) })
	}
	ev := &cpuEvent{done: make(chan struct{})}
	// The copy stream waits for that event, then copies.
	d.copyS.push(func() {
		select {
		case <-recorded:
		case <-ctx.Done():
			ev.err = ctx.Err()
			close(ev.done)
			return
		}
		for i, c := range copies {
			copy(c.Dst, srcs[i])
		}
		close(ev.done)
	})
	return ev, nil
}

// AllocHost implements AsyncCopier: plain host memory.
func (d *CPUDevice) AllocHost(n int) ([]byte, func() error, error) {
	if n <= 0 {
		return nil, nil, fmt.Errorf("gpu: host allocation of %d bytes", n)
	}
	return make([]byte, n), func() error { return nil }, nil
}

// Close waits for the copy stream and every stream's queued work, and
// stops their goroutines.
func (d *CPUDevice) Close() error {
	d.mu.Lock()
	if d.closed {
		d.mu.Unlock()
		return nil
	}
	d.closed = true
	streams := make([]*cpuStream, 0, len(d.streams)+1)
	for _, s := range d.streams {
		streams = append(streams, s)
	}
	d.mu.Unlock()
	for _, s := range streams {
		s.stop()
	}
	d.copyS.stop()
	return nil
}

var _ AsyncCopier = (*CPUDevice)(nil)

// cpuEvent completes when its channel closes.
type cpuEvent struct {
	done chan struct{}
	err  error // set before done closes
}

func (e *cpuEvent) Query() (bool, error) {
	select {
	case <-e.done:
		return true, e.err
	default:
		return false, nil
	}
}

func (e *cpuEvent) Wait() error {
	<-e.done
	return e.err
}

func (e *cpuEvent) Release() {}

// cpuStream runs queued functions in order on one goroutine.
type cpuStream struct {
	mu      sync.Mutex
	cond    *sync.Cond
	q       []func()
	stopped bool
	exited  chan struct{}
}

func newCPUStream() *cpuStream {
	s := &cpuStream{exited: make(chan struct{})}
	s.cond = sync.NewCond(&s.mu)
	go s.run()
	return s
}

// push queues f; on a stopped stream (the device closed) f runs now.
func (s *cpuStream) push(f func()) {
	s.mu.Lock()
	if s.stopped {
		s.mu.Unlock()
		f()
		return
	}
	s.q = append(s.q, f)
	s.mu.Unlock()
	s.cond.Signal()
}

func (s *cpuStream) run() {
	defer close(s.exited)
	for {
		s.mu.Lock()
		for len(s.q) == 0 && !s.stopped {
			s.cond.Wait()
		}
		if len(s.q) == 0 {
			s.mu.Unlock()
			return
		}
		f := s.q[0]
		s.q[0] = nil
		s.q = s.q[1:]
		s.mu.Unlock()
		f()
	}
}

// stop lets the queued work run, then ends the goroutine.
func (s *cpuStream) stop() {
	s.mu.Lock()
	s.stopped = true
	s.mu.Unlock()
	s.cond.Broadcast()
	<-s.exited
}
