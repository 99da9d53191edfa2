package crash

import (
	"errors"
	"fmt"
	"hash/fnv"
	"math/rand"

	"github.com/hcache/hcache/chunk"
)

// Token-addressed contexts in the simulation (SimOptions.Prefix): saves by
// tokens whose prompts share prefixes (a few base documents, extended and
// branched), decode with token ids, forks, deletes of one sharer, and
// restores by name and by tokens, checked at every crash point and after
// repair like the named contexts.

// TokNamespace is the namespace of the token-addressed contexts.
const TokNamespace = "tok"

// tokSlots is the number of token-addressed context slots.
const tokSlots = 5

// PromptTokens is base document seed's first n token ids: prompts of one
// seed share their prefixes.
func PromptTokens(seed, n int) []uint32 {
	out := make([]uint32, n)
	for i := range out {
		out[i] = uint32(seed*1_000_003+i*7919) % 50_000
	}
	return out
}

// prefixName names the rows of position t of a token list: a digest of
// the tokens up to and including t (as a model's state depends on them).
func prefixName(h uint64) string { return fmt.Sprintf("p%016x", h) }

// TokLayerRows is the rows of tokens [from, to) of one layer of a
// token-addressed context holding tokens: a function of each position's
// token prefix, so contexts sharing a prefix hold the same rows there.
func TokLayerRows(ident *chunk.Identity, tokens []uint32, layer, from, to int) []byte {
	h := fnv.New64a()
	var b [4]byte
	var out []byte
	for t := 0; t < to; t++ {
		b[0], b[1], b[2], b[3] = byte(tokens[t]), byte(tokens[t]>>8), byte(tokens[t]>>16), byte(tokens[t]>>24)
		h.Write(b[:])
		if t >= from {
			out = append(out, Row(prefixName(h.Sum64()), layer, t, int(ident.Plan[layer].RowBytes))...)
		}
	}
	return out
}

// tokTokenRows is one token's rows for every layer.
func tokTokenRows(ident *chunk.Identity, tokens []uint32, t int) [][]byte {
	rows := make([][]byte, len(ident.Plan))
	for l, p := range ident.Plan {
		if p.Kind != chunk.LayerNone {
			rows[l] = TokLayerRows(ident, tokens, l, t, t+1)
		}
	}
	return rows
}

// CheckTokContext restores a token-addressed context by name, then by its
// tokens naming it, and judges both: by name as CheckContext (rows are the
// token prefix's); by tokens, every row served must be the request's and,
// when the context must exist, at least its acknowledged tokens come back.
func CheckTokContext(st *chunk.Store, id string, ident *chunk.Identity, tokens []uint32, e Expect) (Verdict, string) {
	check := func(what string) func(layer int, rows []byte) error {
		return func(layer int, rows []byte) error {
			t := len(rows) / int(ident.Plan[layer].RowBytes)
			if t > len(tokens) || string(rows) != string(TokLayerRows(ident, tokens, layer, 0, t)) {
				return fmt.Errorf("%w: %s layer %d: %d tokens not what was appended", errTorn, what, layer, t)
			}
			return nil
		}
	}
	n, err := st.Restore(TokNamespace, id, ident, check("by name"))
	switch {
	case errors.Is(err, chunk.ErrNotFound):
		if e.MustExist {
			return Lost, fmt.Sprintf("%s: acknowledged with %d tokens, not found", id, e.MinTokens)
		}
	case errors.Is(err, errTorn):
		return Torn, fmt.Sprintf("%s: %v", id, err)
	case errors.Is(err, chunk.ErrCorrupt) || errors.Is(err, chunk.ErrDamaged):
		return Damaged, fmt.Sprintf("%s: %v", id, err)
	case err != nil:
		return BadError, fmt.Sprintf("%s: %v", id, err)
	case !e.MustExist && !e.MayExist:
		return Torn, fmt.Sprintf("%s: deleted, yet restored %d tokens", id, n)
	case n < e.MinTokens:
		return Lost, fmt.Sprintf("%s: restored %d tokens, %d acknowledged", id, n, e.MinTokens)
	case n > e.MaxTokens:
		return Torn, fmt.Sprintf("%s: restored %d tokens, only %d appended", id, n, e.MaxTokens)
	}
	q := chunk.Prefix{Namespace: TokNamespace, Identity: ident, Tokens: tokens[:e.MaxTokens], Context: id}
	looked, lerr := st.Lookup(q)
	n, err = st.RestoreTokens(q, check("by tokens"))
	switch {
	case errors.Is(err, errTorn):
		return Torn, fmt.Sprintf("%s: %v", id, err)
	case errors.Is(err, chunk.ErrNotFound):
		// A group dropped between the lookup and the read: no sharer
		// left (never while this context must exist).
		if e.MustExist {
			return Lost, fmt.Sprintf("%s: by tokens: %v", id, err)
		}
	case err != nil || lerr != nil:
		return BadError, fmt.Sprintf("%s: by tokens: %v (lookup %v)", id, err, lerr)
	case n != looked:
		return BadError, fmt.Sprintf("%s: lookup says %d tokens, restore by tokens gave %d", id, looked, n)
	case e.MustExist && n < e.MinTokens:
		return Lost, fmt.Sprintf("%s: by tokens restored %d tokens, %d acknowledged", id, n, e.MinTokens)
	}
	return OK, ""
}

// stepTok runs one random operation on the token-addressed contexts.
func (s *sim) stepTok(st *chunk.Store, rng *rand.Rand) error {
	ct := st.ChunkTokens()
	slot := rng.Intn(tokSlots)
	m := s.live(s.tokSlots, slot)
	r := rng.Intn(100)
	switch {
	case r >= 88 && r < 95:
		// Fork the first n acknowledged tokens of a context into a new
		// one in this slot (the slot's previous context stays as it is).
		var srcs []*ctxModel
		s.mu.Lock()
		for _, id := range s.idsLocked() {
			c := s.ctxs[id]
			if c.tok && c.writer == nil && c.ackedExists && c.acked > 0 && !c.deleteStarted && !c.evicted {
				srcs = append(srcs, c)
			}
		}
		s.mu.Unlock()
		if len(srcs) == 0 {
			return nil
		}
		src := srcs[rng.Intn(len(srcs))]
		return s.fork(st, slot, src, 1+rng.Intn(src.acked))
	case m == nil:
		// A prompt of one of three base documents (their prefixes are
		// shared), sometimes with its own continuation.
		seed := rng.Intn(3)
		tokens := PromptTokens(seed, 1+rng.Intn(5*ct))
		if rng.Intn(3) == 0 {
			tokens = append(tokens, PromptTokens(100+len(s.ctxs), 1+rng.Intn(2*ct))...)
		}
		m = s.newTok(slot, seed, tokens)
		s.mu.Lock()
		m.appended = len(tokens) / ct * ct // at most what CreateTokens finds stored
		s.mu.Unlock()
		w, stored, err := st.CreateTokens(TokNamespace, m.id, s.ident, tokens, chunk.CreateOptions{})
		if err != nil {
			return err
		}
		s.mu.Lock()
		m.writer, m.appended = w, stored
		s.mu.Unlock()
		s.rep.TokensShared += stored
		fmt.Fprintf(s.trace, "cycle %d op %d: create %s by %d tokens of document %d, %d stored\n", s.cycle, s.op, m.id, len(tokens), seed, stored)
	case m.writer == nil && r < 60:
		w, err := st.Append(TokNamespace, m.id, s.ident)
		if err != nil {
			return err
		}
		// A new writer knows the ids of the tokens stored (its tail's
		// among them), not those a previous one was given without rows.
		s.mu.Lock()
		m.writer, m.tokens = w, m.tokens[:m.appended:m.appended]
		s.mu.Unlock()
		fmt.Fprintf(s.trace, "cycle %d op %d: append %s at %d\n", s.cycle, s.op, m.id, w.Tokens())
	case r < 45 && m.writer != nil:
		// Rows: the known ids' (prefill) or new ids', by decode with ids
		// or by ExtendTokens and a prefill.
		s.mu.Lock()
		from := m.appended
		s.mu.Unlock()
		if from == len(m.tokens) {
			n := 1 + rng.Intn(2*ct)
			ext := PromptTokens(m.seed, from+n)[from:]
			if rng.Intn(4) == 0 { // branch off the shared document
				ext = PromptTokens(200+s.op, n)
			}
			if rng.Intn(2) == 0 {
				s.mu.Lock()
				m.tokens = append(m.tokens[:from:from], ext...)
				m.appended += n
				s.mu.Unlock()
				for t := from; t < from+n; t++ {
					if err := m.writer.AppendTokenID(m.tokens[t], tokTokenRows(s.ident, m.tokens, t)); err != nil {
						return err
					}
				}
				return nil
			}
			if err := m.writer.ExtendTokens(ext); err != nil {
				return err
			}
			s.mu.Lock()
			m.tokens = append(m.tokens[:from:from], ext...)
			s.mu.Unlock()
		}
		to := len(m.tokens)
		s.mu.Lock()
		m.appended = to
		s.mu.Unlock()
		for l, p := range s.ident.Plan {
			if p.Kind == chunk.LayerNone {
				continue
			}
			if err := m.writer.AppendLayer(l, TokLayerRows(s.ident, m.tokens, l, from, to)); err != nil {
				return err
			}
		}
	case r < 75 && m.writer != nil:
		want, err := s.ack(m, r >= 65)
		if err != nil {
			return err
		}
		fmt.Fprintf(s.trace, "cycle %d op %d: flush %s at %d\n", s.cycle, s.op, m.id, want)
	case r < 88:
		// Delete one sharer (the others keep the shared groups).
		return s.delete(st, m)
	default:
		s.checkRunning(st, m)
	}
	return nil
}

// fork forks the first n tokens of src (token-addressed, no writer, n at
// most its acknowledged tokens) into a new context of the slot: it need not
// exist until Fork returns, then must, with exactly n tokens.
func (s *sim) fork(st *chunk.Store, slot int, src *ctxModel, n int) error {
	m := s.newTok(slot, src.seed, src.tokens[:n:n])
	s.mu.Lock()
	m.appended, m.forkOf = n, src.id
	s.mu.Unlock()
	if err := st.Fork(TokNamespace, src.id, m.id, n); err != nil {
		return err
	}
	s.mu.Lock()
	m.acked, m.ackedExists = n, true
	s.mu.Unlock()
	s.rep.Forks++
	fmt.Fprintf(s.trace, "cycle %d op %d: fork %s -> %s at %d\n", s.cycle, s.op, src.id, m.id, n)
	return nil
}

// newTok adds a token-addressed context's model to a slot.
func (s *sim) newTok(slot, seed int, tokens []uint32) *ctxModel {
	s.mu.Lock()
	defer s.mu.Unlock()
	m := &ctxModel{id: fmt.Sprintf("t%di%d", slot, len(s.ctxs)), tok: true, seed: seed, tokens: tokens}
	s.ctxs[m.id] = m
	s.tokSlots[slot] = append(s.tokSlots[slot], m.id)
	s.rep.TokContexts++
	return m
}

// checkModel checks one model's context against what it expects.
func (s *sim) checkModel(st *chunk.Store, m ctxModel, e Expect) (Verdict, string) {
	if m.tok {
		return CheckTokContext(st, m.id, s.ident, m.tokens, e)
	}
	return CheckContext(st, "crash", m.id, s.ident, e)
}
