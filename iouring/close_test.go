package iouring

import (
	"errors"
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
