package serve

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand"
	"sync"
	"testing"
	"time"

	"github.com/hcache/hcache/chunk"
	"github.com/hcache/hcache/gpu"
	"github.com/hcache/hcache/internal/testseed"
	"github.com/hcache/hcache/model"
	"github.com/hcache/hcache/state"
)

// saveOp is one append a Saver made: a prefill layer (layer >= 0, rows of
// its tokens) or a decode token (layer -1, a row per layer).
type saveOp struct {
	layer int
	rows  []byte
	tok   [][]byte
}

// opRecorder is an Appender that records the Saver's appends.
type opRecorder struct{ ops []saveOp }

func (r *opRecorder) AppendLayer(layer int, rows []byte) error {
	r.ops = append(r.ops, saveOp{layer: layer, rows: append([]byte(nil), rows...)})
	return nil
}

func (r *opRecorder) AppendToken(rows [][]byte) error {
	tok := make([][]byte, len(rows))
	for l, b := range rows {
		tok[l] = append([]byte(nil), b...)
	}
	r.ops = append(r.ops, saveOp{layer: -1, tok: tok})
	return nil
}

// engine plays an engine on the CPU device: each op's rows are written
// into fresh device memory by a "kernel" on the engine's stream (gated when
// gate is non-nil), then saved through the device saver.
type engine struct {
	t      *testing.T
	dev    *gpu.CPUDevice
	stream gpu.Stream
	plan   []state.LayerPlan
	ds     *DeviceSaver
}

func newEngine(t *testing.T, plan []state.LayerPlan, w DeviceAppender, o DeviceSaveOptions) *engine {
	t.Helper()
	dev := gpu.NewCPUDevice()
	t.Cleanup(func() { dev.Close() })
	s, err := dev.NewStream()
	if err != nil {
		t.Fatal(err)
	}
	ds, err := NewDeviceSaver(plan, w, dev, o)
	if err != nil {
		t.Fatal(err)
	}
	return &engine{t: t, dev: dev, stream: s, plan: plan, ds: ds}
}

// upload allocates device memory and queues a kernel writing b into it,
// after gate (if non-nil) opens.
func (e *engine) upload(b []byte, gate <-chan struct{}) gpu.DevicePtr {
	e.t.Helper()
	p, mem, err := e.dev.Alloc(len(b))
	if err != nil {
		e.t.Fatal(err)
	}
	b = append([]byte(nil), b...)
	if err := e.dev.Launch(e.stream, func() {
		if gate != nil {
			<-gate
		}
		copy(mem, b)
	}); err != nil {
		e.t.Fatal(err)
	}
	return p
}

// save queues op through the device saver (ErrStagingFull included in the
// error returned).
func (e *engine) save(op saveOp, gate <-chan struct{}) (uint64, error) {
	if op.layer >= 0 {
		p := e.upload(op.rows, gate)
		return e.ds.SaveLayer(context.Background(), op.layer, p, len(op.rows)/int(e.plan[op.layer].RowBytes), e.stream)
	}
	return e.saveToken(op, gate)
}

// saveParts saves a prefill layer in calls that each fit the staging.
func (e *engine) saveParts(op saveOp) error {
	rb := int(e.plan[op.layer].RowBytes)
	s := e.ds.Stats()
	most := s.SlotBytes / rb * s.Slots * rb
	for len(op.rows) > 0 {
		n := min(most, len(op.rows))
		if _, err := e.save(saveOp{layer: op.layer, rows: op.rows[:n]}, nil); err != nil {
			return err
		}
		op.rows = op.rows[n:]
	}
	return nil
}

func (e *engine) saveToken(op saveOp, gate <-chan struct{}) (uint64, error) {
	var all []byte
	for _, r := range op.tok {
		all = append(all, r...)
	}
	base := e.upload(all, gate)
	ptrs := make([]gpu.DevicePtr, len(op.tok))
	off := 0
	for l, r := range op.tok {
		if len(r) > 0 {
			ptrs[l] = base + gpu.DevicePtr(off)
			off += len(r)
		}
	}
	return e.ds.SaveToken(context.Background(), ptrs, e.stream)
}

// TestDeviceSaverRestoresBitExact: a prefill and decode steps saved from
// (CPU) device memory through the device saver, into a real store, restore
// bit for bit equal to the never-evicted cache, for plans with hidden, KV
// and recomputed layers, with staging small enough that prefill layers span
// several slots and calls wait for staging.
func TestDeviceSaverRestoresBitExact(t *testing.T) {
	seed := testseed.Seed(t)
	st, err := chunk.Open(chunk.Options{Dir: t.TempDir(), ChunkTokens: 16, SegmentBytes: 8 << 20, Logf: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	rng := rand.New(rand.NewSource(seed))
	for _, preset := range []string{"tiny-llama", "tiny-gqa"} {
		c, _ := model.Preset(preset)
		w := model.Synthesize(c, seed)
		m, err := model.New(c, w)
		if err != nil {
			t.Fatal(err)
		}
		splits := everySplit(c)
		for _, sp := range []int{0, len(splits) / 2, len(splits) - 1} {
			split := splits[sp]
			plan := split.Plan(c)
			id := fmt.Sprintf("%s-%d-%d-%d", preset, split.Recompute, split.Hidden, split.KV)
			t.Run(id, func(t *testing.T) {
				prompt := make([]int, 30+rng.Intn(20))
				for i := range prompt {
					prompt[i] = rng.Intn(c.Vocab)
				}
				rec := &opRecorder{}
				hs := NewSaver(c, plan, rec)
				live := model.NewKVCache(c)
				got, err := m.Generate(live, prompt, 6, hs.Trace)
				if err != nil || hs.Err() != nil {
					t.Fatal(err, hs.Err())
				}
				tokens := append(append([]int(nil), prompt...), got[:len(got)-1]...)
				ident := Identity(c, w, plan)
				wr, err := st.Create("test", id, ident, chunk.CreateOptions{})
				if err != nil {
					t.Fatal(err)
				}
				tok := 0
				for _, p := range plan {
					tok += int(p.RowBytes)
				}
				// Three slots of one token's rows: a prefill layer spans
				// several, and calls wait for the writer to free them.
				e := newEngine(t, plan, wr, DeviceSaveOptions{StagingBytes: int64(3 * tok), SlotBytes: tok, WaitFull: time.Hour})
				for i, op := range rec.ops {
					if op.layer >= 0 && op.layer%2 == 1 {
						// Odd layers in two calls, as an engine
						// saving a long layer in parts would.
						rb := int(plan[op.layer].RowBytes)
						half := len(op.rows) / rb / 2 * rb
						if err := e.saveParts(saveOp{layer: op.layer, rows: op.rows[:half]}); err != nil {
							t.Fatalf("op %d: %v", i, err)
						}
						op.rows = op.rows[half:]
					}
					var err error
					if op.layer >= 0 {
						err = e.saveParts(op)
					} else {
						_, err = e.save(op, nil)
					}
					if err != nil {
						t.Fatalf("op %d: %v", i, err)
					}
				}
				if err := e.ds.Close(); err != nil {
					t.Fatal(err)
				}
				if err := wr.Close(); err != nil {
					t.Fatal(err)
				}
				if s := e.ds.Stats(); s.Calls == 0 || s.Written != s.Calls || s.Copied != s.Calls || s.InUse != 0 || s.Peak > 3 {
					t.Fatalf("stats %+v: want every call copied and written, no slot held, at most 3 used", s)
				}
				paged := pagedFor(t, c, live.Tokens)
				rest := NewRestorer(st, cpuFor(t, m), Settings{})
				if _, err := rest.Restore(Request{NS: "test", ID: id, Ident: ident, Tokens: tokens, Dst: paged}); err != nil {
					t.Fatal(err)
				}
				sameKV(t, id, c, live, paged)
			})
		}
	}
}

// gatedWriter records appended rows per layer; while gate is closed every
// append waits (a slow disk). failToken (1-based, counting every append)
// makes that append fail if it is an AppendToken.
type gatedWriter struct {
	mu        sync.Mutex
	layers    [][]byte
	tokens    int
	appends   int
	gate      chan struct{}
	entered   chan struct{} // one send per append that started
	failToken int
	flushed   []int // appends seen at each Flush
	delay     func()
}

func newGatedWriter(layers int, gated bool) *gatedWriter {
	w := &gatedWriter{layers: make([][]byte, layers), entered: make(chan struct{}, 1<<16)}
	if gated {
		w.gate = make(chan struct{})
	}
	return w
}

func (w *gatedWriter) wait() {
	w.entered <- struct{}{}
	if w.gate != nil {
		<-w.gate
	}
	if w.delay != nil {
		w.delay()
	}
}

func (w *gatedWriter) AppendLayer(layer int, rows []byte) error {
	w.wait()
	w.mu.Lock()
	defer w.mu.Unlock()
	w.appends++
	w.layers[layer] = append(w.layers[layer], rows...)
	return nil
}

func (w *gatedWriter) AppendToken(rows [][]byte) error {
	w.wait()
	w.mu.Lock()
	defer w.mu.Unlock()
	w.appends++
	if w.appends == w.failToken {
		return errors.New("disk on fire")
	}
	w.tokens++
	for l, r := range rows {
		w.layers[l] = append(w.layers[l], r...)
	}
	return nil
}

func (w *gatedWriter) Flush() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.flushed = append(w.flushed, w.appends)
	return nil
}

func (w *gatedWriter) snapshot() [][]byte {
	w.mu.Lock()
	defer w.mu.Unlock()
	out := make([][]byte, len(w.layers))
	for l, b := range w.layers {
		out[l] = append([]byte(nil), b...)
	}
	return out
}

// testPlan: layer 0 hidden (64-byte rows), 1 stores nothing, 2 KV
// (32-byte rows).
var testPlan = []state.LayerPlan{{Kind: state.LayerHidden, RowBytes: 64}, {Kind: state.LayerNone}, {Kind: state.LayerKV, RowBytes: 32}}

func randToken(rng *rand.Rand, plan []state.LayerPlan) saveOp {
	tok := make([][]byte, len(plan))
	for l, p := range plan {
		if p.RowBytes > 0 {
			tok[l] = make([]byte, p.RowBytes)
			rng.Read(tok[l])
		}
	}
	return saveOp{layer: -1, tok: tok}
}

func randLayer(rng *rand.Rand, plan []state.LayerPlan, layer, tokens int) saveOp {
	b := make([]byte, tokens*int(plan[layer].RowBytes))
	rng.Read(b)
	return saveOp{layer: layer, rows: b}
}

// expect is what a writer holds per layer after ops.
func expect(plan []state.LayerPlan, ops []saveOp) [][]byte {
	out := make([][]byte, len(plan))
	for _, op := range ops {
		if op.layer >= 0 {
			out[op.layer] = append(out[op.layer], op.rows...)
			continue
		}
		for l, r := range op.tok {
			out[l] = append(out[l], r...)
		}
	}
	return out
}

func sameLayers(t *testing.T, what string, got, want [][]byte) {
	t.Helper()
	for l := range want {
		if !bytes.Equal(got[l], want[l]) {
			t.Fatalf("%s: layer %d holds %d bytes that differ from the %d saved", what, l, len(got[l]), len(want[l]))
		}
	}
}

// TestDeviceSaverNeverBlocksOnWriter: with the writer held (a slow disk),
// every call returns once its copy is queued; when the staging is full the
// next call returns ErrStagingFull at once and counts it, and nothing
// queued is dropped: once the writer runs, Flush stores every accepted
// token and the refused one can be saved again.
func TestDeviceSaverNeverBlocksOnWriter(t *testing.T) {
	for _, pre := range []bool{false, true} {
		t.Run(fmt.Sprint("preallocate=", pre), func(t *testing.T) { neverBlocks(t, pre) })
	}
}

func neverBlocks(t *testing.T, prealloc bool) {
	rng := rand.New(rand.NewSource(1))
	w := newGatedWriter(len(testPlan), true)
	e := newEngine(t, testPlan, w, DeviceSaveOptions{StagingBytes: 4 * 96, SlotBytes: 96, Preallocate: prealloc})
	var ops []saveOp
	for i := range 4 {
		op := randToken(rng, testPlan)
		if _, err := e.save(op, nil); err != nil {
			t.Fatalf("call %d with the writer held: %v", i, err)
		}
		ops = append(ops, op)
	}
	<-w.entered // the writer holds the first token
	if err := e.ds.WaitCopied(4); err != nil {
		t.Fatal(err)
	}
	refused := randToken(rng, testPlan)
	_, err := e.save(refused, nil)
	if !errors.Is(err, ErrStagingFull) {
		t.Fatalf("fifth call with 4 slots held: %v, want ErrStagingFull", err)
	}
	if s := e.ds.Stats(); s.Full != 1 || s.InUse != 4 || s.Calls != 4 || s.Written != 0 {
		t.Fatalf("stats %+v: want 1 refused, 4 slots in use, 4 calls, none written", s)
	}
	close(w.gate)
	if err := e.ds.Flush(); err != nil {
		t.Fatal(err)
	}
	sameLayers(t, "after the writer ran", w.snapshot(), expect(testPlan, ops))
	if _, err := e.save(refused, nil); err != nil {
		t.Fatalf("retry of the refused call: %v", err)
	}
	ops = append(ops, refused)
	if err := e.ds.Close(); err != nil {
		t.Fatal(err)
	}
	sameLayers(t, "after the retry", w.snapshot(), expect(testPlan, ops))
	if s := e.ds.Stats(); s.Full != 1 || s.Written != 5 || s.InUse != 0 {
		t.Fatalf("stats %+v: want 1 refused, 5 written, none in use", s)
	}
}

// TestDeviceSaverCopyOrderedAfterCallerWork: the copy waits for the work
// queued on the caller's stream before the call (a kernel still writing
// the rows), without the call waiting for it; Flush waits for that copy
// and the writer before it flushes the writer.
func TestDeviceSaverCopyOrderedAfterCallerWork(t *testing.T) {
	rng := rand.New(rand.NewSource(2))
	w := newGatedWriter(len(testPlan), false)
	e := newEngine(t, testPlan, w, DeviceSaveOptions{})
	kernel := make(chan struct{})
	var once sync.Once
	e.ds.flushWaitHook = func() { once.Do(func() { close(kernel) }) }
	ops := []saveOp{randLayer(rng, testPlan, 0, 5), randLayer(rng, testPlan, 2, 5), randToken(rng, testPlan)}
	for i, op := range ops {
		if _, err := e.save(op, kernel); err != nil {
			t.Fatalf("call %d while the kernel is held: %v", i, err)
		}
	}
	if got := e.ds.Copied(); got != 0 {
		t.Fatalf("copies completed (through call %d) before the caller's kernel ran", got)
	}
	err := e.ds.Flush()
	once.Do(func() { close(kernel) }) // a Flush that did not wait
	if err != nil {
		t.Fatal(err)
	}
	if len(w.flushed) != 1 || w.flushed[0] != 3 {
		t.Fatalf("the writer was flushed after %v appends, want once after all 3", w.flushed)
	}
	sameLayers(t, "after Flush", w.snapshot(), expect(testPlan, ops))
	if err := e.ds.Close(); err != nil {
		t.Fatal(err)
	}
}

// TestDeviceSaverErrors: a writer error surfaces on the next call and on
// Flush, and nothing after it is appended (a context's tokens stay in
// order); bad arguments are refused with errors naming them, holding no
// staging.
func TestDeviceSaverErrors(t *testing.T) {
	rng := rand.New(rand.NewSource(3))
	w := newGatedWriter(len(testPlan), false)
	w.failToken = 3
	e := newEngine(t, testPlan, w, DeviceSaveOptions{StagingBytes: 64 * 96, SlotBytes: 96})
	var ops []saveOp
	for range 5 {
		op := randToken(rng, testPlan)
		ops = append(ops, op)
		if _, err := e.save(op, nil); err != nil {
			t.Fatal(err)
		}
	}
	err := e.ds.Flush()
	if err == nil || !bytes.Contains([]byte(err.Error()), []byte("disk on fire")) {
		t.Fatalf("Flush after a failed append: %v", err)
	}
	if _, err2 := e.save(randToken(rng, testPlan), nil); !errors.Is(err2, err) {
		t.Fatalf("the call after the failure: %v, want %v", err2, err)
	}
	sameLayers(t, "after the failure", w.snapshot(), expect(testPlan, ops[:2]))
	if s := e.ds.Stats(); s.Written != 2 || s.InUse != 0 {
		t.Fatalf("stats %+v: want 2 written, no slot held", s)
	}
	if err := e.ds.Close(); err == nil {
		t.Fatal("Close after a failed append returned nil")
	}

	w2 := newGatedWriter(len(testPlan), false)
	e2 := newEngine(t, testPlan, w2, DeviceSaveOptions{StagingBytes: 4 * 96})
	p, _, err := e2.dev.Alloc(64)
	if err != nil {
		t.Fatal(err)
	}
	bg := context.Background()
	for _, c := range []struct {
		name string
		call func() error
		want string
	}{
		{"layer out of range", func() error { _, err := e2.ds.SaveLayer(bg, 3, p, 1, e2.stream); return err }, "layer 3 out of range"},
		{"layer storing nothing", func() error { _, err := e2.ds.SaveLayer(bg, 1, p, 1, e2.stream); return err }, "stores nothing"},
		{"no tokens", func() error { _, err := e2.ds.SaveLayer(bg, 0, p, 0, e2.stream); return err }, "0 tokens"},
		{"null pointer", func() error { _, err := e2.ds.SaveLayer(bg, 0, 0, 1, e2.stream); return err }, "null device pointer"},
		{"past the allocation", func() error { _, err := e2.ds.SaveLayer(bg, 0, p, 2, e2.stream); return err }, "runs past the end"},
		{"more than the staging", func() error { _, err := e2.ds.SaveLayer(bg, 0, p, 7, e2.stream); return err }, "save the layer in parts"},
		{"token of too few layers", func() error { _, err := e2.ds.SaveToken(bg, []gpu.DevicePtr{p}, e2.stream); return err }, "got 1 layers"},
		{"token with a null row", func() error { _, err := e2.ds.SaveToken(bg, []gpu.DevicePtr{p, 0, 0}, e2.stream); return err }, "layer 2 stores 32-byte rows"},
		{"token row for a layer storing nothing", func() error { _, err := e2.ds.SaveToken(bg, []gpu.DevicePtr{p, p, p}, e2.stream); return err }, "layer 1 stores nothing"},
		{"foreign stream", func() error { _, err := e2.ds.SaveLayer(bg, 0, p, 1, 99); return err }, "stream 99"},
	} {
		err := c.call()
		if err == nil || !bytes.Contains([]byte(err.Error()), []byte(c.want)) {
			t.Errorf("%s: %v, want an error saying %q", c.name, err, c.want)
		}
	}
	if s := e2.ds.Stats(); s.InUse != 0 || s.Calls != 0 {
		t.Fatalf("stats after refused calls %+v: want no slot held, no call", s)
	}
	if err := e2.ds.Close(); err != nil {
		t.Fatal(err)
	}
}

// TestDeviceSaverRandomInterleavings: seeded random runs of prefill layers
// (split across calls and slots) and decode tokens, kernels held back at
// random, a writer that yields at random, random Flushes and WaitCopied,
// small staging (refused calls retried after WaitCopied or Flush): the
// writer ends with exactly the rows saved, in order, and every Flush saw
// every call before it appended.
func TestDeviceSaverRandomInterleavings(t *testing.T) {
	seed := testseed.Seed(t)
	for round := range 200 {
		rng := rand.New(rand.NewSource(seed + int64(round)))
		w := newGatedWriter(len(testPlan), false)
		var wmu sync.Mutex
		wrng := rand.New(rand.NewSource(seed ^ int64(round)))
		w.delay = func() {
			wmu.Lock()
			n := wrng.Intn(3)
			wmu.Unlock()
			for range n {
				time.Sleep(0) // yield
			}
		}
		slots := 1 + rng.Intn(6)
		e := newEngine(t, testPlan, w, DeviceSaveOptions{StagingBytes: int64(slots * 128), SlotBytes: 128, Preallocate: rng.Intn(2) == 0})
		var ops []saveOp
		var open []chan struct{}
		calls := 0
		prefill := 1 + rng.Intn(20)
		for _, l := range []int{0, 2} {
			for done := 0; done < prefill; {
				n := 1 + rng.Intn(prefill-done)
				if n*int(testPlan[l].RowBytes) > slots*128 {
					n = slots * 128 / int(testPlan[l].RowBytes)
				}
				ops = append(ops, randLayer(rng, testPlan, l, n))
				done += n
			}
		}
		for range rng.Intn(30) {
			ops = append(ops, randToken(rng, testPlan))
		}
		for i := 0; i < len(ops); {
			var gate chan struct{}
			if rng.Intn(3) == 0 {
				gate = make(chan struct{})
				open = append(open, gate)
			}
			seq, err := e.save(ops[i], gate)
			switch {
			case errors.Is(err, ErrStagingFull):
				for _, g := range open {
					close(g)
				}
				open = nil
				if rng.Intn(2) == 0 {
					if err := e.ds.WaitCopied(uint64(calls)); err != nil {
						t.Fatalf("seed %d round %d: %v", seed, round, err)
					}
				}
				if err := e.ds.Flush(); err != nil {
					t.Fatalf("seed %d round %d: %v", seed, round, err)
				}
				continue
			case err != nil:
				t.Fatalf("seed %d round %d op %d: %v", seed, round, i, err)
			}
			calls++
			if seq != uint64(calls) {
				t.Fatalf("seed %d round %d: call %d got sequence %d", seed, round, calls, seq)
			}
			i++
			if rng.Intn(8) == 0 {
				for _, g := range open {
					close(g)
				}
				open = nil
				if err := e.ds.Flush(); err != nil {
					t.Fatalf("seed %d round %d: %v", seed, round, err)
				}
				if f := w.flushed; f[len(f)-1] < calls {
					t.Fatalf("seed %d round %d: Flush after %d calls flushed the writer after %d appends", seed, round, calls, f[len(f)-1])
				}
			}
		}
		for _, g := range open {
			close(g)
		}
		if err := e.ds.Close(); err != nil {
			t.Fatalf("seed %d round %d: %v", seed, round, err)
		}
		sameLayers(t, fmt.Sprintf("seed %d round %d", seed, round), w.snapshot(), expect(testPlan, ops))
		if s := e.ds.Stats(); s.Written != int64(calls) || s.InUse != 0 || s.Peak > slots {
			t.Fatalf("seed %d round %d: stats %+v: want %d written, none held, at most %d slots", seed, round, s, calls, slots)
		}
	}
}
