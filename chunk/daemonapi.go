package chunk

import (
	"time"

	"github.com/hcache/hcache/lsm"
)

// This file holds the small store API the daemon (package daemon) needs
// beyond what the library's own callers use.

// Abandon releases the writer without flushing: rows not yet flushed are
// dropped (whole groups already handed to the flusher may still become
// durable, always as a prefix of the context). The daemon calls it for the
// writers of a client whose connection ended.
func (w *Writer) Abandon() { w.abandon(ErrClosed) }

// NumContexts counts the live contexts.
func (s *Store) NumContexts() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for _, c := range s.ctxs {
		if !c.deleted {
			n++
		}
	}
	return n
}

// Context describes one context, or returns ErrNotFound.
func (s *Store) Context(ns, id string) (ContextInfo, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	c, err := s.lookup(ns, id)
	if err != nil {
		return ContextInfo{}, err
	}
	return ContextInfo{
		Namespace: c.ns, ID: c.id, Tokens: c.rec.Tokens, Gen: c.rec.Gen, LiveBytes: c.live,
		Pinned: c.rec.Flags&lsm.FlagPinned != 0, Damaged: c.rec.Flags&lsm.FlagDamaged != 0,
		LastUse: unixNanos(c.lastUse), Identity: c.ident,
	}, nil
}

func unixNanos(n int64) time.Time { return time.Unix(0, n) }
