package cuda

import (
	"errors"
	"fmt"
	"math"
	"runtime"
	"sync"
	"sync/atomic"
	"unsafe"

	"github.com/hcache/hcache/model"
)

// The forward pass of the layers a plan recomputes, on the device: the loop
// of model/forward.go (Model.layers) with cuBLAS for the GEMMs and the
// kernels of kernels/hcache.cu for everything between them. The residual
// stream and every GEMM output are float32; what feeds a GEMM (the normed
// rows, the attention output, the MLP activation) is stored in the model
// dtype, as the weights are. Each recomputed layer's K and V are projected,
// rotated and scattered by the same kernel a hidden-state restore uses, so
// they land where a restore of that layer would write them.
//
// fwdPass is written against two small interfaces, fwdOps (launch a kernel,
// run a GEMM) and devMem (allocate, copy in, free): on a GPU they are the
// driver and cuBLAS; in the host tests they are the host-built kernels
// (the same source, the same argument structs, the same grids) and the Go
// CPU GEMM, so the loop below is the one the tests run.

// fwdKernel names a kernel of the forward pass.
type fwdKernel int

const (
	kEmbed fwdKernel = iota
	kNorm
	kQRope
	kAttention
	kResidual
	kSwiGLU
	kBiasAct
	kProject
	numFwdKernels
)

// fwdKernelNames: the device function is "hc_" + name, the host entry
// "hc_host_launch_" + name.
var fwdKernelNames = [numFwdKernels]string{"embed", "norm", "qrope", "attention", "residual", "swiglu", "bias_act", "project_scatter"}

// The Go mirrors of the kernels' argument structs (the HC_*_FIELDS lists in
// kernels/hcache.cu): pointers as uint64, int as int32, float as float32,
// in the same order. TestFwdArgLayout checks every field's offset and size
// against the host build's.
type embedArgs struct {
	embed, posEmbed, tokens, positions, x uint64
	n, hidden, dtype, posOffset           int32
}

type normArgs struct {
	x, w, b, out                uint64
	n, hidden, layernorm, dtype int32
	eps                         float32
}

type qropeArgs struct {
	q, bias, rope, positions       uint64
	n, heads, headDim, interleaved int32
}

type attnArgs struct {
	q, kcache, vcache, positions, blockTable, out           uint64
	n, nblocks, blockTokens, heads, kvHeads, headDim, dtype int32
	scale                                                   float32
}

type residualArgs struct {
	x, y, bias uint64
	n, hidden  int32
}

type swigluArgs struct {
	gu, out         uint64
	n, inter, dtype int32
}

type biasActArgs struct {
	a, bias, out        uint64
	n, cols, act, dtype int32
}

// Activations of the bias_act kernel (HC_ACT_*).
const (
	actNone     = 0
	actReLU     = 1
	actGELUTanh = 2
)

// attnThreads is the attention kernel's block: that many queries of one
// head share each key/value tile.
const attnThreads = 64

// attnBK is the keys per tile (HC_ATTN_BK).
func attnBK(headDim int) int {
	if headDim >= 128 {
		return 16
	}
	return 32
}

// attnHeadDims are the head dims the attention kernel is built for.
var attnHeadDims = map[int]bool{16: true, 32: true, 64: true, 128: true}

// fwdLaunch is one kernel launch as cuLaunchKernel takes it.
type fwdLaunch struct {
	k                    fwdKernel
	grid, threads, shmem int
	params               []unsafe.Pointer
	keep                 any // what params point into
}

// fwdGemm is out[n x m] (float32) = x[n x k] . w[m x k]^T, x and w in the
// model dtype (the Hugging Face [out, in] layout).
type fwdGemm struct {
	m, n, k   int
	w, x, out uintptr
	what      string
}

// fwdOps runs the pass's steps, in order, on one stream.
type fwdOps interface {
	launch(l fwdLaunch) error
	gemm(g fwdGemm) error
}

// devMem is device memory: the Backend's, or host memory in tests.
type devMem interface {
	alloc(n int) (uintptr, error)
	htod(dst uintptr, src []byte) error
	free(p uintptr)
}

// fwdLayer holds one recomputable layer's tensors on the device: norms and
// biases in float32, matrices in the model dtype. The K||V weights and bias
// are the projection backend's own (one [2 kv_dim x hidden] matrix).
type fwdLayer struct {
	attnNormW, attnNormB uintptr
	wq, bq               uintptr
	wkv, bkv             uintptr
	wo, bo               uintptr
	mlpNormW, mlpNormB   uintptr
	w1, b1               uintptr // Llama: [gate; up] [2 inter x hidden]; OPT: fc1 and its bias
	w2, b2               uintptr // Llama: down; OPT: fc2 and its bias
}

// fwdWeights are the embeddings and the first layers' weights on the device.
type fwdWeights struct {
	embed, posEmbed uintptr
	layers          []fwdLayer
	bytes           int64
	allocs          []uintptr
}

func (w *fwdWeights) release(mem devMem) {
	for _, p := range w.allocs {
		mem.free(p)
	}
	w.allocs = nil
	w.layers = nil
}

// fwdWeightBytes is what uploadFwdWeights puts on the device for layers
// layers (not counting the K||V weights, which the projection backend
// holds for every layer already).
func fwdWeightBytes(c *model.Config, layers int) int64 {
	eb := int64(c.ElemBytes())
	d, qd, im := int64(c.HiddenSize), int64(c.Heads*c.HeadDim), int64(c.Intermediate)
	total := int64(c.Vocab) * d * eb
	if c.Arch == model.ArchOPT {
		total += int64(c.MaxPositions+2) * d * eb
	}
	per := (qd*d + d*qd) * eb // Wq, Wo
	per += 4 * d * 4          // norm weights and biases (at most)
	per += (qd + d) * 4       // bq, bo (at most)
	if c.Arch == model.ArchOPT {
		per += (im*d+d*im)*eb + (im+d)*4
	} else {
		per += (2*im*d + d*im) * eb
	}
	return total + int64(layers)*per
}

// ErrRecomputeMemory is wrapped when the recompute weights would exceed
// Options.RecomputeMemory.
var ErrRecomputeMemory = errors.New("cuda: recompute weights exceed Options.RecomputeMemory")

// wspec is one tensor uploadFwdWeights puts on the device: n values, those
// of v then of v2 (gate||up, k||v: no concatenated copy is made), in the
// model dtype when enc, else float32; absent is fine when opt.
type wspec struct {
	dst      *uintptr
	what     string
	v, v2    []float32
	n        int
	enc, opt bool
}

// encodeChunk values are encoded by one goroutine at a time (2 MiB of fp16;
// a variable so that tests split small tensors too); at most encodeWorkers
// goroutines encode one tensor.
var encodeChunk = 1 << 20

const encodeWorkers = 16

// encodeParallel writes src in c's dtype into dst (len(src) *
// c.ElemBytes() bytes): c.EncodeRow's bytes, encodeChunk values at a time
// on up to min(GOMAXPROCS, encodeWorkers) goroutines. Each value's
// encoding depends on that value alone, so the pieces give the serial bytes.
func encodeParallel(c *model.Config, dst []byte, src []float32) {
	eb, n := c.ElemBytes(), len(src)
	workers := min(runtime.GOMAXPROCS(0), encodeWorkers, (n+encodeChunk-1)/encodeChunk)
	if workers <= 1 {
		c.EncodeRow(dst[:n*eb], src)
		return
	}
	var next atomic.Int64
	var wg sync.WaitGroup
	for range workers {
		wg.Go(func() {
			for {
				i := int(next.Add(1)-1) * encodeChunk
				if i >= n {
					return
				}
				j := min(n, i+encodeChunk)
				c.EncodeRow(dst[i*eb:j*eb], src[i:j])
			}
		})
	}
	wg.Wait()
}

// uploadFwdWeights puts the embeddings and layers [0, layers) on the device,
// refusing (before allocating anything) when they need more than limit
// bytes. kvW and kvB are the layers' K||V weights and biases already on the
// device; nil uploads them here (counted too).
func uploadFwdWeights(mem devMem, c *model.Config, w *model.Weights, layers int, limit int64, kvW, kvB []uintptr) (fw *fwdWeights, err error) {
	if layers < 1 || layers > c.Layers || layers > len(w.Layers) {
		return nil, fmt.Errorf("cuda: recompute of %d layers, the model has %d (weights for %d)", layers, c.Layers, len(w.Layers))
	}
	need := fwdWeightBytes(c, layers)
	if kvW == nil {
		need += int64(layers) * int64(2*c.KVDim()*c.HiddenSize*c.ElemBytes()+2*c.KVDim()*4)
	}
	if need > limit {
		return nil, fmt.Errorf("%w: %d layers and the embeddings need %d bytes, the limit is %d", ErrRecomputeMemory, layers, need, limit)
	}
	d, qd, kvd, im := c.HiddenSize, c.Heads*c.HeadDim, c.KVDim(), c.Intermediate
	up := &fwdWeights{}
	fw = up
	defer func() {
		if err != nil {
			up.release(mem)
			fw = nil
		}
	}()
	// put uploads a tensor that must have exactly n values, those of v then
	// v2 (or be absent, when optional): float32, or in the model dtype when
	// enc (encoded in parallel: ~6.6e9 weights for Llama2-7B).
	put := func(what string, v, v2 []float32, n int, enc, optional bool) (uintptr, error) {
		if len(v)+len(v2) == 0 && optional {
			return 0, nil
		}
		if len(v)+len(v2) != n {
			return 0, fmt.Errorf("cuda: recompute weights: %s has %d values, want %d (load them with model.WeightsAll)", what, len(v)+len(v2), n)
		}
		var host []byte
		if enc {
			eb := c.ElemBytes()
			host = make([]byte, n*eb)
			encodeParallel(c, host[:len(v)*eb], v)
			encodeParallel(c, host[len(v)*eb:], v2)
		} else {
			host = append(append(make([]byte, 0, 4*n), f32bytes(v)...), f32bytes(v2)...)
		}
		p, err := mem.alloc(len(host))
		if err != nil {
			return 0, fmt.Errorf("cuda: recompute weights: %s: %w", what, err)
		}
		fw.allocs = append(fw.allocs, p)
		fw.bytes += int64(len(host))
		return p, mem.htod(p, host)
	}
	if fw.embed, err = put("embed_tokens", w.Embed, nil, c.Vocab*d, true, false); err != nil {
		return nil, err
	}
	if c.Arch == model.ArchOPT {
		if fw.posEmbed, err = put("embed_positions", w.PosEmbed, nil, (c.MaxPositions+2)*d, true, false); err != nil {
			return nil, err
		}
	}
	fw.layers = make([]fwdLayer, layers)
	for l := 0; l < layers; l++ {
		lw, fl := &w.Layers[l], &fw.layers[l]
		p := fmt.Sprintf("layer %d ", l)
		ln := c.Norm == "layernorm"
		steps := []wspec{
			{&fl.attnNormW, "attention norm", lw.AttnNormW, nil, d, false, false},
			{&fl.attnNormB, "attention norm bias", lw.AttnNormB, nil, d, false, !ln},
			{&fl.wq, "q_proj", lw.Wq, nil, qd * d, true, false},
			{&fl.bq, "q_proj bias", lw.Bq, nil, qd, false, true},
			{&fl.wo, "o_proj", lw.Wo, nil, d * qd, true, false},
			{&fl.bo, "o_proj bias", lw.Bo, nil, d, false, true},
			{&fl.mlpNormW, "MLP norm", lw.MLPNormW, nil, d, false, false},
			{&fl.mlpNormB, "MLP norm bias", lw.MLPNormB, nil, d, false, !ln},
		}
		if c.Arch == model.ArchOPT {
			steps = append(steps, []wspec{
				{&fl.w1, "fc1", lw.Fc1, nil, im * d, true, false},
				{&fl.b1, "fc1 bias", lw.Fc1B, nil, im, false, true},
				{&fl.w2, "fc2", lw.Fc2, nil, d * im, true, false},
				{&fl.b2, "fc2 bias", lw.Fc2B, nil, d, false, true},
			}...)
		} else {
			if len(lw.Wgate) != im*d || len(lw.Wup) != im*d {
				return nil, fmt.Errorf("cuda: recompute weights: %sgate/up projections missing or misshapen (load them with model.WeightsAll)", p)
			}
			steps = append(steps, []wspec{
				{&fl.w1, "gate||up", lw.Wgate, lw.Wup, 2 * im * d, true, false},
				{&fl.w2, "down_proj", lw.Wdown, nil, d * im, true, false},
			}...)
		}
		if kvW == nil {
			var kvb []float32
			if lw.Bk != nil || lw.Bv != nil {
				kvb = make([]float32, 2*kvd)
				copy(kvb, lw.Bk)
				copy(kvb[kvd:], lw.Bv)
			}
			steps = append(steps, []wspec{
				{&fl.wkv, "k||v_proj", lw.Wk, lw.Wv, 2 * kvd * d, true, false},
				{&fl.bkv, "k||v bias", kvb, nil, 2 * kvd, false, true},
			}...)
		} else {
			if l >= len(kvW) || l >= len(kvB) || kvW[l] == 0 {
				return nil, fmt.Errorf("cuda: recompute weights: %sK/V weights are not on the device", p)
			}
			fl.wkv, fl.bkv = kvW[l], kvB[l]
		}
		for _, s := range steps {
			if *s.dst, err = put(p+s.what, s.v, s.v2, s.n, s.enc, s.opt); err != nil {
				return nil, err
			}
		}
	}
	return fw, nil
}

// fwdScratch are the pass's buffers for n tokens.
type fwdScratch struct {
	n                              int
	x, h, q, kv, attn, o, mlp, act uintptr
}

func (s *fwdScratch) release(mem devMem) {
	for _, p := range []uintptr{s.x, s.h, s.q, s.kv, s.attn, s.o, s.mlp, s.act} {
		mem.free(p)
	}
	*s = fwdScratch{}
}

// fwdScratchBytes lists the scratch buffers' sizes for n tokens.
func fwdScratchBytes(c *model.Config, n int) [8]int {
	eb, d, qd, kvd, im := c.ElemBytes(), c.HiddenSize, c.Heads*c.HeadDim, c.KVDim(), c.Intermediate
	return [8]int{
		n * d * 4,       // x: the residual stream
		n * d * eb,      // h: normed rows (GEMM input)
		n * qd * 4,      // q
		n * 2 * kvd * 4, // k||v GEMM output
		n * qd * eb,     // attention output (GEMM input)
		n * d * 4,       // o_proj / down_proj output
		n * 2 * im * 4,  // gate||up (fc1) output
		n * im * eb,     // MLP activation (GEMM input)
	}
}

func (s *fwdScratch) ensure(mem devMem, c *model.Config, n int) error {
	if n <= s.n {
		return nil
	}
	s.release(mem)
	sizes := fwdScratchBytes(c, n)
	dst := []*uintptr{&s.x, &s.h, &s.q, &s.kv, &s.attn, &s.o, &s.mlp, &s.act}
	for i, size := range sizes {
		p, err := mem.alloc(size)
		if err != nil {
			s.release(mem)
			return fmt.Errorf("cuda: recompute buffers for %d tokens: %w", n, err)
		}
		*dst[i] = p
	}
	s.n = n
	return nil
}

// fwdTarget is where the pass writes K and V: a paged cache.
type fwdTarget struct {
	k, v        []uintptr // per cache layer
	table       uintptr   // device int32 block table
	nblocks     int
	blockTokens int
	layerMap    func(int) int // model layer -> cache layer
}

// fwdPass runs the recompute loop.
type fwdPass struct {
	cfg     *model.Config
	dtype   int // hc* code
	threads int // per block of the elementwise and norm kernels
	w       *fwdWeights
	scr     *fwdScratch
	ops     fwdOps
	// trace, when set, is called after each layer's attention norm with
	// the normed rows (h: [n x hidden], model dtype): the hidden states
	// model.Trace reports (tests only; nil on the device path).
	trace func(layer int, h uintptr) error
}

// elementGrid is the grid of a grid-stride kernel over total elements.
func (p *fwdPass) elementGrid(total int) int {
	g := (total + p.threads - 1) / p.threads
	return max(1, min(g, 1<<16))
}

func (p *fwdPass) launch(k fwdKernel, grid, threads, shmem int, params []unsafe.Pointer, keep any) error {
	escape(params)
	escape(keep)
	return p.ops.launch(fwdLaunch{k: k, grid: grid, threads: threads, shmem: shmem, params: params, keep: keep})
}

// one wraps a kernel's argument struct as its single parameter.
func one[T any](a *T) []unsafe.Pointer { return []unsafe.Pointer{unsafe.Pointer(a)} }

// run recomputes layers [0, layers) for n tokens: tokens and positions are
// device int32 arrays [n] (positions 0..n-1: the whole context), rope the
// cos/sin table (RopeTable) covering them (0 for a model without RoPE).
// Layer l's K and V go to t's cache layer t.layerMap(l). Like Model.Prefill,
// the last layer stops after its K and V.
func (p *fwdPass) run(n int, tokens, positions, rope uintptr, layers int, t fwdTarget) error {
	c := p.cfg
	if layers < 1 || layers > len(p.w.layers) {
		return fmt.Errorf("cuda: recompute of %d layers, %d are on the device", layers, len(p.w.layers))
	}
	if !attnHeadDims[c.HeadDim] {
		return fmt.Errorf("cuda: recompute: head_dim %d (the attention kernel is built for 16, 32, 64, 128)", c.HeadDim)
	}
	if c.Heads%c.KVHeads != 0 {
		return fmt.Errorf("cuda: recompute: %d heads are not a multiple of %d KV heads", c.Heads, c.KVHeads)
	}
	d, qd, kvd, im := c.HiddenSize, c.Heads*c.HeadDim, c.KVDim(), c.Intermediate
	s, w := p.scr, p.w
	nn, th := int32(n), p.threads
	dt := int32(p.dtype)
	if c.UsesRope() && rope == 0 {
		return errors.New("cuda: recompute: no RoPE table")
	}
	if !c.UsesRope() {
		rope = 0
	}
	ea := &embedArgs{embed: uint64(w.embed), posEmbed: uint64(w.posEmbed), tokens: uint64(tokens),
		positions: uint64(positions), x: uint64(s.x), n: nn, hidden: int32(d), dtype: dt}
	if c.Arch == model.ArchOPT {
		ea.posOffset = 2
	}
	if err := p.launch(kEmbed, p.elementGrid(n*d), th, 0, one(ea), ea); err != nil {
		return err
	}
	norm := func(wt, b uintptr) error {
		a := &normArgs{x: uint64(s.x), w: uint64(wt), b: uint64(b), out: uint64(s.h), n: nn, hidden: int32(d),
			dtype: dt, eps: float32(c.NormEps)}
		if c.Norm == "layernorm" {
			a.layernorm = 1
		}
		return p.launch(kNorm, n, th, 4*th, one(a), a)
	}
	residual := func(bias uintptr) error {
		a := &residualArgs{x: uint64(s.x), y: uint64(s.o), bias: uint64(bias), n: nn, hidden: int32(d)}
		return p.launch(kResidual, p.elementGrid(n*d), th, 0, one(a), a)
	}
	il := int32(0)
	if c.RotaryInterleaved {
		il = 1
	}
	for l := 0; l < layers; l++ {
		lw := &w.layers[l]
		li := t.layerMap(l)
		if li < 0 || li >= len(t.k) {
			return fmt.Errorf("cuda: recompute: layer %d has no place in a %d-layer cache", l, len(t.k))
		}
		if err := norm(lw.attnNormW, lw.attnNormB); err != nil {
			return err
		}
		if p.trace != nil {
			if err := p.trace(l, s.h); err != nil {
				return err
			}
		}
		if err := p.ops.gemm(fwdGemm{m: 2 * kvd, n: n, k: d, w: lw.wkv, x: s.h, out: s.kv, what: fmt.Sprintf("layer %d k||v", l)}); err != nil {
			return err
		}
		pa := &projectArgs{gemm: uint64(s.kv), bias: uint64(lw.bkv), rope: uint64(rope), pos: uint64(positions),
			table: uint64(t.table), n: nn, nblocks: int32(t.nblocks), bt: int32(t.blockTokens),
			kvh: int32(c.KVHeads), hd: int32(c.HeadDim), il: il, dtyp: dt, k: uint64(t.k[li]), v: uint64(t.v[li])}
		if err := p.launch(kProject, n, th, 0, pa.params(), pa); err != nil {
			return err
		}
		if l == layers-1 {
			// Like Model.Prefill: the last layer's K and V are what is
			// needed, not its output.
			break
		}
		if err := p.ops.gemm(fwdGemm{m: qd, n: n, k: d, w: lw.wq, x: s.h, out: s.q, what: fmt.Sprintf("layer %d q", l)}); err != nil {
			return err
		}
		if lw.bq != 0 || rope != 0 {
			qa := &qropeArgs{q: uint64(s.q), bias: uint64(lw.bq), rope: uint64(rope), positions: uint64(positions),
				n: nn, heads: int32(c.Heads), headDim: int32(c.HeadDim), interleaved: il}
			if err := p.launch(kQRope, n, th, 0, one(qa), qa); err != nil {
				return err
			}
		}
		aa := &attnArgs{q: uint64(s.q), kcache: uint64(t.k[li]), vcache: uint64(t.v[li]), positions: uint64(positions),
			blockTable: uint64(t.table), out: uint64(s.attn), n: nn, nblocks: int32(t.nblocks),
			blockTokens: int32(t.blockTokens), heads: int32(c.Heads), kvHeads: int32(c.KVHeads),
			headDim: int32(c.HeadDim), dtype: dt, scale: float32(1 / math.Sqrt(float64(c.HeadDim)))}
		tiles := (n + attnThreads - 1) / attnThreads
		if err := p.launch(kAttention, tiles*c.Heads, attnThreads, 2*attnBK(c.HeadDim)*c.HeadDim*4, one(aa), aa); err != nil {
			return err
		}
		if err := p.ops.gemm(fwdGemm{m: d, n: n, k: qd, w: lw.wo, x: s.attn, out: s.o, what: fmt.Sprintf("layer %d o", l)}); err != nil {
			return err
		}
		if err := residual(lw.bo); err != nil {
			return err
		}
		if err := norm(lw.mlpNormW, lw.mlpNormB); err != nil {
			return err
		}
		if c.Arch == model.ArchOPT {
			if err := p.ops.gemm(fwdGemm{m: im, n: n, k: d, w: lw.w1, x: s.h, out: s.mlp, what: fmt.Sprintf("layer %d fc1", l)}); err != nil {
				return err
			}
			ba := &biasActArgs{a: uint64(s.mlp), bias: uint64(lw.b1), out: uint64(s.act), n: nn, cols: int32(im), act: actReLU, dtype: dt}
			if err := p.launch(kBiasAct, p.elementGrid(n*im), th, 0, one(ba), ba); err != nil {
				return err
			}
		} else {
			if err := p.ops.gemm(fwdGemm{m: 2 * im, n: n, k: d, w: lw.w1, x: s.h, out: s.mlp, what: fmt.Sprintf("layer %d gate||up", l)}); err != nil {
				return err
			}
			sa := &swigluArgs{gu: uint64(s.mlp), out: uint64(s.act), n: nn, inter: int32(im), dtype: dt}
			if err := p.launch(kSwiGLU, p.elementGrid(n*im), th, 0, one(sa), sa); err != nil {
				return err
			}
		}
		if err := p.ops.gemm(fwdGemm{m: d, n: n, k: im, w: lw.w2, x: s.act, out: s.o, what: fmt.Sprintf("layer %d down", l)}); err != nil {
			return err
		}
		if err := residual(lw.b2); err != nil {
			return err
		}
	}
	return nil
}
