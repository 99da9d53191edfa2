package crash

import (
	"errors"
	"fmt"
	"math/rand"

	"github.com/hcache/hcache/chunk"
)

// Adversarial operations (SimOptions.Adversarial): what a client may do
// that the workload otherwise never does, each with an exact prediction
// checked on the running store, and the model kept so that every crash
// point and repair check judges what followed.

// adversarialPct is the share of operations that are adversarial.
const adversarialPct = 8

// stepAdversarial runs one adversarial operation on a slot's live context
// (named, or with SimOptions.Prefix token-addressed half the time).
func (s *sim) stepAdversarial(st *chunk.Store, rng *rand.Rand, slots int) error {
	tok := s.prefix && rng.Intn(2) == 0
	var slot int
	var m *ctxModel
	if tok {
		slot = rng.Intn(tokSlots)
		m = s.live(s.tokSlots, slot)
	} else {
		slot = rng.Intn(slots)
		m = s.live(s.slots, slot)
	}
	kind, arg := rng.Intn(4), rng.Intn(1<<20)
	switch {
	case kind == 3 && tok:
		return s.advFork(st, slot, m, arg)
	case m == nil:
		return nil
	case kind == 3:
		// A fork of a named context: refused, nothing created.
		s.rep.AdversarialOps++
		return s.refused(st.Fork("crash", m.id, s.newID("x", slot), 1), chunk.ErrTokens, "fork of named context %s", m.id)
	case kind == 2:
		return s.deleteDuringRestore(st, m)
	case m.writer == nil:
		return nil
	default:
		return s.abandon(st, slot, m, kind == 1 && tok)
	}
}

// newID is a fresh context id of the cycle.
func (s *sim) newID(kind string, slot int) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return fmt.Sprintf("%s%di%d", kind, slot, len(s.ctxs))
}

// wrong tallies a broken prediction on the running store.
func (s *sim) wrong(v Verdict, format string, args ...any) {
	s.rep.tally(v, fmt.Sprintf(format, args...), fmt.Sprintf("seed %d cycle %d op %d (adversarial)", s.seed, s.cycle, s.op))
}

// refused checks that a call failed with want (and, if it did not, stops
// the cycle: the store now holds what the model does not know).
func (s *sim) refused(err, want error, format string, args ...any) error {
	what := fmt.Sprintf(format, args...)
	fmt.Fprintf(s.trace, "cycle %d op %d: %s: %v\n", s.cycle, s.op, what, err)
	if errors.Is(err, want) {
		return nil
	}
	s.wrong(BadError, "%s: got %v, want %v", what, err, want)
	if err == nil {
		return fmt.Errorf("%s succeeded", what)
	}
	return err
}

// abandon abandons m's writer (chunk.Writer.Abandon: a client gone) and
// reopens the context: by name (Store.Append), whose count must be exactly
// max(acknowledged, whole groups appended); or, token-addressed, by its
// tokens under a new id (Store.CreateTokens), which must find exactly the
// whole groups appended stored.
func (s *sim) abandon(st *chunk.Store, slot int, m *ctxModel, byTokens bool) error {
	ct := st.ChunkTokens()
	s.mu.Lock()
	appended := m.appended
	keep := max(m.acked, appended/ct*ct)
	given := append([]uint32(nil), m.tokens[:min(appended, len(m.tokens))]...)
	s.mu.Unlock()
	m.writer.Abandon()
	s.mu.Lock()
	m.writer, m.appended = nil, keep
	if m.tok {
		m.tokens = m.tokens[:keep:keep]
	}
	s.mu.Unlock()
	s.rep.AdversarialOps++
	fmt.Fprintf(s.trace, "cycle %d op %d: abandon %s with %d appended, %d acknowledged\n", s.cycle, s.op, m.id, appended, m.acked)
	if byTokens {
		n := s.newTok(slot, m.seed, given)
		s.mu.Lock()
		n.appended = appended / ct * ct
		s.mu.Unlock()
		w, stored, err := st.CreateTokens(TokNamespace, n.id, s.ident, given, chunk.CreateOptions{})
		if err != nil {
			s.wrong(BadError, "%s: reopen of abandoned %s by its %d tokens: %v", n.id, m.id, len(given), err)
			return err
		}
		fmt.Fprintf(s.trace, "cycle %d op %d: reopen %s by its %d tokens as %s, %d stored\n", s.cycle, s.op, m.id, len(given), n.id, stored)
		if stored != appended/ct*ct {
			w.Abandon()
			s.wrong(BadError, "%s: reopen of abandoned %s by its %d tokens found %d stored, want its %d whole groups' %d", n.id, m.id, len(given), stored, appended/ct, appended/ct*ct)
			return errors.New("reopen by tokens: wrong count")
		}
		s.mu.Lock()
		n.writer = w
		s.mu.Unlock()
		return nil
	}
	w, err := st.Append(m.ns(), m.id, s.ident)
	if err != nil {
		s.wrong(BadError, "%s: Append after Abandon: %v", m.id, err)
		return err
	}
	fmt.Fprintf(s.trace, "cycle %d op %d: reopen %s by name at %d\n", s.cycle, s.op, m.id, w.Tokens())
	if w.Tokens() != keep {
		w.Abandon()
		v := BadError
		if w.Tokens() < keep {
			v = Lost
		}
		s.wrong(v, "%s: Append after Abandon reports %d tokens, want %d (max of %d acknowledged and the whole groups of %d appended)", m.id, w.Tokens(), keep, m.acked, appended)
		return errors.New("append after abandon: wrong count")
	}
	s.mu.Lock()
	m.writer = w
	s.mu.Unlock()
	return nil
}

// deleteDuringRestore closes m's writer (acknowledging it), restores the
// context (by name, or token-addressed by its tokens naming it) and, while
// the first layer is with the consumer, deletes it and runs a GC. The
// restore must still serve what the context held, row for row (between
// its acknowledged and appended tokens: exactly the acknowledged ones
// unless an abandoned writer's groups are among them); the delete must
// succeed and a restore after it find nothing.
func (s *sim) deleteDuringRestore(st *chunk.Store, m *ctxModel) error {
	if m.writer != nil {
		if _, err := s.ack(m, true); err != nil {
			return err
		}
	}
	s.mu.Lock()
	c := *m
	m.deleteStarted = true
	s.mu.Unlock()
	s.rep.AdversarialOps++
	fmt.Fprintf(s.trace, "cycle %d op %d: delete %s during its restore\n", s.cycle, s.op, c.id)
	var deleted bool
	var derr, gerr, torn error
	fn := func(layer int, rows []byte) error {
		t := len(rows) / int(s.ident.Plan[layer].RowBytes)
		var want []byte
		if c.tok {
			want = TokLayerRows(s.ident, c.tokens, layer, 0, min(t, len(c.tokens)))
		} else {
			want = LayerRows(s.ident, c.id, layer, 0, t)
		}
		if string(rows) != string(want) && torn == nil {
			torn = fmt.Errorf("layer %d: %d tokens not what was appended", layer, t)
		}
		if !deleted {
			deleted = true
			if derr = st.Delete(c.ns(), c.id); derr == nil {
				s.mu.Lock()
				m.deleteAcked = true
				s.mu.Unlock()
			}
			gerr = st.GC().Err
		}
		return nil
	}
	var n int
	var err error
	if c.tok {
		n, err = st.RestoreTokens(chunk.Prefix{Namespace: TokNamespace, Identity: s.ident, Tokens: c.tokens[:c.appended], Context: c.id}, fn)
	} else {
		n, err = st.Restore("crash", c.id, s.ident, fn)
	}
	switch {
	case err != nil:
		s.wrong(BadError, "%s: restore with a delete in it: %v", c.id, err)
	case torn != nil:
		s.wrong(Torn, "%s: restore with a delete in it: %v", c.id, torn)
	case n < c.acked:
		s.wrong(Lost, "%s: restore with a delete in it: %d tokens, %d acknowledged", c.id, n, c.acked)
	case n > c.appended:
		s.wrong(Torn, "%s: restore with a delete in it: %d tokens, only %d appended", c.id, n, c.appended)
	}
	if derr != nil {
		s.wrong(BadError, "%s: delete during its restore: %v", c.id, derr)
		return derr
	}
	if gerr != nil {
		return gerr
	}
	if !deleted { // nothing to stream: delete now
		if err := st.Delete(c.ns(), c.id); err != nil {
			return err
		}
		s.mu.Lock()
		m.deleteAcked = true
		s.mu.Unlock()
	}
	s.checkRunning(st, m) // gone
	return nil
}

// advFork is an adversarial fork into a slot of the token-addressed
// contexts: a fork of a fork (of zero tokens up to all it acknowledged), or
// one the store must refuse (of the slot's context while it is being
// written, past a context's end, of a deleted context).
func (s *sim) advFork(st *chunk.Store, slot int, m *ctxModel, arg int) error {
	var forks, idle, deleted []*ctxModel // forks: those with no writer
	s.mu.Lock()
	for _, id := range s.idsLocked() {
		c := s.ctxs[id]
		switch {
		case !c.tok:
		case c.deleteAcked:
			deleted = append(deleted, c)
		case c.writer == nil && c.ackedExists && !c.deleteStarted && !c.evicted:
			idle = append(idle, c)
			if c.forkOf != "" {
				forks = append(forks, c)
			}
		}
	}
	s.mu.Unlock()
	dst := s.newID("t", slot)
	// The first of the four that applies, from arg's.
	for i := range 4 {
		switch k := (arg + i) % 4; {
		case k == 0 && len(forks) > 0:
			src := forks[arg/4%len(forks)]
			s.rep.AdversarialOps++
			return s.fork(st, slot, src, arg/64%(src.acked+1))
		case k == 0 && m != nil:
			// No fork to fork: close the slot's context, fork it and
			// fork the fork.
			if m.writer != nil {
				if _, err := s.ack(m, true); err != nil {
					return err
				}
			}
			s.rep.AdversarialOps++
			if err := s.fork(st, slot, m, arg/64%(m.acked+1)); err != nil {
				return err
			}
			f := s.live(s.tokSlots, slot)
			return s.fork(st, slot, f, arg/4096%(f.acked+1))
		case k == 1 && m != nil && m.writer != nil:
			s.rep.AdversarialOps++
			return s.refused(st.Fork(TokNamespace, m.id, dst, 0), chunk.ErrBusy, "fork of %s, being written", m.id)
		case k == 2 && len(idle) > 0:
			src := idle[arg/4%len(idle)]
			s.rep.AdversarialOps++
			n := src.appended + 1 + arg/4%(2*st.ChunkTokens())
			return s.refused(st.Fork(TokNamespace, src.id, dst, n), chunk.ErrTokens, "fork of %d tokens of %s, which holds at most %d", n, src.id, src.appended)
		case k == 3 && len(deleted) > 0:
			src := deleted[arg/4%len(deleted)]
			s.rep.AdversarialOps++
			return s.refused(st.Fork(TokNamespace, src.id, dst, 0), chunk.ErrNotFound, "fork of deleted %s", src.id)
		}
	}
	return nil
}
