package cuda

import (
	"fmt"
	"math/rand"
	"runtime"
	"sort"
	"sync"
	"time"
	"unsafe"

	"github.com/ebitengine/purego"

	"github.com/hcache/hcache/model"
)

// simDev is devOps on the host: a model of a GPU's streams and events in
// which the restore path's real code runs. Device memory is hostMem; every
// queued operation (an asynchronous copy, a kernel launch through its
// host-built hc_host_launch_ entry, a GEMM in Go, an event record, a wait)
// sits in its stream's queue until a seeded scheduler runs it: after every
// call it runs a few ready operations from randomly chosen streams, and a
// synchronising call runs them until its condition holds. So a copy may run
// long before or after the kernels of other streams, exactly as far as the
// events allow, and what the restore code forgot to order shows as a wrong
// result, a read of a buffer still being written, or a buffer released
// before its copy read it.
//
// It checks, as operations run:
//   - a copy into device memory never overwrites bytes that an operation
//     queued before it (on any stream) has still to read (slot reuse);
//   - kernels and GEMMs read nothing outside one allocation;
//   - a launch has a grid, at most 1024 threads and 48 KiB of shared memory.
type simDev struct {
	mu      sync.Mutex
	mem     *hostMem
	gemmOps *hostOps // GEMM in Go over mem
	rng     *rand.Rand
	next    uintptr
	seq     int
	clock   int
	streams map[uintptr]*simStream
	events  map[uintptr]*simEvent
	blas    map[uintptr]uintptr // handle -> stream
	copied  map[uintptr]int     // host address -> copies of it that have run
	log     map[uintptr][]string
	logging bool
	weight  map[uintptr]int // the scheduler's stream weights of this phase
	// lazyCopies: copies run only while someone synchronises (a copy
	// engine far behind), so a buffer released without waiting for its
	// copy's event is always released before the copy has read it.
	lazyCopies bool
	syncing    bool
	// frozen: nothing runs, and every synchronising call waits (counted
	// in waiters) until thaw.
	frozen  bool
	thawed  *sync.Cond
	waiters int
	bad     []string // violations seen
	err     error    // first failure of a queued operation
}

type simOp struct {
	seq   int
	what  string
	copy  bool
	reads [][2]uintptr // device ranges [start, end) the operation reads
	ready func() bool  // nil: always ready
	run   func() error
}

type simStream struct{ q []*simOp }

type simEvent struct {
	gen, done int // records made, records completed
	at        int // clock of the last completed record
}

func newSimDev(c *model.Config, seed int64) *simDev {
	mem := newHostMem()
	rng := rand.New(rand.NewSource(seed))
	d := &simDev{mem: mem, gemmOps: &hostOps{mem: mem, cfg: c}, rng: rng, next: 1, lazyCopies: rng.Intn(2) == 0,
		streams: map[uintptr]*simStream{}, events: map[uintptr]*simEvent{}, blas: map[uintptr]uintptr{},
		copied: map[uintptr]int{}, log: map[uintptr][]string{}}
	d.thawed = sync.NewCond(&d.mu)
	return d
}

// freeze stops the device: see frozen.
func (d *simDev) freeze() {
	d.mu.Lock()
	d.frozen = true
	d.mu.Unlock()
}

func (d *simDev) thaw() {
	d.mu.Lock()
	d.frozen = false
	d.thawed.Broadcast()
	d.mu.Unlock()
}

// blocked is how many calls wait for the device to thaw.
func (d *simDev) blocked() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.waiters
}

// waitThaw waits while the device is frozen. Call with d.mu held.
func (d *simDev) waitThaw() {
	for d.frozen {
		d.waiters++
		d.thawed.Wait()
		d.waiters--
	}
}

func (d *simDev) handle() uintptr { d.next++; return d.next }

func (d *simDev) alloc(n int) (uintptr, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.mem.alloc(n)
}

// free poisons the buffer (0xff: NaN in every dtype) before dropping it, so
// that a kernel still reading freed memory computes garbage.
func (d *simDev) free(p uintptr) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if b, ok := d.mem.bufs[p]; ok {
		for i := range b {
			b[i] = 0xff
		}
	}
	d.mem.free(p)
}

func (d *simDev) htod(dst uintptr, src []byte) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.mem.htod(dst, src)
}

func (d *simDev) dtoh(dst []byte, src uintptr) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	s, err := d.mem.slice(src, len(dst))
	if err != nil {
		return err
	}
	copy(dst, s)
	return nil
}

func (d *simDev) memset(p uintptr, v byte, n int) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	s, err := d.mem.slice(p, n)
	if err != nil {
		return err
	}
	for i := range s {
		s[i] = v
	}
	return nil
}

func (d *simDev) with(fn func() error) error { return fn() }

func (d *simDev) syncAll() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.waitThaw()
	d.syncing = true
	defer func() { d.syncing = false }()
	for d.pending() > 0 {
		if !d.runOne() {
			return fmt.Errorf("sim: %d operations queued and none can run (a wait on an event never recorded after them)", d.pending())
		}
	}
	return d.err
}

func (d *simDev) pending() int {
	n := 0
	for _, s := range d.streams {
		n += len(s.q)
	}
	return n
}

func (d *simDev) newStream() (uintptr, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	h := d.handle()
	d.streams[h] = &simStream{}
	return h, nil
}

func (d *simDev) destroyStream(s uintptr) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if st := d.streams[s]; st != nil && len(st.q) > 0 {
		d.bad = append(d.bad, fmt.Sprintf("stream %d destroyed with %d operations queued", s, len(st.q)))
	}
	delete(d.streams, s)
}

func (d *simDev) syncStream(s uintptr) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	st := d.streams[s]
	if st == nil {
		return fmt.Errorf("sim: no stream %d", s)
	}
	d.waitThaw()
	d.syncing = true
	defer func() { d.syncing = false }()
	for len(st.q) > 0 {
		if !d.runOne() {
			return fmt.Errorf("sim: stream %d cannot finish", s)
		}
	}
	return d.err
}

func (d *simDev) newBlas(stream uintptr) (uintptr, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.streams[stream] == nil {
		return 0, fmt.Errorf("sim: cuBLAS handle on no stream")
	}
	h := d.handle()
	d.blas[h] = stream
	return h, nil
}

func (d *simDev) destroyBlas(h uintptr) {
	d.mu.Lock()
	defer d.mu.Unlock()
	delete(d.blas, h)
}

func (d *simDev) newEvent(bool) (uintptr, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	h := d.handle()
	d.events[h] = &simEvent{}
	return h, nil
}

func (d *simDev) destroyEvent(e uintptr) {
	d.mu.Lock()
	defer d.mu.Unlock()
	delete(d.events, e)
}

// enqueue adds op to stream s and lets the scheduler run a few ready ones.
// Call with d.mu held.
func (d *simDev) enqueue(s uintptr, op *simOp) error {
	st := d.streams[s]
	if st == nil {
		return fmt.Errorf("sim: %s on no stream (%d)", op.what, s)
	}
	d.seq++
	op.seq = d.seq
	st.q = append(st.q, op)
	if d.logging {
		d.log[s] = append(d.log[s], op.what)
	}
	// Half the time nothing runs (queues build up, as on a busy device),
	// else a few operations.
	if !d.frozen && d.rng.Intn(2) == 0 {
		for n := d.rng.Intn(4); n > 0; n-- {
			d.runOne()
		}
	}
	return nil
}

// runOne runs the head of a random stream whose head is ready. Call with
// d.mu held.
func (d *simDev) runOne() bool {
	var ready []uintptr
	for h, s := range d.streams {
		if len(s.q) > 0 && (s.q[0].ready == nil || s.q[0].ready()) && !(s.q[0].copy && d.lazyCopies && !d.syncing) {
			ready = append(ready, h)
		}
	}
	if len(ready) == 0 {
		return false
	}
	sort.Slice(ready, func(i, j int) bool { return ready[i] < ready[j] })
	// Streams run at uneven speeds: every 16 operations each stream draws
	// a weight of 1, 8 or 64, and a ready stream is picked in proportion,
	// so that one stream (a copy stream, say) races ahead of another for a
	// while, as far as its waits let it.
	if d.clock%16 == 0 || d.weight == nil {
		d.weight = map[uintptr]int{}
	}
	total := 0
	for _, h := range ready {
		if d.weight[h] == 0 {
			d.weight[h] = []int{1, 8, 64}[d.rng.Intn(3)]
		}
		total += d.weight[h]
	}
	pick := d.rng.Intn(total)
	chosen := ready[len(ready)-1]
	for _, h := range ready {
		if pick < d.weight[h] {
			chosen = h
			break
		}
		pick -= d.weight[h]
	}
	s := d.streams[chosen]
	op := s.q[0]
	s.q = s.q[1:]
	d.clock++
	if err := op.run(); err != nil && d.err == nil {
		d.err = fmt.Errorf("sim: %s: %w", op.what, err)
	}
	return true
}

func (d *simDev) record(e, stream uintptr) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	ev := d.events[e]
	if ev == nil {
		return fmt.Errorf("sim: record of no event %d", e)
	}
	ev.gen++
	g := ev.gen
	return d.enqueue(stream, &simOp{what: fmt.Sprintf("record e%d", e), run: func() error {
		ev.done = max(ev.done, g)
		ev.at = d.clock
		return nil
	}})
}

func (d *simDev) waitEvent(stream, e uintptr) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	ev := d.events[e]
	if ev == nil {
		return fmt.Errorf("sim: wait on no event %d", e)
	}
	g := ev.gen
	return d.enqueue(stream, &simOp{what: fmt.Sprintf("wait e%d", e), ready: func() bool { return ev.done >= g }, run: func() error { return nil }})
}

func (d *simDev) syncEvent(e uintptr) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	ev := d.events[e]
	if ev == nil {
		return fmt.Errorf("sim: synchronize on no event %d", e)
	}
	g := ev.gen
	d.waitThaw()
	d.syncing = true
	defer func() { d.syncing = false }()
	for ev.done < g {
		if !d.runOne() {
			return fmt.Errorf("sim: event %d can never complete", e)
		}
	}
	return d.err
}

func (d *simDev) elapsed(e0, e1 uintptr) (time.Duration, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	a, b := d.events[e0], d.events[e1]
	if a == nil || b == nil || a.done < a.gen || b.done < b.gen {
		return 0, fmt.Errorf("sim: elapsed time of events not completed")
	}
	return time.Duration(b.at-a.at) * time.Microsecond, nil
}

func (d *simDev) copyAsync(dst uintptr, src []byte, stream uintptr) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if len(src) == 0 {
		return nil
	}
	host := uintptr(unsafe.Pointer(&src[0]))
	if _, err := d.mem.slice(dst, len(src)); err != nil {
		return err
	}
	var op *simOp
	op = &simOp{what: fmt.Sprintf("copy %d bytes", len(src)), copy: true, run: func() error {
		d.overwriteCheck(op, dst, dst+uintptr(len(src)))
		b, _ := d.mem.slice(dst, len(src))
		copy(b, src) // src is read now, not when it was queued
		d.copied[host]++
		return nil
	}}
	return d.enqueue(stream, op)
}

// overwriteCheck records a violation when an operation queued before op and
// not yet run reads [lo, hi). Call with d.mu held.
func (d *simDev) overwriteCheck(op *simOp, lo, hi uintptr) {
	for h, s := range d.streams {
		for _, q := range s.q {
			if q.seq > op.seq {
				continue
			}
			for _, r := range q.reads {
				if r[0] < hi && lo < r[1] {
					d.bad = append(d.bad, fmt.Sprintf("%s (queued #%d) overwrote [%#x, %#x) before %s (queued #%d on stream %d) read it", op.what, op.seq, lo, hi, q.what, q.seq, h))
				}
			}
		}
	}
}

// copiedFrom reports how many copies from host address p have run.
func (d *simDev) copiedFrom(p []byte) int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.copied[uintptr(unsafe.Pointer(&p[0]))]
}

func (d *simDev) launch(stream uintptr, l kLaunch) error {
	if l.fn == 0 || l.grid < 1 || l.threads < 1 || l.threads > 1024 || l.shmem < 0 || l.shmem > 48<<10 || len(l.params) == 0 {
		return fmt.Errorf("sim: launch of %s: grid %d, %d threads, %d bytes of shared memory: a device refuses it", l.name, l.grid, l.threads, l.shmem)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	op := &simOp{what: fmt.Sprintf("%s grid %d threads %d", l.name, l.grid, l.threads), reads: launchReads(l.keep)}
	if a, ok := l.keep.(*dequantArgs); ok {
		op.what += fmt.Sprintf(" [%d segments, %d per row, of %d values, scale block %d, %d bytes each, rows of %d, dtype %d]",
			a.nseg, a.segs, a.vals, a.block, a.segBytes, a.rowBytes, a.dtyp)
	}
	for _, r := range op.reads {
		if _, err := d.mem.slice(r[0], int(r[1]-r[0])); err != nil {
			return fmt.Errorf("sim: %s reads outside device memory: %w", l.name, err)
		}
	}
	op.run = func() error {
		for _, r := range op.reads {
			if _, err := d.mem.slice(r[0], int(r[1]-r[0])); err != nil {
				d.bad = append(d.bad, fmt.Sprintf("%s ran reading freed memory: %v", op.what, err))
			}
		}
		r, _, _ := purego.SyscallN(l.fn, uintptr(unsafe.Pointer(&l.params[0])), uintptr(l.grid), uintptr(l.threads), uintptr(l.shmem))
		runtime.KeepAlive(l.params)
		runtime.KeepAlive(l.keep)
		if int32(r) != 0 {
			return fmt.Errorf("host launch failed (%d)", int32(r))
		}
		return nil
	}
	return d.enqueue(stream, op)
}

// launchReads lists what the restore kernels read from staging memory.
func launchReads(keep any) [][2]uintptr {
	switch a := keep.(type) {
	case *dequantArgs:
		n := uintptr(a.nseg / a.segs * a.rowBytes)
		return [][2]uintptr{{uintptr(a.src), uintptr(a.src) + n}}
	case *kvArgs:
		n := uintptr(a.n * a.rwords * 4 * 2)
		return [][2]uintptr{{uintptr(a.rows), uintptr(a.rows) + n}}
	case *projectArgs:
		if a.rope != 0 { // the table's first entry
			return [][2]uintptr{{uintptr(a.rope), uintptr(a.rope) + 8}}
		}
	}
	return nil
}

func (d *simDev) gemm(blas uintptr, g fwdGemm) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	s, ok := d.blas[blas]
	if !ok {
		return fmt.Errorf("sim: GEMM on no cuBLAS handle")
	}
	eb := d.gemmOps.cfg.ElemBytes()
	op := &simOp{what: fmt.Sprintf("gemm %s %dx%dx%d", g.what, g.m, g.n, g.k), reads: [][2]uintptr{{g.x, g.x + uintptr(g.n*g.k*eb)}},
		run: func() error { return d.gemmOps.gemm(g) }}
	return d.enqueue(s, op)
}

// violations returns what the checks saw.
func (d *simDev) violations() []string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return append([]string(nil), d.bad...)
}

var _ devOps = (*simDev)(nil)
