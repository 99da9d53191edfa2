package gpubench

import (
	"fmt"
	"io"
	"math/rand"
	"os"
	"path/filepath"
	"sort"
	"time"

	"github.com/hcache/hcache/bench/fio"
	"github.com/hcache/hcache/chunk"
	"github.com/hcache/hcache/gpu"
	"github.com/hcache/hcache/gpu/cuda"
	"github.com/hcache/hcache/model"
	"github.com/hcache/hcache/serve"
)

// Options of a GPU benchmark run.
type Options struct {
	Model     string // preset
	Tokens    []int
	Reps      int    // timed rounds (median and range reported), after one warm-up round
	FromStore string // when set: also restore from a store created in this directory
	Seed      int64
	CUDA      cuda.Options
	Progress  io.Writer
}

// Result is one token count's measurements.
type Result struct {
	Model        string  `json:"model"`
	Device       string  `json:"device"`
	Tokens       int     `json:"tokens"`
	Layers       int     `json:"layers"`
	HiddenBytes  int64   `json:"hidden_bytes"`
	KVBytes      int64   `json:"kv_bytes"`
	H2DGBps      float64 `json:"h2d_gbps"`
	CopyOnlyMs   float64 `json:"copy_only_ms"` // medians of the rounds
	HiddenMs     float64 `json:"hidden_ms"`
	KVMs         float64 `json:"kv_ms"`
	HiddenGPUMs  float64 `json:"hidden_gpu_ms"`
	HiddenVsCopy float64 `json:"hidden_over_copy"` // median of the rounds' ratios (each round times all three back to back)
	HiddenVsKV   float64 `json:"hidden_over_kv"`
	// Rounds: copy-only, hidden and KV timed once each per round, in an
	// order rotated every round (interleaved, never in separate batches);
	// the spreads are over the rounds, the ratios per round.
	Rounds         int     `json:"rounds"`
	CopyOnlySpread Spread  `json:"copy_only_ms_spread"`
	HiddenSpread   Spread  `json:"hidden_ms_spread"`
	KVSpread       Spread  `json:"kv_ms_spread"`
	HiddenVsCopyS  Spread  `json:"hidden_over_copy_spread"`
	HiddenVsKVS    Spread  `json:"hidden_over_kv_spread"`
	MaxRelErr      float64 `json:"max_rel_err"`
	MaxAbsErr      float64 `json:"max_abs_err"`
	Unwritten      int     `json:"unwritten"`
	KVExact        bool    `json:"kv_exact"`
	// From a store on disk (FromStore set): the same restores read through
	// the store's pinned restore buffers.
	StoreHiddenMs  float64 `json:"store_hidden_ms,omitempty"`
	StoreKVMs      float64 `json:"store_kv_ms,omitempty"`
	StoreReadGBps  float64 `json:"store_read_gbps,omitempty"`   // the store's restore with a no-op consumer
	FioReadGBps    float64 `json:"fio_read_gbps,omitempty"`     // fio, same run, when installed
	StoreHiddenErr float64 `json:"store_max_rel_err,omitempty"` // checked like max_rel_err
	FioNote        string  `json:"fio_note,omitempty"`
}

// Run benchmarks opts.Model at each token count.
func Run(o Options) ([]Result, error) {
	if o.Reps <= 0 {
		o.Reps = 7
	}
	if len(o.Tokens) == 0 {
		return nil, fmt.Errorf("gpubench: no token counts")
	}
	base, err := model.Preset(o.Model)
	if err != nil {
		return nil, err
	}
	c := *base
	maxT := 0
	for _, t := range o.Tokens {
		if t <= 0 {
			return nil, fmt.Errorf("gpubench: token count %d", t)
		}
		maxT = max(maxT, t)
	}
	c.MaxPositions = max(c.MaxPositions, maxT)
	logf := func(format string, a ...any) {
		if o.Progress != nil {
			fmt.Fprintf(o.Progress, format+"\n", a...)
		}
	}
	if _, _, err := cuda.Probe(o.CUDA.CublasPath); err != nil {
		return nil, err
	}
	t0 := time.Now()
	w := SynthKV(&c, o.Seed)
	logf("%s: synthesized K/V weights in %v", o.Model, time.Since(t0).Round(time.Millisecond))
	t0 = time.Now()
	b, err := cuda.Open(&c, w, o.CUDA)
	if err != nil {
		return nil, err
	}
	defer b.Close()
	logf("%s: opened %s (cuBLAS %s), weights uploaded in %v", o.Model, b.Device(), b.CublasPath(), time.Since(t0).Round(time.Millisecond))
	cpu, err := gpu.NewCPU(&c, w)
	if err != nil {
		return nil, err
	}
	L := c.Layers
	hrb, kvrb := c.HiddenRowBytes(), c.KVRowBytes()
	hid, err := allocPinned(b, L*maxT*hrb)
	if err != nil {
		return nil, err
	}
	defer hid.free()
	kvm, err := allocPinned(b, L*maxT*kvrb)
	if err != nil {
		return nil, err
	}
	defer kvm.free()
	// Every layer's rows differ, so a copy that lands in the wrong staging
	// slot, or a slot overwritten before its layer was consumed, shows.
	for l := 0; l < L; l++ {
		hostRows(&c, hid.mem[l*maxT*hrb:(l+1)*maxT*hrb], hrb, o.Seed+int64(l)*1000)
		hostRows(&c, kvm.mem[l*maxT*kvrb:(l+1)*maxT*kvrb], kvrb, o.Seed+int64(l)*1000+500)
	}
	var out []Result
	rng := rand.New(rand.NewSource(o.Seed))
	for _, T := range o.Tokens {
		res := Result{Model: o.Model, Device: b.Device(), Tokens: T, Layers: L,
			HiddenBytes: int64(L * T * hrb), KVBytes: int64(L * T * kvrb)}
		const bt = 16
		blocks := (T + bt - 1) / bt
		cache, err := b.NewCache(L, blocks, bt)
		if err != nil {
			return out, err
		}
		// A reversed block table: scattered, as a serving engine's is.
		table := make([]int, blocks)
		for i := range table {
			table[i] = blocks - 1 - i
		}
		if err := cache.SetBlockTable(table); err != nil {
			cache.Free()
			return out, err
		}
		positions := make([]int, T)
		for i := range positions {
			positions[i] = i
		}
		hRows := func(l int) []byte { return hid.mem[l*maxT*hrb : l*maxT*hrb+T*hrb] }
		kRows := func(l int) []byte { return kvm.mem[l*maxT*kvrb : l*maxT*kvrb+T*kvrb] }
		run := func(kind string) (cuda.Timing, error) {
			r, err := b.Begin(cache, positions)
			if err != nil {
				return cuda.Timing{}, err
			}
			for l := 0; l < L && err == nil; l++ {
				switch kind {
				case "copy":
					err = r.Copy(hRows(l), nil)
				case "hidden":
					err = r.Hidden(l, hRows(l), nil)
				case "kv":
					err = r.KV(l, kRows(l), nil)
				}
			}
			t, werr := r.Wait()
			if err == nil {
				err = werr
			}
			return t, err
		}
		rounds, err := interleave([]string{"copy", "hidden", "kv"}, 1, o.Reps, func(kind string) (sample, error) {
			t, err := run(kind)
			if err != nil {
				return sample{}, fmt.Errorf("%s restore of %d tokens: %w", kind, T, err)
			}
			return sample{wall: t.Wall, gpu: t.GPU}, nil
		})
		if err != nil {
			cache.Free()
			return out, err
		}
		summarize(&res, rounds)

		// Correctness: poison, restore hidden, check every layer for
		// unwritten elements and sampled positions of three layers
		// against the CPU backend.
		if err := cache.Poison(0xff); err != nil {
			cache.Free()
			return out, err
		}
		if _, err := run("hidden"); err != nil {
			cache.Free()
			return out, err
		}
		lb := cache.LayerBytes()
		kb, vb := make([]byte, lb), make([]byte, lb)
		sample := samplePositions(T, 24, rng)
		few := samplePositions(T, 6, rng)
		all := &errStats{}
		for l := 0; l < L; l++ {
			s := sample
			if l != 0 && l != L/2 && l != L-1 {
				s = few
			}
			es, left, err := checkLayer(&c, cpu, cache, l, hRows(l), positions, s, kb, vb)
			if err != nil {
				cache.Free()
				return out, err
			}
			res.Unwritten += left
			all.got, all.want = append(all.got, es.got...), append(all.want, es.want...)
		}
		res.MaxRelErr, res.MaxAbsErr = all.result()
		// KV path: poison, restore, every position exact.
		if err := cache.Poison(0xff); err != nil {
			cache.Free()
			return out, err
		}
		if _, err := run("kv"); err != nil {
			cache.Free()
			return out, err
		}
		res.KVExact = true
		for l := 0; l < L; l++ {
			if err := cache.Download(l, kb, vb); err != nil {
				cache.Free()
				return out, err
			}
			got := &gpu.PagedKV{BlockTokens: bt, KVHeads: c.KVHeads, HeadDim: c.HeadDim, ElemBytes: c.ElemBytes(), BlockTable: table, K: kb, V: vb}
			half := kvrb / 2
			rows := kRows(l)
			for i, p := range positions {
				gk, gv, _ := got.Token(p)
				if string(gk) != string(rows[i*kvrb:i*kvrb+half]) || string(gv) != string(rows[i*kvrb+half:(i+1)*kvrb]) {
					res.KVExact = false
					break
				}
			}
		}
		if o.FromStore != "" {
			if err := fromStore(&res, o, &c, b, cpu, cache, hRows, kRows, positions, sample); err != nil {
				cache.Free()
				return out, fmt.Errorf("from store: %w", err)
			}
		}
		cache.Free()
		logf("%s %6d tokens, %d rounds: h2d %.1f GB/s copy-only %.2f ms hidden %.2f ms (%.3fx copy [%.3f-%.3f], %.3fx kv [%.3f-%.3f]) kv %.2f ms max_rel_err %.1e unwritten %d kv_exact %v",
			o.Model, T, res.Rounds, res.H2DGBps, res.CopyOnlyMs, res.HiddenMs, res.HiddenVsCopy, res.HiddenVsCopyS.Min, res.HiddenVsCopyS.Max,
			res.HiddenVsKV, res.HiddenVsKVS.Min, res.HiddenVsKVS.Max, res.KVMs, res.MaxRelErr, res.Unwritten, res.KVExact)
		out = append(out, res)
	}
	return out, nil
}

// fromStore writes the context to a store (hidden plan and KV plan), then
// restores each through the store's pinned buffers into the device cache.
func fromStore(res *Result, o Options, c *model.Config, b *cuda.Backend, cpu *gpu.CPU, cache *cuda.Cache,
	hRows, kRows func(int) []byte, positions, sample []int) error {
	dir, err := os.MkdirTemp(o.FromStore, "hcache-gpubench-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	st, err := chunk.Open(chunk.Options{Dir: filepath.Join(dir, "store"), CapacityBytes: -1, GCInterval: -1,
		ReadBuffers: chunk.BufferHooks{Register: b.HostRegister, Unregister: b.HostUnregister}})
	if err != nil {
		return err
	}
	defer st.Close()
	L, T := c.Layers, len(positions)
	plan := func(kind chunk.LayerKind, rb int) []chunk.LayerPlan {
		p := make([]chunk.LayerPlan, L)
		for i := range p {
			p[i] = chunk.LayerPlan{Kind: kind, RowBytes: uint32(rb)}
		}
		return p
	}
	hIdent := &chunk.Identity{Model: []byte("gpubench " + o.Model), Plan: plan(chunk.LayerHidden, c.HiddenRowBytes())}
	kIdent := &chunk.Identity{Model: []byte("gpubench " + o.Model), Plan: plan(chunk.LayerKV, c.KVRowBytes())}
	for _, ctx := range []struct {
		id    string
		ident *chunk.Identity
		rows  func(int) []byte
	}{{"hidden", hIdent, hRows}, {"kv", kIdent, kRows}} {
		wr, err := st.Create("bench", ctx.id, ctx.ident, chunk.CreateOptions{})
		if err != nil {
			return err
		}
		// Prefill in slices of 1024 tokens per layer, as an engine would.
		rb := int(ctx.ident.Plan[0].RowBytes)
		for from := 0; from < T; from += 1024 {
			to := min(T, from+1024)
			for l := 0; l < L; l++ {
				if err := wr.AppendLayer(l, ctx.rows(l)[from*rb:to*rb]); err != nil {
					return err
				}
			}
		}
		if err := wr.Close(); err != nil {
			return err
		}
	}
	// The store's own read speed: restore with a consumer that does nothing.
	var reads []time.Duration
	for i := 0; i < 2; i++ {
		t0 := time.Now()
		if _, err := st.Restore("bench", "hidden", hIdent, func(int, []byte) error { return nil }); err != nil {
			return err
		}
		reads = append(reads, time.Since(t0))
	}
	res.StoreReadGBps = float64(res.HiddenBytes) / median(reads).Seconds() / 1e9
	// The one restore pipeline, as the daemon and the library run it.
	rest := serve.NewRestorer(st, b, serve.Settings{MaxConcurrent: 1})
	restore := func(id string, ident *chunk.Identity, hidden bool) (time.Duration, error) {
		t0 := time.Now()
		_, err := rest.Restore(serve.Request{NS: "bench", ID: id, Ident: ident, Dst: cache})
		return time.Since(t0), err
	}
	var hs, ks []time.Duration
	for i := 0; i < 2; i++ {
		d, err := restore("hidden", hIdent, true)
		if err != nil {
			return err
		}
		hs = append(hs, d)
		d, err = restore("kv", kIdent, false)
		if err != nil {
			return err
		}
		ks = append(ks, d)
	}
	res.StoreHiddenMs, res.StoreKVMs = ms(median(hs)), ms(median(ks))
	// Check the store path's output too.
	if err := cache.Poison(0xff); err != nil {
		return err
	}
	if _, err := restore("hidden", hIdent, true); err != nil {
		return err
	}
	lb := cache.LayerBytes()
	kb, vb := make([]byte, lb), make([]byte, lb)
	all := &errStats{}
	for _, l := range []int{0, L - 1} {
		es, left, err := checkLayer(c, cpu, cache, l, hRows(l), positions, sample, kb, vb)
		if err != nil {
			return err
		}
		all.got, all.want = append(all.got, es.got...), append(all.want, es.want...)
		res.Unwritten += left
	}
	res.StoreHiddenErr, _ = all.result()
	// fio on a file of the same size in the same directory, when installed.
	f := filepath.Join(dir, "fio.dat")
	if bw, err := fio.Run(fio.Job{File: f, SizeBytes: res.HiddenBytes, BlockSize: 1 << 20, QD: 32}); err == nil {
		res.FioReadGBps = bw
	} else {
		res.FioNote = err.Error()
	}
	return nil
}

// sample is one timed restore: wall clock, and the GPU's own time.
type sample struct{ wall, gpu time.Duration }

// interleave times every kind once per round, warm rounds first (not kept),
// then reps rounds, the order rotated by one each round (copy, hidden, kv;
// hidden, kv, copy; ...) so that no kind always runs first or always after
// another, and a drift of the machine (clocks, another tenant) falls on all
// kinds alike. It returns the kept rounds, each a sample per kind.
func interleave(kinds []string, warm, reps int, run func(kind string) (sample, error)) ([]map[string]sample, error) {
	if len(kinds) == 0 || reps <= 0 || warm < 0 {
		return nil, fmt.Errorf("gpubench: interleave %d kinds, %d warm-up and %d timed rounds", len(kinds), warm, reps)
	}
	var out []map[string]sample
	for r := 0; r < warm+reps; r++ {
		got := make(map[string]sample, len(kinds))
		for i := range kinds {
			k := kinds[(r+i)%len(kinds)]
			s, err := run(k)
			if err != nil {
				return nil, err
			}
			got[k] = s
		}
		if r >= warm {
			out = append(out, got)
		}
	}
	return out, nil
}

// Spread is the median and range of values over rounds.
type Spread struct {
	Median float64 `json:"median"`
	Min    float64 `json:"min"`
	Max    float64 `json:"max"`
	N      int     `json:"n"`
}

// spreadOf summarizes v (the median of an even count is the mean of the two
// middle values).
func spreadOf(v []float64) Spread {
	if len(v) == 0 {
		return Spread{}
	}
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	n := len(s)
	med := s[n/2]
	if n%2 == 0 {
		med = (s[n/2-1] + s[n/2]) / 2
	}
	return Spread{Median: med, Min: s[0], Max: s[n-1], N: n}
}

// summarize fills res's timings from rounds of "copy", "hidden" and "kv":
// the median and range of each kind, and of the ratios taken within each
// round (hidden against the copy and the KV restore timed beside it).
func summarize(res *Result, rounds []map[string]sample) {
	var cw, hw, kw, cg, hg, hc, hk []float64
	for _, r := range rounds {
		c, h, k := r["copy"], r["hidden"], r["kv"]
		cw, hw, kw = append(cw, ms(c.wall)), append(hw, ms(h.wall)), append(kw, ms(k.wall))
		cg, hg = append(cg, c.gpu.Seconds()), append(hg, ms(h.gpu))
		if c.wall > 0 {
			hc = append(hc, float64(h.wall)/float64(c.wall))
		}
		if k.wall > 0 {
			hk = append(hk, float64(h.wall)/float64(k.wall))
		}
	}
	res.Rounds = len(rounds)
	res.CopyOnlySpread, res.HiddenSpread, res.KVSpread = spreadOf(cw), spreadOf(hw), spreadOf(kw)
	res.HiddenVsCopyS, res.HiddenVsKVS = spreadOf(hc), spreadOf(hk)
	res.CopyOnlyMs, res.HiddenMs, res.KVMs = res.CopyOnlySpread.Median, res.HiddenSpread.Median, res.KVSpread.Median
	res.HiddenGPUMs = spreadOf(hg).Median
	res.HiddenVsCopy, res.HiddenVsKV = res.HiddenVsCopyS.Median, res.HiddenVsKVS.Median
	if g := spreadOf(cg).Median; g > 0 {
		res.H2DGBps = float64(res.HiddenBytes) / g / 1e9
	}
}
