package cuda

import (
	"fmt"
	"math"
	"math/rand"

	"github.com/hcache/hcache/gpu"
	"github.com/hcache/hcache/model"
)

// RecomputeTolerance is how far recomputed K and V may be from the CPU
// forward pass's (model.Prefill), relative to the largest magnitude of the
// layer's reference values. The device path rounds what feeds each GEMM
// (the attention output, the MLP activation) to the model dtype where the
// CPU keeps float32, and sums norms and softmax in another order; this is
// that rounding carried through a few layers (the host tests measure at
// most a sixth of it: fp16 1e-3, bf16 5e-3, fp32 4e-7).
func RecomputeTolerance(dtype string) float64 {
	switch dtype {
	case "float32":
		return 5e-6
	case "bfloat16":
		return 3e-2
	}
	return 6e-3
}

// relErr is max |got - want| over max |want|; a NaN or infinity in got is
// +Inf.
func relErr(got, want []float32) float64 {
	var d, m float64
	for i := range want {
		if math.IsNaN(float64(got[i])) || math.IsInf(float64(got[i]), 0) {
			return math.Inf(1)
		}
		d = max(d, math.Abs(float64(got[i])-float64(want[i])))
		m = max(m, math.Abs(float64(want[i])))
	}
	if m == 0 {
		return d
	}
	return d / m
}

// RecomputeCheck is the outcome of CheckRecompute.
type RecomputeCheck struct {
	Model     string    `json:"model"`
	Tokens    int       `json:"tokens"`
	Layers    int       `json:"layers"`
	KErr      []float64 `json:"k_err"` // per layer, relative to the largest reference value
	VErr      []float64 `json:"v_err"`
	Tolerance float64   `json:"tolerance"`
	Bytes     int64     `json:"recompute_weight_bytes"`
}

// compareRecompute measures each layer's K and V in caches (one paged cache
// per layer) at positions against the reference rows wantK/wantV
// ([tokens x kv_dim] per layer), and fails beyond RecomputeTolerance.
func compareRecompute(c *model.Config, caches []*gpu.PagedKV, positions []int, wantK, wantV [][]float32, res *RecomputeCheck) error {
	kvd, n := c.KVDim(), len(positions)
	res.Tolerance = RecomputeTolerance(c.DType)
	var bad error
	for l, pc := range caches {
		gotK, gotV := make([]float32, n*kvd), make([]float32, n*kvd)
		for j, pos := range positions {
			kb, vb, err := pc.Token(pos)
			if err != nil {
				return err
			}
			c.DecodeRow(gotK[j*kvd:(j+1)*kvd], kb)
			c.DecodeRow(gotV[j*kvd:(j+1)*kvd], vb)
		}
		ek, ev := relErr(gotK, wantK[l]), relErr(gotV, wantV[l])
		res.KErr = append(res.KErr, ek)
		res.VErr = append(res.VErr, ev)
		if !(ek <= res.Tolerance && ev <= res.Tolerance) && bad == nil {
			bad = fmt.Errorf("cuda: recomputed layer %d: K error %.3g, V error %.3g of the largest value, over the tolerance %.3g", l, ek, ev, res.Tolerance)
		}
	}
	return bad
}

// CheckRecompute runs the device's recompute of the first layers layers of
// c (synthetic weights from seed) for tokens random token ids into a cache
// with a shuffled block table, and compares every layer's K and V with
// model.Prefill's on the CPU. It is the GPU machine's check of the kernels
// the host tests check on the host.
func CheckRecompute(c *model.Config, seed int64, tokens, layers, blockTokens int, o Options) (*RecomputeCheck, error) {
	if tokens < 1 || layers < 1 || layers > c.Layers || blockTokens < 1 {
		return nil, fmt.Errorf("cuda: CheckRecompute of %d tokens, %d layers (of %d), blocks of %d", tokens, layers, c.Layers, blockTokens)
	}
	w := model.Synthesize(c, seed)
	m, err := model.New(c, w)
	if err != nil {
		return nil, err
	}
	rng := rand.New(rand.NewSource(seed))
	ids := make([]int, tokens)
	positions := make([]int, tokens)
	for i := range ids {
		ids[i], positions[i] = rng.Intn(c.Vocab), i
	}
	wantK, wantV := make([][]float32, layers), make([][]float32, layers)
	if err := m.Prefill(ids, layers, func(l int, _, k, v []float32) {
		wantK[l] = append([]float32(nil), k...)
		wantV[l] = append([]float32(nil), v...)
	}); err != nil {
		return nil, err
	}
	b, err := Open(c, w, o)
	if err != nil {
		return nil, err
	}
	defer b.Close()
	if err := b.LoadRecompute(w, layers); err != nil {
		return nil, err
	}
	blocks := (tokens + blockTokens - 1) / blockTokens
	cache, err := b.NewCache(layers, 2*blocks, blockTokens)
	if err != nil {
		return nil, err
	}
	defer cache.Free()
	table := rng.Perm(2 * blocks)[:blocks]
	if err := cache.SetBlockTable(table); err != nil {
		return nil, err
	}
	if err := cache.Poison(0xff); err != nil {
		return nil, err
	}
	r, err := b.Begin(cache, positions)
	if err != nil {
		return nil, err
	}
	rerr := r.Recompute(ids, layers, nil)
	if _, werr := r.Wait(); rerr == nil {
		rerr = werr
	}
	if rerr != nil {
		return nil, rerr
	}
	res := &RecomputeCheck{Tokens: tokens, Layers: layers, Model: fmt.Sprintf("%s %s hidden %d, %d/%d heads of %d",
		c.Arch, c.DType, c.HiddenSize, c.Heads, c.KVHeads, c.HeadDim)}
	_, res.Bytes = b.RecomputeLayers()
	caches := make([]*gpu.PagedKV, layers)
	for l := range caches {
		pc, err := gpu.NewPagedKV(c, blockTokens, 2*blocks)
		if err != nil {
			return nil, err
		}
		pc.BlockTable = table
		if err := cache.Download(l, pc.K, pc.V); err != nil {
			return nil, err
		}
		caches[l] = pc
	}
	if err := compareRecompute(c, caches, positions, wantK, wantV, res); err != nil {
		return res, err
	}
	return res, nil
}
