package iouring

import (
	"errors"
	"fmt"
	"io"
	"log"
	"sync"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Op is the operation a Request performs.
type Op uint8

// Operations.
const (
	OpRead      Op = iota // read len(Buf) bytes at Off into Buf
	OpWrite               // write Buf at Off
	OpReadv               // read into Iovecs at Off
	OpWritev              // write Iovecs at Off
	OpFsync               // fsync(Fd)
	OpFdatasync           // fdatasync(Fd)
	OpNop                 // does nothing; completes with N = 0
)

var opNames = [...]string{"read", "write", "readv", "writev", "fsync", "fdatasync", "nop"}

func (o Op) String() string {
	if int(o) < len(opNames) {
		return opNames[o]
	}
	return fmt.Sprintf("op(%d)", uint8(o))
}

// Request is one I/O. Fill Op, Fd, Buf or Iovecs, Off (and Link), submit it,
// and read N and Err once its completion has been delivered. A Request must not
// be touched by the caller while it is in flight.
type Request struct {
	Op     Op
	Fd     int      // file descriptor, or a registered-file index when Fixed is set
	Fixed  bool     // Fd is an index into the ring's registered files (io_uring only)
	Buf    []byte   // OpRead / OpWrite
	Iovecs [][]byte // OpReadv / OpWritev
	Off    int64
	// Link makes the next request of the same batch start only after this one
	// completed successfully (IOSQE_IO_LINK). If this one fails, the rest of
	// the chain completes with ECANCELED.
	Link bool

	// Results.
	N   int   // bytes transferred
	Err error // nil or an *IOError (or io.ErrUnexpectedEOF wrapped in one)

	// internal state
	done       func(*Request)
	total      int // bytes wanted
	iov        []unix.Iovec
	prev       *Request // previous request in its link chain
	resuming   bool     // a short transfer is being resumed
	deferred   []*Request
	slot       uint32
	chained    bool // its SQE carries IOSQE_IO_LINK
	placedOnce bool // counted in the ring's in-flight number
}

func (r *Request) length() int {
	switch r.Op {
	case OpRead, OpWrite:
		return len(r.Buf)
	case OpReadv, OpWritev:
		n := 0
		for _, b := range r.Iovecs {
			n += len(b)
		}
		return n
	}
	return 0
}

// IOError is the error of a failed request. It names the operation, the
// descriptor, the offset and the length, and wraps the cause (a syscall.Errno,
// or io.ErrUnexpectedEOF for a read past end of file).
type IOError struct {
	Op   Op
	Fd   int
	Off  int64
	Len  int
	Hint string
	Err  error
}

func (e *IOError) Error() string {
	s := fmt.Sprintf("iouring: %s fd %d off %d len %d: %v", e.Op, e.Fd, e.Off, e.Len, e.Err)
	if e.Hint != "" {
		s += " (" + e.Hint + ")"
	}
	return s
}

func (e *IOError) Unwrap() error { return e.Err }

// newIOError builds the error of r failing with err, explaining an EINVAL that
// comes from O_DIRECT alignment rules.
func newIOError(r *Request, err error) *IOError {
	e := &IOError{Op: r.Op, Fd: r.Fd, Off: r.Off, Len: r.length(), Err: err}
	if errors.Is(err, syscall.EINVAL) {
		if hint := alignmentHint(r); hint != "" {
			e.Hint = hint
		}
	}
	return e
}

// Alignment is the alignment O_DIRECT asks of buffer addresses, lengths and
// offsets on the file systems hcache runs on.
const Alignment = 4096

func alignmentHint(r *Request) string {
	check := func(b []byte) string {
		if len(b) == 0 {
			return ""
		}
		addr := uintptr(unsafe.Pointer(&b[0]))
		if addr%Alignment != 0 || len(b)%Alignment != 0 {
			return fmt.Sprintf("O_DIRECT needs %d-aligned buffers: address %%%d = %d, length %d", Alignment, Alignment, addr%Alignment, len(b))
		}
		return ""
	}
	if r.Off%Alignment != 0 {
		return fmt.Sprintf("O_DIRECT needs %d-aligned offsets: offset %d", Alignment, r.Off)
	}
	if h := check(r.Buf); h != "" {
		return h
	}
	for _, b := range r.Iovecs {
		if h := check(b); h != "" {
			return h
		}
	}
	return ""
}

// Engine runs batches of requests.
type Engine interface {
	// Submit queues reqs for the ring goroutine (or the worker pool),
	// waiting while the engine's in-flight bound is reached. done is called
	// once per request, from the engine's goroutine, after the request's N and Err are final; it must
	// not block. Requests with Link set chain to the next request of reqs.
	// reqs itself may be reused once Submit returns.
	Submit(reqs []*Request, done func(*Request)) error
	// Do submits reqs and waits for all of them; it returns the first error.
	Do(reqs ...*Request) error
	// Name is "io_uring" or "fallback".
	Name() string
	// RegisterBuffers registers memory for fixed-buffer I/O; requests whose
	// Buf lies inside a registered buffer then use READ_FIXED / WRITE_FIXED.
	// The fallback engine accepts and ignores it.
	RegisterBuffers(bufs [][]byte) error
	// Stats returns counters.
	Stats() Stats
	// Close waits for requests in flight and releases the engine.
	Close() error
}

// Stats counts what an engine did.
type Stats struct {
	Submitted   uint64 // requests submitted
	Completed   uint64 // requests completed (success or error)
	Resubmitted uint64 // short transfers resumed and EINTR/EAGAIN retries
	FixedIO     uint64 // requests that used a registered buffer
	Enters      uint64 // io_uring_enter calls that submitted
}

// Config selects and sizes an engine.
type Config struct {
	// Kind is "auto" (io_uring, else the fallback with a logged reason),
	// "io_uring" (fail if unavailable) or "fallback". Default "auto".
	Kind string
	// Entries is the ring size and the bound on requests in flight
	// (power of two, 1..4096). Default 256.
	Entries int
	// Workers is the fallback engine's worker count. Default 16.
	Workers int
	// Logf reports engine choices (fallbacks); default log.Printf.
	Logf func(format string, args ...any)
}

// Defaults for Config.
const (
	DefaultEntries = 256
	MaxEntries     = 4096
	DefaultWorkers = 16
)

func (c *Config) fill() error {
	if c.Kind == "" {
		c.Kind = "auto"
	}
	if c.Entries == 0 {
		c.Entries = DefaultEntries
	}
	if c.Entries < 1 || c.Entries > MaxEntries || c.Entries&(c.Entries-1) != 0 {
		return fmt.Errorf("iouring: Entries = %d: must be a power of two in [1, %d]", c.Entries, MaxEntries)
	}
	if c.Workers == 0 {
		c.Workers = DefaultWorkers
	}
	if c.Workers < 1 || c.Workers > 1024 {
		return fmt.Errorf("iouring: Workers = %d: must be in [1, 1024]", c.Workers)
	}
	if c.Logf == nil {
		c.Logf = log.Printf
	}
	return nil
}

// New returns the engine that cfg selects.
func New(cfg Config) (Engine, error) {
	if err := cfg.fill(); err != nil {
		return nil, err
	}
	switch cfg.Kind {
	case "fallback":
		return NewFallback(cfg.Workers, cfg.Entries), nil
	case "io_uring", "auto":
		r, err := NewRing(cfg.Entries)
		if err == nil {
			return r, nil
		}
		if cfg.Kind == "io_uring" {
			return nil, err
		}
		cfg.Logf("iouring: io_uring unavailable (%v); using the pread/pwrite fallback engine", err)
		return NewFallback(cfg.Workers, cfg.Entries), nil
	}
	return nil, fmt.Errorf("iouring: unknown engine kind %q (want auto, io_uring or fallback)", cfg.Kind)
}

// doBatch implements Engine.Do on top of Submit.
func doBatch(e Engine, reqs []*Request) error {
	if len(reqs) == 0 {
		return nil
	}
	var wg sync.WaitGroup
	wg.Add(len(reqs))
	if err := e.Submit(reqs, func(*Request) { wg.Done() }); err != nil {
		return err
	}
	wg.Wait()
	for _, r := range reqs {
		if r.Err != nil {
			return r.Err
		}
	}
	return nil
}

// validate checks a batch before submission.
func validate(reqs []*Request) error {
	for i, r := range reqs {
		if r == nil {
			return fmt.Errorf("iouring: request %d is nil", i)
		}
		if r.Op > OpNop {
			return fmt.Errorf("iouring: request %d: unknown op %d", i, r.Op)
		}
		if r.Off < 0 {
			return fmt.Errorf("iouring: request %d: negative offset %d", i, r.Off)
		}
		if len(r.Iovecs) > 1024 {
			return fmt.Errorf("iouring: request %d: %d iovecs exceed IOV_MAX 1024", i, len(r.Iovecs))
		}
		// Some kernels and devices accept misaligned O_DIRECT transfers
		// (or fail them with a bare EINVAL): refuse them here with an
		// explanation. The descriptor's flags are asked only when the
		// request is misaligned, so aligned I/O costs no extra syscall.
		if r.Op <= OpWritev && !r.Fixed {
			if hint := alignmentHint(r); hint != "" {
				if fl, err := unix.FcntlInt(uintptr(r.Fd), unix.F_GETFL, 0); err == nil && fl&unix.O_DIRECT != 0 {
					return &IOError{Op: r.Op, Fd: r.Fd, Off: r.Off, Len: r.length(), Hint: hint, Err: ErrUnaligned}
				}
			}
		}
	}
	return nil
}

// ErrUnaligned is the cause of an IOError for a transfer on an O_DIRECT
// descriptor whose buffer address, length or offset is not Alignment-aligned.
// It wraps EINVAL, the kernel's answer to the same request.
var ErrUnaligned = fmt.Errorf("unaligned O_DIRECT transfer: %w", syscall.EINVAL)

// ErrClosed is returned by Submit on a closed engine.
var ErrClosed = errors.New("iouring: engine closed")

// advance decides what a transfer of n more bytes (n >= 0) means for r.
// It returns done=true when r is complete, else r must be resumed.
func advance(r *Request, n int) (done bool, err error) {
	r.N += n
	if r.Op >= OpFsync {
		return true, nil
	}
	if r.N >= r.total {
		return true, nil
	}
	if n == 0 {
		if r.Op == OpRead || r.Op == OpReadv {
			return true, io.ErrUnexpectedEOF
		}
		return true, io.ErrShortWrite
	}
	return false, nil
}

// remaining returns the buffers still to transfer for a resumed request.
func remaining(r *Request) [][]byte {
	var bufs [][]byte
	if r.Op == OpRead || r.Op == OpWrite {
		bufs = [][]byte{r.Buf}
	} else {
		bufs = r.Iovecs
	}
	skip := r.N
	var out [][]byte
	for _, b := range bufs {
		if skip >= len(b) {
			skip -= len(b)
			continue
		}
		out = append(out, b[skip:])
		skip = 0
	}
	return out
}
