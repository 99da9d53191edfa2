package iouring

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Kernel ABI (include/uapi/linux/io_uring.h).
const (
	opNop        = 0
	opReadv      = 1
	opWritev     = 2
	opFsync      = 3
	opReadFixed  = 4
	opWriteFixed = 5
	opRead       = 22
	opWrite      = 23
	opLast       = 23

	sqeFixedFile = 1 << 0
	sqeIOLink    = 1 << 2

	fsyncDatasync = 1

	enterGetEvents = 1

	offSQRing = 0
	offCQRing = 0x8000000
	offSQEs   = 0x10000000

	featSingleMmap = 1 << 0
	featNoDrop     = 1 << 1

	registerBuffers   = 0
	unregisterBuffers = 1
	registerFiles     = 2
	unregisterFiles   = 3
	registerEventfd   = 4
	registerProbe     = 8

	probeOpSupported = 1
)

type sqringOffsets struct {
	head, tail, ringMask, ringEntries, flags, dropped, array, resv1 uint32
	userAddr                                                        uint64
}

type cqringOffsets struct {
	head, tail, ringMask, ringEntries, overflow, cqes, flags, resv1 uint32
	userAddr                                                        uint64
}

type params struct {
	sqEntries, cqEntries, flags, sqThreadCPU, sqThreadIdle, features, wqFd uint32
	resv                                                                   [3]uint32
	sqOff                                                                  sqringOffsets
	cqOff                                                                  cqringOffsets
}

type sqe struct {
	opcode      uint8
	flags       uint8
	ioprio      uint16
	fd          int32
	off         uint64
	addr        uint64
	len         uint32
	rwFlags     uint32
	userData    uint64
	bufIndex    uint16
	personality uint16
	spliceFdIn  int32
	addr3       uint64
	pad2        uint64
}

type cqe struct {
	userData uint64
	res      int32
	flags    uint32
}

type probeOp struct {
	op    uint8
	resv  uint8
	flags uint16
	resv2 uint32
}

type probe struct {
	lastOp uint8
	opsLen uint8
	resv   uint16
	resv2  [3]uint32
	ops    [256]probeOp
}

func init() {
	// The ABI structs must have the kernel's sizes.
	if unsafe.Sizeof(params{}) != 120 || unsafe.Sizeof(sqe{}) != 64 || unsafe.Sizeof(cqe{}) != 16 {
		panic("iouring: ABI struct sizes do not match the kernel's")
	}
}

// Ring is the io_uring engine.
type Ring struct {
	fd       int
	features uint32
	entries  uint32

	sqRing, cqRing, sqeMem []byte
	sqHead, sqTail, sqMask *uint32
	sqArray                []uint32
	sqes                   []sqe
	cqHead, cqTail, cqMask *uint32
	cqes                   []cqe

	// Submitters hand requests to the ring goroutine through pend; that
	// goroutine, locked to one OS thread, is the only one that touches the
	// SQ and CQ. Completions of block I/O run as task work of the task that
	// submitted them, so they always run on that one thread.
	//
	// The ring goroutine never blocks in io_uring_enter: it submits without
	// waiting and sleeps in the Go netpoller on an eventfd that the kernel
	// signals for every completion (IORING_REGISTER_EVENTFD) and that
	// submitters write to wake it. A goroutine blocked in a system call
	// keeps its P until sysmon takes it back, which can take up to 10 ms
	// once sysmon has backed off; while CPU-bound goroutines (a projection)
	// keep every other P busy, that stalled one of them for as long after
	// each completion. A goroutine parked in the netpoller gives its P up
	// at once.
	acquireMu sync.Mutex // one submitter acquires slots at a time (no partial-batch deadlock)
	free      chan uint32
	slots     []*Request // ring goroutine only
	pendMu    sync.Mutex
	pend      []*Request
	sleeping  atomic.Bool  // the ring goroutine waits for the eventfd
	efd       int          // eventfd that wakes it: completions and submitters
	efdFile   *os.File     // efd in the netpoller
	efdMu     sync.RWMutex // wake holds it shared; Close closes efd under it
	efdGone   bool
	inflight  int    // ring goroutine only
	unsent    uint32 // SQEs placed, not yet entered; ring goroutine only

	regMu   sync.RWMutex
	regions []region

	// Close never waits for a lock a blocked submitter holds: it sets
	// closed and closes closing, which wakes submitters waiting for a
	// slot; the ring goroutine keeps completing requests until no
	// submitter is inside Submit and nothing is in flight.
	closed     atomic.Bool
	closing    chan struct{}
	submitters atomic.Int32
	loopDone   chan struct{}
	stats      struct{ submitted, completed, resubmitted, fixed, enters atomic.Uint64 }
}

type region struct{ start, end uintptr }

func setup(entries uint32, p *params) (int, error) {
	fd, _, errno := unix.Syscall(unix.SYS_IO_URING_SETUP, uintptr(entries), uintptr(unsafe.Pointer(p)), 0)
	if errno != 0 {
		return -1, errno
	}
	return int(fd), nil
}

func enter(fd int, toSubmit, minComplete, flags uint32) (int, error) {
	n, _, errno := unix.Syscall6(unix.SYS_IO_URING_ENTER, uintptr(fd), uintptr(toSubmit), uintptr(minComplete), uintptr(flags), 0, 0)
	if errno != 0 {
		return int(n), errno
	}
	return int(n), nil
}

func register(fd int, opcode uint32, arg unsafe.Pointer, nr uint32) error {
	_, _, errno := unix.Syscall6(unix.SYS_IO_URING_REGISTER, uintptr(fd), uintptr(opcode), uintptr(arg), uintptr(nr), 0, 0)
	if errno != 0 {
		return errno
	}
	return nil
}

// NewRing sets up an io_uring with the given number of entries (the bound on
// requests in flight) and starts its ring goroutine.
func NewRing(entries int) (*Ring, error) {
	if entries < 1 || entries > MaxEntries || entries&(entries-1) != 0 {
		return nil, fmt.Errorf("iouring: entries = %d: must be a power of two in [1, %d]", entries, MaxEntries)
	}
	entries = max(entries, 2) // one entry is the wake-up read
	var p params
	fd, err := setup(uint32(entries), &p)
	if err != nil {
		return nil, fmt.Errorf("iouring: io_uring_setup(%d): %w", entries, err)
	}
	r := &Ring{fd: fd, features: p.features, entries: p.sqEntries}
	if err := r.mmap(&p); err != nil {
		unix.Close(fd)
		return nil, err
	}
	if err := r.probe(); err != nil {
		r.unmap()
		unix.Close(fd)
		return nil, err
	}
	efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		r.unmap()
		unix.Close(fd)
		return nil, fmt.Errorf("iouring: eventfd: %w", err)
	}
	efd32 := int32(efd) // the kernel reads an __s32
	if err := register(fd, registerEventfd, unsafe.Pointer(&efd32), 1); err != nil {
		unix.Close(efd)
		r.unmap()
		unix.Close(fd)
		return nil, fmt.Errorf("iouring: IORING_REGISTER_EVENTFD: %w", err)
	}
	r.efd = efd
	// A non-blocking descriptor: os.NewFile puts it in the netpoller (a
	// file outside it has no deadlines; its reads would fail with EAGAIN).
	r.efdFile = os.NewFile(uintptr(efd), "iouring-eventfd")
	if err := r.efdFile.SetReadDeadline(time.Time{}); err != nil {
		r.efdFile.Close()
		r.unmap()
		unix.Close(fd)
		return nil, fmt.Errorf("iouring: the ring's eventfd is not in the Go netpoller: %w", err)
	}
	// In-flight requests stay below the SQ size (one entry spare); the CQ
	// (2x by default) can therefore never overflow.
	n := min(p.sqEntries, p.cqEntries) - 1
	if n == 0 {
		n = 1
	}
	r.free = make(chan uint32, n)
	r.slots = make([]*Request, n)
	for i := uint32(0); i < n; i++ {
		r.free <- i
	}
	r.loopDone = make(chan struct{})
	r.closing = make(chan struct{})
	go r.loop()
	return r, nil
}

func (r *Ring) mmap(p *params) error {
	sqSize := uintptr(p.sqOff.array) + uintptr(p.sqEntries)*4
	cqSize := uintptr(p.cqOff.cqes) + uintptr(p.cqEntries)*unsafe.Sizeof(cqe{})
	single := p.features&featSingleMmap != 0
	if single {
		sqSize = max(sqSize, cqSize)
	}
	var err error
	r.sqRing, err = unix.Mmap(r.fd, offSQRing, int(sqSize), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE)
	if err != nil {
		return fmt.Errorf("iouring: mmap SQ ring: %w", err)
	}
	if single {
		r.cqRing = r.sqRing
	} else {
		r.cqRing, err = unix.Mmap(r.fd, offCQRing, int(cqSize), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE)
		if err != nil {
			unix.Munmap(r.sqRing)
			return fmt.Errorf("iouring: mmap CQ ring: %w", err)
		}
	}
	sqeSize := int(p.sqEntries) * int(unsafe.Sizeof(sqe{}))
	r.sqeMem, err = unix.Mmap(r.fd, offSQEs, sqeSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE)
	if err != nil {
		r.unmap()
		return fmt.Errorf("iouring: mmap SQEs: %w", err)
	}
	sq := unsafe.Pointer(&r.sqRing[0])
	r.sqHead = (*uint32)(unsafe.Add(sq, p.sqOff.head))
	r.sqTail = (*uint32)(unsafe.Add(sq, p.sqOff.tail))
	r.sqMask = (*uint32)(unsafe.Add(sq, p.sqOff.ringMask))
	r.sqArray = unsafe.Slice((*uint32)(unsafe.Add(sq, p.sqOff.array)), p.sqEntries)
	r.sqes = unsafe.Slice((*sqe)(unsafe.Pointer(&r.sqeMem[0])), p.sqEntries)
	cq := unsafe.Pointer(&r.cqRing[0])
	r.cqHead = (*uint32)(unsafe.Add(cq, p.cqOff.head))
	r.cqTail = (*uint32)(unsafe.Add(cq, p.cqOff.tail))
	r.cqMask = (*uint32)(unsafe.Add(cq, p.cqOff.ringMask))
	r.cqes = unsafe.Slice((*cqe)(unsafe.Add(cq, p.cqOff.cqes)), p.cqEntries)
	return nil
}

func (r *Ring) unmap() {
	if r.sqeMem != nil {
		unix.Munmap(r.sqeMem)
	}
	if r.cqRing != nil && &r.cqRing[0] != &r.sqRing[0] {
		unix.Munmap(r.cqRing)
	}
	if r.sqRing != nil {
		unix.Munmap(r.sqRing)
	}
}

// probe checks that the kernel supports every opcode the engine uses.
func (r *Ring) probe() error {
	var pr probe
	if err := register(r.fd, registerProbe, unsafe.Pointer(&pr), 256); err != nil {
		return fmt.Errorf("iouring: probe: %w", err)
	}
	for _, op := range []uint8{opNop, opReadv, opWritev, opFsync, opReadFixed, opWriteFixed, opRead, opWrite} {
		if op > pr.lastOp || pr.ops[op].flags&probeOpSupported == 0 {
			return fmt.Errorf("iouring: kernel lacks opcode %d", op)
		}
	}
	return nil
}

// Name implements Engine.
func (r *Ring) Name() string { return "io_uring" }

// Features returns the IORING_FEAT_* bits the kernel reported.
func (r *Ring) Features() uint32 { return r.features }

// Stats implements Engine.
func (r *Ring) Stats() Stats {
	return Stats{
		Submitted: r.stats.submitted.Load(), Completed: r.stats.completed.Load(),
		Resubmitted: r.stats.resubmitted.Load(), FixedIO: r.stats.fixed.Load(), Enters: r.stats.enters.Load(),
	}
}

// RegisterBuffers implements Engine. It replaces any earlier registration;
// it must not be called while requests are in flight.
func (r *Ring) RegisterBuffers(bufs [][]byte) error {
	r.regMu.Lock()
	defer r.regMu.Unlock()
	if len(r.regions) > 0 {
		_ = register(r.fd, unregisterBuffers, nil, 0)
		r.regions = nil
	}
	if len(bufs) == 0 {
		return nil
	}
	iov := make([]unix.Iovec, len(bufs))
	regions := make([]region, len(bufs))
	for i, b := range bufs {
		if len(b) == 0 {
			return fmt.Errorf("iouring: RegisterBuffers: buffer %d is empty", i)
		}
		iov[i].Base = &b[0]
		iov[i].SetLen(len(b))
		start := uintptr(unsafe.Pointer(&b[0]))
		regions[i] = region{start, start + uintptr(len(b))}
	}
	if err := register(r.fd, registerBuffers, unsafe.Pointer(&iov[0]), uint32(len(iov))); err != nil {
		return fmt.Errorf("iouring: register %d buffers: %w", len(bufs), err)
	}
	runtime.KeepAlive(bufs)
	r.regions = regions
	return nil
}

// RegisterFiles registers descriptors; a Request with Fixed set then names a
// file by its index in fds. Pass nil to unregister.
func (r *Ring) RegisterFiles(fds []int) error {
	_ = register(r.fd, unregisterFiles, nil, 0)
	if len(fds) == 0 {
		return nil
	}
	fd32 := make([]int32, len(fds))
	for i, fd := range fds {
		fd32[i] = int32(fd)
	}
	if err := register(r.fd, registerFiles, unsafe.Pointer(&fd32[0]), uint32(len(fd32))); err != nil {
		return fmt.Errorf("iouring: register %d files: %w", len(fds), err)
	}
	return nil
}

// fixedIndex returns the registered buffer holding b, or -1.
func (r *Ring) fixedIndex(b []byte) int {
	if len(b) == 0 {
		return -1
	}
	start := uintptr(unsafe.Pointer(&b[0]))
	end := start + uintptr(len(b))
	r.regMu.RLock()
	defer r.regMu.RUnlock()
	for i, g := range r.regions {
		if start >= g.start && end <= g.end {
			return i
		}
	}
	return -1
}

// Do implements Engine.
func (r *Ring) Do(reqs ...*Request) error { return doBatch(r, reqs) }

// Submit implements Engine.
func (r *Ring) Submit(reqs []*Request, done func(*Request)) error {
	if err := validate(reqs); err != nil {
		return err
	}
	r.submitters.Add(1)
	defer func() {
		r.submitters.Add(-1)
		if r.closed.Load() {
			r.sleeping.Store(true) // the ring goroutine may wait for the last submitter
			r.wake()
		}
	}()
	if r.closed.Load() {
		return ErrClosed
	}
	capacity := cap(r.free)
	for len(reqs) > 0 {
		// Cut the batch at a chain boundary no longer than the ring.
		n := 0
		cut := 0
		for n < len(reqs) && n < capacity {
			n++
			if !reqs[n-1].Link {
				cut = n
			}
		}
		if n == len(reqs) {
			cut = n
		}
		if cut == 0 {
			return fmt.Errorf("iouring: a linked chain longer than the ring (%d entries)", capacity)
		}
		batch := reqs[:cut]
		reqs = reqs[cut:]
		r.acquireMu.Lock()
		for i, q := range batch {
			select {
			case q.slot = <-r.free:
			case <-r.closing:
				// Give back the slots of this batch; nothing of it was sent.
				for _, p := range batch[:i] {
					r.free <- p.slot
				}
				r.acquireMu.Unlock()
				return ErrClosed
			}
			q.done = done
			q.N, q.Err = 0, nil
			q.total = q.length()
			q.resuming = false
			q.deferred = nil
			q.prev = nil
			if i > 0 && batch[i-1].Link {
				q.prev = batch[i-1]
			}
			q.chained = q.Link && i < len(batch)-1
		}
		r.acquireMu.Unlock()
		r.stats.submitted.Add(uint64(len(batch)))
		r.pendMu.Lock()
		r.pend = append(r.pend, batch...)
		r.pendMu.Unlock()
		r.wake()
	}
	return nil
}

// wake rouses the ring goroutine if it sleeps on the eventfd.
func (r *Ring) wake() {
	if r.sleeping.Load() && r.sleeping.CompareAndSwap(true, false) {
		r.efdMu.RLock()
		defer r.efdMu.RUnlock()
		if r.efdGone {
			return
		}
		var one [8]byte
		one[0] = 1
		for {
			_, err := unix.Write(r.efd, one[:])
			if err != syscall.EINTR {
				break
			}
		}
	}
}

// loop is the ring goroutine: it places submitted requests, enters the
// kernel, reaps completions and runs their callbacks.
func (r *Ring) loop() {
	runtime.LockOSThread()
	defer close(r.loopDone)
	var buf [8]byte
	for {
		r.takePending()
		r.enter()
		if r.reapAvailable() > 0 {
			continue
		}
		done := func() bool {
			return r.closed.Load() && r.submitters.Load() == 0 && r.inflight == 0 && r.pendEmpty()
		}
		if done() {
			return
		}
		r.sleeping.Store(true)
		// A completion posted after the reap above, or a submitter that
		// saw sleeping false, is seen here; later ones write the eventfd.
		if !r.pendEmpty() || r.cqReady() || done() {
			r.sleeping.Store(false)
			continue
		}
		if _, err := r.efdFile.Read(buf[:]); err != nil && !errors.Is(err, syscall.EINTR) {
			// Assertion: the eventfd is closed only after this loop ends.
			panic(fmt.Sprintf("iouring: read of the ring's eventfd: %v", err))
		}
		r.sleeping.Store(false)
	}
}

// cqReady reports whether a completion waits in the CQ.
func (r *Ring) cqReady() bool {
	return atomic.LoadUint32(r.cqTail) != atomic.LoadUint32(r.cqHead)
}

func (r *Ring) pendEmpty() bool {
	r.pendMu.Lock()
	defer r.pendMu.Unlock()
	return len(r.pend) == 0
}

func (r *Ring) takePending() {
	r.pendMu.Lock()
	batch := r.pend
	r.pend = nil
	r.pendMu.Unlock()
	for _, q := range batch {
		r.place(q)
	}
}

// place writes one request's SQE (ring goroutine only).
func (r *Ring) place(q *Request) {
	tail := *r.sqTail
	idx := tail & *r.sqMask
	s := &r.sqes[idx]
	r.prep(s, q)
	if q.chained {
		s.flags |= sqeIOLink
	}
	r.sqArray[idx] = idx
	r.slots[q.slot] = q
	// Publish the entry before the tail (release).
	atomic.StoreUint32(r.sqTail, tail+1)
	r.unsent++
	if !q.placedOnce {
		q.placedOnce = true
		r.inflight++
	}
}

// enter submits the placed SQEs without waiting for completions.
func (r *Ring) enter() {
	for r.unsent > 0 {
		n, err := enter(r.fd, r.unsent, 0, 0)
		r.stats.enters.Add(1)
		if err != nil {
			if err == syscall.EINTR || err == syscall.EAGAIN || err == syscall.EBUSY {
				runtime.Gosched()
				continue
			}
			// Assertion: with the in-flight bound the kernel never
			// refuses well-formed SQEs.
			panic(fmt.Sprintf("iouring: io_uring_enter: %v", err))
		}
		r.unsent -= uint32(n)
	}
}

// reapAvailable handles every CQE in the queue and returns how many.
func (r *Ring) reapAvailable() int {
	head := atomic.LoadUint32(r.cqHead)
	tail := atomic.LoadUint32(r.cqTail) // acquire
	mask := *r.cqMask
	n := 0
	for ; head != tail; head++ {
		c := r.cqes[head&mask]
		n++
		r.complete(r.slots[c.userData], c.res)
	}
	atomic.StoreUint32(r.cqHead, head) // release the entries to the kernel
	return n
}

func (r *Ring) complete(q *Request, res int32) {
	if res < 0 {
		errno := syscall.Errno(-res)
		switch {
		case errno == syscall.EINTR || errno == syscall.EAGAIN:
			r.stats.resubmitted.Add(1)
			r.place(q)
			return
		case errno == syscall.ECANCELED && q.prev != nil && q.prev.resuming:
			// Our predecessor was cut short and is being resumed: run
			// this request again once it has finished.
			q.resuming = true
			q.prev.deferred = append(q.prev.deferred, q)
			return
		}
		r.finish(q, newIOError(q, errno))
		return
	}
	done, err := advance(q, int(res))
	if !done {
		q.resuming = true
		q.chained = false
		r.stats.resubmitted.Add(1)
		r.place(q)
		return
	}
	if err != nil {
		r.finish(q, newIOError(q, err))
		return
	}
	r.finish(q, nil)
}

func (r *Ring) finish(q *Request, err error) {
	q.Err = err
	q.resuming = false
	q.placedOnce = false
	deferred := q.deferred
	q.deferred = nil
	done := q.done
	r.slots[q.slot] = nil
	r.inflight--
	r.free <- q.slot
	r.stats.completed.Add(1)
	if len(deferred) > 0 {
		if err != nil {
			for _, d := range deferred {
				r.finish(d, newIOError(d, syscall.ECANCELED))
			}
		} else {
			for i, d := range deferred {
				d.resuming = false
				d.chained = d.Link && i < len(deferred)-1
				if i > 0 {
					d.prev = deferred[i-1]
				} else {
					d.prev = nil
				}
				r.place(d)
			}
		}
	}
	done(q)
}

// Close implements Engine: it waits for requests in flight, stops the ring
// goroutine and releases the ring.
func (r *Ring) Close() error {
	if !r.closed.CompareAndSwap(false, true) {
		return nil
	}
	close(r.closing)
	r.sleeping.Store(true)
	r.wake()
	<-r.loopDone
	r.unmap()
	r.efdMu.Lock()
	r.efdGone = true
	r.efdFile.Close()
	r.efdMu.Unlock()
	return unix.Close(r.fd)
}

// prep fills s for the current state of q (resumed requests transfer only what
// remains).
func (r *Ring) prep(s *sqe, q *Request) {
	*s = sqe{fd: int32(q.Fd), userData: uint64(q.slot)}
	if q.Fixed {
		s.flags |= sqeFixedFile
	}
	off := uint64(q.Off) + uint64(q.N)
	switch q.Op {
	case OpNop:
		s.opcode = opNop
	case OpFsync:
		s.opcode = opFsync
	case OpFdatasync:
		s.opcode = opFsync
		s.rwFlags = fsyncDatasync
	case OpRead, OpWrite:
		b := q.Buf[q.N:]
		s.off = off
		if len(b) > 0 {
			s.addr = uint64(uintptr(unsafe.Pointer(&b[0])))
		}
		s.len = uint32(len(b))
		if idx := r.fixedIndex(b); idx >= 0 {
			s.bufIndex = uint16(idx)
			if q.Op == OpRead {
				s.opcode = opReadFixed
			} else {
				s.opcode = opWriteFixed
			}
			if q.N == 0 {
				r.stats.fixed.Add(1)
			}
		} else if q.Op == OpRead {
			s.opcode = opRead
		} else {
			s.opcode = opWrite
		}
	case OpReadv, OpWritev:
		bufs := remaining(q)
		q.iov = q.iov[:0]
		for _, b := range bufs {
			if len(b) == 0 {
				continue
			}
			var v unix.Iovec
			v.Base = &b[0]
			v.SetLen(len(b))
			q.iov = append(q.iov, v)
		}
		s.off = off
		if len(q.iov) > 0 {
			s.addr = uint64(uintptr(unsafe.Pointer(&q.iov[0])))
		}
		s.len = uint32(len(q.iov))
		if q.Op == OpReadv {
			s.opcode = opReadv
		} else {
			s.opcode = opWritev
		}
	}
}
