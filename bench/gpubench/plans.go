package gpubench

import (
	"errors"
	"fmt"
	"io"
	"math/rand"
	"slices"
	"time"

	"github.com/hcache/hcache/chunk"
	"github.com/hcache/hcache/gpu"
	"github.com/hcache/hcache/gpu/cuda"
	"github.com/hcache/hcache/model"
	"github.com/hcache/hcache/profiles"
	"github.com/hcache/hcache/serve"
	"github.com/hcache/hcache/serve/sched"
)

// Plan kinds of RunPlans: the scheduler's plan for the profile, and the
// three single-method plans it is measured against.
const (
	PlanScheduled = "scheduled"
	PlanHidden    = "hidden"
	PlanKV        = "kv"
	PlanRecompute = "recompute"
)

// PlanKinds lists the plan kinds in their default order.
var PlanKinds = []string{PlanScheduled, PlanHidden, PlanKV, PlanRecompute}

// Targets of issue 18 (an H100/H200, the Llama2-7B shape, from its own disk).
const (
	// ScheduledTarget: the scheduled plan's restore at most this times the
	// best of all-recompute, all-hidden and all-KV (at 4K and 16K tokens).
	ScheduledTarget = 0.9
	// TorchTarget: hcache's own full recompute at most this times
	// PyTorch's prefill of the same layers.
	TorchTarget = 1.3
)

// PlanOptions of a plan benchmark (`hcache bench gpu --plan`).
type PlanOptions struct {
	Model  string // preset
	Tokens []int
	Plans  []string // of PlanKinds (default: all)
	Reps   int      // timed rounds after one warm-up round (default 5)
	// Dir is where the store is created (a temporary directory under it,
	// removed at the end): the disk whose restores are measured.
	Dir string
	// Backend: "cuda" (default) or "cpu" (a host cache; small models).
	Backend string
	// Profile and Tier give the scheduled plan (sched.Platform.Choose);
	// ProfileName is reported.
	Profile     *profiles.Profile
	ProfileName string
	Tier        string
	Seed        int64
	CUDA        cuda.Options
	// MaxParams bounds the model the cpu backend runs (default 50M).
	MaxParams int64
	// Torch, when set, runs the PyTorch baseline (RunTorch) for the
	// recompute rows, before the backend opens.
	Torch    *TorchOptions
	Progress io.Writer
}

// PlanRow is one (tokens, plan) measurement.
type PlanRow struct {
	Model   string `json:"model"`
	Backend string `json:"backend"`
	Device  string `json:"device"`
	Tokens  int    `json:"tokens"`
	Plan    string `json:"plan"`
	// The plan's layer counts.
	Recomputed int `json:"recomputed"`
	Hidden     int `json:"hidden"`
	KV         int `json:"kv"`
	// PredictedMS is the profile's prediction of the plan (sched.Predict).
	Profile     string  `json:"profile"`
	PredictedMS float64 `json:"predicted_ms"`
	// RestoreMS is the median of the timed rounds (restore call to its
	// end, admission excluded: nothing else runs), RestoreSpread its
	// median and range; plans were interleaved, the order rotated each
	// round. DeviceMS is the backend's own time (gpu.Timing.GPU; 0 on the
	// CPU) median.
	RestoreMS     float64 `json:"restore_ms"`
	RestoreSpread Spread  `json:"restore_ms_spread"`
	DeviceMS      float64 `json:"device_ms"`
	ReadBytes     int64   `json:"read_bytes"` // stored bytes the plan reads
	// DiskGBps is the store's read speed in the same rounds: a restore of
	// the all-hidden context with a consumer that does nothing (the bytes
	// of every layer over its wall time), median of the rounds.
	DiskGBps   float64 `json:"disk_gbps"`
	DiskSpread Spread  `json:"disk_gbps_spread"`
	// OverBest (scheduled rows): the scheduled restore over the fastest of
	// the other plans timed in the same round, median and range of the
	// rounds' ratios; Target is ScheduledTarget.
	OverBest       *Spread `json:"over_best,omitempty"`
	OverBestTarget float64 `json:"over_best_target,omitempty"`
	// Torch (recompute rows, with a baseline): PyTorch's prefill of the
	// same layers and tokens, and hcache's median over it.
	TorchMS     float64 `json:"torch_ms,omitempty"`
	TorchSpread *Spread `json:"torch_ms_spread,omitempty"`
	OverTorch   float64 `json:"over_torch,omitempty"`
	TorchTarget float64 `json:"over_torch_target,omitempty"`
	TorchError  string  `json:"torch_error,omitempty"`
	// Unwritten counts elements of the checked layers (the first, the
	// last recomputed, the first stored, the last) of the first Tokens
	// positions still poisoned after the plan's warm-up restore into a
	// poisoned cache: 0 when the plan wrote every layer it should.
	Unwritten     int   `json:"unwritten"`
	CheckedLayers []int `json:"checked_layers"`
	Rounds        int   `json:"rounds"`
}

// planSplit is each plan kind's split at n tokens.
func planSplit(kind string, c *model.Config, pl *sched.Platform, n int) (sched.Split, error) {
	L := c.Layers
	switch kind {
	case PlanScheduled:
		d, err := pl.Choose(c, n)
		return d.Split, err
	case PlanHidden:
		return sched.Split{Hidden: L}, nil
	case PlanKV:
		return sched.Split{KV: L}, nil
	case PlanRecompute:
		return sched.Split{Recompute: L}, nil
	}
	return sched.Split{}, fmt.Errorf("gpubench: unknown plan %q (want one of %v)", kind, PlanKinds)
}

func (o *PlanOptions) check() error {
	if len(o.Plans) == 0 {
		o.Plans = slices.Clone(PlanKinds)
	}
	seen := map[string]bool{}
	for _, p := range o.Plans {
		if !slices.Contains(PlanKinds, p) {
			return fmt.Errorf("gpubench: unknown plan %q (want some of %v)", p, PlanKinds)
		}
		if seen[p] {
			return fmt.Errorf("gpubench: plan %q given twice", p)
		}
		seen[p] = true
	}
	if len(o.Tokens) == 0 {
		return errors.New("gpubench: no token counts")
	}
	for _, t := range o.Tokens {
		if t <= 0 {
			return fmt.Errorf("gpubench: token count %d", t)
		}
	}
	if o.Reps <= 0 {
		o.Reps = 5
	}
	if o.Dir == "" {
		return errors.New("gpubench: the plan benchmark restores from a store: give its directory (--from-store)")
	}
	if o.Profile == nil {
		return errors.New("gpubench: the plan benchmark needs a profile for the scheduled plan")
	}
	if o.Backend == "" {
		o.Backend = gpu.SelectCUDA
	}
	if o.Backend != gpu.SelectCUDA && o.Backend != gpu.SelectCPU {
		return fmt.Errorf("gpubench: backend %q (want cuda or cpu)", o.Backend)
	}
	if o.MaxParams <= 0 {
		o.MaxParams = 50_000_000
	}
	return nil
}

// RunPlans restores a context of each token count from a store on o.Dir
// under each plan, through serve's restore pipeline (serve.Restorer) and
// the backend, the plans interleaved round by round with the order rotated,
// and a no-op restore of the all-hidden context in the same rounds for the
// disk's read speed. All-recompute stores nothing (the store refuses a plan
// without a stored layer), so its rows time what serve runs for a
// recomputed prefix: BeginRestore, Recompute of every layer, Wait.
func RunPlans(o PlanOptions) ([]PlanRow, error) {
	if err := o.check(); err != nil {
		return nil, err
	}
	logf := func(format string, a ...any) {
		if o.Progress != nil {
			fmt.Fprintf(o.Progress, format+"\n", a...)
		}
	}
	base, err := model.Preset(o.Model)
	if err != nil {
		return nil, err
	}
	c := *base
	maxT := slices.Max(o.Tokens)
	c.MaxPositions = max(c.MaxPositions, maxT)
	if o.Backend == gpu.SelectCPU && c.ParamCount() > o.MaxParams {
		return nil, fmt.Errorf("gpubench: %s has %d parameters, more than the cpu backend's limit of %d", o.Model, c.ParamCount(), o.MaxParams)
	}
	pl, err := sched.NewPlatform(o.Profile, o.Tier)
	if err != nil {
		return nil, err
	}
	L := c.Layers
	splits := map[string]map[int]sched.Split{}
	predicted := map[string]map[int]float64{}
	recompute := 0
	for _, kind := range o.Plans {
		splits[kind], predicted[kind] = map[int]sched.Split{}, map[int]float64{}
		for _, n := range o.Tokens {
			s, err := planSplit(kind, &c, pl, n)
			if err != nil {
				return nil, err
			}
			cs, err := pl.Costs(&c, n)
			if err != nil {
				return nil, err
			}
			splits[kind][n], predicted[kind][n] = s, sched.Predict(cs, s)
			recompute = max(recompute, s.Recompute)
		}
	}
	var torch *TorchResult
	var torchErr error
	if o.Torch != nil && slices.Contains(o.Plans, PlanRecompute) {
		t0 := time.Now()
		torch, torchErr = RunTorch(*o.Torch, &c, L, o.Tokens)
		if torchErr != nil {
			logf("torch baseline: %v", torchErr)
		} else {
			logf("torch baseline (%s, %s, %s): %v", torch.Device, torch.Attention, torch.Timer, time.Since(t0).Round(time.Millisecond))
		}
	}
	if o.Backend == gpu.SelectCUDA {
		if _, _, err := cuda.Probe(o.CUDA.CublasPath); err != nil {
			return nil, err
		}
	}
	t0 := time.Now()
	w := model.SynthesizeParallel(&c, o.Seed)
	logf("%s: synthesized weights in %v", o.Model, time.Since(t0).Round(time.Millisecond))
	t0 = time.Now()
	b, note, err := gpu.Select(o.Backend, &c, w, o.CUDA)
	if err != nil {
		return nil, err
	}
	defer b.Close()
	if recompute > 0 {
		if err := b.LoadRecompute(w, recompute); err != nil {
			return nil, fmt.Errorf("gpubench: loading %d layers for recompute: %w", recompute, err)
		}
	}
	dev, _ := b.(*cuda.Backend)
	device := "cpu"
	if dev != nil {
		device = dev.Device()
	}
	logf("%s: %s, %d layers loaded for recompute, in %v", o.Model, note, recompute, time.Since(t0).Round(time.Millisecond))
	w = nil // the backend holds what it needs

	st, done, err := tempStore(o.Dir, "hcache-benchplans-", dev, true)
	if err != nil {
		return nil, err
	}
	defer done()
	rest := serve.NewRestorer(st, b, serve.Settings{MaxConcurrent: 1})

	hrb, kvrb := c.HiddenRowBytes(), c.KVRowBytes()
	hidRows := make([]byte, maxT*hrb)
	hostRows(&c, hidRows, hrb, o.Seed+11)
	kvRows := make([]byte, maxT*kvrb)
	hostRows(&c, kvRows, kvrb, o.Seed+12)
	rng := rand.New(rand.NewSource(o.Seed))
	var out []PlanRow
	for _, n := range o.Tokens {
		rows, err := benchTokens(o, &c, b, dev, st, rest, n, splits, predicted, hidRows[:n*hrb], kvRows[:n*kvrb], rng, logf)
		if err != nil {
			return out, fmt.Errorf("%d tokens: %w", n, err)
		}
		for i := range rows {
			r := &rows[i]
			r.Model, r.Backend, r.Device, r.Profile = o.Model, b.Name(), device, o.ProfileName
			if r.Plan == PlanRecompute && o.Torch != nil {
				r.TorchTarget = TorchTarget
				if torchErr != nil {
					r.TorchError = torchErr.Error()
				} else if s, ok := torch.At(n); ok {
					r.TorchMS, r.TorchSpread = s.Median, &s
					r.OverTorch = r.RestoreMS / s.Median
				}
			}
		}
		out = append(out, rows...)
	}
	return out, nil
}

// benchTokens stores the context of n tokens under every plan, times the
// interleaved rounds and checks each plan (in the warm-up round) for
// unwritten elements.
func benchTokens(o PlanOptions, c *model.Config, b gpu.Backend, dev *cuda.Backend, st *chunk.Store, rest *serve.Restorer, n int,
	splits map[string]map[int]sched.Split, predicted map[string]map[int]float64, hid, kv []byte, rng *rand.Rand, logf func(string, ...any)) ([]PlanRow, error) {
	L := c.Layers
	prompt := make([]int, n)
	for i := range prompt {
		prompt[i] = rng.Intn(c.Vocab)
	}
	positions := make([]int, n)
	for i := range positions {
		positions[i] = i
	}
	ns := "benchplans"
	idents := map[string]*chunk.Identity{}
	readBytes := map[string]int64{}
	store := func(kind string, s sched.Split) error {
		id := fmt.Sprintf("%s-%d", kind, n)
		plan := s.Plan(c)
		ident := &chunk.Identity{Model: []byte("gpubench " + o.Model), Plan: plan}
		wr, err := st.Create(ns, id, ident, chunk.CreateOptions{})
		if err != nil {
			return err
		}
		// Prefill in slices of 1024 tokens per layer, as an engine would.
		for from := 0; from < n; from += 1024 {
			to := min(n, from+1024)
			for l, p := range plan {
				var err error
				switch p.Kind {
				case chunk.LayerHidden:
					err = wr.AppendLayer(l, hid[from*int(p.RowBytes):to*int(p.RowBytes)])
				case chunk.LayerKV:
					err = wr.AppendLayer(l, kv[from*int(p.RowBytes):to*int(p.RowBytes)])
				}
				if err != nil {
					wr.Close()
					return err
				}
			}
		}
		if err := wr.Close(); err != nil {
			return err
		}
		idents[kind] = ident
		readBytes[kind] = int64(n) * int64(ident.TokenBytes())
		return nil
	}
	t0 := time.Now()
	const diskKind = "disk"
	for _, kind := range o.Plans {
		if s := splits[kind][n]; s.Recompute < L {
			if err := store(kind, s); err != nil {
				return nil, err
			}
		}
	}
	// The disk's read speed: a no-op restore of the all-hidden context (the
	// hidden plan's when it is benchmarked).
	diskID := fmt.Sprintf("%s-%d", PlanHidden, n)
	if idents[PlanHidden] == nil {
		if err := store(diskKind, sched.Split{Hidden: L}); err != nil {
			return nil, err
		}
		diskID = fmt.Sprintf("%s-%d", diskKind, n)
	}
	diskIdent := &chunk.Identity{Model: []byte("gpubench " + o.Model), Plan: sched.Split{Hidden: L}.Plan(c)}
	diskBytes := int64(n) * int64(diskIdent.TokenBytes())
	logf("%s %d tokens: stored %d contexts in %v", o.Model, n, len(idents), time.Since(t0).Round(time.Millisecond))
	defer func() {
		for kind := range idents {
			st.Delete(ns, fmt.Sprintf("%s-%d", kind, n))
		}
	}()

	const bt = 16
	blocks := (n + bt - 1) / bt
	var dst gpu.Cache
	var poison func() error
	var download func(l int, k, v []byte) error
	if dev != nil {
		dc, err := dev.NewCache(L, blocks, bt)
		if err != nil {
			return nil, err
		}
		defer dc.Free()
		dst, poison, download = dc, func() error { return dc.Poison(0xff) }, dc.Download
	} else {
		hc := make(gpu.HostCache, L)
		for l := range hc {
			var err error
			if hc[l], err = gpu.NewPagedKV(c, bt, blocks); err != nil {
				return nil, err
			}
		}
		dst = hc
		poison = func() error {
			for _, p := range hc {
				for i := range p.K {
					p.K[i], p.V[i] = 0xff, 0xff
				}
			}
			return nil
		}
		download = func(l int, k, v []byte) error { copy(k, hc[l].K); copy(v, hc[l].V); return nil }
	}
	run := func(kind string) (sample, error) {
		if kind == diskKind {
			t0 := time.Now()
			_, err := st.Restore(ns, diskID, diskIdent, func(int, []byte) error { return nil })
			return sample{wall: time.Since(t0)}, err
		}
		if splits[kind][n].Recompute == L {
			t0 := time.Now()
			r, err := b.BeginRestore(dst, positions)
			if err != nil {
				return sample{}, err
			}
			err = r.Recompute(prompt, L, nil)
			t, werr := r.Wait()
			if err = errors.Join(err, werr); err != nil {
				return sample{}, fmt.Errorf("recompute of %d layers: %w", L, err)
			}
			return sample{wall: time.Since(t0), gpu: t.GPU}, nil
		}
		t0 := time.Now()
		rs, err := rest.Restore(serve.Request{NS: ns, ID: fmt.Sprintf("%s-%d", kind, n), Ident: idents[kind], Tokens: prompt, Dst: dst})
		if err != nil {
			return sample{}, fmt.Errorf("%s restore: %w", kind, err)
		}
		return sample{wall: time.Since(t0) - rs.QueueWait, gpu: rs.Device.GPU}, nil
	}
	// The warm-up round doubles as the check: each plan restores into a
	// poisoned cache, and its first, last recomputed, first stored and
	// last layers must then hold no poison.
	lb := c.KVDim() * c.ElemBytes() * n // the first n positions (identity block table)
	unwritten := map[string]int{}
	checked := map[string][]int{}
	kinds := append(slices.Clone(o.Plans), diskKind)
	calls := 0
	rounds, err := interleave(kinds, 1, o.Reps, func(kind string) (sample, error) {
		calls++
		if calls > len(kinds) || kind == diskKind {
			return run(kind)
		}
		if err := poison(); err != nil {
			return sample{}, err
		}
		sm, err := run(kind)
		if err != nil {
			return sm, err
		}
		k, v := make([]byte, dstLayerBytes(dst, c, blocks, bt)), make([]byte, dstLayerBytes(dst, c, blocks, bt))
		for _, l := range checkLayers(splits[kind][n], L) {
			if err := download(l, k, v); err != nil {
				return sm, err
			}
			unwritten[kind] += countPoison(k[:lb], c.ElemBytes()) + countPoison(v[:lb], c.ElemBytes())
			checked[kind] = append(checked[kind], l)
		}
		return sm, nil
	})
	if err != nil {
		return nil, err
	}
	var disk []float64
	for _, r := range rounds {
		disk = append(disk, float64(diskBytes)/r[diskKind].wall.Seconds()/1e9)
	}
	diskS := spreadOf(disk)
	var rowsOut []PlanRow
	for _, kind := range o.Plans {
		s := splits[kind][n]
		var wall, gpuT []float64
		for _, r := range rounds {
			wall, gpuT = append(wall, ms(r[kind].wall)), append(gpuT, ms(r[kind].gpu))
		}
		row := PlanRow{Tokens: n, Plan: kind, Recomputed: s.Recompute, Hidden: s.Hidden, KV: s.KV,
			RestoreSpread: spreadOf(wall), DeviceMS: spreadOf(gpuT).Median, ReadBytes: readBytes[kind],
			DiskGBps: diskS.Median, DiskSpread: diskS, Rounds: len(rounds), PredictedMS: predicted[kind][n]}
		row.RestoreMS = row.RestoreSpread.Median
		if kind == PlanScheduled {
			var ratios []float64
			for _, r := range rounds {
				best := time.Duration(0)
				for _, k := range o.Plans {
					if k != PlanScheduled && (best == 0 || r[k].wall < best) {
						best = r[k].wall
					}
				}
				if best > 0 {
					ratios = append(ratios, float64(r[kind].wall)/float64(best))
				}
			}
			if len(ratios) > 0 {
				sp := spreadOf(ratios)
				row.OverBest, row.OverBestTarget = &sp, ScheduledTarget
			}
		}
		row.Unwritten, row.CheckedLayers = unwritten[kind], checked[kind]
		logf("%s %6d tokens %-9s (%s): restore %.2f ms [%.2f-%.2f], predicted %.2f ms, disk %.2f GB/s, unwritten %d",
			o.Model, n, kind, s, row.RestoreMS, row.RestoreSpread.Min, row.RestoreSpread.Max, row.PredictedMS, row.DiskGBps, row.Unwritten)
		rowsOut = append(rowsOut, row)
	}
	return rowsOut, nil
}

// dstLayerBytes is the size of one layer's K (or V) in a cache.
func dstLayerBytes(dst gpu.Cache, c *model.Config, blocks, bt int) int {
	if dc, ok := dst.(*cuda.Cache); ok {
		return dc.LayerBytes()
	}
	return blocks * bt * c.KVDim() * c.ElemBytes()
}

// checkLayers are the layers whose every element a plan's check reads: the
// first, the last recomputed, the first stored and the last.
func checkLayers(s sched.Split, layers int) []int {
	var out []int
	for _, l := range []int{0, s.Recompute - 1, s.Recompute, layers - 1} {
		if l >= 0 && l < layers && !slices.Contains(out, l) {
			out = append(out, l)
		}
	}
	return out
}
