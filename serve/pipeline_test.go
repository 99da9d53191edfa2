package serve

import (
	"errors"
	"fmt"
	"math"
	"math/rand"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hcache/hcache/chunk"
	"github.com/hcache/hcache/gpu"
	"github.com/hcache/hcache/internal/testseed"
	"github.com/hcache/hcache/model"
	"github.com/hcache/hcache/serve/sched"
)

// everySplit lists every plan the scheduler can emit for c: every
// recomputed prefix r < L, and every number of KV layers after the hidden
// ones (hidden layers only where HiddenAllowed).
func everySplit(c *model.Config) []sched.Split {
	var out []sched.Split
	for r := 0; r < c.Layers; r++ {
		for k := 0; k <= c.Layers-r; k++ {
			s := sched.Split{Recompute: r, Hidden: c.Layers - r - k, KV: k}
			if s.Hidden > 0 && !sched.HiddenAllowed(c) {
				continue
			}
			out = append(out, s)
		}
	}
	return out
}

// saved is a context saved to a store while generating, with the cache of
// the run (never evicted) and the token ids it holds.
type saved struct {
	id     string
	ident  *chunk.Identity
	ref    *model.KVCache
	tokens []int
	next   int // the last generated token, not yet fed
}

func saveContext(t *testing.T, st *chunk.Store, m *model.Model, w *model.Weights, plan []chunk.LayerPlan, id string, prompt []int, gen int) *saved {
	t.Helper()
	c := m.Cfg
	ident := Identity(c, w, plan)
	wr, err := st.Create("test", id, ident, chunk.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	saver := NewSaver(c, plan, wr)
	live := model.NewKVCache(c)
	got, err := m.Generate(live, prompt, gen, saver.Trace)
	if err != nil || saver.Err() != nil {
		t.Fatal(err, saver.Err())
	}
	if err := wr.Close(); err != nil {
		t.Fatal(err)
	}
	tokens := append(append([]int(nil), prompt...), got[:len(got)-1]...)
	if len(tokens) != live.Tokens {
		t.Fatalf("%d token ids for a cache of %d", len(tokens), live.Tokens)
	}
	return &saved{id: id, ident: ident, ref: live, tokens: tokens, next: got[len(got)-1]}
}

// cpuFor is the CPU backend of m, able to recompute every layer.
func cpuFor(t *testing.T, m *model.Model) *gpu.CPU {
	t.Helper()
	b, err := gpu.NewCPU(m.Cfg, m.W)
	if err != nil {
		t.Fatal(err)
	}
	if err := b.LoadRecompute(m.W, m.Cfg.Layers); err != nil {
		t.Fatal(err)
	}
	return b
}

func pagedFor(t *testing.T, c *model.Config, tokens int) gpu.HostCache {
	paged := make([]*gpu.PagedKV, c.Layers)
	for l := range paged {
		var err error
		if paged[l], err = gpu.NewPagedKV(c, 16, (tokens+15)/16); err != nil {
			t.Fatal(err)
		}
	}
	return paged
}

func sameKV(t *testing.T, what string, c *model.Config, want *model.KVCache, paged []*gpu.PagedKV) *model.KVCache {
	t.Helper()
	got, err := PagedToCache(c, paged, want.Tokens)
	if err != nil {
		t.Fatal(err)
	}
	for l := 0; l < c.Layers; l++ {
		for i := range want.K[l] {
			if math.Float32bits(want.K[l][i]) != math.Float32bits(got.K[l][i]) || math.Float32bits(want.V[l][i]) != math.Float32bits(got.V[l][i]) {
				t.Fatalf("%s: layer %d element %d: restored KV differs from the never-evicted cache", what, l, i)
			}
		}
	}
	return got
}

// TestRestoreEveryScheduledPlan: for every model family and every plan the
// scheduler can emit, a context saved under the plan (prefill and decode
// steps), evicted and restored (recomputed prefix from the token ids,
// hidden layers projected, KV layers loaded, overlapped) equals the cache
// that was never evicted bit for bit, and generation continues identically.
func TestRestoreEveryScheduledPlan(t *testing.T) {
	seed := testseed.Seed(t)
	st, err := chunk.Open(chunk.Options{Dir: t.TempDir(), ChunkTokens: 16, SegmentBytes: 8 << 20, Logf: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	rng := rand.New(rand.NewSource(seed))
	for _, preset := range []string{"tiny-llama", "tiny-gqa", "tiny-qwen2", "tiny-opt", "tiny-linear-rope"} {
		c, _ := model.Preset(preset)
		w := model.Synthesize(c, seed)
		m, err := model.New(c, w)
		if err != nil {
			t.Fatal(err)
		}
		backend := cpuFor(t, m)
		rest := NewRestorer(st, backend, Settings{})
		splits := everySplit(c)
		if sched.HiddenAllowed(c) != (c.KVHeads == c.Heads) {
			t.Fatalf("%s: hidden allowed %v with %d/%d heads", preset, sched.HiddenAllowed(c), c.Heads, c.KVHeads)
		}
		for _, sp := range splits {
			prompt := make([]int, 20+rng.Intn(30))
			for i := range prompt {
				prompt[i] = rng.Intn(c.Vocab)
			}
			id := fmt.Sprintf("%s-%d-%d-%d", preset, sp.Recompute, sp.Hidden, sp.KV)
			sv := saveContext(t, st, m, w, sp.Plan(c), id, prompt, 5)
			paged := pagedFor(t, c, sv.ref.Tokens)
			rs, err := rest.Restore(Request{NS: "test", ID: id, Ident: sv.ident, Tokens: sv.tokens, Dst: paged})
			if err != nil {
				t.Fatalf("%s: %v", id, err)
			}
			if rs.Tokens != sv.ref.Tokens || len(rs.Layers) != c.Layers {
				t.Fatalf("%s: restored %d tokens, %d layer timings; want %d, %d", id, rs.Tokens, len(rs.Layers), sv.ref.Tokens, c.Layers)
			}
			for i, lt := range rs.Layers {
				if lt.Layer != i || lt.End < lt.Start || (i >= sp.Recompute && lt.Start < lt.ReadDone) {
					t.Fatalf("%s: layer timing %d is inconsistent: %+v", id, i, lt)
				}
			}
			restored := sameKV(t, id, c, sv.ref, paged)
			// Generation continues as it would have without eviction.
			ref := sv.ref
			want, err := m.Generate(ref, []int{sv.next}, 4, nil)
			if err != nil {
				t.Fatal(err)
			}
			got, err := m.Generate(restored, []int{sv.next}, 4, nil)
			if err != nil {
				t.Fatal(err)
			}
			if fmt.Sprint(got) != fmt.Sprint(want) {
				t.Fatalf("%s: tokens after restore %v, want %v", id, got, want)
			}
		}
		t.Logf("%s: %d plans restored bit for bit", preset, len(splits))
	}
}

func TestRestoreRefusesBadRequests(t *testing.T) {
	st, err := chunk.Open(chunk.Options{Dir: t.TempDir(), ChunkTokens: 16, SegmentBytes: 8 << 20, Logf: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	c, _ := model.Preset("tiny-llama")
	w := model.Synthesize(c, 3)
	m, _ := model.New(c, w)
	backend := cpuFor(t, m)
	noRecompute, _ := gpu.NewCPU(c, w)
	prompt := []int{1, 2, 3, 4, 5, 6, 7, 8, 9, 10}
	sv := saveContext(t, st, m, w, sched.Split{Recompute: 2, Hidden: 1, KV: 1}.Plan(c), "ctx", prompt, 3)
	paged := pagedFor(t, c, sv.ref.Tokens)
	rest := NewRestorer(st, backend, Settings{})
	gqa, _ := model.Preset("tiny-gqa")
	cases := []struct {
		name string
		r    *Restorer
		req  Request
		want string
	}{
		{"no token ids", rest, Request{NS: "test", ID: "ctx", Ident: sv.ident, Dst: paged}, "token ids"},
		{"too few token ids", rest, Request{NS: "test", ID: "ctx", Ident: sv.ident, Tokens: sv.tokens[1:], Dst: paged}, "token ids given"},
		{"recompute not loaded", NewRestorer(st, noRecompute, Settings{}), Request{NS: "test", ID: "ctx", Ident: sv.ident, Tokens: sv.tokens, Dst: paged}, "LoadRecompute"},
		{"wrong layer count", rest, Request{NS: "test", ID: "ctx", Ident: sv.ident, Tokens: sv.tokens, Dst: paged[1:]}, "paged caches"},
		{"nil identity", rest, Request{NS: "test", ID: "ctx", Tokens: sv.tokens, Dst: paged}, "without an identity"},
		{"nil destination", rest, Request{NS: "test", ID: "ctx", Ident: sv.ident, Tokens: sv.tokens}, "without a destination"},
		{"no backend", NewRestorer(st, nil, Settings{}), Request{NS: "test", ID: "ctx", Ident: sv.ident, Tokens: sv.tokens, Dst: paged}, "needs a backend"},
		{"negative start", rest, Request{NS: "test", ID: "ctx", Ident: sv.ident, Tokens: sv.tokens, Dst: paged, Start: -1}, "start position -1"},
		{"recompute from a later start", rest, Request{NS: "test", ID: "ctx", Ident: sv.ident, Tokens: sv.tokens, Dst: paged, Start: 4}, "positions from 0"},
		{"plan of another model", rest, Request{NS: "test", ID: "ctx", Ident: Identity(gqa, model.Synthesize(gqa, 1), sched.PlanOf(gqa, chunk.LayerKV)), Dst: pagedFor(t, gqa, 4)}, "stores 128-byte rows; the model has 512"},
	}
	for _, cs := range cases {
		_, err := cs.r.Restore(cs.req)
		if err == nil || !strings.Contains(err.Error(), cs.want) {
			t.Errorf("%s: %v, want an error containing %q", cs.name, err, cs.want)
		}
	}
	// A recomputed layer after a stored one is refused before any read.
	odd := sched.PlanOf(c, chunk.LayerHidden)
	odd[2] = chunk.LayerPlan{Kind: chunk.LayerNone}
	if _, err := rest.Restore(Request{NS: "test", ID: "ctx", Ident: Identity(c, w, odd), Tokens: sv.tokens, Dst: paged}); err == nil || !strings.Contains(err.Error(), "prefix") {
		t.Errorf("non-prefix recompute: %v", err)
	}
	// A state saved under other weights is refused with the store's
	// error, whether or not the recomputation had finished.
	other := Identity(c, model.Synthesize(c, 99), sv.ident.Plan)
	if _, err := rest.Restore(Request{NS: "test", ID: "ctx", Ident: other, Tokens: sv.tokens, Dst: paged}); !errors.Is(err, chunk.ErrIdentityMismatch) {
		t.Errorf("other weights: %v, want ErrIdentityMismatch", err)
	}
	// The entry point without token ids refuses a recomputing plan clearly.
	if _, err := Restore(st, "test", "ctx", sv.ident, backend, paged); !errors.Is(err, ErrTokens) {
		t.Errorf("Restore of a recomputing plan without token ids: %v", err)
	}
	// And the context is intact afterwards.
	if _, err := rest.Restore(Request{NS: "test", ID: "ctx", Ident: sv.ident, Tokens: sv.tokens, Dst: paged}); err != nil {
		t.Fatal(err)
	}
	sameKV(t, "after refusals", c, sv.ref, paged)
}

// failingBackend fails the projection of one layer.
type failingBackend struct {
	gpu.Backend
	layer int
}

func (f failingBackend) BeginRestore(dst gpu.Cache, positions []int) (gpu.Restore, error) {
	r, err := f.Backend.BeginRestore(dst, positions)
	return failingRestore{r, f.layer}, err
}

type failingRestore struct {
	gpu.Restore
	layer int
}

func (f failingRestore) Hidden(layer int, rows []byte, release func()) error {
	if layer == f.layer {
		release()
		return errors.New("injected projection failure")
	}
	return f.Restore.Hidden(layer, rows, release)
}

// TestRestoreBackendFailureStopsReads: a failing layer ends the restore
// with its error, the reads stop, and the next restore of the same context
// (with a working backend) succeeds.
func TestRestoreBackendFailureStopsReads(t *testing.T) {
	st, err := chunk.Open(chunk.Options{Dir: t.TempDir(), ChunkTokens: 16, SegmentBytes: 8 << 20, Logf: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	c, _ := model.Preset("tiny-llama")
	w := model.Synthesize(c, 4)
	m, _ := model.New(c, w)
	backend := cpuFor(t, m)
	sv := saveContext(t, st, m, w, sched.Split{Recompute: 1, Hidden: 2, KV: 1}.Plan(c), "ctx", []int{5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21}, 2)
	paged := pagedFor(t, c, sv.ref.Tokens)
	_, err = NewRestorer(st, failingBackend{backend, 1}, Settings{BufferBytes: 1}).Restore(Request{NS: "test", ID: "ctx", Ident: sv.ident, Tokens: sv.tokens, Dst: paged})
	if err == nil || !strings.Contains(err.Error(), "injected") {
		t.Fatalf("restore with a failing backend: %v", err)
	}
	if _, err := NewRestorer(st, backend, Settings{}).Restore(Request{NS: "test", ID: "ctx", Ident: sv.ident, Tokens: sv.tokens, Dst: paged}); err != nil {
		t.Fatal(err)
	}
	sameKV(t, "after a failed restore", c, sv.ref, paged)
}

// TestConcurrentRestoresShareFairly: many restores of contexts of
// different lengths and plans through one Restorer at once all complete
// with exact caches; no restore held more read-ahead than its budget (or
// two layers); and with one admission slot, restores are served strictly in
// arrival order, so a steady stream of later arrivals cannot starve one.
func TestConcurrentRestoresShareFairly(t *testing.T) {
	seed := testseed.Seed(t)
	rng := rand.New(rand.NewSource(seed))
	st, err := chunk.Open(chunk.Options{Dir: t.TempDir(), ChunkTokens: 16, SegmentBytes: 8 << 20, Logf: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	c, _ := model.Preset("tiny-llama")
	w := model.Synthesize(c, seed)
	m, _ := model.New(c, w)
	backend := cpuFor(t, m)
	splits := everySplit(c)
	var ctxs []*saved
	for i := 0; i < 8; i++ {
		prompt := make([]int, 10+rng.Intn(90))
		for j := range prompt {
			prompt[j] = rng.Intn(c.Vocab)
		}
		ctxs = append(ctxs, saveContext(t, st, m, w, splits[rng.Intn(len(splits))].Plan(c), fmt.Sprint("c", i), prompt, 2))
	}
	const budget = 2048 // bytes: less than one layer of the longer contexts
	rest := NewRestorer(st, backend, Settings{MaxConcurrent: 3, BufferBytes: budget})
	var wg sync.WaitGroup
	stats := make([]RestoreStats, len(ctxs))
	errs := make([]error, len(ctxs))
	paged := make([]gpu.HostCache, len(ctxs))
	for i, sv := range ctxs {
		paged[i] = pagedFor(t, c, sv.ref.Tokens)
		wg.Add(1)
		go func(i int, sv *saved) {
			defer wg.Done()
			stats[i], errs[i] = rest.Restore(Request{NS: "test", ID: sv.id, Ident: sv.ident, Tokens: sv.tokens, Dst: paged[i]})
		}(i, sv)
	}
	wg.Wait()
	for i, sv := range ctxs {
		if errs[i] != nil {
			t.Fatalf("restore %d: %v", i, errs[i])
		}
		sameKV(t, sv.id, c, sv.ref, paged[i])
		layer := int64(sv.ref.Tokens) * int64(max(c.HiddenRowBytes(), c.KVRowBytes()))
		if p := stats[i].PeakBufferedBytes; p > max(budget, 2*layer) {
			t.Errorf("restore %d held %d read-ahead bytes, budget %d, largest layer %d (two are allowed)", i, p, budget, layer)
		}
	}

	// One slot: arrival order is service order. The backend records which
	// restore each call serves (by its paged caches), while the slot is held.
	rec := &recordingBackend{Backend: backend, owner: map[*gpu.PagedKV]int{}}
	serial := NewRestorer(st, rec, Settings{MaxConcurrent: 1})
	serial.admit.acquire() // hold the slot while the queue forms
	for i, sv := range ctxs {
		dst := pagedFor(t, c, sv.ref.Tokens)
		for _, p := range dst {
			rec.owner[p] = i
		}
		wg.Add(1)
		go func(i int, sv *saved) {
			defer wg.Done()
			if _, err := serial.Restore(Request{NS: "test", ID: sv.id, Ident: sv.ident, Tokens: sv.tokens, Dst: dst}); err != nil {
				t.Error(err)
			}
		}(i, sv)
		for serial.admit.waiting() != i+1 { // arrival i is queued before i+1 starts
			time.Sleep(time.Millisecond)
		}
	}
	serial.admit.release()
	wg.Wait()
	if fmt.Sprint(rec.order) != fmt.Sprint([]int{0, 1, 2, 3, 4, 5, 6, 7}) {
		t.Fatalf("service order %v, want arrival order", rec.order)
	}
}

// recordingBackend notes the order in which restores first reach it.
type recordingBackend struct {
	gpu.Backend
	mu    sync.Mutex
	owner map[*gpu.PagedKV]int
	seen  map[int]bool
	order []int
}

func (r *recordingBackend) note(dst gpu.Cache) {
	first := dst.(gpu.HostCache)[0]
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.seen == nil {
		r.seen = map[int]bool{}
	}
	if i := r.owner[first]; !r.seen[i] {
		r.seen[i] = true
		r.order = append(r.order, i)
	}
}

func (r *recordingBackend) BeginRestore(dst gpu.Cache, positions []int) (gpu.Restore, error) {
	r.note(dst)
	return r.Backend.BeginRestore(dst, positions)
}

// TestFIFOSemHandsOff: a holder that releases and acquires again queues
// behind the waiters already there (no barging), so alternating restores
// take the backend in turns.
func TestFIFOSemHandsOff(t *testing.T) {
	s := newFIFOSem(1)
	s.acquire()
	got := make(chan int, 10)
	for i := 0; i < 3; i++ {
		go func(i int) {
			s.acquire()
			got <- i
			s.release()
		}(i)
		for s.waiting() != i+1 {
			time.Sleep(time.Millisecond)
		}
	}
	// The holder releases and immediately wants the slot again: it must
	// come after the three waiters.
	s.release()
	s.acquire()
	got <- 99
	s.release()
	var seq []int
	for i := 0; i < 4; i++ {
		seq = append(seq, <-got)
	}
	if fmt.Sprint(seq) != "[0 1 2 99]" {
		t.Fatalf("order %v, want [0 1 2 99]", seq)
	}
}
