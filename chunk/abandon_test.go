package chunk

import (
	"bytes"
	"errors"
	"fmt"
	randv2 "math/rand/v2"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hcache/hcache/iouring"
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

// holdWrites is an engine seam that holds the completions of segment
// writes (not reads or syncs) while holding is on, so that a test can keep
// a writer's groups with the flusher for as long as it likes.
type holdWrites struct {
	iouring.Engine
	mu   sync.Mutex
	hold bool
	held []func()
}

func (h *holdWrites) Submit(reqs []*iouring.Request, done func(*iouring.Request)) error {
	h.mu.Lock()
	hold := h.hold && reqs[0].Op == iouring.OpWritev
	h.mu.Unlock()
	if !hold {
		return h.Engine.Submit(reqs, done)
	}
	return h.Engine.Submit(reqs, func(r *iouring.Request) {
		h.mu.Lock()
		if h.hold {
			h.held = append(h.held, func() { done(r) })
			h.mu.Unlock()
			return
		}
		h.mu.Unlock()
		done(r)
	})
}

// release stops holding and completes what was held.
func (h *holdWrites) release() {
	h.mu.Lock()
	h.hold = false
	held := h.held
	h.held = nil
	h.mu.Unlock()
	for _, f := range held {
		f()
	}
}

// TestAbandonThenReopenWaits makes the race of issue 16 certain: the
// abandoned writer's two whole groups are held in flight while the context
// is reopened. Append must not return before they are committed (it used
// to return at once, reporting 64 tokens), and must then report 192.
func TestAbandonThenReopenWaits(t *testing.T) {
	real, err := iouring.New(iouring.Config{})
	if err != nil {
		t.Fatal(err)
	}
	h := &holdWrites{Engine: real}
	e := newEnv(t, "disk", func(o *Options) { o.Engine = h; o.ChunkTokens = 64 })
	s := e.open()
	t.Cleanup(func() {
		h.release()
		s.Close()
		real.Close()
	})
	ident := testIdentity("held")
	w, err := s.Create("ns", "c", ident, CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	appendTokens(t, w, ident, "c", 0, 64)
	if err := w.Flush(); err != nil {
		t.Fatal(err)
	}
	h.mu.Lock()
	h.hold = true
	h.mu.Unlock()
	appendTokens(t, w, ident, "c", 64, 192)
	w.Abandon()
	type result struct {
		w   *Writer
		err error
	}
	appended := make(chan result, 1)
	go func() {
		w2, err := s.Append("ns", "c", ident)
		appended <- result{w2, err}
	}()
	// Wait until Append has taken the context (it then waits for the
	// held groups) or has returned without waiting (the old behaviour).
	var r result
	returnedEarly := false
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(time.Millisecond) {
		select {
		case r = <-appended:
			returnedEarly = true
		default:
		}
		s.mu.Lock()
		taken := s.ctxs[ctxMapKey("ns", "c")].writer != nil
		s.mu.Unlock()
		if returnedEarly || taken {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("Append neither returned nor took the context in 20 s (a hang)")
		}
	}
	if returnedEarly {
		t.Errorf("Append returned (%d tokens, %v) while the abandoned writer's groups were still in flight", tokensOf(r.w), r.err)
	}
	h.release()
	if !returnedEarly {
		r = <-appended
	}
	if r.err != nil {
		t.Fatalf("Append: %v", r.err)
	}
	n := r.w.Tokens()
	if n != 192 {
		t.Errorf("Append reports %d tokens, want 192", n)
	}
	appendTokens(t, r.w, ident, "c", n, n+36)
	if err := r.w.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	verify(t, s, "ns", "c", ident, n+36)
}

func tokensOf(w *Writer) int {
	if w == nil {
		return -1
	}
	return w.Tokens()
}

// abandonModel is what one context must hold in TestAbandonReopenRandom.
type abandonModel struct {
	exists bool
	// lo tokens are durable now; hi is what the count becomes once every
	// group handed to the flusher is committed. A restore sees a count in
	// [lo, hi]; Append (which waits for the flusher) reports hi.
	lo, hi int
	// stamp[i] names the writer whose row token i holds (0..hi, and the
	// open writer's unflushed tokens past hi).
	stamp []int
	w     *Writer
	wNo   int // the open writer's number
	// the open writer's complete tokens (len(stamp) while it is open)
	tokens int
}

func abandonRowsName(id string, wNo int) string { return fmt.Sprintf("%s/w%d", id, wNo) }

// TestAbandonReopenRandom runs a seeded random interleaving of create,
// append (decode and prefill), flush, close, abandon, reopen, restore,
// delete and store restart over a few contexts, against a model of what
// each must hold. HCACHE_ABANDON_SEED=<seed> replays a failure.
func TestAbandonReopenRandom(t *testing.T) {
	seed := uint64(time.Now().UnixNano())
	if v := os.Getenv("HCACHE_ABANDON_SEED"); v != "" {
		var err error
		if seed, err = strconv.ParseUint(v, 10, 64); err != nil {
			t.Fatalf("HCACHE_ABANDON_SEED=%q: %v", v, err)
		}
	}
	for _, bc := range []struct {
		backend string
		ops     int
	}{{"mem", 400}, {"disk", 150}} {
		t.Run(bc.backend, func(t *testing.T) {
			t.Logf("seed %d (replay: HCACHE_ABANDON_SEED=%d go test ./chunk -run 'TestAbandonReopenRandom/%s')", seed, seed, bc.backend)
			runAbandonRandom(t, bc.backend, seed, bc.ops)
		})
	}
}

func runAbandonRandom(t *testing.T, backend string, seed uint64, nops int) {
	rng := randv2.New(randv2.NewPCG(seed, 0x9e3779b97f4a7c15))
	const ct = 16
	e := newEnv(t, backend, func(o *Options) { o.ChunkTokens = ct })
	s := e.open()
	defer func() { s.Close() }()
	ident := testIdentity("random")
	ids := []string{"a", "b", "c"}
	m := map[string]*abandonModel{}
	for _, id := range ids {
		m[id] = &abandonModel{}
	}
	var log []string
	fail := func(format string, args ...any) {
		t.Helper()
		from := max(0, len(log)-40)
		t.Fatalf("seed %d, op %d: %s\nlast ops:\n  %s", seed, len(log), fmt.Sprintf(format, args...), strings.Join(log[from:], "\n  "))
	}
	nextW := 0
	// abandoned applies what abandon (or a store close) does: whole
	// groups handed to the flusher stay, the rest is dropped.
	abandoned := func(x *abandonModel) {
		handed := x.tokens - x.tokens%ct
		x.hi = max(x.lo, handed)
		x.stamp = x.stamp[:x.hi]
		x.w, x.tokens = nil, 0
	}
	check := func(id string) {
		x := m[id]
		got := -1
		var mismatch error
		n, err := s.Restore("ns", id, ident, func(layer int, rowsGot []byte) error {
			rb := int(ident.Plan[layer].RowBytes)
			got = len(rowsGot) / rb
			for tok := 0; tok < got; tok++ {
				if tok >= len(x.stamp) {
					mismatch = fmt.Errorf("token %d restored, the model has %d", tok, len(x.stamp))
					break
				}
				want := row(abandonRowsName(id, x.stamp[tok]), layer, tok, rb)
				if !bytes.Equal(rowsGot[tok*rb:(tok+1)*rb], want) {
					mismatch = fmt.Errorf("layer %d token %d differs from writer %d's row", layer, tok, x.stamp[tok])
					break
				}
			}
			return nil
		})
		switch {
		case !x.exists:
			if !errors.Is(err, ErrNotFound) {
				fail("restore %s of a deleted context: %d tokens, %v", id, n, err)
			}
		case err != nil:
			fail("restore %s: %v", id, err)
		case n < x.lo || n > x.hi:
			fail("restore %s: %d tokens, want %d..%d", id, n, x.lo, x.hi)
		case mismatch != nil:
			fail("restore %s: %v", id, mismatch)
		}
	}
	for i := 0; i < nops; i++ {
		id := ids[rng.IntN(len(ids))]
		x := m[id]
		switch k := rng.IntN(100); {
		case !x.exists:
			nextW++
			log = append(log, fmt.Sprintf("create %s (w%d)", id, nextW))
			w, err := s.Create("ns", id, ident, CreateOptions{})
			if err != nil {
				fail("create %s: %v", id, err)
			}
			*x = abandonModel{exists: true, w: w, wNo: nextW}
		case x.w == nil && k < 45:
			nextW++
			log = append(log, fmt.Sprintf("reopen %s (w%d)", id, nextW))
			w, err := s.Append("ns", id, ident)
			if err != nil {
				fail("reopen %s: %v", id, err)
			}
			if n := w.Tokens(); n != x.hi {
				fail("reopen %s reports %d tokens, want %d (lo %d)", id, n, x.hi, x.lo)
			}
			x.lo, x.w, x.wNo, x.tokens = x.hi, w, nextW, x.hi
		case x.w == nil && k < 85:
			log = append(log, "restore "+id)
			check(id)
		case x.w == nil && k < 92:
			log = append(log, "delete "+id)
			if err := s.Delete("ns", id); err != nil {
				fail("delete %s: %v", id, err)
			}
			*x = abandonModel{}
		case x.w == nil:
			log = append(log, "restart")
			for _, y := range m {
				if y.w != nil {
					abandoned(y)
				}
			}
			if err := s.Close(); err != nil {
				fail("close store: %v", err)
			}
			s = e.open()
			for _, y := range m {
				y.lo = y.hi
			}
		case k < 55:
			n := 1 + rng.IntN(2*ct+ct/2)
			prefill := rng.IntN(2) == 0
			log = append(log, fmt.Sprintf("append %s %d-%d prefill=%v", id, x.tokens, x.tokens+n, prefill))
			from := x.tokens
			if from < len(x.stamp) {
				x.stamp = x.stamp[:from]
			}
			name := abandonRowsName(id, x.wNo)
			for tok := from; tok < from+n; tok++ {
				x.stamp = append(x.stamp, x.wNo)
			}
			// The writer's rows are of its own name from where it
			// started; earlier ones (a partial tail read back) are
			// not rewritten by it.
			if prefill {
				for l, p := range ident.Plan {
					if p.Kind == LayerNone {
						continue
					}
					var b []byte
					for tok := from; tok < from+n; tok++ {
						b = append(b, row(name, l, tok, int(p.RowBytes))...)
					}
					if err := x.w.AppendLayer(l, b); err != nil {
						fail("AppendLayer %s: %v", id, err)
					}
				}
			} else {
				for tok := from; tok < from+n; tok++ {
					rs := make([][]byte, len(ident.Plan))
					for l, p := range ident.Plan {
						if p.Kind != LayerNone {
							rs[l] = row(name, l, tok, int(p.RowBytes))
						}
					}
					if err := x.w.AppendToken(rs); err != nil {
						fail("AppendToken %s: %v", id, err)
					}
				}
			}
			x.tokens += n
			x.hi = max(x.lo, x.tokens-x.tokens%ct)
		case k < 70:
			log = append(log, "flush "+id)
			if err := x.w.Flush(); err != nil {
				fail("flush %s: %v", id, err)
			}
			x.lo, x.hi = x.tokens, x.tokens
		case k < 80:
			log = append(log, "close "+id)
			if err := x.w.Close(); err != nil {
				fail("close %s: %v", id, err)
			}
			x.lo, x.hi = x.tokens, x.tokens
			x.w, x.tokens = nil, 0
		case k < 95:
			if rng.IntN(2) == 0 {
				// A prefill cut short: the first stored layer gets
				// rows past the complete tokens, the others do not.
				n := 1 + rng.IntN(2*ct)
				log = append(log, fmt.Sprintf("abandon %s at %d tokens, layer 0 at %d", id, x.tokens, x.tokens+n))
				var b []byte
				for tok := x.tokens; tok < x.tokens+n; tok++ {
					b = append(b, row(abandonRowsName(id, x.wNo), 0, tok, int(ident.Plan[0].RowBytes))...)
				}
				if err := x.w.AppendLayer(0, b); err != nil {
					fail("AppendLayer %s: %v", id, err)
				}
			} else {
				log = append(log, fmt.Sprintf("abandon %s at %d tokens", id, x.tokens))
			}
			x.w.Abandon()
			abandoned(x)
		default:
			log = append(log, "restore (writer open) "+id)
			check(id)
		}
	}
	for _, id := range ids {
		if x := m[id]; x.w != nil {
			if err := x.w.Close(); err != nil {
				fail("final close %s: %v", id, err)
			}
			x.lo, x.hi, x.w = x.tokens, x.tokens, nil
		}
		check(id)
	}
	// Check wants no writes in flight: an abandoned writer's handed groups
	// may still be on their way to the index, and a commit landing between
	// Check's scan of the chunk keys and its read of the token counts and
	// live bytes reads as a mismatch.
	if err := s.barrier(nil); err != nil {
		fail("wait for the abandoned writers' groups: %v", err)
	}
	if r := s.Check(nil); !r.OK() {
		fail("fsck: %v", r.Errors)
	}
}
