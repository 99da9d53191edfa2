package cuda

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand"
	"strings"
	"sync"
	"testing"
	"unsafe"

	"github.com/hcache/hcache/gpu"
	"github.com/hcache/hcache/serve"
	"github.com/hcache/hcache/state"
)

// fakeCall is one driver call the fake saw.
type fakeCall struct {
	name string
	args []uintptr
}

func (c fakeCall) String() string { return fmt.Sprintf("%s%x", c.name, c.args) }

// fakeDriver stands in for libcuda on a machine without a GPU: it records
// every call, hands out handles, and performs cuMemcpyDtoHAsync at once
// (the "device" memory is host memory the test owns). fail makes the n-th
// call of a name (1-based) return a status.
type fakeDriver struct {
	mu      sync.Mutex
	calls   []fakeCall
	next    uintptr
	counts  map[string]int
	fail    map[string]struct{ nth, code int }
	query   int // what cuEventQuery returns
	pinned  map[uintptr][]byte
	busy    map[uintptr]int // slot base -> rows the writer holds there (set by the test's writer)
	onCopy  func(dst uintptr, n int)
	current uintptr // the context made current
}

func newFakeDriver() *fakeDriver {
	return &fakeDriver{next: 0x1000, counts: map[string]int{}, fail: map[string]struct{ nth, code int }{}, pinned: map[uintptr][]byte{}}
}

func (f *fakeDriver) errString(code int) string { return fmt.Sprintf("FAKE_ERROR (%d)", code) }

func (f *fakeDriver) call(name string, args ...uintptr) int {
	f.mu.Lock()
	f.calls = append(f.calls, fakeCall{name, append([]uintptr(nil), args...)})
	f.counts[name]++
	if fl, ok := f.fail[name]; ok && fl.nth == f.counts[name] {
		f.mu.Unlock()
		return fl.code
	}
	if name != "cuCtxSetCurrent" && f.current == 0 {
		f.mu.Unlock()
		panic(name + " called with no context current")
	}
	switch name {
	case "cuCtxSetCurrent":
		f.current = args[0]
	case "cuStreamCreate", "cuEventCreate":
		f.next += 0x10
		*(*uintptr)(cptr(args[0])) = f.next
	case "cuMemAllocHost_v2":
		b := make([]byte, args[1])
		p := uintptr(unsafe.Pointer(&b[0]))
		f.pinned[p] = b
		*(*uintptr)(cptr(args[0])) = p
	case "cuMemFreeHost":
		if f.pinned[args[0]] == nil {
			panic("cuMemFreeHost of memory not from cuMemAllocHost")
		}
		delete(f.pinned, args[0])
	case "cuMemcpyDtoHAsync_v2":
		dst, src, n := args[0], args[1], int(args[2])
		inPinned := false
		for p, b := range f.pinned {
			inPinned = inPinned || (dst >= p && dst+uintptr(n) <= p+uintptr(len(b)))
		}
		if !inPinned {
			f.mu.Unlock()
			panic(fmt.Sprintf("cuMemcpyDtoHAsync into %#x, not pinned memory", dst))
		}
		if f.onCopy != nil {
			f.onCopy(dst, n)
		}
		copy(unsafe.Slice((*byte)(cptr(dst)), n), unsafe.Slice((*byte)(cptr(src)), n))
	case "cuEventQuery":
		f.mu.Unlock()
		return f.query
	}
	f.mu.Unlock()
	return 0
}

// driverCalls returns the calls after skip, without the context switches.
func (f *fakeDriver) driverCalls(skip int) []fakeCall {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []fakeCall
	for _, c := range f.calls[skip:] {
		if c.name != "cuCtxSetCurrent" {
			out = append(out, c)
		}
	}
	return out
}

func (f *fakeDriver) ncalls() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.calls)
}

const fakeCtx, callerStream = 0xC0, 0x5EED

func hostAsDev(b []byte) gpu.DevicePtr { return gpu.DevicePtr(uintptr(unsafe.Pointer(&b[0]))) }

// TestCopierEventOrder: CopyToHost records an event on the caller's stream
// before the copy stream waits for it; the copies and the completion event
// are queued on the copier's stream, never on the caller's; every call
// runs with the copier's context current; Wait synchronizes on the
// completion event; events are pooled; Close drains the stream before
// destroying it and frees pinned memory.
func TestCopierEventOrder(t *testing.T) {
	f := newFakeDriver()
	c, err := newCopier(f, fakeCtx)
	if err != nil {
		t.Fatal(err)
	}
	created := f.driverCalls(0)
	if len(created) != 1 || created[0].name != "cuStreamCreate" || created[0].args[1] != streamNonBlock {
		t.Fatalf("creation calls %v: want one non-blocking cuStreamCreate", created)
	}
	copyS := c.stream
	dst, free, err := c.AllocHost(96)
	if err != nil {
		t.Fatal(err)
	}
	src1, src2 := bytes.Repeat([]byte{1}, 64), bytes.Repeat([]byte{2}, 32)
	mark := f.ncalls()
	ev, err := c.CopyToHost(context.Background(), callerStream,
		gpu.Copy{Src: hostAsDev(src1), Bytes: 64, Dst: dst[:64]}, gpu.Copy{Src: hostAsDev(src2), Bytes: 32, Dst: dst[64:]})
	if err != nil {
		t.Fatal(err)
	}
	got := f.driverCalls(mark)
	names := make([]string, len(got))
	for i, g := range got {
		names[i] = g.name
	}
	want := []string{"cuEventCreate", "cuEventCreate", "cuEventRecord", "cuStreamWaitEvent", "cuMemcpyDtoHAsync_v2", "cuMemcpyDtoHAsync_v2", "cuEventRecord"}
	if strings.Join(names, " ") != strings.Join(want, " ") {
		t.Fatalf("calls %v, want %v", got, want)
	}
	rec, done := got[2].args[0], got[6].args[0]
	switch {
	case got[2].args[1] != callerStream:
		t.Fatalf("the first event was recorded on stream %#x, want the caller's %#x", got[2].args[1], callerStream)
	case got[3].args[0] != copyS || got[3].args[1] != rec:
		t.Fatalf("cuStreamWaitEvent%x: want the copy stream %#x waiting on the caller's event %#x", got[3].args, copyS, rec)
	case got[4].args[3] != copyS || got[5].args[3] != copyS || got[6].args[1] != copyS:
		t.Fatalf("copies or the completion event not on the copy stream %#x: %v", copyS, got)
	case got[4].args[0] != uintptr(unsafe.Pointer(&dst[0])) || got[4].args[1] != uintptr(hostAsDev(src1)) || got[4].args[2] != 64:
		t.Fatalf("first copy %x: want dst %p, src %#x, 64 bytes", got[4].args, &dst[0], uintptr(hostAsDev(src1)))
	case done == rec:
		t.Fatal("the completion event is the caller-stream event")
	case got[0].args[1] != eventNoTiming|eventBlockingSync:
		t.Fatalf("events created with flags %d, want no timing and blocking sync", got[0].args[1])
	}
	for _, g := range f.calls[mark:] {
		if g.name == "cuCtxSetCurrent" && g.args[0] != fakeCtx {
			t.Fatalf("context %#x made current, want the copier's %#x", g.args[0], fakeCtx)
		}
	}
	if !bytes.Equal(dst, append(append([]byte(nil), src1...), src2...)) {
		t.Fatal("the copies did not land in the destination")
	}
	mark = f.ncalls()
	for _, q := range []struct {
		code int
		done bool
		err  bool
	}{{errNotReady, false, false}, {0, true, false}, {700, false, true}} {
		f.query = q.code
		d, err := ev.Query()
		if d != q.done || (err != nil) != q.err {
			t.Errorf("Query with cuEventQuery = %d: %v, %v", q.code, d, err)
		}
	}
	if err := ev.Wait(); err != nil {
		t.Fatal(err)
	}
	if w := f.driverCalls(mark); w[len(w)-1].name != "cuEventSynchronize" || w[len(w)-1].args[0] != done {
		t.Fatalf("Wait made %v, want cuEventSynchronize of the completion event", w)
	}
	ev.Release()
	// A second copy reuses both events: no cuEventCreate.
	mark = f.ncalls()
	if _, err := c.CopyToHost(context.Background(), callerStream, gpu.Copy{Src: hostAsDev(src1), Bytes: 64, Dst: dst[:64]}); err != nil {
		t.Fatal(err)
	}
	for _, g := range f.driverCalls(mark) {
		if g.name == "cuEventCreate" {
			t.Fatalf("a new event was created with two in the pool: %v", f.driverCalls(mark))
		}
	}
	if err := free(); err != nil {
		t.Fatal(err)
	}
	if _, _, err := c.AllocHost(8); err != nil {
		t.Fatal(err)
	}
	mark = f.ncalls()
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	cl := f.driverCalls(mark)
	if cl[0].name != "cuStreamSynchronize" || cl[0].args[0] != copyS {
		t.Fatalf("Close began with %v, want cuStreamSynchronize of the copy stream", cl[0])
	}
	var destroyed, streamGone, freed int
	for _, g := range cl {
		switch g.name {
		case "cuEventDestroy_v2":
			destroyed++
		case "cuStreamDestroy_v2":
			streamGone++
		case "cuMemFreeHost":
			freed++
		}
	}
	if destroyed != 2 || streamGone != 1 || freed != 1 || len(f.pinned) != 0 {
		t.Fatalf("Close: %d events destroyed, %d streams, %d frees, %d pinned left; want 2, 1, 1, 0", destroyed, streamGone, freed, len(f.pinned))
	}
}

// TestCopierFailures: a failure to record on the caller's stream queues
// no copy; a failed copy after others were queued drains the copy stream
// before the error returns (no copy still writes into a destination the
// caller gets back); errors name the call.
func TestCopierFailures(t *testing.T) {
	src := bytes.Repeat([]byte{7}, 32)
	for _, c := range []struct {
		fail      string
		nth       int
		want      string
		noCopy    bool
		drained   bool
		copiesMax int
	}{
		{"cuEventRecord", 1, "cuEventRecord on the caller's stream", true, false, 0},
		{"cuStreamWaitEvent", 1, "cuStreamWaitEvent", true, false, 0},
		{"cuMemcpyDtoHAsync_v2", 1, "copy 0 of 32 bytes", true, false, 0},
		{"cuMemcpyDtoHAsync_v2", 2, "copy 1 of 32 bytes", false, true, 2},
		{"cuEventRecord", 2, "cuEventRecord on the copy stream", false, true, 2},
		{"cuEventCreate", 2, "cuEventCreate", true, false, 0},
	} {
		t.Run(fmt.Sprintf("%s#%d", c.fail, c.nth), func(t *testing.T) {
			f := newFakeDriver()
			cp, err := newCopier(f, fakeCtx)
			if err != nil {
				t.Fatal(err)
			}
			dst, _, err := cp.AllocHost(64)
			if err != nil {
				t.Fatal(err)
			}
			f.fail[c.fail] = struct{ nth, code int }{c.nth, 1}
			mark := f.ncalls()
			_, err = cp.CopyToHost(context.Background(), callerStream, gpu.Copy{Src: hostAsDev(src), Bytes: 32, Dst: dst[:32]}, gpu.Copy{Src: hostAsDev(src), Bytes: 32, Dst: dst[32:]})
			if err == nil || !strings.Contains(err.Error(), c.want) || !strings.Contains(err.Error(), "FAKE_ERROR") {
				t.Fatalf("error %v, want one naming %q and the driver's status", err, c.want)
			}
			var copies, syncs int
			for _, g := range f.driverCalls(mark) {
				switch g.name {
				case "cuMemcpyDtoHAsync_v2":
					copies++
				case "cuStreamSynchronize":
					syncs++
				}
			}
			if (c.noCopy && copies > 1) || (c.drained != (syncs == 1)) {
				t.Fatalf("%d copies attempted, %d stream syncs (want drained %v)", copies, syncs, c.drained)
			}
			if err := cp.Close(); err != nil {
				t.Fatal(err)
			}
		})
	}
	f := newFakeDriver()
	cp, err := newCopier(f, fakeCtx)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	mark := f.ncalls()
	if _, err := cp.CopyToHost(ctx, callerStream, gpu.Copy{Src: hostAsDev(src), Bytes: 32, Dst: make([]byte, 32)}); !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled context: %v", err)
	}
	if _, err := cp.CopyToHost(context.Background(), callerStream, gpu.Copy{Src: hostAsDev(src), Bytes: 32, Dst: make([]byte, 16)}); err == nil {
		t.Fatal("a 32-byte copy into 16 bytes was accepted")
	}
	if n := len(f.driverCalls(mark)); n != 0 {
		t.Fatalf("refused copies made %d driver calls", n)
	}
	cp.Close()
}

// writerOnSlots is a serve.DeviceAppender that marks the staging bytes it
// is reading while it appends, so that the fake driver can check that no
// copy lands in staging the writer has not finished with.
type writerOnSlots struct {
	f      *fakeDriver
	gate   chan struct{}
	mu     sync.Mutex
	rows   [][]byte
	tokens int
}

func (w *writerOnSlots) hold(rows [][]byte, on bool) {
	w.f.mu.Lock()
	defer w.f.mu.Unlock()
	for _, r := range rows {
		if len(r) > 0 {
			if on {
				w.f.busy[uintptr(unsafe.Pointer(&r[0]))] = len(r)
			} else {
				delete(w.f.busy, uintptr(unsafe.Pointer(&r[0])))
			}
		}
	}
}

func (w *writerOnSlots) AppendLayer(layer int, rows []byte) error {
	return errors.New("not used")
}

func (w *writerOnSlots) AppendToken(rows [][]byte) error {
	w.hold(rows, true)
	<-w.gate
	w.mu.Lock()
	for l, r := range rows {
		w.rows[l] = append(w.rows[l], r...)
	}
	w.tokens++
	w.mu.Unlock()
	w.hold(rows, false)
	return nil
}

func (w *writerOnSlots) Flush() error { return nil }

// TestCopierUnderDeviceSaver: serve's device saver over the CUDA copier
// (fake driver): every copy lands in pinned staging that no writer is
// reading (staging is released only after the writer has the rows), full
// staging refuses the call, and the rows arrive in order, bit for bit.
func TestCopierUnderDeviceSaver(t *testing.T) {
	f := newFakeDriver()
	f.busy = map[uintptr]int{}
	var violations []string
	f.onCopy = func(dst uintptr, n int) { // f.mu held
		for p, m := range f.busy {
			if dst < p+uintptr(m) && p < dst+uintptr(n) {
				violations = append(violations, fmt.Sprintf("copy into [%#x, +%d) while the writer reads [%#x, +%d)", dst, n, p, m))
			}
		}
	}
	cp, err := newCopier(f, fakeCtx)
	if err != nil {
		t.Fatal(err)
	}
	plan := []state.LayerPlan{{Kind: state.LayerHidden, RowBytes: 48}, {Kind: state.LayerKV, RowBytes: 16}}
	w := &writerOnSlots{f: f, gate: make(chan struct{}), rows: make([][]byte, 2)}
	ds, err := serve.NewDeviceSaver(plan, w, cp, serve.DeviceSaveOptions{StagingBytes: 3 * 64, SlotBytes: 64})
	if err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewSource(4))
	var want [2][]byte
	save := func() error {
		r0, r1 := make([]byte, 48), make([]byte, 16)
		rng.Read(r0)
		rng.Read(r1)
		if _, err := ds.SaveToken(context.Background(), []gpu.DevicePtr{hostAsDev(r0), hostAsDev(r1)}, callerStream); err != nil {
			return err
		}
		want[0], want[1] = append(want[0], r0...), append(want[1], r1...)
		return nil
	}
	for i := range 3 {
		if err := save(); err != nil {
			t.Fatalf("token %d: %v", i, err)
		}
	}
	// Every copy complete: only the writer holds the staging now.
	if err := ds.WaitCopied(3); err != nil {
		t.Fatal(err)
	}
	if err := save(); !errors.Is(err, serve.ErrStagingFull) {
		t.Fatalf("a fourth token with 3 slots and the writer held: %v, want ErrStagingFull", err)
	}
	close(w.gate)
	if err := ds.Flush(); err != nil {
		t.Fatal(err)
	}
	for i := range 20 {
		if err := save(); err != nil {
			if errors.Is(err, serve.ErrStagingFull) {
				if err := ds.Flush(); err != nil {
					t.Fatal(err)
				}
				continue
			}
			t.Fatalf("token %d: %v", 3+i, err)
		}
	}
	if err := ds.Close(); err != nil {
		t.Fatal(err)
	}
	if len(violations) > 0 {
		t.Fatalf("%d copies into staging the writer was reading: %v", len(violations), violations[0])
	}
	if !bytes.Equal(w.rows[0], want[0]) || !bytes.Equal(w.rows[1], want[1]) {
		t.Fatalf("the writer got %d tokens whose rows differ from those saved", w.tokens)
	}
	if err := cp.Close(); err != nil {
		t.Fatal(err)
	}
	if len(f.pinned) != 0 {
		t.Fatalf("%d pinned allocations left after Close", len(f.pinned))
	}
}
