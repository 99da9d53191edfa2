package cuda

import (
	"bytes"
	"errors"
	"fmt"
	"math"
	"math/rand"
	"runtime"
	"strings"
	"sync"
	"testing"

	"github.com/hcache/hcache/gpu"
	"github.com/hcache/hcache/internal/testseed"
	"github.com/hcache/hcache/model"
	"github.com/hcache/hcache/state"
	"github.com/hcache/hcache/state/codec"
)

// The restore path (Begin, Hidden, KV, Encoded, Recompute, Wait, the lane
// pool) run on the host: simDev in place of the driver, the host-built
// kernels (hcache.cu, codec.cu) launched with the very parameter arrays the
// code builds for cuLaunchKernel, a Go GEMM in place of cuBLAS. Results are
// checked against the CPU backend to the bit (the kernels and the GEMM are
// the CPU's arithmetic), recomputed layers against model.Prefill within
// RecomputeTolerance.

// newSimBackend builds a Backend for c on a simDev.
func newSimBackend(t *testing.T, c *model.Config, w *model.Weights, o Options, seed int64) (*Backend, *simDev) {
	t.Helper()
	k := loadHostKernels(t)
	loadCodecKernel(t)
	b, err := newBackend(c, w, o)
	if err != nil {
		t.Fatal(err)
	}
	dev := newSimDev(c, seed)
	b.ops = dev
	b.fProj, b.fKV, b.fDeq = k.launch[kProject], k.kvLaunch, codecLaunch
	b.fwdFns = k.launch
	if err := b.with(func() error { return b.uploadWeights(w) }); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Close() })
	return b, dev
}

// simRestore is one context restored in a test: its layers' rows as
// submitted and the CPU backend's result for them.
type simRestore struct {
	positions []int
	table     []int
	blocks    int
	kinds     []state.LayerKind
	cd        state.Codec
	rows      [][]byte
	want      gpu.HostCache
	order     []int
}

// allHidden makes newSimRestore store every layer as hidden.
var allHidden bool

// newSimRestore draws a context: tokens at positions from start, a
// shuffled block table over twice the blocks needed, each layer hidden or
// KV at random, rows under cd, and the CPU backend's restore of it (rows
// decoded by state/codec first, as serve decodes them for the CPU).
func newSimRestore(t *testing.T, c *model.Config, cpu *gpu.CPU, rng *rand.Rand, tokens, start, bt int, cd state.Codec) *simRestore {
	t.Helper()
	s := &simRestore{cd: cd}
	for i := 0; i < tokens; i++ {
		s.positions = append(s.positions, start+i)
	}
	need := (start+tokens-1)/bt + 1
	s.blocks = 2 * need
	s.table = rng.Perm(s.blocks)[:need]
	s.order = rng.Perm(c.Layers)
	for l := 0; l < c.Layers; l++ {
		kind := state.LayerHidden
		if rng.Intn(3) == 0 && !allHidden {
			kind = state.LayerKV
		}
		segs, vals := 1, c.HiddenSize
		if kind == state.LayerKV {
			segs, vals = 2, c.KVDim()
		}
		rb := codec.RowBytes(cd, c.DType, segs, vals)
		rows := make([]byte, tokens*rb)
		for i := 0; i < tokens; i++ {
			seg := make([][]float32, segs)
			for j := range seg {
				seg[j] = make([]float32, vals)
				amp := math.Exp(rng.NormFloat64())
				for v := range seg[j] {
					seg[j][v] = float32(rng.NormFloat64() * amp)
				}
			}
			if cd == state.CodecNone {
				for j := range seg {
					c.EncodeRow(rows[i*rb+j*vals*c.ElemBytes():], seg[j])
				}
			} else if err := codec.EncodeRow(cd, c.DType, rows[i*rb:(i+1)*rb], seg...); err != nil {
				t.Fatal(err)
			}
		}
		s.kinds = append(s.kinds, kind)
		s.rows = append(s.rows, rows)
		dec := rows
		if cd != state.CodecNone {
			dec = make([]byte, tokens*segs*vals*c.ElemBytes())
			if err := codec.TranscodeRows(cd, c.DType, dec, rows, segs, vals); err != nil {
				t.Fatal(err)
			}
		}
		p, err := gpu.NewPagedKV(c, bt, s.blocks)
		if err != nil {
			t.Fatal(err)
		}
		p.BlockTable = s.table
		poison(p.K)
		poison(p.V)
		if kind == state.LayerHidden {
			err = cpu.Project(l, dec, s.positions, p)
		} else {
			err = cpu.LoadKV(l, dec, s.positions, p)
		}
		if err != nil {
			t.Fatal(err)
		}
		s.want = append(s.want, p)
	}
	return s
}

// run restores s through b into a new device cache and compares every
// layer's K and V (the whole cache: written slots and untouched ones) with
// the CPU's. Each release checks that the copy of its rows has run and then
// overwrites them, so a buffer handed back early corrupts the result.
func (s *simRestore) run(b *Backend, dev *simDev, c *model.Config, bt int) error {
	r, cache, err := s.begin(b, c, bt)
	if err != nil {
		return err
	}
	defer cache.Free()
	return s.finish(r, cache, dev, c)
}

// begin makes the context's device cache and begins its restore.
func (s *simRestore) begin(b *Backend, c *model.Config, bt int) (*Restore, *Cache, error) {
	cache, err := b.NewCache(c.Layers, s.blocks, bt)
	if err != nil {
		return nil, nil, err
	}
	if err := cache.SetBlockTable(s.table); err != nil {
		return nil, nil, err
	}
	if err := cache.Poison(0xff); err != nil {
		return nil, nil, err
	}
	r, err := cache.b.Begin(cache, s.positions)
	if err != nil {
		cache.Free()
		return nil, nil, err
	}
	return r, cache, nil
}

// finish submits every layer, waits and compares with the CPU's result.
func (s *simRestore) finish(r *Restore, cache *Cache, dev *simDev, c *model.Config) (err error) {
	var mu sync.Mutex
	var early []int
	released := 0
	for _, l := range s.order {
		rows := append([]byte(nil), s.rows[l]...)
		release := func() {
			if dev.copiedFrom(rows) == 0 {
				mu.Lock()
				early = append(early, l)
				mu.Unlock()
			}
			for i := range rows {
				rows[i] = 0xff
			}
			mu.Lock()
			released++
			mu.Unlock()
		}
		if s.cd == state.CodecNone {
			if s.kinds[l] == state.LayerHidden {
				err = r.Hidden(l, rows, release)
			} else {
				err = r.KV(l, rows, release)
			}
		} else {
			err = r.Encoded(l, s.kinds[l], s.cd, rows, release)
		}
		if err != nil {
			r.Wait()
			return err
		}
	}
	tm, err := r.Wait()
	if err != nil {
		return err
	}
	if released != c.Layers || len(early) > 0 {
		return fmt.Errorf("%d of %d releases; released before their copy ran: layers %v", released, c.Layers, early)
	}
	if tm.Layers != c.Layers {
		return fmt.Errorf("timing counts %d layers, want %d", tm.Layers, c.Layers)
	}
	for l := 0; l < c.Layers; l++ {
		k, v := make([]byte, cache.LayerBytes()), make([]byte, cache.LayerBytes())
		if err := cache.Download(l, k, v); err != nil {
			return err
		}
		if !bytes.Equal(k, s.want[l].K) || !bytes.Equal(v, s.want[l].V) {
			return fmt.Errorf("layer %d (%s, codec %s): K/V differ from the CPU backend's (%s)", l, s.kinds[l], s.cd, firstDiff(k, s.want[l].K, v, s.want[l].V))
		}
	}
	return nil
}

func firstDiff(k, wk, v, wv []byte) string {
	for i := range k {
		if k[i] != wk[i] {
			return fmt.Sprintf("K byte %d: 0x%02x, want 0x%02x", i, k[i], wk[i])
		}
	}
	for i := range v {
		if v[i] != wv[i] {
			return fmt.Sprintf("V byte %d: 0x%02x, want 0x%02x", i, v[i], wv[i])
		}
	}
	return "equal"
}

// TestRestoreLanesMatchCPU: several restores at once on one backend (more
// than its lanes, so some wait for one), each with its own cache, shuffled
// block table, start position, mix of hidden and KV layers submitted in a
// random order, and codec (none, fp8 per token, fp8 per block: decoded on
// the device), on the simulated device whose scheduler runs every queued
// operation as late or as early as the events allow. Every layer equals the
// CPU backend's to the bit, nothing outside the restored slots is written,
// no copy overwrites a staging slot a kernel has still to read, no buffer is
// released before its copy ran, and no more lanes are made than
// Options.Restores.
func TestRestoreLanesMatchCPU(t *testing.T) {
	seed := testseed.Seed(t)
	cases := []struct {
		preset                    string
		restores, slots, threads  int
		tokens, bt, contexts, run int
	}{
		{"tiny-llama", 2, 2, 32, 37, 16, 3, 0},
		{"tiny-gqa", 2, 3, 64, 50, 8, 4, 0},
		{"tiny-qwen2", 3, 2, 32, 33, 16, 3, 0},
		{"tiny-opt", 1, 2, 32, 21, 4, 3, 0},
		{"tiny-linear-rope", 4, 4, 96, 40, 16, 4, 0},
		{"demo-llama", 2, 3, 64, 24, 16, 4, 0}, // hidden 256: two fp8 scale blocks a row
	}
	codecs := []state.Codec{state.CodecNone, state.CodecFP8Token, state.CodecFP8Block}
	for ci, tc := range cases {
		t.Run(tc.preset, func(t *testing.T) {
			c, err := model.Preset(tc.preset)
			if err != nil {
				t.Fatal(err)
			}
			w := model.Synthesize(c, seed+int64(ci))
			cpu, err := gpu.NewCPU(c, w)
			if err != nil {
				t.Fatal(err)
			}
			b, dev := newSimBackend(t, c, w, Options{Restores: tc.restores, Slots: tc.slots, Threads: tc.threads}, seed+int64(ci))
			if got := b.Concurrency(); got != tc.restores {
				t.Fatalf("Concurrency() = %d, want Options.Restores %d", got, tc.restores)
			}
			ctxs := make([]*simRestore, tc.contexts)
			for i := range ctxs {
				rng := rand.New(rand.NewSource(seed + int64(100*ci+i)))
				// Where the model allows, later contexts start past the
				// first RoPE table (1024 positions): the table grows while
				// other restores still use the old one.
				starts := []int{0, 5, 17, 130}
				if c.MaxPositions > 2100 {
					starts = []int{0, 1100, 17, 2000}
				}
				start := starts[i%4]
				ctxs[i] = newSimRestore(t, c, cpu, rng, tc.tokens-i, start, tc.bt, codecs[i%len(codecs)])
			}
			errs := make([]error, len(ctxs))
			var wg sync.WaitGroup
			for i, s := range ctxs {
				wg.Add(1)
				go func() {
					defer wg.Done()
					errs[i] = s.run(b, dev, c, tc.bt)
				}()
			}
			wg.Wait()
			for i, err := range errs {
				if err != nil {
					t.Errorf("restore %d (codec %s): %v (seed %d)", i, ctxs[i].cd, err, seed)
				}
			}
			if v := dev.violations(); len(v) > 0 {
				t.Errorf("%d ordering violations (seed %d), first: %s", len(v), seed, v[0])
			}
			if b.lanesMade > tc.restores {
				t.Errorf("%d lanes made, Options.Restores is %d", b.lanesMade, tc.restores)
			}
		})
	}
}

// TestRestoreSubmitSequence: what one restore queues, stream by stream: on
// the compute stream first the positions and the cleared decode flag; on
// the copy stream, each layer's copy after a wait for the layer that last
// used its staging slot, then an event; on the compute stream, a wait for
// that event, then for an fp8 hidden layer the dequantize kernel (one block
// per segment, its segment and row geometry), the K||V GEMM of the decoded
// rows and the RoPE/scatter kernel (one block per token); for an fp8 KV
// layer the dequantize kernel (two segments a row) and the scatter; then
// the layer's done event. And the bytes copied are the encoded ones.
func TestRestoreSubmitSequence(t *testing.T) {
	seed := testseed.Seed(t)
	c, _ := model.Preset("demo-llama") // hidden and kv_dim 256: two scale blocks
	w := model.Synthesize(c, seed)
	b, dev := newSimBackend(t, c, w, Options{Restores: 1, Slots: 2, Threads: 64}, seed)
	n := 19
	cache, err := b.NewCache(c.Layers, 2, 16)
	if err != nil {
		t.Fatal(err)
	}
	positions := make([]int, n)
	for i := range positions {
		positions[i] = i
	}
	dev.mu.Lock()
	dev.logging = true
	dev.mu.Unlock()
	r, err := b.Begin(cache, positions)
	if err != nil {
		t.Fatal(err)
	}
	cds := []state.Codec{state.CodecFP8Token, state.CodecFP8Block, state.CodecFP8Token, state.CodecNone, state.CodecFP8Block, state.CodecNone}
	kinds := []state.LayerKind{state.LayerHidden, state.LayerKV, state.LayerHidden, state.LayerKV, state.LayerHidden, state.LayerHidden}
	rowBytes := make([]int, c.Layers)
	for l := 0; l < c.Layers; l++ {
		var rows []byte
		switch {
		case cds[l] == state.CodecNone && kinds[l] == state.LayerKV:
			rows = make([]byte, n*c.KVRowBytes())
			err = r.KV(l, rows, nil)
		case cds[l] == state.CodecNone:
			rows = make([]byte, n*c.HiddenRowBytes())
			err = r.Hidden(l, rows, nil)
		default:
			segs, vals := 1, c.HiddenSize
			if kinds[l] == state.LayerKV {
				segs, vals = 2, c.KVDim()
			}
			rb := codec.RowBytes(cds[l], c.DType, segs, vals)
			rows = make([]byte, n*rb)
			for i := 0; i < n; i++ {
				seg := make([][]float32, segs)
				for j := range seg {
					seg[j] = make([]float32, vals)
				}
				codec.EncodeRow(cds[l], c.DType, rows[i*rb:(i+1)*rb], seg...)
			}
			err = r.Encoded(l, kinds[l], cds[l], rows, nil)
		}
		if err != nil {
			t.Fatal(err)
		}
		rowBytes[l] = len(rows)
	}
	ln := r.lane
	dev.mu.Lock()
	copyLog, compLog := append([]string(nil), dev.log[ln.copyS]...), append([]string(nil), dev.log[ln.compS]...)
	dev.mu.Unlock()
	if _, err := r.Wait(); err != nil {
		t.Fatal(err)
	}
	th := b.opts.Threads
	wantCopy := []string{fmt.Sprintf("record e%d", r.start)}
	// Begin's uploads of the positions and the cleared decode flag.
	wantComp := []string{fmt.Sprintf("copy %d bytes", 4*n), "copy 4 bytes"}
	for l := 0; l < c.Layers; l++ {
		if l >= b.opts.Slots {
			wantCopy = append(wantCopy, fmt.Sprintf("wait e%d", r.done[l-b.opts.Slots]))
		}
		wantCopy = append(wantCopy, fmt.Sprintf("copy %d bytes", rowBytes[l]), fmt.Sprintf("record e%d", r.copied[l]))
		wantComp = append(wantComp, fmt.Sprintf("wait e%d", r.copied[l]))
		if cds[l] != state.CodecNone {
			segs, vals, block := 1, c.HiddenSize, c.HiddenSize
			if kinds[l] == state.LayerKV {
				segs, vals, block = 2, c.KVDim(), c.KVDim()
			}
			if cds[l] == state.CodecFP8Block {
				block = codec.BlockSize
			}
			wantComp = append(wantComp, fmt.Sprintf("hc_fp8_dequant grid %d threads %d [%d segments, %d per row, of %d values, scale block %d, %d bytes each, rows of %d, dtype %d]",
				n*segs, th, n*segs, segs, vals, block, codec.SegmentBytes(cds[l], c.DType, vals), codec.RowBytes(cds[l], c.DType, segs, vals), hcF16))
		}
		if kinds[l] == state.LayerHidden {
			wantComp = append(wantComp, fmt.Sprintf("gemm layer %d %dx%dx%d", l, 2*c.KVDim(), n, c.HiddenSize),
				fmt.Sprintf("hc_project_scatter grid %d threads %d", n, th))
		} else {
			wantComp = append(wantComp, fmt.Sprintf("hc_kv_scatter grid %d threads %d", n, th))
		}
		wantComp = append(wantComp, fmt.Sprintf("record e%d", r.done[l]))
	}
	for _, s := range []struct {
		name      string
		got, want []string
	}{{"copy", copyLog, wantCopy}, {"compute", compLog, wantComp}} {
		if strings.Join(s.got, "\n") != strings.Join(s.want, "\n") {
			t.Errorf("%s stream queued:\n  %s\nwant:\n  %s", s.name, strings.Join(s.got, "\n  "), strings.Join(s.want, "\n  "))
		}
	}
	// The fp8 hidden layer moved fewer bytes than its fp16 rows.
	if rowBytes[0] >= n*c.HiddenRowBytes() {
		t.Errorf("fp8 hidden rows of %d bytes, fp16 ones %d", rowBytes[0], n*c.HiddenRowBytes())
	}
}

// TestRestoreRefusals: bad options, rows of the wrong size for their
// codec, a codec the device does not decode, rows that are not an
// encoding, and restore buffers past Options.RestoreMemory each give a
// clear error, and the backend still restores afterwards.
func TestRestoreRefusals(t *testing.T) {
	seed := testseed.Seed(t)
	c, _ := model.Preset("tiny-llama")
	w := model.Synthesize(c, seed)
	for _, o := range []Options{{Restores: -1}, {Restores: MaxRestores + 1}, {RestoreMemory: -5}} {
		if _, err := newBackend(c, w, o); err == nil {
			t.Errorf("options %+v accepted", o)
		}
	}
	b, _ := newSimBackend(t, c, w, Options{Restores: 2}, seed)
	cache, err := b.NewCache(c.Layers, 4, 16)
	if err != nil {
		t.Fatal(err)
	}
	positions := []int{0, 1, 2, 3, 4, 5, 6, 7}
	n := len(positions)
	enc := func(cd state.Codec) []byte {
		rb := codec.HiddenRowBytes(cd, c.DType, c.HiddenSize)
		rows := make([]byte, n*rb)
		for i := 0; i < n; i++ {
			x := make([]float32, c.HiddenSize)
			for j := range x {
				x[j] = float32(j%7) - 3
			}
			codec.EncodeRow(cd, c.DType, rows[i*rb:(i+1)*rb], x)
		}
		return rows
	}
	cases := []struct {
		name   string
		submit func(r *Restore) error
		want   string
	}{
		{"short fp8 rows", func(r *Restore) error {
			return r.Encoded(0, state.LayerHidden, state.CodecFP8Token, enc(state.CodecFP8Token)[1:], nil)
		}, "under codec fp8"},
		{"codec none through Encoded", func(r *Restore) error {
			return r.Encoded(0, state.LayerHidden, state.CodecNone, make([]byte, n*c.HiddenRowBytes()), nil)
		}, "no device decode"},
		{"recomputed layer through Encoded", func(r *Restore) error {
			return r.Encoded(0, state.LayerNone, state.CodecFP8Token, enc(state.CodecFP8Token), nil)
		}, "nothing is stored"},
		{"NaN code", func(r *Restore) error {
			rows := enc(state.CodecFP8Token)
			rows[5] = 0x7f
			if err := r.Encoded(1, state.LayerHidden, state.CodecFP8Token, rows, nil); err != nil {
				return err
			}
			_, err := r.Wait()
			return err
		}, "not an encoding"},
		{"negative scale", func(r *Restore) error {
			rows := enc(state.CodecFP8Block)
			rows[c.HiddenSize+3] = 0x80 // the first scale's sign bit
			if err := r.Encoded(2, state.LayerHidden, state.CodecFP8Block, rows, nil); err != nil {
				return err
			}
			_, err := r.Wait()
			return err
		}, "not an encoding"},
	}
	for _, tc := range cases {
		r, err := b.Begin(cache, positions)
		if err != nil {
			t.Fatal(err)
		}
		err = tc.submit(r)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: error %v, want one containing %q", tc.name, err, tc.want)
		}
		if !r.ended {
			r.Wait()
		}
	}
	// Every lane is back: a restore of good rows works.
	r, err := b.Begin(cache, positions)
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Encoded(0, state.LayerHidden, state.CodecFP8Token, enc(state.CodecFP8Token), nil); err != nil {
		t.Fatal(err)
	}
	if _, err := r.Wait(); err != nil {
		t.Fatalf("a good restore after the refusals: %v", err)
	}

	// The lanes' memory bound: a restore too large for it is refused
	// before it queues anything, and a smaller one still runs.
	small, _ := newSimBackend(t, c, w, Options{Restores: 2, RestoreMemory: 64 << 10}, seed)
	big, err := small.NewCache(c.Layers, 64, 16)
	if err != nil {
		t.Fatal(err)
	}
	many := make([]int, 1000)
	for i := range many {
		many[i] = i
	}
	if r, err := small.Begin(big, many); !errors.Is(err, ErrRestoreMemory) {
		t.Errorf("a 1000-token restore within 64 KiB of lane memory: %v, want ErrRestoreMemory", err)
		if err == nil {
			r.Wait()
		}
	}
	r, err = small.Begin(big, positions)
	if err != nil {
		t.Fatalf("a small restore after a refused one: %v", err)
	}
	if _, err := r.Wait(); err != nil {
		t.Fatal(err)
	}
	if small.laneBytes > 64<<10 {
		t.Errorf("lanes hold %d bytes, the limit is %d", small.laneBytes, 64<<10)
	}
}

// TestRecomputeOnLanes: a mixed plan through the restore path on the
// simulated device, two restores at once: the prefix recomputed from token
// ids (the forward pass queued on the lane's compute stream) while the
// stored layers after it are copied on the copy stream and projected or
// scattered behind it. Recomputed layers equal model.Prefill within
// RecomputeTolerance, the stored ones the CPU backend to the bit.
func TestRecomputeOnLanes(t *testing.T) {
	seed := testseed.Seed(t)
	for _, preset := range []string{"tiny-llama", "tiny-gqa"} {
		t.Run(preset, func(t *testing.T) {
			c, _ := model.Preset(preset)
			w := model.Synthesize(c, seed)
			m, err := model.New(c, w)
			if err != nil {
				t.Fatal(err)
			}
			cpu, err := gpu.NewCPU(c, w)
			if err != nil {
				t.Fatal(err)
			}
			b, dev := newSimBackend(t, c, w, Options{Restores: 2, Slots: 2, Threads: 64, RecomputeMemory: 1 << 30}, seed)
			nr := 2
			if err := b.LoadRecompute(w, nr); err != nil {
				t.Fatal(err)
			}
			var wg sync.WaitGroup
			errs := make([]error, 2)
			for i := range errs {
				rng := rand.New(rand.NewSource(seed + int64(i)))
				n := 30 + 7*i
				ids := make([]int, n)
				for j := range ids {
					ids[j] = rng.Intn(c.Vocab)
				}
				s := newSimRestore(t, c, cpu, rng, n, 0, 8, state.Codec(i%2))
				wg.Add(1)
				go func() {
					defer wg.Done()
					errs[i] = recomputeOnce(b, c, m, s, ids, 8, nr)
				}()
			}
			wg.Wait()
			for i, err := range errs {
				if err != nil {
					t.Errorf("restore %d: %v (seed %d)", i, err, seed)
				}
			}
			if v := dev.violations(); len(v) > 0 {
				t.Errorf("%d ordering violations (seed %d), first: %s", len(v), seed, v[0])
			}
		})
	}
}

func recomputeOnce(b *Backend, c *model.Config, m *model.Model, s *simRestore, ids []int, bt, nr int) error {
	cd := s.cd
	wantK, wantV := make([][]float32, nr), make([][]float32, nr)
	if err := m.Prefill(ids, nr, func(l int, _, k, v []float32) {
		wantK[l] = append([]float32(nil), k...)
		wantV[l] = append([]float32(nil), v...)
	}); err != nil {
		return err
	}
	cache, err := b.NewCache(c.Layers, s.blocks, bt)
	if err != nil {
		return err
	}
	defer cache.Free()
	if err := cache.SetBlockTable(s.table); err != nil {
		return err
	}
	if err := cache.Poison(0xff); err != nil {
		return err
	}
	r, err := b.Begin(cache, s.positions)
	if err != nil {
		return err
	}
	if err := r.Recompute(ids, nr, nil); err != nil {
		r.Wait()
		return err
	}
	for l := nr; l < c.Layers; l++ {
		rows := append([]byte(nil), s.rows[l]...)
		if cd == state.CodecNone && s.kinds[l] == state.LayerHidden {
			err = r.Hidden(l, rows, nil)
		} else if cd == state.CodecNone {
			err = r.KV(l, rows, nil)
		} else {
			err = r.Encoded(l, s.kinds[l], cd, rows, nil)
		}
		if err != nil {
			r.Wait()
			return err
		}
	}
	tm, err := r.Wait()
	if err != nil {
		return err
	}
	if tm.Layers != c.Layers {
		return fmt.Errorf("timing counts %d layers, want %d", tm.Layers, c.Layers)
	}
	caches := make([]*gpu.PagedKV, nr)
	for l := 0; l < c.Layers; l++ {
		p, _ := gpu.NewPagedKV(c, bt, s.blocks)
		p.BlockTable = s.table
		if err := cache.Download(l, p.K, p.V); err != nil {
			return err
		}
		if l < nr {
			caches[l] = p
			continue
		}
		if !bytes.Equal(p.K, s.want[l].K) || !bytes.Equal(p.V, s.want[l].V) {
			return fmt.Errorf("stored layer %d (%s, codec %s) after a recomputed prefix differs from the CPU's (%s)", l, s.kinds[l], cd, firstDiff(p.K, s.want[l].K, p.V, s.want[l].V))
		}
	}
	res := &RecomputeCheck{}
	return compareRecompute(c, caches, s.positions, wantK, wantV, res)
}

// TestReleaseWaitsForCopy: a layer's host buffer is handed back only once
// its copy has read it. The device is frozen (nothing runs) when the layer
// is queued; the test waits until either the release has been called or
// something is blocked waiting for the device, and only then lets it run.
// A release that does not wait for the copy's event is called while the
// copy has not run.
func TestReleaseWaitsForCopy(t *testing.T) {
	seed := testseed.Seed(t)
	c, _ := model.Preset("tiny-llama")
	w := model.Synthesize(c, seed)
	b, dev := newSimBackend(t, c, w, Options{Restores: 1}, seed)
	cache, err := b.NewCache(c.Layers, 1, 16)
	if err != nil {
		t.Fatal(err)
	}
	for _, kind := range []state.LayerKind{state.LayerHidden, state.LayerKV} {
		r, err := b.Begin(cache, []int{0, 1, 2})
		if err != nil {
			t.Fatal(err)
		}
		dev.freeze()
		rows := make([]byte, 3*c.HiddenRowBytes())
		if kind == state.LayerKV {
			rows = make([]byte, 3*c.KVRowBytes())
		}
		var mu sync.Mutex
		called, ranFirst := false, false
		release := func() {
			ran := dev.copiedFrom(rows) > 0
			mu.Lock()
			called, ranFirst = true, ran
			mu.Unlock()
		}
		if kind == state.LayerHidden {
			err = r.Hidden(0, rows, release)
		} else {
			err = r.KV(0, rows, release)
		}
		if err != nil {
			t.Fatal(err)
		}
		for {
			mu.Lock()
			done := called
			mu.Unlock()
			if done || dev.blocked() > 0 {
				break
			}
			runtime.Gosched()
		}
		dev.thaw()
		if _, err := r.Wait(); err != nil {
			t.Fatal(err)
		}
		if !called || !ranFirst {
			t.Errorf("%s layer: release called %v, after its copy ran %v", kind, called, ranFirst)
		}
	}
}

// TestRopeTableOutlivesGrowth: a restore that began with the first RoPE
// table still rotates with it after another restore, needing positions past
// it, has made a larger one; the old table is freed (poisoned, on the
// simulated device) only once its last holder has waited.
func TestRopeTableOutlivesGrowth(t *testing.T) {
	seed := testseed.Seed(t)
	c, _ := model.Preset("tiny-gqa")
	w := model.Synthesize(c, seed)
	cpu, err := gpu.NewCPU(c, w)
	if err != nil {
		t.Fatal(err)
	}
	b, dev := newSimBackend(t, c, w, Options{Restores: 2}, seed)
	rng := rand.New(rand.NewSource(seed))
	allHidden = true // every layer rotated with the table
	a := newSimRestore(t, c, cpu, rng, 20, 0, 8, state.CodecNone)
	allHidden = false
	z := newSimRestore(t, c, cpu, rng, 20, 1500, 8, state.CodecFP8Token)
	ra, ca, err := a.begin(b, c, 8)
	if err != nil {
		t.Fatal(err)
	}
	defer ca.Free()
	first := ra.rope
	rz, cz, err := z.begin(b, c, 8)
	if err != nil {
		t.Fatal(err)
	}
	defer cz.Free()
	if rz.rope == first || rz.rope.n <= 1500 {
		t.Fatalf("the second restore's table covers %d positions, the same as the first's: %v", rz.rope.n, rz.rope == first)
	}
	if err := a.finish(ra, ca, dev, c); err != nil {
		t.Errorf("the restore holding the old table: %v (seed %d)", err, seed)
	}
	if first.ptr != 0 {
		t.Errorf("the old table is still allocated after its last holder waited")
	}
	if err := z.finish(rz, cz, dev, c); err != nil {
		t.Errorf("the restore with the new table: %v (seed %d)", err, seed)
	}
}

// TestHostCacheOnSim: the checked host path of the CUDA backend (a
// gpu.HostCache through BeginRestore, and Project/LoadKV: a round trip to
// the device per layer) gives the CPU backend's caches to the bit, and it
// refuses what it cannot do.
func TestHostCacheOnSim(t *testing.T) {
	seed := testseed.Seed(t)
	c, _ := model.Preset("tiny-qwen2")
	w := model.Synthesize(c, seed)
	cpu, err := gpu.NewCPU(c, w)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := newSimBackend(t, c, w, Options{}, seed)
	rng := rand.New(rand.NewSource(seed))
	s := newSimRestore(t, c, cpu, rng, 23, 40, 8, state.CodecNone)
	host := make(gpu.HostCache, c.Layers)
	for l := range host {
		host[l], _ = gpu.NewPagedKV(c, 8, s.blocks)
		host[l].BlockTable = s.table
		poison(host[l].K)
		poison(host[l].V)
	}
	r, err := b.BeginRestore(host, s.positions)
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Recompute(make([]int, len(s.positions)), 1, nil); err == nil {
		t.Error("recompute into a host cache accepted")
	}
	r, err = b.BeginRestore(host, s.positions)
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range s.order {
		if s.kinds[l] == state.LayerHidden {
			err = r.Hidden(l, s.rows[l], nil)
		} else {
			err = r.KV(l, s.rows[l], nil)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	if err := r.KV(c.Layers, s.rows[0], nil); err == nil {
		t.Error("a layer past the model accepted")
	}
	r.Abort()
	if _, err := r.Wait(); err == nil {
		t.Error("Wait after a refused layer reports no error")
	}
	for l := range host {
		if !bytes.Equal(host[l].K, s.want[l].K) || !bytes.Equal(host[l].V, s.want[l].V) {
			t.Errorf("layer %d (%s) through the host path differs from the CPU's", l, s.kinds[l])
		}
	}
	// Project and LoadKV directly.
	for l := range host {
		poison(host[l].K)
		poison(host[l].V)
		if s.kinds[l] == state.LayerHidden {
			err = b.Project(l, s.rows[l], s.positions, host[l])
		} else {
			err = b.LoadKV(l, s.rows[l], s.positions, host[l])
		}
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(host[l].K, s.want[l].K) || !bytes.Equal(host[l].V, s.want[l].V) {
			t.Errorf("layer %d (%s) through Project/LoadKV differs from the CPU's", l, s.kinds[l])
		}
	}
	wrong, _ := gpu.NewPagedKV(&model.Config{KVHeads: 1, HeadDim: 2, DType: "float32"}, 8, 1)
	for _, tc := range []struct {
		name string
		err  error
	}{
		{"nil cache", b.Project(0, s.rows[0], s.positions, nil)},
		{"another shape", b.Project(0, s.rows[0], s.positions, wrong)},
		{"short host cache", func() error { _, err := b.BeginRestore(host[:1], s.positions); return err }()},
		{"foreign cache", func() error { _, err := b.BeginRestore(foreignCache{}, s.positions); return err }()},
	} {
		if tc.err == nil {
			t.Errorf("%s accepted", tc.name)
		}
	}
}

type foreignCache struct{}

func (foreignCache) CacheLayers() int { return 3 }
