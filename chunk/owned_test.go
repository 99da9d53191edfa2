package chunk

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand"
	"strings"
	"sync"
	"testing"
	"time"
)

// TestRestoreOwned: a consumer that keeps buffers after fn returns (as a GPU
// copy does) gets every layer intact; no held buffer is reused or changed
// before its release; at most ahead buffers are out at once; RestoreOwned
// returns only after the last release.
func TestRestoreOwned(t *testing.T) {
	seed := time.Now().UnixNano()
	t.Logf("seed %d", seed)
	rng := rand.New(rand.NewSource(seed))
	e := newEnv(t, "disk", nil)
	s := e.open()
	defer s.Close()
	// Eight stored layers, so the producer has to wait for releases.
	ident := &Identity{Model: []byte("owned"), Plan: []LayerPlan{
		{LayerHidden, 128}, {LayerKV, 256}, {LayerHidden, 128}, {LayerHidden, 128},
		{LayerKV, 256}, {LayerHidden, 128}, {LayerNone, 0}, {LayerHidden, 128}, {LayerKV, 256},
	}}
	const tokens = 70
	w, err := s.Create("ns", "c", ident, CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	appendPrefill(t, w, ident, "c", 0, tokens)
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
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
		{LayerHidden, 128}, {LayerKV, 256}, {LayerHidden, 128}, {LayerHidden, 128},
		{LayerKV, 256}, {LayerHidden, 128}, {LayerHidden, 128}, {LayerKV, 256},
	}}
	w, err := s.Create("ns", "c", ident, CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	appendPrefill(t, w, ident, "c", 0, 70)
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
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
