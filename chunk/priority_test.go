package chunk

import (
	"runtime"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/hcache/hcache/iouring"
)

// waitFor yields until cond holds (no deadline: a hang is the failure, and
// the test binary's -timeout reports it).
func waitFor(cond func() bool) {
	for !cond() {
		runtime.Gosched()
	}
}

// TestReadGate: admission is in arrival order within the bound; a later
// request that would fit does not pass an earlier one that does not; one
// larger than the bound is admitted once nothing else is; no bound admits
// everything at once.
func TestReadGate(t *testing.T) {
	for _, c := range []struct {
		name  string
		limit int64
		held  int64   // admitted first
		later []int64 // then requested, in this order
		// admitted (by index into later) while held is still held
		before []int
	}{
		{"fits beside", 10, 4, []int64{6}, []int{0}},
		{"earlier waiter blocks a later one that fits", 10, 6, []int64{6, 1}, nil},
		{"larger than the bound waits for an empty gate", 10, 1, []int64{20}, nil},
		{"no bound", 0, 100, []int64{100, 100}, []int{0, 1}},
	} {
		t.Run(c.name, func(t *testing.T) {
			g := &readGate{limit: c.limit}
			g.acquire(c.held)
			admitted := make([]atomic.Bool, len(c.later))
			var wg sync.WaitGroup
			for i, n := range c.later {
				wg.Add(1)
				go func() {
					defer wg.Done()
					g.acquire(n)
					admitted[i].Store(true)
				}()
				// In order: each waits (or is admitted) before the next asks.
				waitFor(func() bool { return admitted[i].Load() || g.waiting() > i-len(c.before) })
			}
			want := map[int]bool{}
			for _, i := range c.before {
				want[i] = true
				waitFor(admitted[i].Load)
			}
			if w := g.waiting(); w != len(c.later)-len(c.before) {
				t.Fatalf("%d waiting, want %d", w, len(c.later)-len(c.before))
			}
			for i := range c.later {
				if admitted[i].Load() != want[i] {
					t.Errorf("request %d (%d bytes) admitted = %v beside %d held, want %v", i, c.later[i], admitted[i].Load(), c.held, want[i])
				}
			}
			g.release(c.held)
			wg.Wait() // every waiter is admitted once the first is gone
			if g.reading.Load() != int32(len(c.later)) {
				t.Errorf("reading %d, want %d", g.reading.Load(), len(c.later))
			}
		})
	}
}

// TestRestoresAdmittedInArrivalOrder: with room for one restore at a time,
// a second restore does not read while the first is still reading (it
// waits for admission, and its callback has not run), and it runs once the
// first's reads are done. Before admission existed every restore read at
// once, so sixteen concurrent restores shared the disk evenly and each took
// as long as all of them (issue 20).
func TestRestoresAdmittedInArrivalOrder(t *testing.T) {
	ident := bigIdentity()
	s := newEnv(t, "disk", func(o *Options) { o.RestoreQueueBytes = 1 }).open()
	defer s.Close()
	createFilled(t, s, ident, "a", 300)
	createFilled(t, s, ident, "b", 300)

	// A's consumer keeps layer 0 and does not release it: with two
	// buffers A cannot start its third layer, so it is still reading.
	hold := make(chan struct{})
	var unhold sync.Once
	defer unhold.Do(func() { close(hold) }) // before Close, which waits for A
	aGot := make(chan struct{})
	aDone := make(chan error, 1)
	go func() {
		first := true
		_, err := s.RestoreOwned("ns", "a", ident, 2, func(layer int, rows []byte, release func()) error {
			if first {
				first = false
				close(aGot)
				<-hold
			}
			release()
			return nil
		})
		aDone <- err
	}()
	<-aGot
	var bRan atomic.Bool
	bDone := make(chan error, 1)
	go func() {
		_, err := s.Restore("ns", "b", ident, func(int, []byte) error { bRan.Store(true); return nil })
		bDone <- err
	}()
	waitFor(func() bool { return s.gate.waiting() == 1 || bRan.Load() })
	if bRan.Load() {
		t.Fatal("the second restore read while the first was still reading")
	}
	unhold.Do(func() { close(hold) })
	if err := <-aDone; err != nil {
		t.Fatal(err)
	}
	if err := <-bDone; err != nil {
		t.Fatal(err)
	}
	if !bRan.Load() {
		t.Fatal("the second restore never ran")
	}
	if st := s.RestoreStages(); st.Restores != 2 || st.Queued <= 0 {
		t.Errorf("stages %+v: want 2 restores, one of them queued", st)
	}
}

// TestSlowConsumerHoldsNoOneBack: a restore whose reads have all landed
// leaves admission although its consumer still holds its buffers, so
// another restore runs to completion meanwhile ("admission that does not
// hold a restore behind another's buffers", issue 20).
func TestSlowConsumerHoldsNoOneBack(t *testing.T) {
	ident := testIdentity("slow") // three stored layers
	s := newEnv(t, "disk", func(o *Options) { o.RestoreQueueBytes = 1 }).open()
	defer s.Close()
	createFilled(t, s, ident, "a", 100)
	createFilled(t, s, ident, "b", 100)
	hold := make(chan struct{})
	aGot := make(chan struct{})
	aDone := make(chan error, 1)
	go func() {
		// Enough buffers for every layer: all are read at once, and the
		// consumer sits on the first.
		_, err := s.RestoreOwned("ns", "a", ident, 8, func(layer int, rows []byte, release func()) error {
			if layer == 0 {
				close(aGot)
				<-hold
			}
			release()
			return nil
		})
		aDone <- err
	}()
	<-aGot
	// A leaves admission once its last reads have landed, its consumer
	// still blocked (if it never does, this waits until the test binary's
	// -timeout fails it), and B then runs to completion meanwhile.
	waitFor(func() bool { return s.gate.reading.Load() == 0 })
	verify(t, s, "ns", "b", ident, 100)
	close(hold)
	if err := <-aDone; err != nil {
		t.Fatal(err)
	}
}

// writeCounter counts the bytes of writes in flight through it.
type writeCounter struct {
	iouring.Engine
	inflight, peak atomic.Int64
}

func (w *writeCounter) Submit(reqs []*iouring.Request, done func(*iouring.Request)) error {
	var n int64
	for _, r := range reqs {
		n += writeLen(r)
	}
	if n == 0 {
		return w.Engine.Submit(reqs, done)
	}
	if v := w.inflight.Add(n); v > w.peak.Load() {
		w.peak.Store(v)
	}
	return w.Engine.Submit(reqs, func(r *iouring.Request) {
		w.inflight.Add(-writeLen(r))
		done(r)
	})
}

func writeLen(r *iouring.Request) int64 {
	var n int64
	switch r.Op {
	case iouring.OpWrite:
		n = int64(len(r.Buf))
	case iouring.OpWritev:
		for _, b := range r.Iovecs {
			n += int64(len(b))
		}
	}
	return n
}

// TestFlusherWriteBytesBound: the flusher keeps at most WriteBytes of
// writes in flight (the last one may pass it), and at most
// WriteBytesUnderRestores while a restore is being read. Before, it kept
// QueueDepth groups in flight, and with real groups (16 MiB for Llama2-7B)
// half a gigabyte sat in front of every fdatasync and restore read.
func TestFlusherWriteBytesBound(t *testing.T) {
	ident := bigIdentity() // a 16-token group: 4 x 32 KiB + 64 KiB + header = 196 KiB
	const group = 196 << 10
	for _, c := range []struct {
		name    string
		reading bool
		bound   int64
	}{
		{"WriteBytes", false, 4 * group},
		{"WriteBytesUnderRestores", true, group},
	} {
		t.Run(c.name, func(t *testing.T) {
			real, err := iouring.New(iouring.Config{})
			if err != nil {
				t.Fatal(err)
			}
			defer real.Close()
			wc := &writeCounter{Engine: real}
			s := newEnv(t, "disk", func(o *Options) {
				o.Engine = wc
				o.WriteBytes, o.WriteBytesUnderRestores = 4*group, group
			}).open()
			defer s.Close()
			if c.reading {
				s.gate.acquire(1) // a restore being read
				defer s.gate.release(1)
			}
			createFilled(t, s, ident, "ctx", 64*16) // 64 groups at once
			if p := wc.peak.Load(); p == 0 || p > c.bound+group {
				t.Errorf("peak %d bytes of writes in flight, want within %d (+ one group of %d)", p, c.bound, group)
			}
		})
	}
}
