package chunk

import (
	"time"

	"github.com/hcache/hcache/lsm"
)

// This file holds the small store API the daemon (package daemon) needs
// beyond what the library's own callers use.

// Abandon releases the writer without flushing. Precisely:
//
//   - every whole chunk group (ChunkTokens tokens complete in every stored
//     layer) is handed to the flusher as it fills, and a handed group is
//     not taken back: it still becomes durable (unless its write fails),
//     after the groups before it, so the context grows by a prefix;
//   - what was never handed is dropped: the partial last group, and tokens
//     not yet complete in every layer (a prefill cut short);
//   - what was flushed stays, of course.
//
// So after an Abandon the context holds max(flushed, whole groups) tokens
// once the flusher is done. Append of the context waits for that and
// reports the count (see Store.Append); a Restore meanwhile sees a count
// between the two. Later calls on the writer fail. The daemon calls it for
// CloseContext{abandon: true} and for the writers of a client whose
// connection ended.
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
		LastUse: unixNanos(c.lastUse), Identity: c.ident, TokenAddressed: c.tokCtx(),
	}, nil
}

func unixNanos(n int64) time.Time { return time.Unix(0, n) }
