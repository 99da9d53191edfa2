package chunk

import (
	"errors"
	"fmt"
	"sync/atomic"
)

// ErrInvariant is wrapped by every write refused after the store found one
// of its own invariants violated (a bug, not bad input or a failed disk).
// Reads go on; the message names the invariant. Reopening the store clears
// the state (Open rebuilds everything in memory from the index).
var ErrInvariant = errors.New("chunk: an internal invariant was violated; the store refuses writes until it is reopened")

// invariantsPanic makes a violated invariant panic instead of breaking the
// store: the package's tests turn it on in TestMain, so that a violation
// fails them loudly wherever it happens (the flusher included).
var invariantsPanic atomic.Bool

// invariant checks a condition the store's own code guarantees. When it
// does not hold, the store is broken: it logs why, counts it, and refuses
// every later write with ErrInvariant naming the invariant, while restores
// go on. It returns ok, so that the caller can skip what would build on the
// violation (never index what the invariant says is wrong). Safe with or
// without s.mu held.
func (s *Store) invariant(ok bool, format string, args ...any) bool {
	if ok {
		return true
	}
	msg := fmt.Sprintf(format, args...)
	if invariantsPanic.Load() {
		panic("chunk: invariant violated: " + msg)
	}
	s.stats.invariants.Add(1)
	if s.broken.CompareAndSwap(nil, &msg) {
		s.opts.Logf("chunk: %s: invariant violated: %s; the store refuses writes from now on (restores go on); reopen it after saving the log", s.dir, msg)
	} else {
		s.opts.Logf("chunk: %s: invariant violated again: %s", s.dir, msg)
	}
	return false
}

// brokenErr is ErrInvariant with the first violated invariant, or nil.
func (s *Store) brokenErr() error {
	if m := s.broken.Load(); m != nil {
		return fmt.Errorf("%w: %s", ErrInvariant, *m)
	}
	return nil
}
