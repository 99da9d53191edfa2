package chunk

import (
	randv2 "math/rand/v2"
	"sync"
	"testing"

	"github.com/cockroachdb/pebble/v2/vfs"
)

// TestEvictOneAndClock: with the store's clock set by the caller, EvictOne
// takes the least recently used contexts (by that clock) until one holding
// bytes has gone, skipping pinned ones and ones with an open writer, and
// reports each through OnEvict.
func TestEvictOneAndClock(t *testing.T) {
	for _, backend := range backends {
		t.Run(backend, func(t *testing.T) {
			var mu sync.Mutex
			now := int64(1000)
			var evicted []string
			e := newEnv(t, backend, func(o *Options) {
				o.CapacityBytes = -1
				o.GCInterval = -1
				o.Now = func() int64 { mu.Lock(); defer mu.Unlock(); return now }
				o.OnEvict = func(ns, id string) { mu.Lock(); evicted = append(evicted, id); mu.Unlock() }
			})
			s := e.open()
			defer s.Close()
			ident := testIdentity("m")
			tick := func() { mu.Lock(); now += 1000; mu.Unlock() }
			// Created in this order: a (10 tokens), empty (none), pinned
			// (10, pinned), b (10), open (10, writer left open), c (10).
			mk := func(id string, tokens int, pinned, close bool) {
				tick()
				w, err := s.Create("ns", id, ident, CreateOptions{Pinned: pinned})
				if err != nil {
					t.Fatal(err)
				}
				appendTokens(t, w, ident, id, 0, tokens)
				if close {
					if err := w.Close(); err != nil {
						t.Fatal(err)
					}
				} else if err := w.Flush(); err != nil {
					t.Fatal(err)
				}
			}
			mk("a", 10, false, true)
			mk("empty", 0, false, true)
			mk("pinned", 10, true, true)
			mk("b", 10, false, true)
			mk("open", 10, false, false)
			mk("c", 10, false, true)
			tick()
			verify(t, s, "ns", "a", ident, 10) // a is now the most recently used
			for _, c := range s.Contexts() {
				if c.ID == "a" && c.LastUse.UnixNano() != now {
					t.Fatalf("a's last use %d, want the clock's %d", c.LastUse.UnixNano(), now)
				}
			}
			steps := []struct {
				want []string
			}{
				{[]string{"empty", "b"}}, // the empty one goes first, then the first with bytes
				{[]string{"c"}},
				{[]string{"a"}},
				{nil}, // only pinned and open are left
			}
			for i, st := range steps {
				mu.Lock()
				evicted = nil
				mu.Unlock()
				n, err := s.EvictOne()
				if err != nil {
					t.Fatal(err)
				}
				mu.Lock()
				got := append([]string(nil), evicted...)
				mu.Unlock()
				if n != len(st.want) || len(got) != len(st.want) {
					t.Fatalf("step %d: evicted %d %v, want %v", i, n, got, st.want)
				}
				for j := range got {
					if got[j] != st.want[j] {
						t.Fatalf("step %d: evicted %v, want %v", i, got, st.want)
					}
				}
			}
			// No candidate holds bytes (pinned and open do): every
			// empty candidate goes, whatever the others hold.
			mk("e1", 0, false, true)
			mk("e2", 0, false, true)
			mu.Lock()
			evicted = nil
			mu.Unlock()
			if n, err := s.EvictOne(); err != nil || n != 2 || len(evicted) != 2 || evicted[0] != "e1" || evicted[1] != "e2" {
				t.Fatalf("only empty candidates: evicted %d %v (%v), want [e1 e2]", n, evicted, err)
			}
			if _, err := s.Restore("ns", "b", ident, func(int, []byte) error { return nil }); err == nil {
				t.Fatal("an evicted context restores")
			}
			verify(t, s, "ns", "pinned", ident, 10)
		})
	}
}

// TestSynchronousSettles: with Options.Synchronous, a write handed to the
// flusher has been written when AppendToken returns, and is not committed
// until a Flush (no idle commit): a crash clone taken then holds no token of
// it, and one taken after the Flush holds all.
func TestSynchronousSettles(t *testing.T) {
	mem := vfs.NewCrashableMem()
	o := Options{FS: mem, Dir: "/s", ChunkTokens: 4, SegmentBytes: MinSegmentBytes, GCInterval: -1, Synchronous: true, Logf: t.Logf}
	s, err := Open(o)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	ident := testIdentity("m")
	w, err := s.Create("ns", "x", ident, CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	appendTokens(t, w, ident, "x", 0, 8) // two full groups handed over
	if st := s.Stats(); st.BytesWritten == 0 {
		t.Fatalf("nothing written when AppendToken returned: %+v", st)
	}
	tokensIn := func() uint64 {
		c := mem.CrashClone(vfs.CrashCloneCfg{UnsyncedDataPercent: 100, RNG: randv2.New(randv2.NewPCG(1, 2))})
		o2 := o
		o2.FS, o2.Synchronous = c, false
		s2, err := Open(o2)
		if err != nil {
			t.Fatal(err)
		}
		defer s2.Close()
		for _, ci := range s2.Contexts() {
			if ci.ID == "x" {
				return ci.Tokens
			}
		}
		return 0
	}
	if n := tokensIn(); n != 0 {
		t.Fatalf("%d tokens committed before any Flush (an idle commit)", n)
	}
	if err := w.Flush(); err != nil {
		t.Fatal(err)
	}
	if n := tokensIn(); n != 8 {
		t.Fatalf("%d tokens after Flush, want 8", n)
	}
}

// TestEvictOneWithNothingLive: with no byte live anywhere (a writer's rows
// still staged), EvictOne still takes the empty candidates, as it does when
// another configuration's writer has committed a group: which contexts go
// does not depend on chunk size (the metamorphic crash test found that).
func TestEvictOneWithNothingLive(t *testing.T) {
	s, err := Open(Options{FS: vfs.NewMem(), Dir: "/s", ChunkTokens: 16, GCInterval: -1, Logf: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	ident := testIdentity("m")
	w, err := s.Create("ns", "w", ident, CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	appendTokens(t, w, ident, "w", 0, 5) // staged, not a full group
	e, err := s.Create("ns", "e", ident, CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	if n, err := s.EvictOne(); err != nil || n != 1 {
		t.Fatalf("evicted %d (%v), want the empty context", n, err)
	}
	if _, err := s.Context("ns", "e"); err == nil {
		t.Fatal("the empty context is still there")
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	verify(t, s, "ns", "w", ident, 5)
}
