package chunk

import (
	"errors"
	"strings"
	"sync"
	"testing"
)

// TestInvariantBreaksStore: in production (invariants not panicking) a
// violated invariant leaves the store refusing every write with
// ErrInvariant naming it, serving restores, logging it and showing it in
// Stats; what is stored stays as it was, and a reopen clears the state.
func TestInvariantBreaksStore(t *testing.T) {
	invariantsPanic.Store(false)
	defer invariantsPanic.Store(true)
	ident := testIdentity("inv")
	cases := []struct {
		name string
		// violate breaks an invariant with w (a writer of "open" holding
		// 20 unflushed tokens) and returns what Stats.Broken must contain.
		violate func(t *testing.T, s *Store, w *Writer) string
	}{
		{"group committed for a writer that is gone", func(t *testing.T, s *Store, w *Writer) string {
			s.mu.Lock()
			w.c.writerSeq++ // as if another writer had opened the context
			s.mu.Unlock()
			if err := w.Flush(); !errors.Is(err, ErrInvariant) {
				t.Errorf("Flush of the stale writer: %v, want ErrInvariant", err)
			}
			return "which is gone"
		}},
		{"staging slabs with the flusher below zero", func(t *testing.T, s *Store, w *Writer) string {
			if err := w.Flush(); err != nil { // no slab with the flusher now
				t.Fatal(err)
			}
			s.staging.handOff(-1)
			return "slabs with the flusher"
		}},
		{"segment reference below zero", func(t *testing.T, s *Store, w *Writer) string {
			s.mu.Lock()
			var sg *segFile
			for _, x := range s.segs {
				sg = x
			}
			s.unref([]*segFile{sg})
			s.mu.Unlock()
			return "restores reading it"
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, "mem", nil)
			var mu sync.Mutex
			var logged []string
			e.opts.Logf = func(f string, a ...any) {
				mu.Lock()
				logged = append(logged, f)
				mu.Unlock()
				t.Logf(f, a...)
			}
			s := e.open()
			createFilled(t, s, ident, "kept", 40)
			w, err := s.Create("ns", "open", ident, CreateOptions{})
			if err != nil {
				t.Fatal(err)
			}
			appendTokens(t, w, ident, "open", 0, 20)
			want := tc.violate(t, s, w)
			st := s.Stats()
			if st.InvariantViolations == 0 || !strings.Contains(st.Broken, want) {
				t.Fatalf("Stats: %d violations, Broken %q; want it to name %q", st.InvariantViolations, st.Broken, want)
			}
			mu.Lock()
			sawLog := strings.Contains(strings.Join(logged, "\n"), "invariant violated")
			mu.Unlock()
			if !sawLog {
				t.Error("the violation was not logged")
			}
			refused := func(what string, err error) {
				t.Helper()
				if !errors.Is(err, ErrInvariant) || !strings.Contains(err.Error(), want) {
					t.Errorf("%s: %v, want ErrInvariant naming %q", what, err, want)
				}
			}
			_, err = s.Create("ns", "new", ident, CreateOptions{})
			refused("Create", err)
			_, err = s.Append("ns", "kept", ident)
			refused("Append", err)
			refused("AppendToken", w.AppendToken(make([][]byte, len(ident.Plan))))
			refused("AppendLayer", w.AppendLayer(0, make([]byte, 128)))
			refused("Delete", s.Delete("ns", "kept"))
			refused("GC", s.GC().Err)
			verify(t, s, "ns", "kept", ident, 40) // reads go on
			w.Abandon()
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			s = e.open()
			defer s.Close()
			if st := s.Stats(); st.Broken != "" {
				t.Errorf("after a reopen: Broken %q", st.Broken)
			}
			verify(t, s, "ns", "kept", ident, 40)
			w2, err := s.Create("ns", "again", ident, CreateOptions{})
			if err != nil {
				t.Fatalf("Create after a reopen: %v", err)
			}
			appendTokens(t, w2, ident, "again", 0, 20)
			if err := w2.Close(); err != nil {
				t.Fatal(err)
			}
			verify(t, s, "ns", "again", ident, 20)
			if r := s.Check(nil); !r.OK() {
				t.Fatalf("fsck: %v", r.Errors)
			}
		})
	}
}

// TestInvariantPanicsInTests: with the package's tests' setting, a
// violation panics where it happens.
func TestInvariantPanicsInTests(t *testing.T) {
	s := newEnv(t, "mem", nil).open()
	defer s.Close()
	defer func() {
		if r := recover(); r == nil || !strings.Contains(r.(string), "invariant violated: the test's") {
			t.Fatalf("recovered %v, want the invariant's panic", r)
		}
	}()
	s.invariant(false, "the test's %s", "violation")
}
