package gpubench

import (
	"fmt"
	"io"
	"math"
	"math/rand"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"time"

	"golang.org/x/sys/unix"

	"github.com/hcache/hcache/chunk"
	"github.com/hcache/hcache/gpu"
	"github.com/hcache/hcache/gpu/cuda"
	"github.com/hcache/hcache/internal/par"
	"github.com/hcache/hcache/model"
)

// SynthKV makes seeded K/V weights (and biases where the model has them)
// for c, rounded to its dtype, in parallel: what a restore needs, without
// the rest of a 7B model.
func SynthKV(c *model.Config, seed int64) *model.Weights {
	w := &model.Weights{Layers: make([]model.LayerWeights, c.Layers)}
	kvd, d := c.KVDim(), c.HiddenSize
	std := float32(1 / math.Sqrt(float64(d)))
	par.Each(c.Layers, func(l int) {
		rng := rand.New(rand.NewSource(seed + int64(l)*7919))
		lw := &w.Layers[l]
		lw.Wk = randRounded(c, rng, kvd*d, std)
		lw.Wv = randRounded(c, rng, kvd*d, std)
		if c.QKVBias {
			lw.Bk = randRounded(c, rng, kvd, 0.02)
			lw.Bv = randRounded(c, rng, kvd, 0.02)
		}
	})
	return w
}

func randRounded(c *model.Config, rng *rand.Rand, n int, std float32) []float32 {
	v := make([]float32, n)
	for i := range v {
		// Uniform with the given standard deviation: cheaper than normal
		// for a billion values, and just as good for timing and checks.
		v[i] = (rng.Float32()*2 - 1) * std * 1.7320508
	}
	buf := make([]byte, 4*n)
	c.EncodeRow(buf, v)
	c.DecodeRow(v, buf)
	return v
}

// hostRows fills dst (rows of rowBytes) with encoded values, uniform with a
// standard deviation of 1 (valid numbers of the dtype, never the poison
// pattern). The result depends only on the seed: rows are split into a fixed
// number of parts, each with its own generator, whatever the core count.
func hostRows(c *model.Config, dst []byte, rowBytes int, seed int64) {
	rows := len(dst) / rowBytes
	per := rowBytes / c.ElemBytes()
	const parts = 64
	par.Each(parts, func(i int) {
		rng := rand.New(rand.NewSource(seed + int64(i)))
		v := make([]float32, per)
		for r := i; r < rows; r += parts {
			for j := range v {
				v[j] = (rng.Float32()*2 - 1) * 1.7320508
			}
			c.EncodeRow(dst[r*rowBytes:(r+1)*rowBytes], v)
		}
	})
}

// pinned is host memory mapped and registered with the backend.
type pinned struct {
	b   *cuda.Backend
	mem []byte
}

func allocPinned(b *cuda.Backend, n int) (*pinned, error) {
	mem, err := unix.Mmap(-1, 0, n, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_POPULATE)
	if err != nil {
		return nil, fmt.Errorf("mmap %d bytes: %w", n, err)
	}
	if err := b.HostRegister(mem); err != nil {
		unix.Munmap(mem)
		return nil, err
	}
	return &pinned{b, mem}, nil
}

func (p *pinned) free() {
	p.b.HostUnregister(p.mem)
	unix.Munmap(p.mem)
}

// elemValue decodes element i of a cache buffer as float64.
func elemValue(c *model.Config, buf []byte, i int) float64 {
	v := make([]float32, 1)
	eb := c.ElemBytes()
	c.DecodeRow(v, buf[i*eb:(i+1)*eb])
	return float64(v[0])
}

// isPoison: every byte 0xff (a NaN in every dtype; no restore writes one).
func isPoison(b []byte) bool {
	for _, x := range b {
		if x != 0xff {
			return false
		}
	}
	return true
}

// countPoison counts elements of buf still holding the poison pattern.
func countPoison(buf []byte, eb int) int {
	n := len(buf) / eb
	parts := runtime.GOMAXPROCS(0)
	counts := make([]int, parts)
	par.Each(parts, func(p int) {
		lo, hi := p*n/parts, (p+1)*n/parts
		for i := lo; i < hi; i++ {
			if isPoison(buf[i*eb : (i+1)*eb]) {
				counts[p]++
			}
		}
	})
	total := 0
	for _, c := range counts {
		total += c
	}
	return total
}

// errStats accumulates the error measure of the checks. max_rel_err is the
// largest |got - want| / max(|want|, 0.01 x rms(want)) over the elements
// compared: relative where values are of ordinary size, and measured against
// 1% of the typical magnitude where a value is near zero (a sum of thousands
// of products that cancels to ~0 carries the absolute rounding error of its
// large partial sums, whatever the order of summation). Both sides are
// rounded to the model dtype: one unit in the last place is about 1e-3 of
// fp16 and 4e-3 to 8e-3 of bf16. max_abs_err is reported beside it.
type errStats struct {
	got, want []float64
}

func (e *errStats) add(got, want float64) {
	e.got = append(e.got, got)
	e.want = append(e.want, want)
}

// result returns max_rel_err and max_abs_err (+Inf if any value is NaN).
func (e *errStats) result() (maxRel, maxAbs float64) {
	var ss float64
	for _, w := range e.want {
		ss += w * w
	}
	if len(e.want) == 0 {
		return 0, 0
	}
	floor := 0.01 * math.Sqrt(ss/float64(len(e.want)))
	for i, g := range e.got {
		w := e.want[i]
		if math.IsNaN(g) || math.IsNaN(w) {
			return math.Inf(1), math.Inf(1)
		}
		d := math.Abs(g - w)
		maxAbs = math.Max(maxAbs, d)
		maxRel = math.Max(maxRel, d/math.Max(math.Abs(w), floor))
	}
	return maxRel, maxAbs
}

// checkLayer compares a restored layer at sampled positions with the CPU
// backend's projection of the same rows, and counts unwritten elements.
func checkLayer(c *model.Config, cpu *gpu.CPU, cache *cuda.Cache, layer int, rows []byte, positions []int,
	sample []int, k, v []byte) (es *errStats, left int, err error) {
	es = &errStats{}
	if err := cache.Download(layer, k, v); err != nil {
		return nil, 0, err
	}
	eb := c.ElemBytes()
	used := len(positions) * c.KVDim() * eb
	left = countPoison(k[:used], eb) + countPoison(v[:used], eb)
	hrb := c.HiddenRowBytes()
	sRows := make([]byte, 0, len(sample)*hrb)
	sPos := make([]int, len(sample))
	for i, t := range sample {
		sRows = append(sRows, rows[t*hrb:(t+1)*hrb]...)
		sPos[i] = positions[t]
	}
	want, err := gpu.NewPagedKV(c, cache.BlockTokens, cache.Blocks)
	if err != nil {
		return nil, 0, err
	}
	want.BlockTable = cacheTable(cache)
	if err := cpu.Project(layer, sRows, sPos, want); err != nil {
		return nil, 0, err
	}
	got := &gpu.PagedKV{BlockTokens: cache.BlockTokens, KVHeads: c.KVHeads, HeadDim: c.HeadDim, ElemBytes: eb,
		BlockTable: want.BlockTable, K: k, V: v}
	for _, p := range sPos {
		wk, wv, err := want.Token(p)
		if err != nil {
			return nil, 0, err
		}
		gk, gv, err := got.Token(p)
		if err != nil {
			return nil, 0, err
		}
		for i := 0; i < c.KVDim(); i++ {
			es.add(elemValue(c, gk, i), elemValue(c, wk, i))
			es.add(elemValue(c, gv, i), elemValue(c, wv, i))
		}
	}
	return es, left, nil
}

func cacheTable(c *cuda.Cache) []int { return c.BlockTable() }

// samplePositions picks up to n token indices spread over [0, tokens),
// the first and last included.
func samplePositions(tokens, n int, rng *rand.Rand) []int {
	if tokens <= n {
		out := make([]int, tokens)
		for i := range out {
			out[i] = i
		}
		return out
	}
	set := map[int]bool{0: true, tokens - 1: true}
	for len(set) < n {
		set[rng.Intn(tokens)] = true
	}
	out := make([]int, 0, n)
	for t := range set {
		out = append(out, t)
	}
	sort.Ints(out)
	return out
}

func median(d []time.Duration) time.Duration {
	s := append([]time.Duration(nil), d...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[len(s)/2]
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// CheckResult is one preset shape's agreement between the CUDA and CPU
// backends.
type CheckResult struct {
	Preset    string  `json:"preset"`
	DType     string  `json:"dtype"`
	Tokens    int     `json:"tokens"`
	Layers    int     `json:"layers_checked"`
	MaxRelErr float64 `json:"max_rel_err"`
	MaxAbsErr float64 `json:"max_abs_err"`
	Unwritten int     `json:"unwritten"`
	KVExact   bool    `json:"kv_exact"`
	OK        bool    `json:"ok"`
}

// CheckTolerance is the max_rel_err a check accepts.
const CheckTolerance = 1e-2

// Check runs every preset's shape (two layers of it) through the CUDA
// backend, both the pipelined device path and the gpu.Backend host path,
// and compares with the CPU backend.
func Check(opts cuda.Options, tokens int, seed int64, progress io.Writer) ([]CheckResult, error) {
	n, lib, err := cuda.Probe(opts.CublasPath)
	if err != nil {
		return nil, err
	}
	if progress != nil {
		fmt.Fprintf(progress, "check: %d CUDA device(s), cuBLAS %s\n", n, lib)
	}
	var out []CheckResult
	for _, name := range model.PresetNames() {
		c, err := model.Preset(name)
		if err != nil {
			return nil, err
		}
		cc := *c
		cc.Layers = min(c.Layers, 2)
		cc.MaxPositions = max(cc.MaxPositions, 4*tokens)
		res, err := checkOne(&cc, name, tokens, seed, opts)
		if err != nil {
			return out, fmt.Errorf("%s: %w", name, err)
		}
		if progress != nil {
			fmt.Fprintf(progress, "check %-18s %-8s max_rel_err %.2e max_abs_err %.2e unwritten %d kv_exact %v\n", name, cc.DType, res.MaxRelErr, res.MaxAbsErr, res.Unwritten, res.KVExact)
		}
		out = append(out, res)
	}
	pres, err := checkPipeline(opts, tokens, seed)
	if err != nil {
		return out, fmt.Errorf("pipeline: %w", err)
	}
	if progress != nil {
		fmt.Fprintf(progress, "check %-18s %-8s max_rel_err %.2e max_abs_err %.2e unwritten %d kv_exact %v (2 slots, 6 layers, hidden and KV alternating)\n", pres.Preset, pres.DType, pres.MaxRelErr, pres.MaxAbsErr, pres.Unwritten, pres.KVExact)
	}
	out = append(out, pres)
	res, err := CheckIPC(opts, "llama2-7b", tokens, seed)
	if err != nil {
		return out, fmt.Errorf("IPC: %w", err)
	}
	if progress != nil {
		fmt.Fprintf(progress, "check %-18s %-8s max_rel_err %.2e max_abs_err %.2e unwritten %d (restored by a child process through a CUDA IPC handle)\n", res.Preset, res.DType, res.MaxRelErr, res.MaxAbsErr, res.Unwritten)
	}
	out = append(out, res)
	return out, nil
}

// checkPipeline restores every layer of demo-llama (6 layers) with only 2
// staging slots, hidden and KV layers alternating and every layer's rows
// different, so each slot is reused three times: a copy overtaking the
// kernel that still reads its slot would show as a wrong layer.
func checkPipeline(opts cuda.Options, tokens int, seed int64) (CheckResult, error) {
	c, err := model.Preset("demo-llama")
	if err != nil {
		return CheckResult{}, err
	}
	res := CheckResult{Preset: "demo-llama pipeline", DType: c.DType, Tokens: tokens, Layers: c.Layers}
	o := opts
	o.Slots = 2
	w := SynthKV(c, seed)
	b, err := cuda.Open(c, w, o)
	if err != nil {
		return res, err
	}
	defer b.Close()
	cpu, err := gpu.NewCPU(c, w)
	if err != nil {
		return res, err
	}
	const bt = 16
	blocks := (tokens + bt - 1) / bt
	cache, err := b.NewCache(c.Layers, blocks, bt)
	if err != nil {
		return res, err
	}
	defer cache.Free()
	if err := cache.Poison(0xff); err != nil {
		return res, err
	}
	positions := make([]int, tokens)
	for i := range positions {
		positions[i] = i
	}
	rows := make([][]byte, c.Layers)
	for l := range rows {
		rb := c.HiddenRowBytes()
		if l%2 == 1 {
			rb = c.KVRowBytes()
		}
		rows[l] = make([]byte, tokens*rb)
		hostRows(c, rows[l], rb, seed+int64(l)*1000)
	}
	r, err := b.Begin(cache, positions)
	if err != nil {
		return res, err
	}
	for l := 0; l < c.Layers && err == nil; l++ {
		if l%2 == 0 {
			err = r.Hidden(l, rows[l], nil)
		} else {
			err = r.KV(l, rows[l], nil)
		}
	}
	if _, werr := r.Wait(); err == nil {
		err = werr
	}
	if err != nil {
		return res, err
	}
	lb := cache.LayerBytes()
	k, v := make([]byte, lb), make([]byte, lb)
	all := &errStats{}
	res.KVExact = true
	got := &gpu.PagedKV{BlockTokens: bt, KVHeads: c.KVHeads, HeadDim: c.HeadDim, ElemBytes: c.ElemBytes(), BlockTable: cache.BlockTable(), K: k, V: v}
	for l := 0; l < c.Layers; l++ {
		if l%2 == 0 {
			es, left, err := checkLayer(c, cpu, cache, l, rows[l], positions, positions, k, v)
			if err != nil {
				return res, err
			}
			res.Unwritten += left
			all.got, all.want = append(all.got, es.got...), append(all.want, es.want...)
			continue
		}
		if err := cache.Download(l, k, v); err != nil {
			return res, err
		}
		res.Unwritten += unwritten(got, positions, c.ElemBytes())
		half := c.KVRowBytes() / 2
		for i, p := range positions {
			gk, gv, _ := got.Token(p)
			row := rows[l][i*2*half : (i+1)*2*half]
			if string(gk) != string(row[:half]) || string(gv) != string(row[half:]) {
				res.KVExact = false
			}
		}
	}
	res.MaxRelErr, res.MaxAbsErr = all.result()
	res.OK = res.MaxRelErr < CheckTolerance && res.Unwritten == 0 && res.KVExact
	return res, nil
}

func checkOne(c *model.Config, name string, tokens int, seed int64, opts cuda.Options) (CheckResult, error) {
	res := CheckResult{Preset: name, DType: c.DType, Tokens: tokens, Layers: c.Layers}
	w := SynthKV(c, seed)
	b, err := cuda.Open(c, w, opts)
	if err != nil {
		return res, err
	}
	defer b.Close()
	cpu, err := gpu.NewCPU(c, w)
	if err != nil {
		return res, err
	}
	const bt = 16
	blocks := (tokens+bt-1)/bt + 1
	cache, err := b.NewCache(c.Layers, 2*blocks, bt)
	if err != nil {
		return res, err
	}
	defer cache.Free()
	rng := rand.New(rand.NewSource(seed))
	// A shuffled block table and positions that start past zero.
	table := rng.Perm(2 * blocks)[:blocks]
	if err := cache.SetBlockTable(table); err != nil {
		return res, err
	}
	positions := make([]int, tokens)
	for i := range positions {
		positions[i] = 3 + i
	}
	rows := make([]byte, tokens*c.HiddenRowBytes())
	hostRows(c, rows, c.HiddenRowBytes(), seed)
	kvRows := make([]byte, tokens*c.KVRowBytes())
	hostRows(c, kvRows, c.KVRowBytes(), seed+1)
	if err := cache.Poison(0xff); err != nil {
		return res, err
	}
	r, err := b.Begin(cache, positions)
	if err != nil {
		return res, err
	}
	// Layer 0 hidden, layer 1 (when there is one) KV.
	err = r.Hidden(0, rows, nil)
	if err == nil && c.Layers > 1 {
		err = r.KV(1, kvRows, nil)
	}
	if _, werr := r.Wait(); err == nil {
		err = werr
	}
	if err != nil {
		return res, err
	}
	lb := cache.LayerBytes()
	k, v := make([]byte, lb), make([]byte, lb)
	sample := samplePositions(tokens, tokens, rng)
	es, _, err := checkLayer(c, cpu, cache, 0, rows, positions, sample, k, v)
	if err != nil {
		return res, err
	}
	got := &gpu.PagedKV{BlockTokens: bt, KVHeads: c.KVHeads, HeadDim: c.HeadDim, ElemBytes: c.ElemBytes(), BlockTable: table, K: k, V: v}
	res.Unwritten += unwritten(got, positions, c.ElemBytes())
	res.KVExact = true
	if c.Layers > 1 {
		if err := cache.Download(1, k, v); err != nil {
			return res, err
		}
		res.Unwritten += unwritten(got, positions, c.ElemBytes())
		half := c.KVRowBytes() / 2
		for i, p := range positions {
			gk, gv, err := got.Token(p)
			if err != nil {
				return res, err
			}
			row := kvRows[i*2*half : (i+1)*2*half]
			if string(gk) != string(row[:half]) || string(gv) != string(row[half:]) {
				res.KVExact = false
			}
		}
	}
	// The gpu.Backend (host cache) path against the CPU backend.
	hp, _ := gpu.NewPagedKV(c, bt, 2*blocks)
	hp.BlockTable = table
	cp, _ := gpu.NewPagedKV(c, bt, 2*blocks)
	cp.BlockTable = table
	if err := b.Project(0, rows, positions, hp); err != nil {
		return res, err
	}
	if err := cpu.Project(0, rows, positions, cp); err != nil {
		return res, err
	}
	for _, p := range positions {
		gk, gv, _ := hp.Token(p)
		wk, wv, _ := cp.Token(p)
		for i := 0; i < c.KVDim(); i++ {
			es.add(elemValue(c, gk, i), elemValue(c, wk, i))
			es.add(elemValue(c, gv, i), elemValue(c, wv, i))
		}
	}
	res.MaxRelErr, res.MaxAbsErr = es.result()
	res.OK = res.MaxRelErr < CheckTolerance && res.Unwritten == 0 && res.KVExact
	return res, nil
}

// unwritten counts elements of the positions' slots still poisoned.
func unwritten(p *gpu.PagedKV, positions []int, eb int) int {
	n := 0
	for _, pos := range positions {
		k, v, err := p.Token(pos)
		if err != nil {
			return -1
		}
		n += countPoisonSerial(k, eb) + countPoisonSerial(v, eb)
	}
	return n
}

func countPoisonSerial(b []byte, eb int) int {
	n := 0
	for i := 0; i+eb <= len(b); i += eb {
		if isPoison(b[i : i+eb]) {
			n++
		}
	}
	return n
}

// tempStore opens a new store in a temporary directory under dir (named
// prefix followed by random characters), with no capacity bound and GC off;
// quiet silences its log; with dev, its restore buffers are registered with
// the device (pinned). done closes the store, then removes the directory.
func tempStore(dir, prefix string, dev *cuda.Backend, quiet bool) (st *chunk.Store, done func(), err error) {
	sdir, err := os.MkdirTemp(dir, prefix)
	if err != nil {
		return nil, nil, err
	}
	opts := chunk.Options{Dir: filepath.Join(sdir, "store"), CapacityBytes: -1, GCInterval: -1}
	if quiet {
		opts.Logf = func(string, ...any) {}
	}
	if dev != nil {
		opts.ReadBuffers = chunk.BufferHooks{Register: dev.HostRegister, Unregister: dev.HostUnregister}
	}
	if st, err = chunk.Open(opts); err != nil {
		os.RemoveAll(sdir)
		return nil, nil, err
	}
	return st, func() { st.Close(); os.RemoveAll(sdir) }, nil
}
