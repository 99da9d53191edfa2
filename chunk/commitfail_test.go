package chunk

import (
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/cockroachdb/pebble/v2/vfs"
	"github.com/cockroachdb/pebble/v2/vfs/errorfs"
)

// TestFailedCommitThenInFlightTail is the interleaving behind a CI flake of
// TestIndexCommitFailure: an idle commit of a full group fails (its WAL sync
// is refused), and a Flush's tail group, submitted while that commit was
// still under way (so before the store refused writes), is committed after
// it. The failed commit never advanced the context's token count, so
// indexing the tail would leave a gap: the flusher hit the invariant
// "would leave a gap after the N tokens indexed". The tail must instead
// fail with the commit's error, with no invariant violated, and what was
// acknowledged before survives a power cut.
//
// Deterministic: the WAL sync of the idle commit blocks on a gate until the
// tail's segment write has started.
func TestFailedCommitThenInFlightTail(t *testing.T) {
	ident := testIdentity("m")
	tokens := promptTokens(3, 40)
	cases := []struct {
		name    string
		create  func(s *Store) (*Writer, error)
		append  func(t *testing.T, w *Writer, from, to int)
		restore func(t *testing.T, s *Store) (int, error)
	}{
		{"plain context",
			func(s *Store) (*Writer, error) { return s.Create("ns", "c", ident, CreateOptions{}) },
			func(t *testing.T, w *Writer, from, to int) { appendTokens(t, w, ident, "c", from, to) },
			func(t *testing.T, s *Store) (int, error) {
				return s.Restore("ns", "c", ident, func(int, []byte) error { return nil })
			}},
		{"token-addressed context",
			func(s *Store) (*Writer, error) {
				w, _, err := s.CreateTokens("ns", "c", ident, tokens, CreateOptions{})
				return w, err
			},
			func(t *testing.T, w *Writer, from, to int) {
				for l, p := range ident.Plan {
					if p.Kind == LayerNone {
						continue
					}
					if err := w.AppendLayer(l, prefixLayer(tokens, l, from, to, int(p.RowBytes))); err != nil {
						t.Fatalf("AppendLayer %d: %v", l, err)
					}
				}
			},
			func(t *testing.T, s *Store) (int, error) {
				return s.Restore("ns", "c", ident, func(layer int, rows []byte) error {
					rb := int(ident.Plan[layer].RowBytes)
					if want := prefixLayer(tokens, layer, 0, len(rows)/rb, rb); string(rows) != string(want) {
						t.Fatalf("layer %d: restored rows differ from those saved", layer)
					}
					return nil
				})
			}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) { failedCommitThenInFlightTail(t, tc.create, tc.append, tc.restore) })
	}
}

func failedCommitThenInFlightTail(t *testing.T, create func(s *Store) (*Writer, error), appendRows func(t *testing.T, w *Writer, from, to int), restore func(t *testing.T, s *Store) (int, error)) {
	invariantsPanic.Store(false) // the old code's violation is reported, not a crash
	defer invariantsPanic.Store(true)
	var walArmed, segArmed atomic.Bool
	entered, gate, tailWritten := make(chan struct{}), make(chan struct{}), make(chan struct{})
	var enterOnce, tailOnce sync.Once
	inj := errorfs.InjectorFunc(func(op errorfs.Op) error {
		switch {
		case (op.Kind == errorfs.OpFileSync || op.Kind == errorfs.OpFileSyncData) && strings.HasSuffix(op.Path, ".log") && walArmed.Load():
			enterOnce.Do(func() { close(entered); <-gate })
			return errorfs.ErrInjected
		case (op.Kind == errorfs.OpFileWrite || op.Kind == errorfs.OpFileWriteAt) && strings.Contains(op.Path, "seg-") && segArmed.Load():
			tailOnce.Do(func() { close(tailWritten) })
		}
		return nil
	})
	mem := vfs.NewCrashableMem()
	opts := Options{FS: errorfs.Wrap(mem, inj), Dir: "/s", ChunkTokens: 16, SegmentBytes: 1 << 20, GCInterval: -1, Logf: t.Logf}
	s, err := Open(opts)
	if err != nil {
		t.Fatal(err)
	}
	w, err := create(s)
	if err != nil {
		t.Fatal(err)
	}
	appendRows(t, w, 0, 20)
	if err := w.Flush(); err != nil {
		t.Fatal(err)
	}
	// Group 1 fills up and goes to the flusher; idle, it commits it, and
	// that commit's WAL sync waits at the gate.
	walArmed.Store(true)
	appendRows(t, w, 20, 40)
	<-entered
	// The store has not failed yet: the Flush's tail (tokens 32-40) is
	// accepted and written.
	segArmed.Store(true)
	flushed := make(chan error, 1)
	go func() { flushed <- w.Flush() }()
	<-tailWritten
	close(gate) // the commit of group 1 fails
	err = <-flushed
	if err == nil || errors.Is(err, ErrInvariant) || !strings.Contains(err.Error(), errorfs.ErrInjected.Error()) {
		t.Fatalf("flush after the failed commit: %v; want the failed commit's error (the injected WAL sync error)", err)
	}
	if err := s.brokenErr(); err != nil {
		t.Fatalf("an invariant was violated: %v", err)
	}
	if n := s.Stats().InvariantViolations; n != 0 {
		t.Fatalf("%d invariant violations", n)
	}
	walArmed.Store(false)
	if err := s.Close(); err != nil {
		t.Logf("close of the failed store: %v", err)
	}
	// Power cut, reopen: the acknowledged 20 tokens are there, and the
	// index is consistent.
	o := opts
	o.FS = mem.CrashClone(vfs.CrashCloneCfg{})
	s2, err := Open(o)
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	n, err := restore(t, s2)
	if err != nil || n < 20 {
		t.Fatalf("after reopen: %d tokens, %v; want at least the 20 acknowledged", n, err)
	}
	if r := s2.Check(nil); !r.OK() {
		t.Fatal(r.Errors)
	}
}
