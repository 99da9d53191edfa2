package chunk

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hcache/hcache/internal/testseed"
	"github.com/hcache/hcache/iouring"
)

// TestRestoreOwned: a consumer that keeps buffers after fn returns (as a GPU
// copy does) gets every layer intact; no held buffer is reused or changed
// before its release; at most ahead buffers are out at once; RestoreOwned
// returns only after the last release.
func TestRestoreOwned(t *testing.T) {
	seed := testseed.Seed(t)
	rng := rand.New(rand.NewSource(seed))
	e := newEnv(t, "disk", nil)
	s := e.open()
	defer s.Close()
	// Eight stored layers, so the producer has to wait for releases.
	ident := &Identity{Model: []byte("owned"), Plan: []LayerPlan{
		{Kind: LayerHidden, RowBytes: 128}, {Kind: LayerKV, RowBytes: 256}, {Kind: LayerHidden, RowBytes: 128}, {Kind: LayerHidden, RowBytes: 128},
		{Kind: LayerKV, RowBytes: 256}, {Kind: LayerHidden, RowBytes: 128}, {Kind: LayerNone, RowBytes: 0}, {Kind: LayerHidden, RowBytes: 128}, {Kind: LayerKV, RowBytes: 256},
	}}
	const tokens = 70
	createFilled(t, s, ident, "c", tokens)
	for _, ahead := range []int{2, 3, 5} {
		t.Run(fmt.Sprintf("ahead=%d", ahead), func(t *testing.T) {
			type held struct {
				layer   int
				rows    []byte
				copy    []byte
				release func()
			}
			var mu sync.Mutex
			var out []held
			maxOut, released := 0, 0
			var wg sync.WaitGroup
			done := make(chan struct{})
			n, err := s.RestoreOwned("ns", "c", ident, ahead, func(layer int, rows []byte, release func()) error {
				h := held{layer, rows, bytes.Clone(rows), release}
				mu.Lock()
				out = append(out, h)
				if len(out)-released > maxOut {
					maxOut = len(out) - released
				}
				mu.Unlock()
				// Release later, from another goroutine, checking that
				// the bytes did not change while held.
				wg.Add(1)
				delay := time.Duration(rng.Intn(3)) * time.Millisecond
				go func() {
					defer wg.Done()
					time.Sleep(delay)
					mu.Lock()
					if !bytes.Equal(h.rows, h.copy) {
						t.Errorf("layer %d: buffer changed while the consumer held it", h.layer)
					}
					released++
					mu.Unlock()
					h.release()
					h.release() // a second release is a no-op
				}()
				return nil
			})
			close(done)
			if err != nil {
				t.Fatal(err)
			}
			if n != tokens {
				t.Fatalf("%d tokens, want %d", n, tokens)
			}
			mu.Lock()
			if released != len(out) {
				t.Errorf("RestoreOwned returned with %d of %d buffers unreleased", len(out)-released, len(out))
			}
			if maxOut > ahead {
				t.Errorf("%d buffers held at once, ahead is %d", maxOut, ahead)
			}
			mu.Unlock()
			wg.Wait()
			for _, h := range out {
				want := expectLayer("c", h.layer, tokens, int(ident.Plan[h.layer].RowBytes))
				if !bytes.Equal(h.copy, want) {
					t.Errorf("layer %d: restored bytes differ", h.layer)
				}
			}
			if len(out) != 8 {
				t.Errorf("%d layers handed over, want 8", len(out))
			}
		})
	}
}

// TestRestoreOwnedMisuse: nil arguments are errors, a callback error or
// panic ends the restore with an error and leaves the store serving.
func TestRestoreOwnedMisuse(t *testing.T) {
	e := newEnv(t, "disk", nil)
	s := e.open()
	defer s.Close()
	ident := testIdentity("m")
	w, _ := s.Create("ns", "c", ident, CreateOptions{})
	appendTokens(t, w, ident, "c", 0, 20)
	w.Close()
	boom := errors.New("boom")
	cases := []struct {
		name  string
		ident *Identity
		ahead int
		fn    func(int, []byte, func()) error
		want  string
	}{
		{"nil identity", nil, 0, func(int, []byte, func()) error { return nil }, "needs an identity"},
		{"nil callback", ident, 0, nil, "needs a callback"},
		{"ahead 1", ident, 1, func(int, []byte, func()) error { return nil }, "at least 2"},
		{"error without release", ident, 0, func(l int, _ []byte, rel func()) error {
			go rel()
			return boom
		}, "boom"},
		{"panic", ident, 0, func(l int, _ []byte, rel func()) error { panic("callback bug") }, "panicked"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := s.RestoreOwned("ns", "c", tc.ident, tc.ahead, tc.fn)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want one mentioning %q", err, tc.want)
			}
			verify(t, s, "ns", "c", ident, 20)
		})
	}
	if _, err := s.Restore("ns", "c", ident, nil); err == nil {
		t.Fatal("Restore with a nil callback: no error")
	}
}

// TestRestoreOwnedHoldsUntilNext: a consumer that releases each layer only
// when the next one arrives (double buffering) finishes with the smallest
// ahead.
func TestRestoreOwnedHoldsUntilNext(t *testing.T) {
	e := newEnv(t, "disk", nil)
	s := e.open()
	defer s.Close()
	ident := testIdentity("m")
	w, _ := s.Create("ns", "c", ident, CreateOptions{})
	appendTokens(t, w, ident, "c", 0, 40)
	w.Close()
	for _, ahead := range []int{2, 3} {
		var prev func()
		done := make(chan error, 1)
		go func() {
			_, err := s.RestoreOwned("ns", "c", ident, ahead, func(layer int, rows []byte, release func()) error {
				if prev != nil {
					prev()
				}
				prev = release
				if layer == 3 { // the last stored layer
					release()
				}
				return nil
			})
			done <- err
		}()
		select {
		case err := <-done:
			if err != nil {
				t.Fatalf("ahead %d: %v", ahead, err)
			}
		case <-time.After(20 * time.Second):
			t.Fatalf("ahead %d: RestoreOwned hung with a consumer that holds one buffer", ahead)
		}
	}
}

// TestRestoreOwnedReadsDeep: once the first layer is in, the reads of every
// layer the read-ahead allows are submitted before that layer is handed
// over, so they run while the consumer computes and the store's goroutine,
// which may then wait long for a CPU, is not on their path. The first layer
// is read alone when more than two buffers are allowed.
func TestRestoreOwnedReadsDeep(t *testing.T) {
	e := newEnv(t, "disk", nil)
	s := e.open()
	defer s.Close()
	ident := &Identity{Model: []byte("deep"), Plan: []LayerPlan{
		{Kind: LayerHidden, RowBytes: 128}, {Kind: LayerKV, RowBytes: 256}, {Kind: LayerHidden, RowBytes: 128}, {Kind: LayerHidden, RowBytes: 128},
		{Kind: LayerKV, RowBytes: 256}, {Kind: LayerHidden, RowBytes: 128}, {Kind: LayerHidden, RowBytes: 128}, {Kind: LayerKV, RowBytes: 256},
	}}
	createFilled(t, s, ident, "c", 70)
	// Requests per layer: every layer has the same groups.
	before := s.EngineStats().Submitted
	if _, err := s.Restore("ns", "c", ident, func(int, []byte) error { return nil }); err != nil {
		t.Fatal(err)
	}
	total := s.EngineStats().Submitted - before
	if total == 0 || total%uint64(len(ident.Plan)) != 0 {
		t.Fatalf("a restore submitted %d requests for %d layers", total, len(ident.Plan))
	}
	perLayer := total / uint64(len(ident.Plan))
	for _, c := range []struct{ ahead, wantLayers int }{
		{2, 2}, // the second beside the first, as before
		{3, 3},
		{5, 5},
		{8, 8},
		{20, 8}, // no more than the context has
	} {
		before := s.EngineStats().Submitted
		var atFirst uint64
		_, err := s.RestoreOwned("ns", "c", ident, c.ahead, func(layer int, rows []byte, release func()) error {
			if layer == 0 {
				atFirst = s.EngineStats().Submitted - before
			}
			release()
			return nil
		})
		if err != nil {
			t.Fatalf("ahead %d: %v", c.ahead, err)
		}
		if want := uint64(c.wantLayers) * perLayer; atFirst != want {
			t.Errorf("ahead %d: %d requests submitted when the first layer was handed over, want %d (%d layers of %d)", c.ahead, atFirst, want, c.wantLayers, perLayer)
		}
	}
}

// gatedEngine holds the completions of each Submit of reads (one per layer
// of a restore) until the test opens that batch's gate: a seam that makes
// the order of a restore's reads observable.
type gatedEngine struct {
	iouring.Engine
	reads   atomic.Int64 // Submits of reads (a restore: one per layer), gated or not
	mu      sync.Mutex
	gating  bool
	batches []*gate
	added   chan struct{}
}

type gate struct {
	open bool
	held []func()
}

func (g *gatedEngine) Submit(reqs []*iouring.Request, done func(*iouring.Request)) error {
	if reqs[0].Op == iouring.OpRead {
		g.reads.Add(1)
	}
	g.mu.Lock()
	if !g.gating || reqs[0].Op != iouring.OpRead {
		g.mu.Unlock()
		return g.Engine.Submit(reqs, done)
	}
	b := &gate{}
	g.batches = append(g.batches, b)
	g.mu.Unlock()
	select {
	case g.added <- struct{}{}:
	default:
	}
	return g.Engine.Submit(reqs, func(r *iouring.Request) {
		g.mu.Lock()
		if !b.open {
			b.held = append(b.held, func() { done(r) })
			g.mu.Unlock()
			return
		}
		g.mu.Unlock()
		done(r)
	})
}

// newGated opens a store on a gated engine over a real one; both close at
// the end of the test.
func newGated(t *testing.T) (*gatedEngine, *Store) {
	t.Helper()
	real, err := iouring.New(iouring.Config{})
	if err != nil {
		t.Fatal(err)
	}
	g := &gatedEngine{Engine: real, added: make(chan struct{}, 1)}
	s := newEnv(t, "disk", func(o *Options) { o.Engine = g }).open()
	t.Cleanup(func() {
		s.Close()
		real.Close()
	})
	return g, s
}

// setGating turns gating of later read batches on or off; off also opens
// every gate, so whatever waits completes.
func (g *gatedEngine) setGating(on bool) {
	g.mu.Lock()
	g.gating = on
	n := len(g.batches)
	g.mu.Unlock()
	if !on {
		for i := 0; i < n; i++ {
			g.openGate(i)
		}
	}
}

// openGate lets batch i complete.
func (g *gatedEngine) openGate(i int) {
	g.mu.Lock()
	b := g.batches[i]
	b.open = true
	held := b.held
	b.held = nil
	g.mu.Unlock()
	for _, f := range held {
		f()
	}
}

// waitBatches waits until n batches were submitted or the restore returned.
func (g *gatedEngine) waitBatches(t *testing.T, n int, restored <-chan error) bool {
	t.Helper()
	deadline := time.After(20 * time.Second) // a hang, not a speed limit
	for {
		g.mu.Lock()
		got := len(g.batches)
		g.mu.Unlock()
		if got >= n {
			return true
		}
		select {
		case <-g.added:
		case err := <-restored:
			t.Errorf("the restore returned (%v) with %d read batches submitted, want %d first", err, got, n)
			return false
		case <-deadline:
			t.Errorf("%d read batches submitted after 20 s, want %d", got, n)
			return false
		}
	}
}

// TestRestoreStartsReadsWhileWaiting: with two buffers and a consumer that
// gives each back at once, the third layer's reads start as soon as the
// first layer's buffer is back, while the second layer's reads are still in
// flight; they used to start only after the second layer had been read and
// verified, which left the disk idle during every checksum.
func TestRestoreStartsReadsWhileWaiting(t *testing.T) {
	g, s := newGated(t)
	ident := testIdentity("gated")
	createFilled(t, s, ident, "c", 40)
	g.setGating(true)
	restored := make(chan error, 1)
	var layers []int
	go func() {
		_, err := s.RestoreOwned("ns", "c", ident, 2, func(layer int, rows []byte, release func()) error {
			layers = append(layers, layer)
			release()
			return nil
		})
		restored <- err
	}()
	if g.waitBatches(t, 2, restored) { // the first two layers, read together
		// Layer 0 completes, is handed over and given back; layer 1's
		// reads cannot complete (its gate stays shut), so layer 3's must
		// start while they are in flight.
		g.openGate(0)
		g.waitBatches(t, 3, restored)
	}
	g.setGating(false) // let the restore finish
	if err := <-restored; err != nil {
		t.Fatal(err)
	}
	if want := []int{0, 1, 3}; fmt.Sprint(layers) != fmt.Sprint(want) {
		t.Fatalf("layers handed over %v, want %v", layers, want)
	}
}

// TestRestoreAheadBytes: Restore keeps max(2, RestoreAheadBytes / layer
// bytes) layers read or in flight, at most the context's.
func TestRestoreAheadBytes(t *testing.T) {
	ident := &Identity{Model: []byte("budget"), Plan: []LayerPlan{
		{Kind: LayerHidden, RowBytes: 128}, {Kind: LayerKV, RowBytes: 256}, {Kind: LayerHidden, RowBytes: 128}, {Kind: LayerHidden, RowBytes: 128},
		{Kind: LayerKV, RowBytes: 256}, {Kind: LayerHidden, RowBytes: 128}, {Kind: LayerHidden, RowBytes: 128}, {Kind: LayerKV, RowBytes: 256},
	}}
	const tokens = 70
	layer := int64(tokens * 256) // the largest layer
	for _, c := range []struct {
		budget     int64
		wantLayers int
	}{
		{-1, 2},
		{layer, 2},
		{3*layer + layer/2, 3},
		{6 * layer, 6},
		{0, 8}, // the default (32 MiB) holds the whole context
	} {
		t.Run(fmt.Sprint(c.budget), func(t *testing.T) {
			e := newEnv(t, "disk", func(o *Options) { o.RestoreAheadBytes = c.budget })
			s := e.open()
			defer s.Close()
			createFilled(t, s, ident, "c", tokens)
			before := s.EngineStats().Submitted
			var atFirst uint64
			if _, err := s.Restore("ns", "c", ident, func(l int, _ []byte) error {
				if l == 0 {
					atFirst = s.EngineStats().Submitted - before
				}
				return nil
			}); err != nil {
				t.Fatal(err)
			}
			total := s.EngineStats().Submitted - before
			if want := uint64(c.wantLayers) * total / uint64(len(ident.Plan)); atFirst != want {
				t.Fatalf("%d of %d requests submitted when the first layer was handed over, want %d (%d layers)", atFirst, total, want, c.wantLayers)
			}
		})
	}
}

// TestRestoreReadsFirstLayerAlone: with more than two buffers, the first
// layer's reads are the only ones in flight until they complete (the
// consumer waits for that layer, so it gets the whole disk); then the
// layers the buffers allow go out together.
func TestRestoreReadsFirstLayerAlone(t *testing.T) {
	g, s := newGated(t)
	ident := &Identity{Model: []byte("alone"), Plan: []LayerPlan{
		{Kind: LayerHidden, RowBytes: 128}, {Kind: LayerKV, RowBytes: 256}, {Kind: LayerHidden, RowBytes: 128}, {Kind: LayerHidden, RowBytes: 128}, {Kind: LayerKV, RowBytes: 256},
	}}
	createFilled(t, s, ident, "c", 40)
	g.setGating(true)
	restored := make(chan error, 1)
	go func() {
		_, err := s.RestoreOwned("ns", "c", ident, 4, func(layer int, rows []byte, release func()) error {
			release()
			return nil
		})
		restored <- err
	}()
	if g.waitBatches(t, 1, restored) {
		// A reader that did not hold back would have submitted the
		// other layers at once; give it the chance (not a speed limit:
		// the check is that none arrives while layer 0 is in flight).
		time.Sleep(100 * time.Millisecond)
		g.mu.Lock()
		n := len(g.batches)
		g.mu.Unlock()
		if n != 1 {
			t.Errorf("%d layers' reads submitted while the first layer's were in flight, want 1", n)
		}
		g.openGate(0)
		g.waitBatches(t, 4, restored) // layers 0-3: four buffers
	}
	g.setGating(false)
	if err := <-restored; err != nil {
		t.Fatal(err)
	}
}

// TestRestoreStopsReadingOnError: once the consumer fails, no further
// layer's reads start: at most the ahead buffers in flight and the one the
// consumer's release let start before the failure was seen. Layers are
// counted as the store's read submissions (one per layer), so the
// flusher's own I/O does not count.
func TestRestoreStopsReadingOnError(t *testing.T) {
	g, s := newGated(t)
	plan := make([]LayerPlan, 32)
	for i := range plan {
		plan[i] = LayerPlan{Kind: LayerHidden, RowBytes: 128}
	}
	ident := &Identity{Model: []byte("stop"), Plan: plan}
	createFilled(t, s, ident, "c", 40)
	before := g.reads.Load()
	if _, err := s.Restore("ns", "c", ident, func(int, []byte) error { return nil }); err != nil {
		t.Fatal(err)
	}
	if n := g.reads.Load() - before; n != int64(len(plan)) {
		t.Fatalf("a whole restore made %d read submissions for %d layers", n, len(plan))
	}
	boom := errors.New("consumer failed")
	for _, ahead := range []int{2, 8} {
		worst := int64(0)
		for i := 0; i < 30; i++ {
			before := g.reads.Load()
			_, err := s.RestoreOwned("ns", "c", ident, ahead, func(layer int, rows []byte, release func()) error {
				release()
				return boom
			})
			if !errors.Is(err, boom) {
				t.Fatalf("ahead %d: %v, want the consumer's error", ahead, err)
			}
			worst = max(worst, g.reads.Load()-before)
		}
		if worst > int64(ahead+1) {
			t.Errorf("ahead %d: up to %d layers read after the consumer failed on the first, want at most %d", ahead, worst, ahead+1)
		}
	}
}

// createFilled creates context id in namespace "ns" holding tokens tokens of
// its rows for every stored layer, durable on return.
func createFilled(t *testing.T, s *Store, ident *Identity, id string, tokens int) {
	t.Helper()
	w, err := s.Create("ns", id, ident, CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	appendPrefill(t, w, ident, id, 0, tokens)
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
}
