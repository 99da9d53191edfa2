package iouring

import (
	"errors"
	"runtime"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestCloseWhileSubmitWaitsForSlot: Close while a submitter waits for an
// in-flight slot must not deadlock (the waiting submitter used to hold the
// lock that Close and the ring goroutine needed). The ring is full of pipe
// reads that complete only after Close was called; the waiting submitters
// get ErrClosed (or a slot), Close returns once the reads complete.
func TestCloseWhileSubmitWaitsForSlot(t *testing.T) {
	e, err := New(Config{Kind: "io_uring", Entries: 4, Logf: t.Logf})
	if err != nil {
		t.Fatalf("io_uring: %v", err)
	}
	r, ok := e.(*Ring)
	if !ok {
		t.Fatalf("engine %T is not a ring", e)
	}
	var p [2]int
	if err := unix.Pipe(p[:]); err != nil {
		t.Fatal(err)
	}
	defer unix.Close(p[0])
	defer unix.Close(p[1])
	read := func() *Request { return &Request{Op: OpRead, Fd: p[0], Buf: make([]byte, 1)} }
	capacity := cap(r.free)
	first := make([]*Request, capacity)
	for i := range first {
		first[i] = read()
	}
	if err := r.Submit(first, func(*Request) {}); err != nil {
		t.Fatal(err)
	}
	waiters := capacity + 2 // more than the slots the first batch frees
	results := make(chan error, waiters)
	for i := 0; i < waiters; i++ {
		go func() { results <- r.Submit([]*Request{read()}, func(*Request) {}) }()
	}
	time.Sleep(50 * time.Millisecond) // let them block on a slot (not an assertion)
	closed := make(chan error, 1)
	go func() { closed <- r.Close() }()
	time.Sleep(50 * time.Millisecond)
	// Complete the first batch: its slots go to some of the waiters, whose
	// reads then stay in flight while the others still wait for a slot.
	if _, err := unix.Write(p[1], make([]byte, capacity)); err != nil {
		t.Fatal(err)
	}
	time.Sleep(50 * time.Millisecond)
	// Complete every read that may be in flight.
	if _, err := unix.Write(p[1], make([]byte, waiters)); err != nil {
		t.Fatal(err)
	}
	watchdog := time.After(20 * time.Second) // a hang, not a speed limit
	for i := 0; i < waiters; i++ {
		select {
		case err := <-results:
			if err != nil && !errors.Is(err, ErrClosed) {
				t.Fatalf("waiting Submit: %v", err)
			}
		case <-watchdog:
			t.Fatal("a Submit waiting for a slot never returned after Close")
		}
	}
	select {
	case err := <-closed:
		if err != nil {
			t.Fatal(err)
		}
	case <-watchdog:
		t.Fatal("Close deadlocked with a Submit waiting for a slot")
	}
	if err := r.Submit([]*Request{read()}, func(*Request) {}); !errors.Is(err, ErrClosed) {
		t.Fatalf("Submit after Close: %v, want ErrClosed", err)
	}
}

// TestRingWaitsInNetpoller: while requests are in flight and nothing has
// completed, the ring goroutine waits parked in the netpoller ("IO wait"),
// not in a system call ("syscall"): a goroutine blocked in io_uring_enter
// keeps its P until sysmon takes it back, up to 10 ms later, which stalled
// CPU-bound goroutines (a projection) beside every restore. The read then
// completes when its data arrives.
func TestRingWaitsInNetpoller(t *testing.T) {
	r, err := NewRing(8)
	if err != nil {
		t.Fatalf("io_uring: %v", err)
	}
	defer r.Close()
	var p [2]int
	if err := unix.Pipe(p[:]); err != nil {
		t.Fatal(err)
	}
	defer unix.Close(p[0])
	defer unix.Close(p[1])
	q := &Request{Op: OpRead, Fd: p[0], Buf: make([]byte, 3)}
	done := make(chan struct{})
	if err := r.Submit([]*Request{q}, func(*Request) { close(done) }); err != nil {
		t.Fatal(err)
	}
	// The ring goroutine's state, from a dump of every goroutine.
	state := func() string {
		buf := make([]byte, 1<<20)
		for _, g := range strings.Split(string(buf[:runtime.Stack(buf, true)]), "\n\n") {
			if strings.Contains(g, "iouring.(*Ring).loop") {
				head := g[:strings.Index(g, "\n")]
				return head[strings.Index(head, "[")+1 : strings.Index(head, "]")]
			}
		}
		return "gone"
	}
	deadline := time.Now().Add(20 * time.Second) // a hang, not a speed limit
	var st string
	for st = state(); !strings.HasPrefix(st, "IO wait") && time.Now().Before(deadline); st = state() {
		if strings.HasPrefix(st, "syscall") {
			t.Fatalf("the ring goroutine waits in a system call (%q), holding its P", st)
		}
		time.Sleep(time.Millisecond)
	}
	if !strings.HasPrefix(st, "IO wait") {
		t.Fatalf("the ring goroutine is %q with a read in flight, want parked in the netpoller (IO wait)", st)
	}
	if _, err := unix.Write(p[1], []byte("abc")); err != nil {
		t.Fatal(err)
	}
	select {
	case <-done:
	case <-time.After(20 * time.Second):
		t.Fatal("the read never completed after its data arrived")
	}
	if q.Err != nil || string(q.Buf[:q.N]) != "abc" {
		t.Fatalf("read %q, %v; want \"abc\"", q.Buf[:q.N], q.Err)
	}
}

// TestSubmitAfterCloseTouchesNoFile: a Submit after Close wakes nothing:
// the ring's eventfd is closed and its number may already belong to another
// file, which a stray wake-up write would corrupt.
func TestSubmitAfterCloseTouchesNoFile(t *testing.T) {
	r, err := NewRing(8)
	if err != nil {
		t.Fatalf("io_uring: %v", err)
	}
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	var p [2]int // takes the lowest free numbers: the eventfd's among them
	if err := unix.Pipe2(p[:], unix.O_NONBLOCK); err != nil {
		t.Fatal(err)
	}
	defer unix.Close(p[0])
	defer unix.Close(p[1])
	if err := r.Submit([]*Request{{Op: OpNop}}, func(*Request) {}); !errors.Is(err, ErrClosed) {
		t.Fatalf("Submit after Close: %v, want ErrClosed", err)
	}
	buf := make([]byte, 64)
	if n, _ := unix.Read(p[0], buf); n > 0 {
		t.Fatalf("Submit after Close wrote %d bytes into an unrelated descriptor", n)
	}
}
