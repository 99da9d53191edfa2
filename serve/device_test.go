package serve

import (
	"errors"
	"fmt"
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

// asyncDevice is a test seam shaped like a GPU backend: every call of its
// restores only queues work, which one worker goroutine (its "stream") runs
// later in submission order on the CPU backend, calling each release from
// there once the layer is consumed. Its recompute does not start until a
// stored layer has been queued behind it (or Wait is called), so a pipeline
// that waited for the recompute before streaming stored layers would never
// see it finish. It records what was queued, in order.
type asyncDevice struct {
	*gpu.CPU
	fail string // queued work of this name fails ("hidden 2")

	mu       sync.Mutex
	log      []string
	overlaps int // stored layers queued while the recompute had not run
	waits    int
}

func (d *asyncDevice) note(s string) {
	d.mu.Lock()
	d.log = append(d.log, s)
	d.mu.Unlock()
}

// deviceCache is asyncDevice's "device memory": what it restores into, and
// not a gpu.HostCache (a pipeline that treated device caches otherwise than
// host ones would show here).
type deviceCache struct{ mem gpu.HostCache }

func (c deviceCache) CacheLayers() int { return len(c.mem) }

func (d *asyncDevice) BeginRestore(dst gpu.Cache, positions []int) (gpu.Restore, error) {
	dc, ok := dst.(deviceCache)
	if !ok {
		return nil, fmt.Errorf("asyncDevice restores into its deviceCache, not a %T", dst)
	}
	inner, err := d.CPU.BeginRestore(dc.mem, positions)
	if err != nil {
		return nil, err
	}
	d.note(fmt.Sprintf("begin %d..%d", positions[0], positions[len(positions)-1]))
	r := &asyncRestore{d: d, inner: inner, work: make(chan work, 64), done: make(chan struct{}), gate: make(chan struct{})}
	go r.stream()
	return r, nil
}

// work is one queued item; release (may be nil) is called when a failed
// stream skips it.
type work struct {
	run     func() error
	release func()
}

type asyncRestore struct {
	d        *asyncDevice
	inner    gpu.Restore
	work     chan work
	done     chan struct{}
	gate     chan struct{} // closed once a stored layer (or Wait) follows the recompute
	gateOnce sync.Once
	mu       sync.Mutex
	err      error
	recomp   bool // a recompute is queued and has not run
}

func (r *asyncRestore) stream() {
	defer close(r.done)
	for w := range r.work {
		if r.firstErr() != nil {
			if w.release != nil {
				w.release()
			}
			continue
		}
		if err := w.run(); err != nil {
			r.mu.Lock()
			if r.err == nil {
				r.err = err
			}
			r.mu.Unlock()
		}
	}
}

func (r *asyncRestore) firstErr() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.err
}

func (r *asyncRestore) open() { r.gateOnce.Do(func() { close(r.gate) }) }

func (r *asyncRestore) Recompute(tokens []int, layers int, done func(int)) error {
	r.d.note(fmt.Sprintf("recompute %d", layers))
	r.mu.Lock()
	r.recomp = true
	r.mu.Unlock()
	r.work <- work{run: func() error {
		<-r.gate
		err := r.inner.Recompute(tokens, layers, nil)
		r.mu.Lock()
		r.recomp = false
		r.mu.Unlock()
		return err
	}}
	for l := 0; done != nil && l < layers; l++ {
		done(l) // queued
	}
	return r.firstErr()
}

func (r *asyncRestore) Hidden(layer int, rows []byte, release func()) error {
	return r.layer("hidden", layer, rows, release, r.inner.Hidden)
}

func (r *asyncRestore) KV(layer int, rows []byte, release func()) error {
	return r.layer("kv", layer, rows, release, r.inner.KV)
}

func (r *asyncRestore) layer(kind string, layer int, rows []byte, release func(), run func(int, []byte, func()) error) error {
	name := fmt.Sprintf("%s %d", kind, layer)
	r.d.note(name)
	r.mu.Lock()
	if r.recomp {
		r.d.mu.Lock()
		r.d.overlaps++
		r.d.mu.Unlock()
	}
	r.mu.Unlock()
	r.open()
	if err := r.firstErr(); err != nil {
		release()
		return err
	}
	r.work <- work{run: func() error {
		if name == r.d.fail {
			release()
			return errors.New("injected device failure at " + name)
		}
		return run(layer, rows, release)
	}, release: release}
	return nil
}

func (r *asyncRestore) Abort() { r.inner.Abort() }

func (r *asyncRestore) Wait() (gpu.Timing, error) {
	r.d.mu.Lock()
	r.d.waits++
	r.d.mu.Unlock()
	r.open()
	close(r.work)
	<-r.done
	t, err := r.inner.Wait()
	if e := r.firstErr(); e != nil {
		err = e
	}
	return t, err
}

// TestDevicePipelineRunsEveryScheduledPlan: through a backend that only
// queues (asyncDevice), every plan the scheduler emits restores bit for bit:
// the recomputed prefix is queued first, from the token ids, and the stored
// layers are queued behind it while it has not run (the compute stream and
// the reads overlap), each buffer handed back by the device once consumed;
// Wait ends each restore once. A scheduled plan restored this way equals an
// all-KV restore of the same context.
func TestDevicePipelineRunsEveryScheduledPlan(t *testing.T) {
	seed := testseed.Seed(t)
	rng := rand.New(rand.NewSource(seed))
	st, err := chunk.Open(chunk.Options{Dir: t.TempDir(), ChunkTokens: 16, SegmentBytes: 8 << 20, Logf: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	for _, preset := range []string{"tiny-llama", "tiny-gqa"} {
		c, _ := model.Preset(preset)
		w := model.Synthesize(c, seed)
		m, err := model.New(c, w)
		if err != nil {
			t.Fatal(err)
		}
		dev := &asyncDevice{CPU: cpuFor(t, m)}
		rest := NewRestorer(st, dev, Settings{BufferBytes: 1})
		prompt := make([]int, 20+rng.Intn(30))
		for i := range prompt {
			prompt[i] = rng.Intn(c.Vocab)
		}
		allKV := saveContext(t, st, m, w, sched.PlanOf(c, chunk.LayerKV), preset+"-kv", prompt, 3)
		kvPaged := pagedFor(t, c, allKV.ref.Tokens)
		if _, err := rest.Restore(Request{NS: "test", ID: allKV.id, Ident: allKV.ident, Dst: deviceCache{kvPaged}}); err != nil {
			t.Fatal(err)
		}
		kvCache := sameKV(t, "all-KV", c, allKV.ref, kvPaged)
		for _, sp := range everySplit(c) {
			id := fmt.Sprintf("%s-%d-%d-%d", preset, sp.Recompute, sp.Hidden, sp.KV)
			sv := saveContext(t, st, m, w, sp.Plan(c), id, prompt, 3)
			paged := pagedFor(t, c, sv.ref.Tokens)
			dev.mu.Lock()
			dev.log, dev.overlaps, dev.waits = nil, 0, 0
			dev.mu.Unlock()
			rs, err := rest.Restore(Request{NS: "test", ID: id, Ident: sv.ident, Tokens: sv.tokens, Dst: deviceCache{paged}})
			if err != nil {
				t.Fatalf("%s: %v", id, err)
			}
			got := sameKV(t, id, c, sv.ref, paged)
			for l := range got.K {
				if fmt.Sprint(got.K[l]) != fmt.Sprint(kvCache.K[l]) || fmt.Sprint(got.V[l]) != fmt.Sprint(kvCache.V[l]) {
					t.Fatalf("%s: layer %d differs from the all-KV restore", id, l)
				}
			}
			want := []string{fmt.Sprintf("begin 0..%d", sv.ref.Tokens-1)}
			if sp.Recompute > 0 {
				want = append(want, fmt.Sprintf("recompute %d", sp.Recompute))
			}
			for l := sp.Recompute; l < c.Layers; l++ {
				want = append(want, fmt.Sprintf("%s %d", sv.ident.Plan[l].Kind, l))
			}
			dev.mu.Lock()
			log, overlaps, waits := fmt.Sprint(dev.log), dev.overlaps, dev.waits
			dev.mu.Unlock()
			if log != fmt.Sprint(want) {
				t.Fatalf("%s: device queue %s, want %v", id, log, want)
			}
			if sp.Recompute > 0 && overlaps == 0 {
				t.Fatalf("%s: no stored layer was queued while the recompute was pending", id)
			}
			if waits != 1 || rs.Device.Layers != c.Layers {
				t.Fatalf("%s: %d waits, device counted %d layers; want 1 and %d", id, waits, rs.Device.Layers, c.Layers)
			}
		}
	}
}

// TestDevicePipelineFailureDrains: when queued device work fails, the
// restore returns its error after the device has been waited for and every
// buffer handed back (the store's restore returns only then), and the same
// context then restores exactly.
func TestDevicePipelineFailureDrains(t *testing.T) {
	st, err := chunk.Open(chunk.Options{Dir: t.TempDir(), ChunkTokens: 16, SegmentBytes: 8 << 20, Logf: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	c, _ := model.Preset("tiny-llama")
	w := model.Synthesize(c, 7)
	m, _ := model.New(c, w)
	sv := saveContext(t, st, m, w, sched.Split{Recompute: 1, Hidden: 2, KV: 1}.Plan(c), "ctx", []int{3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4}, 2)
	for _, fail := range []string{"hidden 1", "hidden 2", "kv 3"} {
		dev := &asyncDevice{CPU: cpuFor(t, m), fail: fail}
		paged := pagedFor(t, c, sv.ref.Tokens)
		_, err := NewRestorer(st, dev, Settings{BufferBytes: 1}).Restore(Request{NS: "test", ID: "ctx", Ident: sv.ident, Tokens: sv.tokens, Dst: deviceCache{paged}})
		if err == nil || !strings.Contains(err.Error(), "injected device failure at "+fail) {
			t.Fatalf("%s: %v", fail, err)
		}
		if dev.waits != 1 {
			t.Fatalf("%s: the device was waited for %d times, want 1", fail, dev.waits)
		}
	}
	paged := pagedFor(t, c, sv.ref.Tokens)
	if _, err := NewRestorer(st, &asyncDevice{CPU: cpuFor(t, m)}, Settings{}).Restore(Request{NS: "test", ID: "ctx", Ident: sv.ident, Tokens: sv.tokens, Dst: deviceCache{paged}}); err != nil {
		t.Fatal(err)
	}
	sameKV(t, "after failures", c, sv.ref, paged)
}

// barrierBackend holds each restore's first layer until every one of n
// restores has begun on the backend: restores that ran in turns would
// never all begin.
type barrierBackend struct {
	gpu.Backend
	n       int
	mu      sync.Mutex
	begun   int
	all     chan struct{}
	timeout <-chan time.Time
	turns   bool
}

func (b *barrierBackend) BeginRestore(dst gpu.Cache, positions []int) (gpu.Restore, error) {
	r, err := b.Backend.BeginRestore(dst, positions)
	if err != nil {
		return nil, err
	}
	b.mu.Lock()
	b.begun++
	if b.begun == b.n {
		close(b.all)
	}
	b.mu.Unlock()
	return &barrierRestore{Restore: r, b: b}, nil
}

type barrierRestore struct {
	gpu.Restore
	b    *barrierBackend
	once sync.Once
}

func (r *barrierRestore) wait() {
	r.once.Do(func() {
		select {
		case <-r.b.all:
		case <-r.b.timeout: // a deadlock guard, not a timing assertion
			r.b.mu.Lock()
			r.b.turns = true
			r.b.mu.Unlock()
		}
	})
}

func (r *barrierRestore) Hidden(layer int, rows []byte, release func()) error {
	r.wait()
	return r.Restore.Hidden(layer, rows, release)
}

func (r *barrierRestore) KV(layer int, rows []byte, release func()) error {
	r.wait()
	return r.Restore.KV(layer, rows, release)
}

// TestConcurrentRestoresRunSideBySide: restores admitted together run on a
// backend that allows it at the same time, each with its own restore, not
// one context after another.
func TestConcurrentRestoresRunSideBySide(t *testing.T) {
	st, err := chunk.Open(chunk.Options{Dir: t.TempDir(), ChunkTokens: 16, SegmentBytes: 8 << 20, Logf: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	c, _ := model.Preset("tiny-llama")
	w := model.Synthesize(c, 5)
	m, _ := model.New(c, w)
	const n = 3
	var ctxs []*saved
	for i := 0; i < n; i++ {
		ctxs = append(ctxs, saveContext(t, st, m, w, sched.PlanOf(c, chunk.LayerHidden), fmt.Sprint("t", i), []int{1 + i, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17}, 2))
	}
	bb := &barrierBackend{Backend: cpuFor(t, m), n: n, all: make(chan struct{}), timeout: time.After(time.Minute)}
	rest := NewRestorer(st, bb, Settings{MaxConcurrent: n})
	var wg sync.WaitGroup
	for _, sv := range ctxs {
		wg.Add(1)
		go func(sv *saved) {
			defer wg.Done()
			dst := pagedFor(t, c, sv.ref.Tokens)
			if _, err := rest.Restore(Request{NS: "test", ID: sv.id, Ident: sv.ident, Dst: dst}); err != nil {
				t.Error(err)
				return
			}
			sameKV(t, sv.id, c, sv.ref, dst)
		}(sv)
	}
	wg.Wait()
	if bb.turns {
		t.Fatalf("%d restores admitted together did not all begin on the backend while each held its first layer: they ran in turns", n)
	}
}

// TestStreamHandsOnStoredAndProjectedRows: the daemon's path. Without
// projection every stored layer is handed on as stored; with it, hidden
// layers come as the K|V rows of the forward pass's cache; recomputed
// layers store nothing and are not handed on. A plan of another model, or a
// failing sink, ends the stream with the error and the context restores
// afterwards.
func TestStreamHandsOnStoredAndProjectedRows(t *testing.T) {
	st, err := chunk.Open(chunk.Options{Dir: t.TempDir(), ChunkTokens: 16, SegmentBytes: 8 << 20, Logf: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	c, _ := model.Preset("tiny-llama")
	w := model.Synthesize(c, 9)
	m, _ := model.New(c, w)
	sv := saveContext(t, st, m, w, sched.Split{Recompute: 1, Hidden: 2, KV: 1}.Plan(c), "ctx", []int{9, 8, 7, 6, 5, 4, 3, 2, 1, 10, 11, 12, 13, 14, 15, 16, 17, 18}, 3)
	stored := map[int][]byte{}
	if _, err := st.Restore("test", "ctx", sv.ident, func(l int, rows []byte) error {
		stored[l] = append([]byte(nil), rows...)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	kvRows := func(l int) []byte {
		kvd, half := c.KVDim(), c.KVRowBytes()/2
		out := make([]byte, sv.ref.Tokens*c.KVRowBytes())
		for i := 0; i < sv.ref.Tokens; i++ {
			c.EncodeRow(out[i*2*half:], sv.ref.K[l][i*kvd:(i+1)*kvd])
			c.EncodeRow(out[i*2*half+half:], sv.ref.V[l][i*kvd:(i+1)*kvd])
		}
		return out
	}
	rest := NewRestorer(st, cpuFor(t, m), Settings{})
	for _, project := range []bool{false, true} {
		var got []string
		rs, err := rest.Stream(StreamRequest{NS: "test", ID: "ctx", Ident: sv.ident, Project: project}, func(l StreamLayer) error {
			got = append(got, fmt.Sprintf("%d:%s", l.Layer, l.Kind))
			want := stored[l.Layer]
			if project {
				want = kvRows(l.Layer)
			}
			if string(l.Rows) != string(want) || l.Tokens != sv.ref.Tokens || l.RowBytes*l.Tokens != len(l.Rows) {
				return fmt.Errorf("layer %d (project %v): rows differ", l.Layer, project)
			}
			return nil
		})
		if err != nil || rs.Tokens != sv.ref.Tokens {
			t.Fatalf("project %v: %d tokens, %v", project, rs.Tokens, err)
		}
		want := "[1:hidden 2:hidden 3:kv]"
		if project {
			want = "[1:kv 2:kv 3:kv]"
		}
		if fmt.Sprint(got) != want {
			t.Fatalf("project %v: layers %v, want %s", project, got, want)
		}
	}
	gqa, _ := model.Preset("tiny-gqa")
	other := NewRestorer(st, cpuFor(t, mustModel(t, gqa)), Settings{})
	if _, err := other.Stream(StreamRequest{NS: "test", ID: "ctx", Ident: sv.ident, Project: true}, func(StreamLayer) error { return nil }); !errors.Is(err, ErrPlan) {
		t.Fatalf("projected by another model: %v, want ErrPlan", err)
	}
	if _, err := NewRestorer(st, nil, Settings{}).Stream(StreamRequest{NS: "test", ID: "ctx", Ident: sv.ident, Project: true}, func(StreamLayer) error { return nil }); err == nil || !strings.Contains(err.Error(), "without a backend") {
		t.Fatalf("projected without a backend: %v", err)
	}
	for _, project := range []bool{false, true} {
		calls := 0
		_, err := rest.Stream(StreamRequest{NS: "test", ID: "ctx", Ident: sv.ident, Project: project}, func(StreamLayer) error {
			calls++
			return errors.New("client went away")
		})
		if err == nil || err.Error() != "client went away" || calls != 1 {
			t.Fatalf("failing sink (project %v): %v after %d calls", project, err, calls)
		}
	}
	paged := pagedFor(t, c, sv.ref.Tokens)
	if _, err := rest.Restore(Request{NS: "test", ID: "ctx", Ident: sv.ident, Tokens: sv.tokens, Dst: paged}); err != nil {
		t.Fatal(err)
	}
	sameKV(t, "after streams", c, sv.ref, paged)
}

func mustModel(t *testing.T, c *model.Config) *model.Model {
	t.Helper()
	m, err := model.New(c, model.Synthesize(c, 1))
	if err != nil {
		t.Fatal(err)
	}
	return m
}
