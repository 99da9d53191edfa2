package crash

import (
	"fmt"
	"io"
	"math/rand"
)

// logSource is the workload generator's source with every draw written to
// w (SimOptions.opLog): the values are the wrapped source's.
type logSource struct {
	rand.Source64
	w io.Writer
}

func (l logSource) Int63() int64 {
	v := l.Source64.Int63()
	fmt.Fprintf(l.w, "rng63 %d\n", v)
	return v
}

func (l logSource) Uint64() uint64 {
	v := l.Source64.Uint64()
	fmt.Fprintf(l.w, "rng64 %d\n", v)
	return v
}

// logModels writes the model of every context after operation op (and the
// error that stopped the cycle, if any).
func (s *sim) logModels(w io.Writer, op int, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	fmt.Fprintf(w, "op %d err %v\n", op, err != nil)
	for _, id := range s.idsLocked() {
		m := s.ctxs[id]
		fmt.Fprintf(w, "  %s tok %v appended %d acked %d exists %v delete %v/%v evict %v/%v writer %v tokens %v seed %d\n",
			m.id, m.tok, m.appended, m.acked, m.ackedExists, m.deleteStarted, m.deleteAcked,
			m.evictPending, m.evicted, m.writer != nil, m.tokens, m.seed)
	}
}
