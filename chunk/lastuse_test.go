package chunk

import (
	"fmt"
	"sync"
	"testing"
	"time"
)

// TestLastUseSurvivesReopen: last-use times (set by Create, Append and
// Restore) are persisted and loaded on open, so eviction after a restart
// follows real use. They used to be written only for restored contexts:
// one created and never restored came back with 1970 and went first.
func TestLastUseSurvivesReopen(t *testing.T) {
	for _, backend := range backends {
		t.Run(backend, func(t *testing.T) {
			e := newEnv(t, backend, nil)
			ident := testIdentity("lastuse")
			s := e.open()
			// a: created, then restored; b: created after that (most
			// recent); c: created first, then continued with Append
			// last of all.
			createFilled(t, s, ident, "c", 16)
			time.Sleep(time.Millisecond) // distinct last-use times
			createFilled(t, s, ident, "a", 16)
			time.Sleep(time.Millisecond)
			verify(t, s, "ns", "a", ident, 16)
			time.Sleep(time.Millisecond)
			createFilled(t, s, ident, "b", 16)
			time.Sleep(time.Millisecond)
			w, err := s.Append("ns", "c", ident)
			if err != nil {
				t.Fatal(err)
			}
			appendTokens(t, w, ident, "c", 16, 32)
			if err := w.Close(); err != nil {
				t.Fatal(err)
			}
			before := map[string]time.Time{}
			for _, ci := range s.Contexts() {
				before[ci.ID] = ci.LastUse
			}
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			s = e.open()
			for _, ci := range s.Contexts() {
				if ci.LastUse.Year() < 2000 || !ci.LastUse.Equal(before[ci.ID]) {
					t.Errorf("%s: last use %v after reopen, %v before", ci.ID, ci.LastUse, before[ci.ID])
				}
			}
			if !(before["a"].Before(before["b"]) && before["b"].Before(before["c"])) {
				t.Fatalf("last uses before the restart: %v, want a < b < c", before)
			}
			recBytes := s.Contexts()[1].LiveBytes // b: one 16-token group
			s.Close()
			// Reopen with room for about five such groups (a, b, two of
			// c); each new context then evicts the least recently used.
			var mu sync.Mutex
			var evicted []string
			e.opts.CapacityBytes = 5*recBytes - 1
			e.opts.OnEvict = func(ns, id string) { mu.Lock(); evicted = append(evicted, id); mu.Unlock() }
			s = e.open()
			defer s.Close()
			createFilled(t, s, ident, "d", 16)
			createFilled(t, s, ident, "e", 16)
			var got string
			for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
				mu.Lock()
				got = fmt.Sprint(evicted)
				mu.Unlock()
				if len(got) >= len("[a b]") {
					break
				}
			}
			if got != "[a b]" {
				t.Fatalf("evicted %s after the restart, want [a b] (least recently used first)", got)
			}
		})
	}
}
