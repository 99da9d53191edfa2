package chunk

import (
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/hcache/hcache/iouring"
)

// idleKinds lists the idle buffers as size/kind strings, oldest first.
func idleKinds(a *alignedScratch) []string {
	a.mu.Lock()
	defer a.mu.Unlock()
	var out []string
	for _, b := range a.idle {
		k := "base"
		if b.HugePages() {
			k = "huge"
		}
		out = append(out, fmt.Sprintf("%d/%s", len(b.Bytes())>>20, k))
	}
	return out
}

// TestRestoreBuffersMapHugePagesInBackground: a restore buffer no idle one
// serves is handed out in base pages at once while one in huge pages is
// mapped in the background; later requests prefer it, a base-page buffer
// returned beside an idle huge one of its size is freed, and trimming frees
// base-page buffers first. Requests under a huge page, or past the idle
// bound, map as before. Every buffer registered is unregistered by release.
func TestRestoreBuffersMapHugePagesInBackground(t *testing.T) {
	const mib = 1 << 20
	class4 := sizeClass(3 * mib) // 4 MiB + a block
	cases := []struct {
		name      string
		limit     int64
		steps     func(t *testing.T, a *alignedScratch)
		wantIdle  []string // after the steps and the mappers
		wantSmall int      // buffers handed out in base pages (-1: depends on the mapper's speed)
	}{
		{"cold get: base pages now, huge for later", 64 * mib, func(t *testing.T, a *alignedScratch) {
			b := get(t, a, 3*mib)
			if b.HugePages() || len(b.Bytes()) != class4 {
				t.Fatalf("cold get: %d bytes, huge %v; want %d in base pages", len(b.Bytes()), b.HugePages(), class4)
			}
			a.mappers.Wait()
			a.put(b) // replaced: freed
		}, []string{"4/huge"}, 1},
		{"the huge one is preferred, then reused", 64 * mib, func(t *testing.T, a *alignedScratch) {
			b := get(t, a, 3*mib)
			a.mappers.Wait()
			h := get(t, a, 3*mib)
			if !h.HugePages() {
				t.Fatal("second get: base pages with a huge-page buffer idle")
			}
			a.put(h)
			a.put(b)
		}, []string{"4/huge"}, 1},
		{"an idle base-page buffer is used and replaced", 64 * mib, func(t *testing.T, a *alignedScratch) {
			b1 := get(t, a, 3*mib)
			b2 := get(t, a, 3*mib) // the mapper may not be done: base pages again, or the huge one
			a.mappers.Wait()
			a.put(b1)
			a.put(b2)
			b3 := get(t, a, 3*mib)
			if !b3.HugePages() {
				t.Fatalf("with %v idle, get handed out base pages", idleKinds(a))
			}
			a.put(b3)
		}, []string{"4/huge"}, -1},
		{"trim frees base pages first", 18 * mib, func(t *testing.T, a *alignedScratch) {
			big := get(t, a, 12*mib) // 16 MiB class: base pages; its huge one is mapped
			a.mappers.Wait()         // idle: 16/huge
			small := get(t, a, 3*mib)
			a.mappers.Wait() // idle: 16/huge, 4/huge: over 18 MiB, the older (16) goes
			a.put(big)       // 4/huge, 16/base: over the bound, the base one goes though newer
			a.put(small)     // 4/base beside 4/huge: freed
		}, []string{"4/huge"}, 2},
		{"prepared: the restore's buffers are mapped ahead", 64 * mib, func(t *testing.T, a *alignedScratch) {
			a.prepare(3*mib, 2)
			a.mappers.Wait()
			a.prepare(3*mib, 2) // two idle already: nothing more
			b1, b2 := get(t, a, 3*mib), get(t, a, 3*mib)
			if !b1.HugePages() || !b2.HugePages() {
				t.Fatal("a prepared request was handed base pages")
			}
			a.put(b1)
			a.put(b2)
		}, []string{"4/huge", "4/huge"}, 0},
		{"prepared past the idle bound: nothing mapped", 6 * mib, func(t *testing.T, a *alignedScratch) {
			a.prepare(3*mib, 2)
		}, nil, 0},
		{"under a huge page: mapped directly", 64 * mib, func(t *testing.T, a *alignedScratch) {
			b := get(t, a, 100<<10)
			a.mappers.Wait()
			a.put(b)
		}, []string{"0/base"}, 0},
		{"past the idle bound: huge pages directly", 2 * mib, func(t *testing.T, a *alignedScratch) {
			b := get(t, a, 3*mib)
			if !b.HugePages() {
				t.Fatal("a buffer that will never be kept idle was mapped in base pages")
			}
			a.mappers.Wait()
			a.put(b)
		}, nil, 0},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			var mu sync.Mutex
			live := map[*byte]int{}
			a := &alignedScratch{bounded: true, limit: c.limit, logf: t.Logf, hooks: BufferHooks{
				Register:   func(m []byte) error { mu.Lock(); live[&m[0]]++; mu.Unlock(); return nil },
				Unregister: func(m []byte) { mu.Lock(); live[&m[0]]--; mu.Unlock() },
			}}
			c.steps(t, a)
			a.mappers.Wait()
			if got := idleKinds(a); fmt.Sprint(got) != fmt.Sprint(c.wantIdle) {
				t.Errorf("idle buffers %v, want %v", got, c.wantIdle)
			}
			if got := a.smallPages.Load(); c.wantSmall >= 0 && got != uint64(c.wantSmall) {
				t.Errorf("%d buffers in base pages, want %d", got, c.wantSmall)
			}
			a.release()
			for p, n := range live {
				if n != 0 {
					t.Errorf("buffer at %p registered %d more times than unregistered after release", p, n)
				}
			}
		})
	}
}

// TestReleaseWaitsForBackgroundMapping: a store closed while a huge-page
// buffer is still being mapped frees (and unregisters) it: release waits for
// the mapper, which sees the store closed.
func TestReleaseWaitsForBackgroundMapping(t *testing.T) {
	var mu sync.Mutex
	registered := 0
	gate := make(chan struct{})
	a := &alignedScratch{bounded: true, limit: 64 << 20, logf: t.Logf, hooks: BufferHooks{
		Register:   func([]byte) error { mu.Lock(); registered++; mu.Unlock(); return nil },
		Unregister: func([]byte) { mu.Lock(); registered--; mu.Unlock() },
	}}
	a.mapped = func() { <-gate }
	b := get(t, a, 3<<20)
	a.put(b) // no huge one idle yet: kept
	released := make(chan struct{})
	go func() { a.release(); close(released) }()
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(time.Millisecond) { // a hang, not a speed limit
		a.mu.Lock()
		closed := a.closed
		a.mu.Unlock()
		if closed {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("release did not start")
		}
	}
	select {
	case <-released:
		t.Fatal("release returned while a mapper was still running")
	default:
	}
	close(gate)
	<-released
	if registered != 0 {
		t.Fatalf("%d buffers still registered after release", registered)
	}
	if n := len(idleKinds(a)); n != 0 {
		t.Fatalf("%d idle buffers after release", n)
	}
}

func get(t *testing.T, a *alignedScratch, n int) *iouring.AlignedBuffer {
	t.Helper()
	b, err := a.get(n)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestSavedContextRestoresIntoHugePages: closing a writer has the context's
// restore buffers mapped in huge pages in the background, so its first
// restore takes none in base pages.
func TestSavedContextRestoresIntoHugePages(t *testing.T) {
	e := newEnv(t, "disk", func(o *Options) { o.ChunkTokens = 64 })
	s := e.open()
	defer s.Close()
	ident := &Identity{Model: []byte("huge"), Plan: []LayerPlan{{Kind: LayerHidden, RowBytes: 8192}, {Kind: LayerHidden, RowBytes: 8192}}}
	const tokens = 320 // 2.5 MiB layers
	w, err := s.Create("ns", "c", ident, CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	appendPrefill(t, w, ident, "c", 0, tokens)
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	s.readBufs.mappers.Wait()
	verify(t, s, "ns", "c", ident, tokens)
	if n := s.RestoreStages().BasePageBuffers; n != 0 {
		t.Fatalf("the first restore of a saved context took %d buffers in base pages", n)
	}
}

// TestReopenedStorePreparesRestoreBuffers: Open has the restore buffers of
// the stored contexts mapped in huge pages in the background, the most
// recently used first within IdleReadBufferBytes, so the first restore after
// a restart takes none in base pages; a read-only open (fsck, stat) maps
// nothing.
func TestReopenedStorePreparesRestoreBuffers(t *testing.T) {
	cases := []struct {
		name     string
		idle     int64
		readOnly bool
		wantIdle int // idle buffers once the mappers are done
		wantBase int // buffers the first restore took in base pages (-1: some, as the mapper runs beside it)
	}{
		{"prepared", 0, false, 2, 0},
		{"read-only: nothing mapped", 0, true, 0, -1},
		{"past the idle bound: nothing mapped, huge pages on the restore's path", 4 << 20, false, 0, 0},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			e := newEnv(t, "disk", func(o *Options) { o.ChunkTokens = 64; o.IdleReadBufferBytes = c.idle })
			s := e.open()
			ident := &Identity{Model: []byte("huge"), Plan: []LayerPlan{{Kind: LayerHidden, RowBytes: 8192}, {Kind: LayerHidden, RowBytes: 8192}}}
			const tokens = 320 // 2.5 MiB layers: two 4 MiB buffers
			w, err := s.Create("ns", "c", ident, CreateOptions{})
			if err != nil {
				t.Fatal(err)
			}
			appendPrefill(t, w, ident, "c", 0, tokens)
			if err := w.Close(); err != nil {
				t.Fatal(err)
			}
			s.Close()
			e.opts.ReadOnly = c.readOnly
			s = e.open()
			defer s.Close()
			s.readBufs.mappers.Wait()
			if got := len(idleKinds(&s.readBufs)); got != c.wantIdle {
				t.Fatalf("%d idle buffers after Open, want %d", got, c.wantIdle)
			}
			verify(t, s, "ns", "c", ident, tokens)
			if n := s.RestoreStages().BasePageBuffers; c.wantBase >= 0 && n != uint64(c.wantBase) || c.wantBase < 0 && n == 0 {
				t.Fatalf("the first restore after Open took %d buffers in base pages, want %d", n, c.wantBase)
			}
		})
	}
}
