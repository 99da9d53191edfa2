package gpubench

import (
	"fmt"
	"io"
	"math"
	"math/rand"
	"slices"

	"github.com/hcache/hcache/chunk"
	"github.com/hcache/hcache/gpu"
	"github.com/hcache/hcache/gpu/cuda"
	"github.com/hcache/hcache/model"
	"github.com/hcache/hcache/serve"
	"github.com/hcache/hcache/serve/sched"
)

// MixedPresets are the shapes CheckMixed runs: the families the CPU forward
// pass supports (Llama MHA and GQA with llama3 rope scaling, Qwen2 with qkv
// bias, OPT, interleaved linear-scaled rope in fp32).
var MixedPresets = []string{"tiny-llama", "tiny-gqa", "tiny-qwen2", "tiny-opt", "tiny-linear-rope"}

// MixedResult is one preset's mixed-plan check on the device.
type MixedResult struct {
	Preset string `json:"preset"`
	DType  string `json:"dtype"`
	Tokens int    `json:"tokens"`
	// Recompute is gpu/cuda's CheckRecompute of every layer: the device
	// forward pass against the CPU's.
	RecomputeErr float64 `json:"recompute_max_rel_err"`
	// Plan is the scheduled plan restored (recomputed/hidden/kv layers).
	Plan string `json:"plan"`
	// LayerErr is each layer's error of the scheduled-plan restore into a
	// device cache against the all-KV restore of the same context (exact
	// rows as the forward pass computed them), relative to the largest
	// value; Tolerance is what each layer's kind allows.
	LayerErr  []float64 `json:"layer_rel_err"`
	Tolerance []float64 `json:"tolerance"`
	KVExact   bool      `json:"kv_exact"`  // the all-KV restore equals the forward pass bit for bit
	SameNext  bool      `json:"same_next"` // greedy decoding from the restored cache continues as from the forward pass
	OK        bool      `json:"ok"`
	Error     string    `json:"error,omitempty"`
}

// CheckMixed is the GPU machine's check of mixed plans through serve's one
// restore pipeline: for each preset, the device recompute against the CPU
// forward pass (cuda.CheckRecompute), then a context saved to a store
// under a scheduled plan (a recomputed prefix, hidden layers, KV layers) and
// under all-KV, both restored into device caches with serve.Restorer on
// the CUDA backend; every layer of the first must equal the second within
// the dtype's rounding, and greedy decoding must continue from it. dir
// holds the temporary store.
func CheckMixed(opts cuda.Options, dir string, tokens int, seed int64, progress io.Writer) ([]MixedResult, error) {
	if _, _, err := cuda.Probe(opts.CublasPath); err != nil {
		return nil, err
	}
	var out []MixedResult
	for _, p := range MixedPresets {
		r, err := checkMixedOne(opts, dir, p, tokens, seed)
		if err != nil {
			r.Error = err.Error()
			r.OK = false
		}
		if progress != nil {
			fmt.Fprintf(progress, "mixed %-16s plan %s recompute %.2e layers %v ok %v %s\n", p, r.Plan, r.RecomputeErr, r.LayerErr, r.OK, r.Error)
		}
		out = append(out, r)
	}
	return out, nil
}

func checkMixedOne(opts cuda.Options, dir, preset string, tokens int, seed int64) (MixedResult, error) {
	res := MixedResult{Preset: preset, Tokens: tokens}
	c, err := model.Preset(preset)
	if err != nil {
		return res, err
	}
	res.DType = c.DType
	rc, err := cuda.CheckRecompute(c, seed, tokens, c.Layers, 16, opts)
	if rc != nil {
		res.RecomputeErr = slices.Max(append(slices.Clone(rc.KErr), rc.VErr...))
	}
	if err != nil {
		return res, fmt.Errorf("recompute: %w", err)
	}
	w := model.Synthesize(c, seed)
	m, err := model.New(c, w)
	if err != nil {
		return res, err
	}
	st, done, err := tempStore(dir, "hcache-mixed-", nil, false)
	if err != nil {
		return res, err
	}
	defer done()
	rng := rand.New(rand.NewSource(seed))
	prompt := make([]int, tokens)
	for i := range prompt {
		prompt[i] = rng.Intn(c.Vocab)
	}
	// The scheduled plan: half the layers recomputed, then hidden layers
	// where the shape allows them, the last layer KV.
	split := sched.Split{Recompute: c.Layers / 2, KV: 1}
	split.Hidden = c.Layers - split.Recompute - split.KV
	if !sched.HiddenAllowed(c) {
		split.KV, split.Hidden = split.KV+split.Hidden, 0
	}
	res.Plan = fmt.Sprintf("%d/%d/%d", split.Recompute, split.Hidden, split.KV)
	ref := model.NewKVCache(c)
	save := func(id string, plan []chunk.LayerPlan) (*chunk.Identity, error) {
		ident := serve.Identity(c, w, plan)
		wr, err := st.Create("mixed", id, ident, chunk.CreateOptions{})
		if err != nil {
			return nil, err
		}
		sv := serve.NewSaver(c, plan, wr)
		cache := model.NewKVCache(c)
		if _, err := m.Forward(prompt, cache, sv.Trace); err != nil {
			return nil, err
		}
		if sv.Err() != nil {
			return nil, sv.Err()
		}
		*ref = *cache
		return ident, wr.Close()
	}
	mixedIdent, err := save("mixed", split.Plan(c))
	if err != nil {
		return res, err
	}
	kvIdent, err := save("kv", sched.PlanOf(c, chunk.LayerKV))
	if err != nil {
		return res, err
	}
	b, err := cuda.Open(c, w, opts)
	if err != nil {
		return res, err
	}
	defer b.Close()
	if err := b.LoadRecompute(w, split.Recompute); err != nil {
		return res, err
	}
	const bt = 16
	blocks := (tokens + bt - 1) / bt
	table := rng.Perm(2 * blocks)[:blocks]
	rest := serve.NewRestorer(st, b, serve.Settings{})
	restore := func(id string, ident *chunk.Identity) ([]*gpu.PagedKV, error) {
		cache, err := b.NewCache(c.Layers, 2*blocks, bt)
		if err != nil {
			return nil, err
		}
		defer cache.Free()
		if err := cache.SetBlockTable(table); err != nil {
			return nil, err
		}
		if err := cache.Poison(0xff); err != nil {
			return nil, err
		}
		if _, err := rest.Restore(serve.Request{NS: "mixed", ID: id, Ident: ident, Tokens: prompt, Dst: cache}); err != nil {
			return nil, err
		}
		host := make([]*gpu.PagedKV, c.Layers)
		for l := range host {
			if host[l], err = gpu.NewPagedKV(c, bt, 2*blocks); err != nil {
				return nil, err
			}
			host[l].BlockTable = table
			if err := cache.Download(l, host[l].K, host[l].V); err != nil {
				return nil, err
			}
		}
		return host, nil
	}
	mixed, err := restore("mixed", mixedIdent)
	if err != nil {
		return res, fmt.Errorf("scheduled plan: %w", err)
	}
	allKV, err := restore("kv", kvIdent)
	if err != nil {
		return res, fmt.Errorf("all-KV plan: %w", err)
	}
	kvCache, err := serve.PagedToCache(c, allKV, tokens)
	if err != nil {
		return res, err
	}
	got, err := serve.PagedToCache(c, mixed, tokens)
	if err != nil {
		return res, err
	}
	res.KVExact = true
	for l := range kvCache.K {
		res.KVExact = res.KVExact && slices.Equal(kvCache.K[l], ref.K[l]) && slices.Equal(kvCache.V[l], ref.V[l])
	}
	res.OK = res.KVExact
	for l := 0; l < c.Layers; l++ {
		e := max(relErrF(got.K[l], kvCache.K[l]), relErrF(got.V[l], kvCache.V[l]))
		tol := 0.0 // KV layers: exact
		switch mixedIdent.Plan[l].Kind {
		case chunk.LayerNone:
			tol = cuda.RecomputeTolerance(c.DType)
		case chunk.LayerHidden:
			tol = CheckTolerance
		}
		res.LayerErr, res.Tolerance = append(res.LayerErr, e), append(res.Tolerance, tol)
		res.OK = res.OK && e <= tol
	}
	next := []int{prompt[len(prompt)-1]}
	want, err := m.Generate(kvCache, next, 8, nil)
	if err != nil {
		return res, err
	}
	have, err := m.Generate(got, next, 8, nil)
	if err != nil {
		return res, err
	}
	res.SameNext = slices.Equal(want, have)
	return res, nil
}

// relErrF is max |got - want| over max |want| (NaN or Inf: +Inf).
func relErrF(got, want []float32) float64 {
	var d, m float64
	for i := range want {
		g, w := float64(got[i]), float64(want[i])
		if math.IsNaN(g) || math.IsInf(g, 0) {
			return math.Inf(1)
		}
		d, m = max(d, math.Abs(g-w)), max(m, math.Abs(w))
	}
	if m == 0 {
		return d
	}
	return d / m
}
