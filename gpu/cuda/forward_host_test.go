package cuda

import (
	"errors"
	"fmt"
	"math"
	"math/rand"
	"reflect"
	"runtime"
	"strings"
	"testing"
	"time"
	"unsafe"

	"github.com/ebitengine/purego"

	"github.com/hcache/hcache/gpu"
	"github.com/hcache/hcache/internal/half"
	"github.com/hcache/hcache/internal/tensor"
	"github.com/hcache/hcache/model"
)

// The forward pass of the recomputed prefix, run on the host: the
// host-built kernels (kernels/hcache.cu with HCACHE_HOST: the same bodies,
// the same argument structs, the same grids, a block's threads as pthreads
// meeting at real barriers) and the Go CPU GEMM in place of cuBLAS, driven
// by the same fwdPass.run the device uses, checked against model/forward.go.

// hostMem is "device memory" in Go's heap (which does not move).
type hostMem struct {
	bufs  map[uintptr][]byte
	limit int // fail allocations past this many live bytes (0: none)
	live  int
}

func newHostMem() *hostMem { return &hostMem{bufs: map[uintptr][]byte{}} }

func (m *hostMem) alloc(n int) (uintptr, error) {
	if m.limit > 0 && m.live+n > m.limit {
		return 0, fmt.Errorf("host memory: %d bytes over the %d-byte test limit", n, m.limit)
	}
	b := make([]byte, max(n, 16))
	p := uintptr(unsafe.Pointer(&b[0]))
	m.bufs[p] = b
	m.live += len(b)
	return p, nil
}

func (m *hostMem) free(p uintptr) {
	if b, ok := m.bufs[p]; ok {
		m.live -= len(b)
		delete(m.bufs, p)
	}
}

// slice is n bytes at p, which must lie inside one allocation.
func (m *hostMem) slice(p uintptr, n int) ([]byte, error) {
	for base, b := range m.bufs {
		if p >= base && p+uintptr(n) <= base+uintptr(len(b)) {
			off := int(p - base)
			return b[off : off+n], nil
		}
	}
	return nil, fmt.Errorf("host memory: %d bytes at %#x are not inside one allocation", n, p)
}

func (m *hostMem) htod(dst uintptr, src []byte) error {
	d, err := m.slice(dst, len(src))
	if err != nil {
		return err
	}
	copy(d, src)
	return nil
}

// put uploads a copy of v's bytes.
func (m *hostMem) put(t *testing.T, v []byte) uintptr {
	t.Helper()
	p, err := m.alloc(len(v))
	if err != nil {
		t.Fatal(err)
	}
	if err := m.htod(p, v); err != nil {
		t.Fatal(err)
	}
	return p
}

func (m *hostMem) bytes(t *testing.T, p uintptr, n int) []byte {
	t.Helper()
	b, err := m.slice(p, n)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func (m *hostMem) f32(t *testing.T, p uintptr, n int) []float32 {
	t.Helper()
	b := m.bytes(t, p, 4*n)
	return unsafe.Slice((*float32)(unsafe.Pointer(&b[0])), n)
}

func i32s(v []int) []byte {
	out := make([]int32, len(v))
	for i, x := range v {
		out[i] = int32(x)
	}
	return i32bytes(out)
}

// hostOps runs launches through the host build and GEMMs through
// tensor.MatMulT on the decoded model-dtype operands. It checks what a
// device would refuse: more than 1024 threads, more than 48 KiB of dynamic
// shared memory, an empty grid.
type hostOps struct {
	k        *hostKernels
	mem      *hostMem
	cfg      *model.Config
	launches map[fwdKernel]int
	gemms    int
	weights  map[uintptr][]float32 // decoded weight matrices (they do not change)
}

func (o *hostOps) launch(l fwdLaunch) error {
	if l.grid < 1 || l.threads < 1 || l.threads > 1024 || l.shmem < 0 || l.shmem > 48<<10 || len(l.params) == 0 {
		return fmt.Errorf("launch of %s: grid %d, %d threads, %d bytes of shared memory: a device refuses it", fwdKernelNames[l.k], l.grid, l.threads, l.shmem)
	}
	r, _, _ := purego.SyscallN(o.k.launch[l.k], uintptr(unsafe.Pointer(&l.params[0])), uintptr(l.grid), uintptr(l.threads), uintptr(l.shmem))
	runtime.KeepAlive(l.params)
	runtime.KeepAlive(l.keep)
	if int32(r) != 0 {
		return fmt.Errorf("host launch of %s failed (%d)", fwdKernelNames[l.k], int32(r))
	}
	if o.launches == nil {
		o.launches = map[fwdKernel]int{}
	}
	o.launches[l.k]++
	return nil
}

func (o *hostOps) gemm(g fwdGemm) error {
	eb := o.cfg.ElemBytes()
	xb, err := o.mem.slice(g.x, g.n*g.k*eb)
	if err != nil {
		return fmt.Errorf("gemm %s x: %w", g.what, err)
	}
	wb, err := o.mem.slice(g.w, g.m*g.k*eb)
	if err != nil {
		return fmt.Errorf("gemm %s w: %w", g.what, err)
	}
	ob, err := o.mem.slice(g.out, g.n*g.m*4)
	if err != nil {
		return fmt.Errorf("gemm %s out: %w", g.what, err)
	}
	x := make([]float32, g.n*g.k)
	o.cfg.DecodeRow(x, xb)
	w := o.weights[g.w]
	if len(w) != g.m*g.k {
		w = make([]float32, g.m*g.k)
		o.cfg.DecodeRow(w, wb)
		if o.weights == nil {
			o.weights = map[uintptr][]float32{}
		}
		o.weights[g.w] = w
	}
	out := make([]float32, g.n*g.m)
	tensor.MatMulT(out, x, g.n, g.k, w, g.m, nil)
	copy(ob, f32bytes(out))
	o.gemms++
	return nil
}

func dtypeCode(c *model.Config) int {
	return map[string]int{"float16": hcF16, "bfloat16": hcBF16, "float32": hcF32}[c.DType]
}

// variant is a preset with other attention shapes.
func variant(t *testing.T, preset string, edit func(c *model.Config)) *model.Config {
	t.Helper()
	c, err := model.Preset(preset)
	if err != nil {
		t.Fatal(err)
	}
	cc := *c
	if edit != nil {
		edit(&cc)
	}
	if err := cc.Validate(); err != nil {
		t.Fatal(err)
	}
	return &cc
}

// TestRecomputeMatchesPrefill: for every family the CPU forward pass runs
// (Llama MHA and GQA, Qwen2's q/k/v biases, OPT's LayerNorm, ReLU, biases and
// learned positions; fp16, bf16, fp32; neox and interleaved RoPE; llama3 and
// linear scaling; head dims 16 to 128), the host-run pass writes each
// layer's K and V into a paged cache (shuffled block table) within the
// stated tolerance of model.Prefill's, and nothing else; each layer's normed
// hidden states match the CPU's too.
func TestRecomputeMatchesPrefill(t *testing.T) {
	k := loadHostKernels(t)
	seed := time.Now().UnixNano()
	t.Logf("seed %d", seed)
	cases := []struct {
		name        string
		cfg         *model.Config
		tokens      int
		layers      int
		blockTokens int
		threads     int
	}{
		{"llama fp16 neox", variant(t, "tiny-llama", nil), 37, 4, 16, 32},
		{"llama bf16 GQA 4:1 llama3 scaling, prefix of 3", variant(t, "tiny-gqa", nil), 50, 3, 8, 64},
		{"qwen2 fp16 qkv bias GQA 3:1", variant(t, "tiny-qwen2", nil), 33, 3, 16, 96},
		{"opt fp16 layernorm relu", variant(t, "tiny-opt", nil), 21, 3, 4, 32},
		{"mistral fp32 interleaved linear scaling", variant(t, "tiny-linear-rope", nil), 40, 2, 16, 32},
		{"llama fp16 head_dim 64, two query tiles", variant(t, "tiny-llama", func(c *model.Config) {
			c.Heads, c.KVHeads, c.HeadDim = 2, 2, 64
		}), 70, 3, 16, 64},
		{"llama bf16 head_dim 128 GQA 2:1", variant(t, "tiny-llama", func(c *model.Config) {
			c.HiddenSize, c.Heads, c.KVHeads, c.HeadDim, c.DType = 256, 2, 1, 128, "bfloat16"
		}), 67, 2, 16, 32},
		{"qwen2 fp16 head_dim 128", variant(t, "tiny-qwen2", func(c *model.Config) {
			c.HiddenSize, c.Heads, c.KVHeads, c.HeadDim = 256, 2, 2, 128
		}), 20, 3, 8, 64},
		{"opt fp32 head_dim 64", variant(t, "tiny-opt", func(c *model.Config) {
			c.Heads, c.KVHeads, c.HeadDim, c.DType = 2, 2, 64, "float32"
		}), 30, 3, 16, 32},
	}
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := tc.cfg
			rng := rand.New(rand.NewSource(seed + int64(i)))
			w := model.Synthesize(c, seed+int64(i))
			m, err := model.New(c, w)
			if err != nil {
				t.Fatal(err)
			}
			n := tc.tokens
			tokens := make([]int, n)
			positions := make([]int, n)
			for j := range tokens {
				tokens[j] = rng.Intn(c.Vocab)
				positions[j] = j
			}
			wantH := make([][]float32, tc.layers)
			wantK := make([][]float32, tc.layers)
			wantV := make([][]float32, tc.layers)
			if err := m.Prefill(tokens, tc.layers, func(l int, h, kk, vv []float32) {
				wantH[l] = append([]float32(nil), h...)
				wantK[l] = append([]float32(nil), kk...)
				wantV[l] = append([]float32(nil), vv...)
			}); err != nil {
				t.Fatal(err)
			}

			mem := newHostMem()
			fw, err := uploadFwdWeights(mem, c, w, tc.layers, 1<<40, nil, nil)
			if err != nil {
				t.Fatal(err)
			}
			blocks := (n + tc.blockTokens - 1) / tc.blockTokens
			table := rng.Perm(2 * blocks)[:blocks]
			caches := make([]*gpu.PagedKV, tc.layers)
			tgt := fwdTarget{table: mem.put(t, i32s(table)), nblocks: blocks, blockTokens: tc.blockTokens,
				layerMap: func(l int) int { return l }}
			for l := range caches {
				caches[l], _ = gpu.NewPagedKV(c, tc.blockTokens, 2*blocks)
				caches[l].BlockTable = table
				poison(caches[l].K)
				poison(caches[l].V)
				tgt.k = append(tgt.k, mem.put(t, caches[l].K))
				tgt.v = append(tgt.v, mem.put(t, caches[l].V))
			}
			var rope uintptr
			if c.UsesRope() {
				rope = mem.put(t, f32bytes(RopeTable(c.InvFreq(), n)))
			}
			ops := &hostOps{k: k, mem: mem, cfg: c}
			p := &fwdPass{cfg: c, dtype: dtypeCode(c), threads: tc.threads, w: fw, scr: &fwdScratch{}, ops: ops}
			if err := p.scr.ensure(mem, c, n); err != nil {
				t.Fatal(err)
			}
			tol := RecomputeTolerance(c.DType)
			p.trace = func(l int, hp uintptr) error {
				got := make([]float32, n*c.HiddenSize)
				c.DecodeRow(got, mem.bytes(t, hp, n*c.HiddenRowBytes()))
				if e := relErr(got, wantH[l]); e > tol {
					return fmt.Errorf("layer %d hidden states: error %.3g of the largest value, over %.3g", l, e, tol)
				} else {
					t.Logf("layer %d hidden: %.2g", l, e)
				}
				return nil
			}
			tokDev, posDev := mem.put(t, i32s(tokens)), mem.put(t, i32s(positions))
			if err := p.run(n, tokDev, posDev, rope, tc.layers, tgt); err != nil {
				t.Fatal(err)
			}
			for l := range caches {
				copy(caches[l].K, mem.bytes(t, tgt.k[l], len(caches[l].K)))
				copy(caches[l].V, mem.bytes(t, tgt.v[l], len(caches[l].V)))
				noStrayWrites(t, fmt.Sprintf("layer %d", l), caches[l], positions)
			}
			res := &RecomputeCheck{}
			err = compareRecompute(c, caches, positions, wantK, wantV, res)
			t.Logf("K errors %.2g, V errors %.2g of the largest value (tolerance %.2g)", res.KErr, res.VErr, res.Tolerance)
			if err != nil {
				t.Fatal(err)
			}
			// Every kernel of the pass ran (the last layer stops after K/V).
			want := map[fwdKernel]int{kEmbed: 1, kNorm: 2*tc.layers - 1, kProject: tc.layers, kAttention: tc.layers - 1,
				kResidual: 2 * (tc.layers - 1)}
			if c.Arch == model.ArchOPT {
				want[kBiasAct] = tc.layers - 1
			} else {
				want[kSwiGLU] = tc.layers - 1
			}
			for kk, cnt := range want {
				if ops.launches[kk] != cnt {
					t.Errorf("%s launched %d times, want %d", fwdKernelNames[kk], ops.launches[kk], cnt)
				}
			}
			fw.release(mem)
			p.scr.release(mem)
		})
	}
}

// TestFwdArgLayout: each Go argument struct has the C struct's fields at
// the same offsets with the same sizes, and the same total size (the launch
// passes one pointer to it; a field out of place would hand a kernel the
// wrong value).
func TestFwdArgLayout(t *testing.T) {
	k := loadHostKernels(t)
	types := map[string]reflect.Type{
		"embed": reflect.TypeOf(embedArgs{}), "norm": reflect.TypeOf(normArgs{}), "qrope": reflect.TypeOf(qropeArgs{}),
		"attention": reflect.TypeOf(attnArgs{}), "residual": reflect.TypeOf(residualArgs{}),
		"swiglu": reflect.TypeOf(swigluArgs{}), "bias_act": reflect.TypeOf(biasActArgs{}),
	}
	if len(types) != int(kProject) {
		t.Fatalf("%d argument structs for %d struct-argument kernels", len(types), kProject)
	}
	for _, name := range fwdKernelNames[:kProject] {
		typ := types[name]
		out := make([]int64, 64)
		r, _, _ := purego.SyscallN(k.layout[name], uintptr(unsafe.Pointer(&out[0])))
		cnt := int(int32(r))
		var goLayout []int64
		var goNames string
		for i := 0; i < typ.NumField(); i++ {
			f := typ.Field(i)
			goLayout = append(goLayout, int64(f.Offset), int64(f.Type.Size()))
			goNames += strings.ToLower(f.Name) + ","
		}
		fp, _, _ := purego.SyscallN(k.fields[name])
		if cNames := strings.ReplaceAll(cString(fp), "_", ""); cNames != goNames {
			t.Errorf("%s: C fields %s, Go %s %s (names compared without case or underscores)", name, cNames, typ.Name(), goNames)
		}
		goLayout = append(goLayout, int64(typ.Size()))
		if !reflect.DeepEqual(out[:cnt], goLayout) {
			t.Errorf("%s: C layout (offset, size per field; struct size) %v, Go %s %v", name, out[:cnt], typ.Name(), goLayout)
		}
	}
	// hc_project_scatter and hc_kv_scatter take one parameter per field:
	// params() points at each field, in order (TestPTXParams checks the
	// sizes against the kernels').
	pa, ka := &projectArgs{}, &kvArgs{}
	for _, tc := range []struct {
		base   unsafe.Pointer
		typ    reflect.Type
		params []unsafe.Pointer
	}{{unsafe.Pointer(pa), reflect.TypeOf(*pa), pa.params()}, {unsafe.Pointer(ka), reflect.TypeOf(*ka), ka.params()}} {
		if len(tc.params) != tc.typ.NumField() {
			t.Fatalf("%s.params() has %d pointers for %d fields", tc.typ.Name(), len(tc.params), tc.typ.NumField())
		}
		for i := 0; i < tc.typ.NumField(); i++ {
			f := tc.typ.Field(i)
			if tc.params[i] != unsafe.Add(tc.base, f.Offset) {
				t.Fatalf("%s.params()[%d] does not point at field %s", tc.typ.Name(), i, f.Name)
			}
		}
	}
}

// TestPTXParams: the committed PTX (what the device loads) declares, for each
// forward-pass kernel, one parameter of the Go argument struct's size, and
// for hc_project_scatter and hc_kv_scatter parameters of the sizes of the Go
// fields the launches point at, in order. Needs no clang.
func TestPTXParams(t *testing.T) {
	ptx := string(kernelPTX)
	entry := func(name string) []int {
		t.Helper()
		i := strings.Index(ptx, ".entry "+name+"(")
		if i < 0 {
			t.Fatalf("the PTX has no kernel %s", name)
		}
		body := ptx[i:]
		body = body[:strings.Index(body, ")")]
		var sizes []int
		for _, line := range strings.Split(body, "\n")[1:] {
			line = strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(line), ","))
			var size int
			switch {
			case line == "":
				continue
			case strings.HasPrefix(line, ".param .u64 "):
				size = 8
			case strings.HasPrefix(line, ".param .u32 "):
				size = 4
			case strings.HasPrefix(line, ".param .align "):
				lb, rb := strings.LastIndex(line, "["), strings.LastIndex(line, "]")
				if _, err := fmt.Sscanf(line[lb+1:rb], "%d", &size); err != nil {
					t.Fatalf("%s: %q: %v", name, line, err)
				}
			default:
				t.Fatalf("%s: unexpected parameter %q", name, line)
			}
			sizes = append(sizes, size)
		}
		return sizes
	}
	structs := map[string]any{"embed": embedArgs{}, "norm": normArgs{}, "qrope": qropeArgs{}, "attention": attnArgs{},
		"residual": residualArgs{}, "swiglu": swigluArgs{}, "bias_act": biasActArgs{}}
	for _, name := range fwdKernelNames[:kProject] {
		got := entry("hc_" + name)
		if want := int(reflect.TypeOf(structs[name]).Size()); len(got) != 1 || got[0] != want {
			t.Errorf("hc_%s takes parameters of %v bytes; the launch passes one %d-byte struct", name, got, want)
		}
	}
	fieldSizes := func(v any) []int {
		typ := reflect.TypeOf(v)
		var out []int
		for i := 0; i < typ.NumField(); i++ {
			out = append(out, int(typ.Field(i).Type.Size()))
		}
		return out
	}
	for name, v := range map[string]any{"hc_project_scatter": projectArgs{}, "hc_kv_scatter": kvArgs{}} {
		if got, want := entry(name), fieldSizes(v); !reflect.DeepEqual(got, want) {
			t.Errorf("%s takes parameters of %v bytes; the launch passes %v", name, got, want)
		}
	}
}

// TestHostMath: the kernels' exp, SiLU and dtype widening equal the Go
// reference's to the bit (exp after rounding to float32, as every caller
// uses it).
func TestHostMath(t *testing.T) {
	k := loadHostKernels(t)
	seed := time.Now().UnixNano()
	t.Logf("seed %d", seed)
	rng := rand.New(rand.NewSource(seed))
	xs := []float32{0, float32(math.Copysign(0, -1)), 1, -1, 88.7, -87.3, -103.9, 89, -200, 1e-9, -1e-9, 3.7e-8,
		float32(math.Inf(1)), float32(math.Inf(-1)), float32(math.NaN()), 65504, -65504, 1e30, -1e30}
	for i := 0; i < 100000; i++ {
		xs = append(xs, float32(rng.NormFloat64()*float64([]float32{0.01, 1, 10, 60}[i%4])))
	}
	for i := 0; i < 20000; i++ {
		xs = append(xs, math.Float32frombits(rng.Uint32()))
	}
	for _, x := range xs {
		want := float32(math.Exp(float64(x)))
		if got := float32(k.exp(float64(x))); math.Float32bits(got) != math.Float32bits(want) && !(math.IsNaN(float64(got)) && math.IsNaN(float64(want))) {
			t.Fatalf("exp(%g = %08x): kernel %g, Go %g", x, math.Float32bits(x), got, want)
		}
		ws := tensor.SiLU(x)
		if got := k.silu(x); math.Float32bits(got) != math.Float32bits(ws) && !(math.IsNaN(float64(got)) && math.IsNaN(float64(ws))) {
			t.Fatalf("silu(%g = %08x): kernel %g (%08x), Go %g (%08x)", x, math.Float32bits(x), got, math.Float32bits(got), ws, math.Float32bits(ws))
		}
		if math.IsNaN(float64(x)) || math.Abs(float64(x)) > 1e4 {
			continue
		}
		v := float64(x)
		wg := float32(v / (1 + math.Exp(-2*0.7978845608028654*(v+0.044715*v*v*v))))
		if ref := 0.5 * v * (1 + math.Tanh(0.7978845608028654*(v+0.044715*v*v*v))); math.Abs(ref-float64(wg)) > 1e-6*math.Abs(v)+1e-30 {
			t.Fatalf("gelu_tanh(%g) as x*sigmoid(2u) = %g, as 0.5x(1+tanh u) = %g", x, wg, ref)
		}
		if got := k.geluTanh(x); math.Abs(float64(got-wg)) > 2e-7*math.Abs(float64(wg))+1e-37 {
			t.Fatalf("gelu_tanh(%g): kernel %g, Go %g", x, got, wg)
		}
	}
	for h := 0; h < 1<<16; h++ {
		if got, want := k.widen(uint16(h), hcF16), math.Float32bits(half.ToFloat32(uint16(h))); got != want {
			t.Fatalf("fp16 %04x: kernel %08x, Go %08x", h, got, want)
		}
		if got, want := k.widen(uint16(h), hcBF16), math.Float32bits(half.BF16ToFloat32(uint16(h))); got != want {
			t.Fatalf("bf16 %04x: kernel %08x, Go %08x", h, got, want)
		}
	}
}

func randF32(rng *rand.Rand, n int, scale float64) []float32 {
	v := make([]float32, n)
	for i := range v {
		v[i] = float32(rng.NormFloat64() * scale)
	}
	return v
}

func dtypeCfg(dtype string) *model.Config { return &model.Config{DType: dtype} }

// roundTo rounds to a dtype as the kernels' stores do.
func roundTo(dtype string, v []float32) []float32 {
	c := dtypeCfg(dtype)
	b := make([]byte, len(v)*c.ElemBytes())
	c.EncodeRow(b, v)
	out := make([]float32, len(v))
	c.DecodeRow(out, b)
	return out
}

func bitsEqual(a, b []float32) int {
	for i := range a {
		if math.Float32bits(a[i]) != math.Float32bits(b[i]) {
			return i
		}
	}
	return -1
}

// TestFwdElementwiseKernels: the embedding gather, Q's bias and RoPE, the
// residual add, SwiGLU and bias+activation equal the CPU forward pass's
// arithmetic to the bit, whatever the grid and block.
func TestFwdElementwiseKernels(t *testing.T) {
	k := loadHostKernels(t)
	seed := time.Now().UnixNano()
	t.Logf("seed %d", seed)
	for ci, tc := range []struct {
		dtype   string
		n, d    int
		threads int
		grid    int // 0: what fwdPass uses
	}{
		{"float16", 7, 64, 32, 0},
		{"bfloat16", 13, 96, 64, 3},
		{"float32", 5, 128, 256, 1},
		{"float16", 33, 32, 96, 0},
	} {
		t.Run(fmt.Sprintf("%s n%d d%d t%d g%d", tc.dtype, tc.n, tc.d, tc.threads, tc.grid), func(t *testing.T) {
			rng := rand.New(rand.NewSource(seed + int64(ci)))
			mem := newHostMem()
			ops := &hostOps{k: k, mem: mem, cfg: dtypeCfg(tc.dtype)}
			dt := dtypeCfg(tc.dtype)
			n, d := tc.n, tc.d
			p := &fwdPass{threads: tc.threads}
			grid := func(total int) int {
				if tc.grid > 0 {
					return tc.grid
				}
				return p.elementGrid(total)
			}
			run := func(kk fwdKernel, g, shm int, params []unsafe.Pointer, keep any) {
				t.Helper()
				if err := ops.launch(fwdLaunch{k: kk, grid: g, threads: tc.threads, shmem: shm, params: params, keep: keep}); err != nil {
					t.Fatal(err)
				}
			}
			enc := func(v []float32) uintptr {
				b := make([]byte, len(v)*dt.ElemBytes())
				dt.EncodeRow(b, v)
				return mem.put(t, b)
			}
			dec := func(p uintptr, cnt int) []float32 {
				out := make([]float32, cnt)
				dt.DecodeRow(out, mem.bytes(t, p, cnt*dt.ElemBytes()))
				return out
			}

			// Embedding (+ OPT positions at offset 2).
			vocab, maxPos := 50, 40
			embed := roundTo(tc.dtype, randF32(rng, vocab*d, 1))
			posEmb := roundTo(tc.dtype, randF32(rng, (maxPos+2)*d, 1))
			toks, poss := make([]int, n), make([]int, n)
			for i := range toks {
				toks[i], poss[i] = rng.Intn(vocab), rng.Intn(maxPos)
			}
			for _, withPos := range []bool{false, true} {
				x, _ := mem.alloc(4 * n * d)
				a := &embedArgs{embed: uint64(enc(embed)), tokens: uint64(mem.put(t, i32s(toks))), positions: uint64(mem.put(t, i32s(poss))),
					x: uint64(x), n: int32(n), hidden: int32(d), dtype: int32(dtypeCode(dt))}
				if withPos {
					a.posEmbed, a.posOffset = uint64(enc(posEmb)), 2
				}
				run(kEmbed, grid(n*d), 0, one(a), a)
				want := make([]float32, n*d)
				for i, tk := range toks {
					copy(want[i*d:], embed[tk*d:(tk+1)*d])
					if withPos {
						for j := 0; j < d; j++ {
							want[i*d+j] += posEmb[(poss[i]+2)*d+j]
						}
					}
				}
				if i := bitsEqual(mem.f32(t, x, n*d), want); i >= 0 {
					t.Fatalf("embed (positions %v): element %d differs", withPos, i)
				}
			}

			// Q bias + RoPE: heads x head_dim = d.
			for _, rc := range []struct {
				hd         int
				bias, rope bool
				il         bool
			}{{16, true, true, false}, {32, false, true, true}, {d, true, false, false}} {
				heads := d / rc.hd
				q := randF32(rng, n*d, 1)
				bias := randF32(rng, d, 0.1)
				inv := make([]float32, rc.hd/2)
				for i := range inv {
					inv[i] = float32(1 / math.Pow(10000, float64(2*i)/float64(rc.hd)))
				}
				qp := mem.put(t, f32bytes(q))
				a := &qropeArgs{q: uint64(qp), positions: uint64(mem.put(t, i32s(poss))), n: int32(n), heads: int32(heads), headDim: int32(rc.hd)}
				if rc.bias {
					a.bias = uint64(mem.put(t, f32bytes(bias)))
				}
				if rc.rope {
					a.rope = uint64(mem.put(t, f32bytes(RopeTable(inv, maxPos))))
				}
				if rc.il {
					a.interleaved = 1
				}
				run(kQRope, n, 0, one(a), a)
				want := append([]float32(nil), q...)
				for i := 0; i < n; i++ {
					row := want[i*d : (i+1)*d]
					if rc.bias {
						for j := range row {
							row[j] += bias[j]
						}
					}
					if rc.rope {
						for h := 0; h < heads; h++ {
							tensor.Rope(row[h*rc.hd:(h+1)*rc.hd], poss[i], inv, rc.il)
						}
					}
				}
				if i := bitsEqual(mem.f32(t, qp, n*d), want); i >= 0 {
					t.Fatalf("qrope %+v: element %d differs", rc, i)
				}
			}

			// Residual, with and without a bias.
			for _, withBias := range []bool{false, true} {
				x, y, bias := randF32(rng, n*d, 1), randF32(rng, n*d, 1), randF32(rng, d, 0.1)
				xp := mem.put(t, f32bytes(x))
				a := &residualArgs{x: uint64(xp), y: uint64(mem.put(t, f32bytes(y))), n: int32(n), hidden: int32(d)}
				if withBias {
					a.bias = uint64(mem.put(t, f32bytes(bias)))
				}
				run(kResidual, grid(n*d), 0, one(a), a)
				want := append([]float32(nil), x...)
				for i := range want {
					o := y[i]
					if withBias {
						o += bias[i%d]
					}
					want[i] += o
				}
				if i := bitsEqual(mem.f32(t, xp, n*d), want); i >= 0 {
					t.Fatalf("residual (bias %v): element %d differs", withBias, i)
				}
			}

			// SwiGLU: gate||up per token.
			im := d + 8
			gu := randF32(rng, n*2*im, 3)
			out, _ := mem.alloc(n * im * dt.ElemBytes())
			sa := &swigluArgs{gu: uint64(mem.put(t, f32bytes(gu))), out: uint64(out), n: int32(n), inter: int32(im), dtype: int32(dtypeCode(dt))}
			run(kSwiGLU, grid(n*im), 0, one(sa), sa)
			want := make([]float32, n*im)
			for i := 0; i < n; i++ {
				for j := 0; j < im; j++ {
					want[i*im+j] = tensor.SiLU(gu[i*2*im+j]) * gu[i*2*im+im+j]
				}
			}
			if i := bitsEqual(dec(out, n*im), roundTo(tc.dtype, want)); i >= 0 {
				t.Fatalf("swiglu: element %d differs", i)
			}

			// Bias + ReLU (OPT's fc1), bias only, GELU.
			for _, act := range []int{actReLU, actNone, actGELUTanh} {
				av, bias := randF32(rng, n*im, 2), randF32(rng, im, 0.5)
				av[0] = float32(math.Copysign(0, -1))
				out, _ := mem.alloc(n * im * dt.ElemBytes())
				ba := &biasActArgs{a: uint64(mem.put(t, f32bytes(av))), bias: uint64(mem.put(t, f32bytes(bias))), out: uint64(out),
					n: int32(n), cols: int32(im), act: int32(act), dtype: int32(dtypeCode(dt))}
				run(kBiasAct, grid(n*im), 0, one(ba), ba)
				want := make([]float32, n*im)
				for i := range want {
					v := av[i] + bias[i%im]
					switch act {
					case actReLU:
						v = max(v, 0)
					case actGELUTanh:
						v = k.geluTanh(v) // checked against math.Tanh in TestHostMath
					}
					want[i] = v
				}
				if i := bitsEqual(dec(out, n*im), roundTo(tc.dtype, want)); i >= 0 {
					t.Fatalf("bias_act %d: element %d differs", act, i)
				}
			}
		})
	}
}

// TestFwdNormKernel: RMSNorm and LayerNorm over a block of any thread count
// (a shared-memory tree) agree with tensor.RMSNorm/LayerNorm within 4e-6 of
// the row's largest output in float32 (the sums run in another order), and
// to one rounding step of the model dtype after it.
func TestFwdNormKernel(t *testing.T) {
	k := loadHostKernels(t)
	seed := time.Now().UnixNano()
	t.Logf("seed %d", seed)
	for ci, tc := range []struct {
		layernorm bool
		dtype     string
		n, d      int
		threads   int
		scale     float64 // of x; small rows make eps matter
	}{
		{false, "float32", 9, 128, 32, 2},
		{true, "float32", 5, 100, 96, 2},
		{false, "float16", 17, 256, 64, 2},
		{true, "bfloat16", 3, 96, 1024, 2},
		{false, "bfloat16", 4, 4096, 256, 2},
		{true, "float16", 2, 33, 1, 2},
		{false, "float32", 6, 64, 32, 0.003},
		{true, "float32", 6, 64, 64, 0.003},
	} {
		t.Run(fmt.Sprintf("ln%v %s n%d d%d t%d", tc.layernorm, tc.dtype, tc.n, tc.d, tc.threads), func(t *testing.T) {
			rng := rand.New(rand.NewSource(seed + int64(ci)))
			mem := newHostMem()
			dt := dtypeCfg(tc.dtype)
			ops := &hostOps{k: k, mem: mem, cfg: dt}
			n, d := tc.n, tc.d
			x := randF32(rng, n*d, tc.scale)
			for i := 0; i < d; i++ {
				x[i] += float32(2.5 * tc.scale) // a row with a large mean
			}
			wv := roundTo(tc.dtype, randF32(rng, d, 0.3))
			bv := roundTo(tc.dtype, randF32(rng, d, 0.1))
			out, _ := mem.alloc(n * d * dt.ElemBytes())
			a := &normArgs{x: uint64(mem.put(t, f32bytes(x))), w: uint64(mem.put(t, f32bytes(wv))), out: uint64(out),
				n: int32(n), hidden: int32(d), dtype: int32(dtypeCode(dt)), eps: 1e-5}
			if tc.layernorm {
				a.b, a.layernorm = uint64(mem.put(t, f32bytes(bv))), 1
			}
			// A grid larger than n: the extra blocks must do nothing.
			if err := ops.launch(fwdLaunch{k: kNorm, grid: n + 2, threads: tc.threads, shmem: 4 * tc.threads, params: one(a), keep: a}); err != nil {
				t.Fatal(err)
			}
			got := make([]float32, n*d)
			dt.DecodeRow(got, mem.bytes(t, out, n*d*dt.ElemBytes()))
			want := make([]float32, n*d)
			for i := 0; i < n; i++ {
				if tc.layernorm {
					tensor.LayerNorm(want[i*d:(i+1)*d], x[i*d:(i+1)*d], wv, bv, 1e-5)
				} else {
					tensor.RMSNorm(want[i*d:(i+1)*d], x[i*d:(i+1)*d], wv, 1e-5)
				}
			}
			step := map[string]float64{"float32": 0, "float16": 1.0 / 1024, "bfloat16": 1.0 / 128}[tc.dtype]
			for i := 0; i < n; i++ {
				g, w := got[i*d:(i+1)*d], want[i*d:(i+1)*d]
				var big float64
				for _, v := range w {
					big = max(big, math.Abs(float64(v)))
				}
				for j := range w {
					lim := 4e-6*big + step*math.Abs(float64(w[j]))
					if diff := math.Abs(float64(g[j]) - float64(w[j])); !(diff <= lim) {
						t.Fatalf("row %d element %d: kernel %g, CPU %g (|diff| %g > %g)", i, j, g[j], w[j], diff, lim)
					}
				}
			}
		})
	}
}

// refAttention is model/forward.go's attention over cache values: for query
// i at position pos[i], softmax over positions 0..pos[i].
func refAttention(q []float32, kc, vc func(pos int) []float32, pos []int, heads, kvHeads, hd int) []float32 {
	qd, group := heads*hd, heads/kvHeads
	scale := float32(1 / math.Sqrt(float64(hd)))
	out := make([]float32, len(pos)*qd)
	for i, p := range pos {
		scores := make([]float32, p+1)
		for h := 0; h < heads; h++ {
			qv := q[i*qd+h*hd : i*qd+(h+1)*hd]
			kh := (h / group) * hd
			for j := 0; j <= p; j++ {
				scores[j] = tensor.Dot(qv, kc(j)[kh:kh+hd]) * scale
			}
			tensor.Softmax(scores)
			o := out[i*qd+h*hd : i*qd+(h+1)*hd]
			for j := 0; j <= p; j++ {
				vj := vc(j)[kh : kh+hd]
				for e := range o {
					o[e] += scores[j] * vj[e]
				}
			}
		}
	}
	return out
}

// TestFwdAttentionKernel: the tiled online-softmax attention over a paged
// cache (shuffled block table) agrees with the CPU's attention, for head
// dims 16 to 128, MHA and GQA, query counts that do not fill the last tile,
// every cache dtype: within 2e-6 of the largest output in float32, one
// dtype rounding step after it otherwise.
func TestFwdAttentionKernel(t *testing.T) {
	k := loadHostKernels(t)
	seed := time.Now().UnixNano()
	t.Logf("seed %d", seed)
	for ci, tc := range []struct {
		hd, heads, kvHeads int
		n, blockTokens     int
		dtype              string
		qscale             float64
		start              int // first query position; the cache holds 0..start+n-1
	}{
		{64, 4, 4, 70, 16, "float16", 1, 0},
		{128, 4, 1, 45, 8, "bfloat16", 1, 0},
		{128, 2, 2, 130, 16, "float32", 3, 0},
		{64, 8, 2, 33, 4, "float32", 1, 0},
		{32, 6, 3, 64, 16, "float16", 4, 0},
		{16, 2, 1, 9, 16, "bfloat16", 1, 0},
		{64, 2, 1, 300, 16, "float16", 6, 0}, // ten key tiles: the running max moves
		{32, 4, 2, 20, 8, "float32", 1, 77},  // queries after a cached prefix
	} {
		t.Run(fmt.Sprintf("hd%d h%d/%d n%d from %d %s", tc.hd, tc.heads, tc.kvHeads, tc.n, tc.start, tc.dtype), func(t *testing.T) {
			rng := rand.New(rand.NewSource(seed + int64(ci)))
			mem := newHostMem()
			c := &model.Config{DType: tc.dtype, KVHeads: tc.kvHeads, HeadDim: tc.hd}
			ops := &hostOps{k: k, mem: mem, cfg: c}
			n, kvd, qd := tc.n, tc.kvHeads*tc.hd, tc.heads*tc.hd
			blocks := (tc.start + n + tc.blockTokens - 1) / tc.blockTokens
			table := rng.Perm(3 * blocks)[:blocks]
			cache, _ := gpu.NewPagedKV(c, tc.blockTokens, 3*blocks)
			cache.BlockTable = table
			kv := map[int][2][]float32{}
			for p := 0; p < tc.start+n; p++ {
				kb, vb, err := cache.Token(p)
				if err != nil {
					t.Fatal(err)
				}
				kr, vr := roundTo(tc.dtype, randF32(rng, kvd, 1)), roundTo(tc.dtype, randF32(rng, kvd, 1))
				c.EncodeRow(kb, kr)
				c.EncodeRow(vb, vr)
				kv[p] = [2][]float32{kr, vr}
			}
			q := randF32(rng, n*qd, tc.qscale)
			pos := make([]int, n)
			for i := range pos {
				pos[i] = tc.start + i
			}
			out, _ := mem.alloc(n * qd * c.ElemBytes())
			a := &attnArgs{q: uint64(mem.put(t, f32bytes(q))), kcache: uint64(mem.put(t, cache.K)), vcache: uint64(mem.put(t, cache.V)),
				positions: uint64(mem.put(t, i32s(pos))), blockTable: uint64(mem.put(t, i32s(table))), out: uint64(out),
				n: int32(n), nblocks: int32(blocks), blockTokens: int32(tc.blockTokens), heads: int32(tc.heads),
				kvHeads: int32(tc.kvHeads), headDim: int32(tc.hd), dtype: int32(dtypeCode(c)),
				scale: float32(1 / math.Sqrt(float64(tc.hd)))}
			tiles := (n + attnThreads - 1) / attnThreads
			if err := ops.launch(fwdLaunch{k: kAttention, grid: tiles * tc.heads, threads: attnThreads,
				shmem: 2 * attnBK(tc.hd) * tc.hd * 4, params: one(a), keep: a}); err != nil {
				t.Fatal(err)
			}
			got := make([]float32, n*qd)
			c.DecodeRow(got, mem.bytes(t, out, n*qd*c.ElemBytes()))
			want := refAttention(q, func(p int) []float32 { return kv[p][0] }, func(p int) []float32 { return kv[p][1] }, pos, tc.heads, tc.kvHeads, tc.hd)
			var big float64
			for _, v := range want {
				big = max(big, math.Abs(float64(v)))
			}
			step := map[string]float64{"float32": 0, "float16": 1.0 / 1024, "bfloat16": 1.0 / 128}[tc.dtype]
			for i := range want {
				lim := 2e-6*big + step*math.Abs(float64(want[i]))
				if diff := math.Abs(float64(got[i]) - float64(want[i])); !(diff <= lim) {
					t.Fatalf("query %d head %d element %d: kernel %g, CPU %g (|diff| %g > %g)", i/qd, (i%qd)/tc.hd, i%tc.hd, got[i], want[i], diff, lim)
				}
			}
		})
	}
}

// TestUploadFwdWeightsRefusals: weights over the memory limit are refused
// before anything is allocated, with an error naming the option; missing
// tensors (a WeightsKV load) are named and what was uploaded is freed; a
// pass over more layers than are loaded, or a head dim the attention kernel
// is not built for, is refused.
func TestUploadFwdWeightsRefusals(t *testing.T) {
	c := variant(t, "tiny-llama", nil)
	w := model.Synthesize(c, 1)
	mem := newHostMem()
	need := fwdWeightBytes(c, 2) + 2*int64(2*c.KVDim()*c.HiddenSize*c.ElemBytes()+2*c.KVDim()*4)
	_, err := uploadFwdWeights(mem, c, w, 2, need-1, nil, nil)
	if !errors.Is(err, ErrRecomputeMemory) || !strings.Contains(err.Error(), "RecomputeMemory") {
		t.Fatalf("over the limit: %v", err)
	}
	if len(mem.bufs) != 0 {
		t.Fatalf("a refused upload left %d allocations", len(mem.bufs))
	}
	fw, err := uploadFwdWeights(mem, c, w, 2, need, nil, nil)
	if err != nil {
		t.Fatalf("at the limit: %v", err)
	}
	if fw.bytes > need {
		t.Fatalf("uploaded %d bytes, counted %d", fw.bytes, need)
	}
	fw.release(mem)
	if len(mem.bufs) != 0 {
		t.Fatalf("release left %d allocations", len(mem.bufs))
	}
	kvOnly := *w
	kvOnly.Layers = append([]model.LayerWeights(nil), w.Layers...)
	kvOnly.Layers[1].Wup = nil
	if _, err := uploadFwdWeights(mem, c, &kvOnly, 2, 1<<40, nil, nil); err == nil || !strings.Contains(err.Error(), "layer 1 gate/up") {
		t.Fatalf("missing up_proj: %v", err)
	}
	if len(mem.bufs) != 0 {
		t.Fatalf("a failed upload left %d allocations", len(mem.bufs))
	}
	mem.limit = 1 << 10
	if _, err := uploadFwdWeights(mem, c, w, 2, 1<<40, nil, nil); err == nil || !strings.Contains(err.Error(), "embed_tokens") {
		t.Fatalf("an allocation failure: %v", err)
	}
	mem.limit = 0
	if _, err := uploadFwdWeights(mem, c, w, c.Layers+1, 1<<40, nil, nil); err == nil {
		t.Fatal("more layers than the model has: accepted")
	}
	if _, err := uploadFwdWeights(mem, c, w, 1, 1<<40, []uintptr{0}, []uintptr{0}); err == nil || !strings.Contains(err.Error(), "not on the device") {
		t.Fatalf("K/V weights absent: %v", err)
	}

	fw, err = uploadFwdWeights(mem, c, w, 2, 1<<40, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	p := &fwdPass{cfg: c, dtype: hcF16, threads: 32, w: fw, scr: &fwdScratch{}, ops: &hostOps{mem: mem, cfg: c}}
	tgt := fwdTarget{k: []uintptr{1}, v: []uintptr{1}, layerMap: func(l int) int { return l }}
	if err := p.run(4, 1, 1, 1, 3, tgt); err == nil || !strings.Contains(err.Error(), "2 are on the device") {
		t.Fatalf("3 layers with 2 loaded: %v", err)
	}
	c48 := *c
	c48.HeadDim, c48.Heads, c48.KVHeads = 48, 2, 2
	p.cfg = &c48
	if err := p.run(4, 1, 1, 1, 1, tgt); err == nil || !strings.Contains(err.Error(), "head_dim 48") {
		t.Fatalf("head_dim 48: %v", err)
	}
}

// TestRecomputeRefusals: Restore.Recompute checks its arguments before
// touching the device: tokens one per position, positions 0..n-1, ids inside
// the vocabulary, layers loaded; the first error sticks to the restore.
func TestRecomputeRefusals(t *testing.T) {
	c := variant(t, "tiny-llama", nil)
	b := &Backend{cfg: c}
	if l, by := b.RecomputeLayers(); l != 0 || by != 0 {
		t.Fatalf("nothing loaded: %d layers, %d bytes", l, by)
	}
	if err := b.LoadRecompute(nil, 1); err == nil {
		t.Fatal("LoadRecompute(nil): accepted")
	}
	for _, tc := range []struct {
		name     string
		r        *Restore
		tokens   []int
		layers   int
		contains string
	}{
		{"token count", &Restore{b: b, n: 4, fromZero: true}, []int{1, 2, 3}, 1, "3 tokens in a restore of 4"},
		{"positions", &Restore{b: b, n: 3}, []int{1, 2, 3}, 1, "0..n-1"},
		{"vocabulary", &Restore{b: b, n: 3, fromZero: true}, []int{1, c.Vocab, 3}, 1, "token 256 (at 1) is outside"},
		{"negative id", &Restore{b: b, n: 2, fromZero: true}, []int{-1, 0}, 1, "token -1 (at 0)"},
		{"not loaded", &Restore{b: b, n: 2, fromZero: true}, []int{0, 1}, 2, "LoadRecompute put 0"},
		{"ended", &Restore{b: b, n: 2, fromZero: true, ended: true}, []int{0, 1}, 1, errEnded.Error()},
	} {
		err := tc.r.Recompute(tc.tokens, tc.layers, nil)
		if err == nil || !strings.Contains(err.Error(), tc.contains) {
			t.Errorf("%s: %v, want an error containing %q", tc.name, err, tc.contains)
			continue
		}
		if !tc.r.ended {
			if err2 := tc.r.Recompute([]int{0, 1}, 1, nil); err2 != err {
				t.Errorf("%s: the next call got %v, not the restore's first error", tc.name, err2)
			}
		}
	}
	b.fwd = &fwdWeights{layers: make([]fwdLayer, 3), bytes: 123}
	if l, by := b.RecomputeLayers(); l != 3 || by != 123 {
		t.Fatalf("RecomputeLayers: %d, %d", l, by)
	}
	if err := (&Restore{b: b, n: 2, fromZero: true}).Recompute([]int{0, 1}, 4, nil); err == nil || !strings.Contains(err.Error(), "LoadRecompute put 3") {
		t.Fatalf("4 layers with 3 loaded: %v", err)
	}
}

// TestCheckRecomputeWithoutDevice: the device check refuses bad arguments
// and, on a machine without CUDA, says so with ErrNoDevice.
func TestCheckRecomputeWithoutDevice(t *testing.T) {
	c := variant(t, "tiny-llama", nil)
	for _, a := range [][3]int{{0, 1, 16}, {8, 0, 16}, {8, c.Layers + 1, 16}, {8, 1, 0}} {
		if _, err := CheckRecompute(c, 1, a[0], a[1], a[2], Options{}); err == nil || errors.Is(err, ErrNoDevice) {
			t.Errorf("CheckRecompute(tokens %d, layers %d, block %d): %v, want an argument error", a[0], a[1], a[2], err)
		}
	}
	if _, _, err := Probe(""); err == nil {
		t.Skip("a CUDA device is present: the GPU check runs CheckRecompute")
	}
	if _, err := CheckRecompute(c, 1, 8, 2, 16, Options{}); !errors.Is(err, ErrNoDevice) {
		t.Fatalf("without a device: %v, want ErrNoDevice", err)
	}
}
