package cuda

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"sync"
	"unsafe"

	"github.com/hcache/hcache/gpu"
)

// The device save path (issue 24): Copier is gpu.AsyncCopier on CUDA. A
// CopyToHost call records an event on the caller's stream, makes the
// copier's own non-blocking copy stream wait for it, queues the
// device-to-host copies (cuMemcpyDtoHAsync) there and records a completion
// event after them; the caller's stream gets the event record and nothing
// else, so it never waits for the copy.

// saveDriver is what the copier calls: the driver, or a test's fake that
// records the calls (the seam that checks their arguments and order on a
// machine without a GPU).
type saveDriver interface {
	call(name string, args ...uintptr) int
	errString(code int) string
}

// Driver constants of the save path.
const (
	eventBlockingSync = 1   // CU_EVENT_BLOCKING_SYNC: cuEventSynchronize sleeps
	errNotReady       = 600 // CUDA_ERROR_NOT_READY (cuEventQuery)
)

// CopierOptions configure OpenCopier.
type CopierOptions struct {
	// Device is the CUDA device ordinal (default 0); the copier runs in
	// its primary context, the one PyTorch and the runtime API use, so
	// the caller's streams and pointers are valid in it.
	Device int
	// CublasPath is passed to the driver loader (which loads cuBLAS with
	// the driver; the copier does not use it).
	CublasPath string
}

// Copier copies device memory to pinned host memory on its own stream.
// Its methods may be called from any goroutine.
type Copier struct {
	d      saveDriver
	ctx    uintptr
	dev    int32
	owned  bool // the primary context was retained by OpenCopier
	stream uintptr

	mu     sync.Mutex // guards what follows and orders the queueing on stream
	free   []uintptr  // events not in use
	all    []uintptr  // every event created
	pinned map[uintptr]int
	closed bool
}

// OpenCopier loads the driver and starts a copier on a device's primary
// context.
func OpenCopier(o CopierOptions) (*Copier, error) {
	d, err := loadDriver(o.CublasPath)
	if err != nil {
		return nil, err
	}
	var dev int32
	if err := d.check("cuDeviceGet", d.call("cuDeviceGet", ptr(&dev), uintptr(o.Device))); err != nil {
		return nil, fmt.Errorf("%w: device %d: %v", ErrNoDevice, o.Device, err)
	}
	var ctx uintptr
	if err := d.check("cuDevicePrimaryCtxRetain", d.call("cuDevicePrimaryCtxRetain", ptr(&ctx), uintptr(dev))); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrNoDevice, err)
	}
	c, err := newCopier(d, ctx)
	if err != nil {
		d.call("cuDevicePrimaryCtxRelease_v2", uintptr(dev))
		return nil, err
	}
	c.dev, c.owned = dev, true
	return c, nil
}

// NewCopier starts a copier in the backend's context (its device's primary
// context), with a copy stream of its own.
func (b *Backend) NewCopier() (*Copier, error) {
	b.mu.Lock()
	err := b.live()
	b.mu.Unlock()
	if err != nil {
		return nil, err
	}
	return newCopier(b.d, b.ctx)
}

// newCopier creates the copy stream in ctx.
func newCopier(d saveDriver, ctx uintptr) (*Copier, error) {
	c := &Copier{d: d, ctx: ctx, pinned: map[uintptr]int{}}
	err := c.with(func() error {
		return c.check("cuStreamCreate", c.d.call("cuStreamCreate", ptr(&c.stream), streamNonBlock))
	})
	if err != nil {
		return nil, err
	}
	return c, nil
}

func (c *Copier) check(what string, code int) error {
	if code == 0 {
		return nil
	}
	return fmt.Errorf("cuda: %s: %s", what, c.d.errString(code))
}

// with runs fn on a locked OS thread with the copier's context current.
func (c *Copier) with(fn func() error) error {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	if err := c.check("cuCtxSetCurrent", c.d.call("cuCtxSetCurrent", c.ctx)); err != nil {
		return err
	}
	return fn()
}

// event returns an event from the pool or a new one (c.mu held, in with).
func (c *Copier) event() (uintptr, error) {
	if n := len(c.free); n > 0 {
		e := c.free[n-1]
		c.free = c.free[:n-1]
		return e, nil
	}
	var e uintptr
	if err := c.check("cuEventCreate", c.d.call("cuEventCreate", ptr(&e), eventNoTiming|eventBlockingSync)); err != nil {
		return 0, err
	}
	c.all = append(c.all, e)
	return e, nil
}

// CopyToHost implements gpu.AsyncCopier: event record on stream, copy
// stream waits for it, copies, completion event. ctx is checked before
// anything is queued (a queued device copy cannot be taken back). Dst
// should be memory AllocHost returned: a copy into pageable memory is not
// asynchronous.
func (c *Copier) CopyToHost(ctx context.Context, stream gpu.Stream, copies ...gpu.Copy) (gpu.Event, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if len(copies) == 0 {
		return nil, errors.New("cuda: CopyToHost of no copies")
	}
	for i, cp := range copies {
		if cp.Bytes <= 0 || len(cp.Dst) != cp.Bytes || cp.Src == 0 {
			return nil, fmt.Errorf("cuda: copy %d: %d bytes from %#x into a %d-byte destination", i, cp.Bytes, uintptr(cp.Src), len(cp.Dst))
		}
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return nil, errors.New("cuda: copier is closed")
	}
	var done uintptr
	err := c.with(func() error {
		rec, err := c.event()
		if err != nil {
			return err
		}
		if done, err = c.event(); err != nil {
			c.free = append(c.free, rec)
			return err
		}
		// The wait captures the record: the event could be recorded again
		// as soon as cuStreamWaitEvent returns; it goes back to the pool
		// (and the completion event is another one, for clarity).
		err = c.check("cuEventRecord on the caller's stream", c.d.call("cuEventRecord", rec, uintptr(stream)))
		if err == nil {
			err = c.check("cuStreamWaitEvent", c.d.call("cuStreamWaitEvent", c.stream, rec, 0))
		}
		c.free = append(c.free, rec)
		if err != nil {
			c.free = append(c.free, done)
			return err
		}
		for i, cp := range copies {
			if err := c.check(fmt.Sprintf("cuMemcpyDtoHAsync (copy %d of %d bytes from %#x)", i, cp.Bytes, uintptr(cp.Src)),
				c.d.call("cuMemcpyDtoHAsync_v2", bptr(cp.Dst), uintptr(cp.Src), uintptr(cp.Bytes), c.stream)); err != nil {
				c.free = append(c.free, done)
				return c.drain(err, i > 0)
			}
		}
		if err := c.check("cuEventRecord on the copy stream", c.d.call("cuEventRecord", done, c.stream)); err != nil {
			c.free = append(c.free, done)
			return c.drain(err, true)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return &cudaEvent{c: c, ev: done}, nil
}

// drain, after a failure with copies already queued, waits for the copy
// stream, so that no copy still writes into a destination the caller gets
// back with the error.
func (c *Copier) drain(err error, queued bool) error {
	if queued {
		if serr := c.check("cuStreamSynchronize", c.d.call("cuStreamSynchronize", c.stream)); serr != nil {
			return errors.Join(err, serr)
		}
	}
	return err
}

// AllocHost implements gpu.AsyncCopier: page-locked host memory
// (cuMemAllocHost), freed by the function returned.
func (c *Copier) AllocHost(n int) ([]byte, func() error, error) {
	if n <= 0 {
		return nil, nil, fmt.Errorf("cuda: host allocation of %d bytes", n)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return nil, nil, errors.New("cuda: copier is closed")
	}
	var p uintptr
	if err := c.with(func() error {
		return c.check(fmt.Sprintf("cuMemAllocHost (%d bytes)", n), c.d.call("cuMemAllocHost_v2", ptr(&p), uintptr(n)))
	}); err != nil {
		return nil, nil, err
	}
	c.pinned[p] = n
	var once sync.Once
	var ferr error
	free := func() error {
		once.Do(func() {
			c.mu.Lock()
			defer c.mu.Unlock()
			if _, ok := c.pinned[p]; !ok {
				return // freed by Close
			}
			delete(c.pinned, p)
			ferr = c.with(func() error { return c.check("cuMemFreeHost", c.d.call("cuMemFreeHost", p)) })
		})
		return ferr
	}
	return unsafe.Slice((*byte)(cptr(p)), n), free, nil
}

// Close implements gpu.AsyncCopier: it waits for the copy stream, destroys
// the events and the stream, frees pinned memory not yet freed and
// releases the primary context OpenCopier retained.
func (c *Copier) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return nil
	}
	c.closed = true
	return c.with(func() error {
		err := c.check("cuStreamSynchronize", c.d.call("cuStreamSynchronize", c.stream))
		for _, e := range c.all {
			err = errors.Join(err, c.check("cuEventDestroy", c.d.call("cuEventDestroy_v2", e)))
		}
		c.all, c.free = nil, nil
		err = errors.Join(err, c.check("cuStreamDestroy", c.d.call("cuStreamDestroy_v2", c.stream)))
		for p := range c.pinned {
			err = errors.Join(err, c.check("cuMemFreeHost", c.d.call("cuMemFreeHost", p)))
			delete(c.pinned, p)
		}
		if c.owned {
			err = errors.Join(err, c.check("cuDevicePrimaryCtxRelease", c.d.call("cuDevicePrimaryCtxRelease_v2", uintptr(c.dev))))
		}
		return err
	})
}

var _ gpu.AsyncCopier = (*Copier)(nil)

// cudaEvent is a CopyToHost's completion event.
type cudaEvent struct {
	c        *Copier
	ev       uintptr
	released bool
}

// Query implements gpu.Event (cuEventQuery).
func (e *cudaEvent) Query() (bool, error) {
	var done bool
	err := e.c.with(func() error {
		switch r := e.c.d.call("cuEventQuery", e.ev); r {
		case 0:
			done = true
			return nil
		case errNotReady:
			return nil
		default:
			return e.c.check("cuEventQuery", r)
		}
	})
	return done, err
}

// Wait implements gpu.Event (cuEventSynchronize: the thread sleeps).
func (e *cudaEvent) Wait() error {
	return e.c.with(func() error { return e.c.check("cuEventSynchronize", e.c.d.call("cuEventSynchronize", e.ev)) })
}

// Release implements gpu.Event: the event goes back to the pool.
func (e *cudaEvent) Release() {
	if e.released {
		return
	}
	e.released = true
	e.c.mu.Lock()
	defer e.c.mu.Unlock()
	if !e.c.closed {
		e.c.free = append(e.c.free, e.ev)
	}
}
