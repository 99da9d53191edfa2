package chunk

import (
	"errors"
	"testing"
)

// TestAbandonThenReopenExact is issue 16's interleaving, as reported: a
// writer abandoned with whole groups still with the flusher, the context
// reopened at once. Append must report what a restore will see, and the
// new writer's acknowledged rows must restore, also after a restart.
func TestAbandonThenReopenExact(t *testing.T) {
	for _, backend := range backends {
		t.Run(backend, func(t *testing.T) {
			e := newEnv(t, backend, func(o *Options) { o.ChunkTokens = 64 })
			ident := testIdentity("abandon")
			for round := 0; round < 5; round++ {
				s := e.open()
				id := "ctx"
				w, err := s.Create("ns", id, ident, CreateOptions{})
				if err != nil {
					t.Fatal(err)
				}
				appendTokens(t, w, ident, id, 0, 64)
				if err := w.Flush(); err != nil {
					t.Fatal(err)
				}
				appendTokens(t, w, ident, id, 64, 192)
				w.Abandon()
				w2, err := s.Append("ns", id, ident)
				if err != nil {
					t.Fatalf("round %d: Append after Abandon: %v", round, err)
				}
				n := w2.Tokens()
				if n != 192 {
					t.Errorf("round %d: Append after Abandon reports %d tokens, want 192 (the abandoned writer's whole groups)", round, n)
				}
				// Go on from what Append reported: its Close is
				// acknowledged, so exactly that must restore.
				appendTokens(t, w2, ident, id, n, n+36)
				if err := w2.Close(); err != nil {
					t.Fatalf("round %d: Close: %v", round, err)
				}
				verify(t, s, "ns", id, ident, n+36)
				if err := s.Close(); err != nil {
					t.Fatal(err)
				}
				s = e.open()
				verify(t, s, "ns", id, ident, n+36)
				if r := s.Check(nil); !r.OK() {
					t.Fatalf("round %d: fsck: %v", round, r.Errors)
				}
				if err := s.Delete("ns", id); err != nil && !errors.Is(err, ErrNotFound) {
					t.Fatal(err)
				}
				s.Close()
			}
		})
	}
}
