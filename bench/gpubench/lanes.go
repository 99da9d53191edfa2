package gpubench

import (
	"errors"
	"fmt"
	"io"
	"math"
	"math/rand"
	"sync"
	"time"

	"github.com/hcache/hcache/chunk"
	"github.com/hcache/hcache/gpu"
	"github.com/hcache/hcache/gpu/cuda"
	"github.com/hcache/hcache/internal/par"
	"github.com/hcache/hcache/model"
	"github.com/hcache/hcache/serve"
	"github.com/hcache/hcache/serve/sched"
	"github.com/hcache/hcache/state"
	"github.com/hcache/hcache/state/codec"
)

// LanesOptions of CheckLanes (`hcache gpu lanes`).
type LanesOptions struct {
	Model  string // preset (default tiny-llama)
	Layers int    // the preset's first Layers layers (0: all)
	Tokens int    // tokens per context of the concurrency check
	// CodecTokens: tokens of the codec check's contexts, which the CPU
	// backend also restores (its projection is slow on big shapes);
	// default min(Tokens, 256).
	CodecTokens int
	// Dir is where the temporary store is created.
	Dir string
	// Backend: "cuda" (default) or "cpu" (a host cache: the same check
	// with the CPU backend, which decodes every codec on the host).
	Backend string
	// Reps: timed rounds of N sequential and N concurrent restores, after
	// one untimed round (default 3).
	Reps     int
	Seed     int64
	CUDA     cuda.Options
	Progress io.Writer
	// open, when set, opens the backend checked instead of gpu.Select
	// (tests: a backend with a fault the check must find).
	open func(c *model.Config, w *model.Weights) (gpu.Backend, error)
}

// LanesResult is CheckLanes' report.
type LanesResult struct {
	Model   string `json:"model"`
	Backend string `json:"backend"`
	Device  string `json:"device"`
	Tokens  int    `json:"tokens"`
	// CodecTokens: the codec check's contexts' tokens.
	CodecTokens int `json:"codec_tokens"`
	Layers      int `json:"layers"`
	// Plan is the stored plan: hidden/kv layer counts (hidden first).
	Plan string `json:"plan"`
	// Lanes is the backend's Concurrency (the CPU's unbounded one is
	// reported as the CUDA default the concurrency check then uses).
	Lanes       int              `json:"lanes"`
	Codecs      []CodecLaneCheck `json:"codecs"`
	Concurrency []ConcurrentRun  `json:"concurrency"`
	Failed      int              `json:"failed"`
}

// CodecLaneCheck is one codec's check: the context stored under it,
// restored through serve's pipeline into a device cache with the rows
// decoded on the device (the copy moves the stored bytes), against the
// same restore with the rows decoded on the host (the device gets the
// model dtype) and against the CPU backend's restore.
type CodecLaneCheck struct {
	Codec string `json:"codec"`
	// DecodedOnDevice: the backend's restore took the stored rows
	// (gpu.DeviceDecoder); false on the CPU backend, which decodes on the
	// host in both restores.
	DecodedOnDevice bool `json:"decoded_on_device"`
	// CopiedBytes is what the device-decoded restore handed the device
	// (gpu.Timing.Bytes), HostDecodedBytes the host-decoded restore's.
	CopiedBytes      int64 `json:"copied_bytes"`
	HostDecodedBytes int64 `json:"host_decoded_bytes"`
	// Exact: every layer of the device-decoded restore equals the
	// host-decoded one bit for bit; MaxErrVsHost is the largest layer
	// error between them (relative to the layer's largest value).
	Exact        bool    `json:"exact_vs_host_decode"`
	MaxErrVsHost float64 `json:"max_rel_err_vs_host_decode"`
	// Against the CPU backend: hidden layers within HiddenTolerance
	// (the projection's accumulation order differs), KV layers exact.
	HiddenErrVsCPU  float64 `json:"hidden_rel_err_vs_cpu"`
	HiddenTolerance float64 `json:"hidden_tolerance"`
	KVExactVsCPU    bool    `json:"kv_exact_vs_cpu"`
	OK              bool    `json:"ok"`
	Error           string  `json:"error,omitempty"`
}

// ConcurrentRun is N restores of N different contexts (codecs none, fp8
// and fp8-block in turn) run at once through one serve.Restorer, against
// each restored alone.
type ConcurrentRun struct {
	N int `json:"n"`
	// Equal: each concurrent restore equals its single restore bit for
	// bit; Mismatched lists the contexts that did not.
	Equal      bool  `json:"equal"`
	Mismatched []int `json:"mismatched,omitempty"`
	// SequentialMS: the N restores one after another; ConcurrentMS: all N
	// at once, to the last one's end; medians of the timed rounds, each
	// round both in turn (the order alternating). Ratio is concurrent over
	// sequential per round, median and range.
	Rounds       int     `json:"rounds"`
	SequentialMS float64 `json:"sequential_ms"`
	ConcurrentMS float64 `json:"concurrent_ms"`
	Ratio        Spread  `json:"concurrent_over_sequential"`
	BytesRead    int64   `json:"bytes_read"` // stored bytes of the N contexts
	OK           bool    `json:"ok"`
	Error        string  `json:"error,omitempty"`
}

// lanesCodecs are the codecs the device decodes.
var lanesCodecs = []state.Codec{state.CodecFP8Token, state.CodecFP8Block}

func (o *LanesOptions) check() error {
	if o.Model == "" {
		o.Model = "tiny-llama"
	}
	if o.Tokens <= 0 {
		return fmt.Errorf("gpubench: %d tokens per context", o.Tokens)
	}
	if o.Layers < 0 || o.CodecTokens < 0 {
		return fmt.Errorf("gpubench: %d layers, %d codec tokens", o.Layers, o.CodecTokens)
	}
	if o.CodecTokens == 0 {
		o.CodecTokens = min(o.Tokens, 256)
	}
	if o.Reps <= 0 {
		o.Reps = 3
	}
	if o.Backend == "" {
		o.Backend = gpu.SelectCUDA
	}
	if o.Backend != gpu.SelectCUDA && o.Backend != gpu.SelectCPU {
		return fmt.Errorf("gpubench: backend %q (want cuda or cpu)", o.Backend)
	}
	return nil
}

// CheckLanes is the GPU machine's check of what landed with the restore
// lanes and fp8 decoded on the device, through serve's restore pipeline
// from a store: (a) a context stored under each fp8 codec (hidden layers
// then KV layers), restored with the rows decoded on the device, equals
// the restore with the rows decoded on the host bit for bit, and the CPU
// backend's (hidden within CheckTolerance, KV exact); (b) N restores of
// different contexts at once (N = the lanes, and twice the lanes) each
// equal its restore alone, and the time of N at once against N in turn.
// A disagreement is reported in the result (Failed), not as an error.
func CheckLanes(o LanesOptions) (*LanesResult, error) {
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
	if o.Layers > 0 {
		if o.Layers > c.Layers {
			return nil, fmt.Errorf("gpubench: %d layers, %s has %d", o.Layers, o.Model, c.Layers)
		}
		c.Layers = o.Layers
	}
	c.MaxPositions = max(c.MaxPositions, o.Tokens, o.CodecTokens)
	if o.Backend == gpu.SelectCUDA {
		if _, _, err := cuda.Probe(o.CUDA.CublasPath); err != nil {
			return nil, err
		}
	}
	L, n := c.Layers, o.Tokens
	t0 := time.Now()
	w := SynthKV(&c, o.Seed)
	var b gpu.Backend
	if o.open != nil {
		b, err = o.open(&c, w)
	} else {
		b, _, err = gpu.Select(o.Backend, &c, w, o.CUDA)
	}
	if err != nil {
		return nil, err
	}
	defer b.Close()
	cpu, err := gpu.NewCPU(&c, w)
	if err != nil {
		return nil, err
	}
	defer cpu.Close()
	dev, _ := b.(*cuda.Backend)
	res := &LanesResult{Model: o.Model, Backend: b.Name(), Device: "cpu", Tokens: n, CodecTokens: o.CodecTokens, Layers: L, Lanes: b.Concurrency()}
	if dev != nil {
		res.Device = dev.Device()
	}
	if res.Lanes > cuda.MaxRestores {
		res.Lanes = cuda.DefaultRestores
		if o.CUDA.Restores > 0 {
			res.Lanes = o.CUDA.Restores
		}
	}
	logf("lanes: %s (%d layers) on %s, %d lanes, opened in %v", o.Model, L, res.Device, res.Lanes, time.Since(t0).Round(time.Millisecond))

	st, done, err := tempStore(o.Dir, "hcache-lanes-", dev, true)
	if err != nil {
		return nil, err
	}
	defer done()

	split := sched.Split{Hidden: L / 2}
	if !sched.HiddenAllowed(&c) {
		split.Hidden = 0
	}
	split.KV = L - split.Hidden
	res.Plan = fmt.Sprintf("%d/%d", split.Hidden, split.KV)
	lc := &lanesCtx{c: &c, st: st, dev: dev, n: o.CodecTokens, split: split, rng: rand.New(rand.NewSource(o.Seed))}

	// (a) fp8 decoded on the device against decoded on the host.
	onHost := serve.NewRestorer(st, hostDecoded{b}, serve.Settings{})
	onCPU := serve.NewRestorer(st, cpu, serve.Settings{})
	for i, cd := range lanesCodecs {
		r := CodecLaneCheck{Codec: cd.String(), HiddenTolerance: CheckTolerance}
		if err := lc.checkCodec(&r, cd, o.Seed+int64(i)*101, b, onHost, onCPU); err != nil {
			r.OK, r.Error = false, err.Error()
		}
		if !r.OK {
			res.Failed++
		}
		logf("lanes: %-9s on device %v, copied %d bytes (host-decoded %d), exact %v (max err %.2e), vs cpu hidden %.2e kv exact %v, ok %v %s",
			r.Codec, r.DecodedOnDevice, r.CopiedBytes, r.HostDecodedBytes, r.Exact, r.MaxErrVsHost, r.HiddenErrVsCPU, r.KVExactVsCPU, r.OK, r.Error)
		res.Codecs = append(res.Codecs, r)
	}

	// (b) N restores at once against each alone.
	lc.n = n
	for _, N := range []int{res.Lanes, 2 * res.Lanes} {
		r := ConcurrentRun{N: N}
		if err := lc.checkConcurrent(&r, b, o.Reps, o.Seed+1000*int64(N)); err != nil {
			r.OK, r.Error = false, err.Error()
		}
		if !r.OK {
			res.Failed++
		}
		logf("lanes: %d at once: equal %v %v, sequential %.2f ms, concurrent %.2f ms, ratio %.3f [%.3f-%.3f], ok %v %s",
			N, r.Equal, r.Mismatched, r.SequentialMS, r.ConcurrentMS, r.Ratio.Median, r.Ratio.Min, r.Ratio.Max, r.OK, r.Error)
		res.Concurrency = append(res.Concurrency, r)
	}
	return res, nil
}

// hostDecoded is a backend whose restores are not gpu.DeviceDecoders, so
// serve decodes rows stored under a codec on the host and hands the device
// the model dtype: the reference the device's decode is checked against.
type hostDecoded struct{ gpu.Backend }

func (h hostDecoded) BeginRestore(dst gpu.Cache, positions []int) (gpu.Restore, error) {
	r, err := h.Backend.BeginRestore(dst, positions)
	if err != nil {
		return nil, err
	}
	return plainRestore{r}, nil
}

// plainRestore has only gpu.Restore's methods (not Encoded).
type plainRestore struct{ gpu.Restore }

// decodeProbe is the backend itself, noting whether its restores decode
// rows under cd on the device (serve then hands them as stored).
type decodeProbe struct {
	gpu.Backend
	cd state.Codec
	on *bool
}

func (p decodeProbe) BeginRestore(dst gpu.Cache, positions []int) (gpu.Restore, error) {
	r, err := p.Backend.BeginRestore(dst, positions)
	if dd, ok := r.(gpu.DeviceDecoder); ok && err == nil && dd.DecodesOnDevice(p.cd) {
		*p.on = true
	}
	return r, err
}

// lanesCtx holds what CheckLanes' checks share.
type lanesCtx struct {
	c     *model.Config
	st    *chunk.Store
	dev   *cuda.Backend
	n     int // tokens of the contexts saved next
	split sched.Split
	rng   *rand.Rand
	ids   int
}

const lanesNS = "gpulanes"

// save stores a context of lc.n tokens under the split, rows encoded by cd
// (random values, a different set per seed); it returns its id, identity
// and stored bytes.
func (lc *lanesCtx) save(cd state.Codec, seed int64) (string, *state.Identity, int64, error) {
	c := lc.c
	lc.ids++
	id := fmt.Sprintf("ctx-%d", lc.ids)
	plan := lc.split.PlanCodec(c, cd)
	ident := &state.Identity{Model: []byte("gpubench lanes " + c.Arch), Plan: plan, Codec: cd}
	wr, err := lc.st.Create(lanesNS, id, ident, chunk.CreateOptions{})
	if err != nil {
		return "", nil, 0, err
	}
	kvd := c.KVDim()
	var total int64
	for l, p := range plan {
		rb := int(p.RowBytes)
		rows := make([]byte, lc.n*rb)
		segs, per := 1, c.HiddenSize
		if p.Kind == state.LayerKV {
			segs, per = 2, kvd
		}
		// Parts of 64 tokens in parallel, each with its own seeded stream.
		const part = 64
		parts := (lc.n + part - 1) / part
		errs := make([]error, parts)
		par.Each(parts, func(i int) {
			rng := rand.New(rand.NewSource(seed*1_000_003 + int64(l)*10_007 + int64(i)))
			v := make([]float32, segs*per)
			mb := make([]byte, len(v)*c.ElemBytes())
			for t := i * part; t < min(lc.n, (i+1)*part); t++ {
				scale := float32(math.Exp(rng.NormFloat64())) // rows of different sizes: per-token scales differ
				for j := range v {
					v[j] = float32(rng.NormFloat64()) * scale
				}
				// In the model dtype first: what an engine hands over.
				c.EncodeRow(mb, v)
				c.DecodeRow(v, mb)
				dst := rows[t*rb : (t+1)*rb]
				switch {
				case cd == state.CodecNone:
					copy(dst, mb)
				case segs == 1:
					errs[i] = codec.EncodeRow(cd, c.DType, dst, v)
				default:
					errs[i] = codec.EncodeRow(cd, c.DType, dst, v[:kvd], v[kvd:])
				}
				if errs[i] != nil {
					return
				}
			}
		})
		err := errors.Join(errs...)
		if err == nil {
			err = wr.AppendLayer(l, rows)
		}
		if err != nil {
			wr.Close()
			return "", nil, 0, err
		}
		total += int64(len(rows))
	}
	return id, ident, total, wr.Close()
}

// lanesCache is a destination of restores: device memory on the CUDA
// backend, a host cache on the CPU; blocks of 16 tokens through a shuffled
// table of twice the blocks needed.
type lanesCache struct {
	dst      gpu.Cache
	table    []int
	blocks   int
	poison   func() error
	download func(l int, k, v []byte) error
	free     func()
}

const lanesBT = 16

func (lc *lanesCtx) newCache(dev *cuda.Backend) (*lanesCache, error) {
	c, L := lc.c, lc.c.Layers
	blocks := 2 * ((lc.n + lanesBT - 1) / lanesBT)
	table := lc.rng.Perm(blocks)[:blocks/2]
	if dev != nil {
		dc, err := dev.NewCache(L, blocks, lanesBT)
		if err != nil {
			return nil, err
		}
		if err := dc.SetBlockTable(table); err != nil {
			dc.Free()
			return nil, err
		}
		return &lanesCache{dst: dc, table: table, blocks: blocks, poison: func() error { return dc.Poison(0xff) }, download: dc.Download, free: dc.Free}, nil
	}
	hc := make(gpu.HostCache, L)
	for l := range hc {
		var err error
		if hc[l], err = gpu.NewPagedKV(c, lanesBT, blocks); err != nil {
			return nil, err
		}
		hc[l].BlockTable = table
	}
	return &lanesCache{dst: hc, table: table, blocks: blocks,
		poison: func() error {
			for _, p := range hc {
				for i := range p.K {
					p.K[i], p.V[i] = 0xff, 0xff
				}
			}
			return nil
		},
		download: func(l int, k, v []byte) error { copy(k, hc[l].K); copy(v, hc[l].V); return nil },
		free:     func() {}}, nil
}

// restore restores context id into a poisoned cache through rest and
// returns what it wrote (K and V of every layer, float32, poison as NaN)
// and the restore's stats.
func (lc *lanesCtx) restore(rest *serve.Restorer, lcache *lanesCache, id string, ident *state.Identity) (*model.KVCache, serve.RestoreStats, error) {
	if err := lcache.poison(); err != nil {
		return nil, serve.RestoreStats{}, err
	}
	rs, err := rest.Restore(serve.Request{NS: lanesNS, ID: id, Ident: ident, Dst: lcache.dst})
	if err != nil {
		return nil, rs, err
	}
	kv, err := lc.read(lcache)
	return kv, rs, err
}

func (lc *lanesCtx) read(lcache *lanesCache) (*model.KVCache, error) {
	host := make([]*gpu.PagedKV, lc.c.Layers)
	for l := range host {
		var err error
		if host[l], err = gpu.NewPagedKV(lc.c, lanesBT, lcache.blocks); err != nil {
			return nil, err
		}
		host[l].BlockTable = lcache.table
		if err := lcache.download(l, host[l].K, host[l].V); err != nil {
			return nil, err
		}
	}
	return serve.PagedToCache(lc.c, host, lc.n)
}

func (lc *lanesCtx) checkCodec(r *CodecLaneCheck, cd state.Codec, seed int64, b gpu.Backend, onHost, onCPU *serve.Restorer) error {
	id, ident, _, err := lc.save(cd, seed)
	if err != nil {
		return err
	}
	defer lc.st.Delete(lanesNS, id)
	onDevice := serve.NewRestorer(lc.st, decodeProbe{b, cd, &r.DecodedOnDevice}, serve.Settings{})
	var caches []*lanesCache
	defer func() {
		for _, x := range caches {
			x.free()
		}
	}()
	get := func(rest *serve.Restorer, dev *cuda.Backend, what string) (*model.KVCache, serve.RestoreStats, error) {
		x, err := lc.newCache(dev)
		if err != nil {
			return nil, serve.RestoreStats{}, err
		}
		caches = append(caches, x)
		kv, rs, err := lc.restore(rest, x, id, ident)
		if err != nil {
			return nil, rs, fmt.Errorf("%s: %w", what, err)
		}
		return kv, rs, nil
	}
	devKV, devRS, err := get(onDevice, lc.dev, "decoded on the device")
	if err != nil {
		return err
	}
	hostKV, hostRS, err := get(onHost, lc.dev, "decoded on the host")
	if err != nil {
		return err
	}
	cpuKV, _, err := get(onCPU, nil, "the CPU backend")
	if err != nil {
		return err
	}
	r.CopiedBytes, r.HostDecodedBytes = devRS.Device.Bytes, hostRS.Device.Bytes
	r.Exact, r.KVExactVsCPU = true, true
	for l := 0; l < lc.c.Layers; l++ {
		e := max(relErrF(devKV.K[l], hostKV.K[l]), relErrF(devKV.V[l], hostKV.V[l]))
		r.MaxErrVsHost = max(r.MaxErrVsHost, e)
		r.Exact = r.Exact && bitsEqual(devKV.K[l], hostKV.K[l]) && bitsEqual(devKV.V[l], hostKV.V[l])
		ec := max(relErrF(devKV.K[l], cpuKV.K[l]), relErrF(devKV.V[l], cpuKV.V[l]))
		if ident.Plan[l].Kind == state.LayerHidden {
			r.HiddenErrVsCPU = max(r.HiddenErrVsCPU, ec)
		} else {
			r.KVExactVsCPU = r.KVExactVsCPU && bitsEqual(devKV.K[l], cpuKV.K[l]) && bitsEqual(devKV.V[l], cpuKV.V[l])
		}
	}
	r.OK = r.Exact && r.KVExactVsCPU && r.HiddenErrVsCPU <= r.HiddenTolerance
	return nil
}

// bitsEqual compares float32 slices bit for bit (a NaN, the poison, equals
// nothing written).
func bitsEqual(a, b []float32) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if math.Float32bits(a[i]) != math.Float32bits(b[i]) || a[i] != a[i] {
			return false
		}
	}
	return true
}

func (lc *lanesCtx) checkConcurrent(r *ConcurrentRun, b gpu.Backend, reps int, seed int64) error {
	N := r.N
	codecs := []state.Codec{state.CodecNone, state.CodecFP8Token, state.CodecFP8Block}
	ids := make([]string, N)
	idents := make([]*state.Identity, N)
	caches := make([]*lanesCache, N)
	defer func() {
		for i := range N {
			if caches[i] != nil {
				caches[i].free()
			}
			if ids[i] != "" {
				lc.st.Delete(lanesNS, ids[i])
			}
		}
	}()
	for i := range N {
		var bytes int64
		var err error
		if ids[i], idents[i], bytes, err = lc.save(codecs[i%len(codecs)], seed+int64(i)); err != nil {
			return err
		}
		r.BytesRead += bytes
		if caches[i], err = lc.newCache(lc.dev); err != nil {
			return err
		}
	}
	rest := serve.NewRestorer(lc.st, b, serve.Settings{MaxConcurrent: N})
	single := make([]*model.KVCache, N)
	sequential := func(keep bool) (time.Duration, error) {
		for i := range N {
			if err := caches[i].poison(); err != nil {
				return 0, err
			}
		}
		t0 := time.Now()
		for i := range N {
			if _, err := rest.Restore(serve.Request{NS: lanesNS, ID: ids[i], Ident: idents[i], Dst: caches[i].dst}); err != nil {
				return 0, fmt.Errorf("context %d alone: %w", i, err)
			}
		}
		d := time.Since(t0)
		if keep {
			for i := range N {
				var err error
				if single[i], err = lc.read(caches[i]); err != nil {
					return 0, err
				}
			}
		}
		return d, nil
	}
	concurrent := func(check bool) (time.Duration, error) {
		for i := range N {
			if err := caches[i].poison(); err != nil {
				return 0, err
			}
		}
		errs := make([]error, N)
		var wg sync.WaitGroup
		start := make(chan struct{})
		for i := range N {
			wg.Go(func() {
				<-start
				_, errs[i] = rest.Restore(serve.Request{NS: lanesNS, ID: ids[i], Ident: idents[i], Dst: caches[i].dst})
			})
		}
		t0 := time.Now()
		close(start)
		wg.Wait()
		d := time.Since(t0)
		for i, err := range errs {
			if err != nil {
				return 0, fmt.Errorf("context %d of %d at once: %w", i, N, err)
			}
		}
		if check {
			r.Equal = true
			for i := range N {
				got, err := lc.read(caches[i])
				if err != nil {
					return 0, err
				}
				same := true
				for l := range got.K {
					same = same && bitsEqual(got.K[l], single[i].K[l]) && bitsEqual(got.V[l], single[i].V[l])
				}
				if !same {
					r.Equal = false
					r.Mismatched = append(r.Mismatched, i)
				}
			}
		}
		return d, nil
	}
	// The untimed round: each alone (the reference), then all at once,
	// checked against it.
	if _, err := sequential(true); err != nil {
		return err
	}
	if _, err := concurrent(true); err != nil {
		return err
	}
	var seq, con, ratio []float64
	for round := range reps {
		var s, cc time.Duration
		var err error
		if round%2 == 0 {
			if s, err = sequential(false); err == nil {
				cc, err = concurrent(false)
			}
		} else {
			if cc, err = concurrent(false); err == nil {
				s, err = sequential(false)
			}
		}
		if err != nil {
			return err
		}
		seq, con = append(seq, ms(s)), append(con, ms(cc))
		ratio = append(ratio, ms(cc)/ms(s))
	}
	r.Rounds = reps
	r.SequentialMS, r.ConcurrentMS = spreadOf(seq).Median, spreadOf(con).Median
	r.Ratio = spreadOf(ratio)
	r.OK = r.Equal
	return nil
}
