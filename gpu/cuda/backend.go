package cuda

import (
	_ "embed"
	"errors"
	"fmt"
	"math"
	"runtime"
	"sync"
	"unsafe"

	"github.com/hcache/hcache/gpu"
	"github.com/hcache/hcache/model"
)

//go:generate sh -c "clang-19 -x cuda --cuda-device-only --cuda-gpu-arch=sm_80 -nocudainc -nocudalib -O3 -ffp-contract=off -S -o kernels/hcache.ptx kernels/hcache.cu"

//go:embed kernels/hcache.ptx
var kernelPTX []byte

// Options configure a Backend. Zero values take the defaults.
type Options struct {
	// CublasPath is an explicit libcublas path, tried first (then
	// $HCACHE_CUBLAS, the loader's search, CublasSearchDirs).
	CublasPath string
	// Device is the CUDA device ordinal (default 0).
	Device int
	// Slots is the number of device staging buffers, so the number of
	// layers in flight between the copy and compute streams (default 3,
	// at least 2).
	Slots int
	// Threads per block of the scatter kernels (default 256).
	Threads int
	// RecomputeMemory is the most device memory, in bytes, that
	// LoadRecompute may put on the device for the recomputed prefix (the
	// embeddings and the first layers' attention, MLP and norm weights;
	// the K/V weights are the backend's own). Default: half the device's
	// memory.
	RecomputeMemory int64
}

// Defaults.
const (
	DefaultSlots   = 3
	MaxSlots       = 64
	DefaultThreads = 256
)

// cuBLAS and CUDA enum values used.
const (
	cublasOpN        = 0
	cublasOpT        = 1
	cudaR32F         = 0
	cudaR16F         = 2
	cudaR16BF        = 14
	cublasCompute32F = 68
	gemmAlgoDefault  = ^uintptr(0) // CUBLAS_GEMM_DEFAULT (-1) as a register value
	eventNoTiming    = 2
	streamNonBlock   = 1
	hcF16, hcBF16    = 0, 1
	hcF32            = 2
)

// Backend is a model's projection state on one GPU: its K/V weights (uploaded
// once, as one [2 x kv_dim, hidden] matrix per layer in the model dtype),
// biases, RoPE table, streams, cuBLAS handle and kernels. One restore runs
// on it at a time (Begin waits for the previous one to end).
type Backend struct {
	d       *driver
	cfg     *model.Config
	opts    Options
	ctx     uintptr
	dev     int32
	devName string
	mod     uintptr
	fProj   uintptr
	fKV     uintptr
	blas    uintptr
	copyS   uintptr
	compS   uintptr
	dtype   int // hc* code of the cache dtype
	gemmT   int // cuda data type of the GEMM inputs
	weights []uintptr
	biases  []uintptr
	invFreq []float32

	busy    sync.Mutex // held by the Restore in progress
	mu      sync.Mutex // guards what follows
	rope    uintptr    // [ropeLen x head_dim/2 x 2] float32 cos, sin
	ropeLen int
	staging devBuf    // slots x slotBytes
	gemm    devBuf    // [tokens x 2 kv_dim] float32
	events  []uintptr // pool of timing-free events (used under busy)
	pos     uintptr   // device int32 positions of the restore in progress
	posLen  int
	alpha   float32 // GEMM scalars, read by cuBLAS from host memory
	beta    float32
	closed  bool
	caches  map[*Cache]bool // live caches, freed by Close
	memory  int64           // the device's total memory

	fwdFns [numFwdKernels]uintptr // the forward-pass kernels
	fwd    *fwdWeights            // LoadRecompute's weights (under busy)
	fwdScr fwdScratch             // the recompute buffers (under busy)
	toks   devBuf                 // device int32 token ids of a recompute
}

type devBuf struct {
	ptr  uintptr
	size int
}

// Open loads CUDA, selects the device and uploads w's K/V weights (w needs
// only the model.WeightsKV set).
func Open(c *model.Config, w *model.Weights, o Options) (*Backend, error) {
	if c == nil || w == nil {
		return nil, errors.New("cuda: Open needs a config and weights")
	}
	if o.Slots == 0 {
		o.Slots = DefaultSlots
	}
	if o.Slots < 2 || o.Slots > MaxSlots {
		return nil, fmt.Errorf("cuda: Slots %d: between 2 (one copying, one computing) and %d", o.Slots, MaxSlots)
	}
	if o.Threads == 0 {
		o.Threads = DefaultThreads
	}
	if o.Threads < 32 || o.Threads > 1024 || o.Threads%32 != 0 {
		return nil, fmt.Errorf("cuda: Threads %d: a multiple of 32 in [32, 1024]", o.Threads)
	}
	if len(w.Layers) != c.Layers {
		return nil, fmt.Errorf("cuda: weights have %d layers, config %d", len(w.Layers), c.Layers)
	}
	b := &Backend{cfg: c, opts: o, invFreq: c.InvFreq(), alpha: 1}
	switch c.DType {
	case "float16":
		b.dtype, b.gemmT = hcF16, cudaR16F
	case "bfloat16":
		b.dtype, b.gemmT = hcBF16, cudaR16BF
	case "float32":
		b.dtype, b.gemmT = hcF32, cudaR32F
	default:
		return nil, fmt.Errorf("cuda: dtype %q not supported", c.DType)
	}
	if c.KVDim()*c.ElemBytes()%4 != 0 {
		return nil, fmt.Errorf("cuda: a K row of %d bytes is not whole 32-bit words", c.KVDim()*c.ElemBytes())
	}
	if c.HeadDim%2 != 0 {
		return nil, fmt.Errorf("cuda: head_dim %d is odd", c.HeadDim)
	}
	d, err := loadDriver(o.CublasPath)
	if err != nil {
		return nil, err
	}
	b.d = d
	if err := b.init(w); err != nil {
		b.Close()
		return nil, err
	}
	return b, nil
}

func (b *Backend) init(w *model.Weights) error {
	d := b.d
	if err := d.check("cuDeviceGet", d.call("cuDeviceGet", ptr(&b.dev), uintptr(b.opts.Device))); err != nil {
		return fmt.Errorf("%w: device %d: %v", ErrNoDevice, b.opts.Device, err)
	}
	name := make([]byte, 256)
	d.call("cuDeviceGetName", bptr(name), uintptr(len(name)), uintptr(b.dev))
	b.devName = cStringBytes(name)
	d.call("cuDeviceTotalMem_v2", ptr(&b.memory), uintptr(b.dev))
	if err := d.check("cuDevicePrimaryCtxRetain", d.call("cuDevicePrimaryCtxRetain", ptr(&b.ctx), uintptr(b.dev))); err != nil {
		return fmt.Errorf("%w: %v", ErrNoDevice, err)
	}
	if err := d.lockThread(b.ctx); err != nil {
		return err
	}
	defer runtime.UnlockOSThread()
	ptx := append(append([]byte(nil), kernelPTX...), 0)
	if err := d.check("cuModuleLoadData", d.call("cuModuleLoadData", ptr(&b.mod), bptr(ptx))); err != nil {
		return fmt.Errorf("%w: the driver cannot load the kernels' PTX (sm_80, PTX 7.0): %v", ErrNoDevice, err)
	}
	runtime.KeepAlive(ptx)
	for _, k := range []struct {
		name string
		dst  *uintptr
	}{{"hc_project_scatter", &b.fProj}, {"hc_kv_scatter", &b.fKV}} {
		cname := append([]byte(k.name), 0)
		err := d.check("cuModuleGetFunction "+k.name, d.call("cuModuleGetFunction", ptr(k.dst), b.mod, bptr(cname)))
		runtime.KeepAlive(cname)
		if err != nil {
			return err
		}
	}
	for k := range b.fwdFns {
		name := "hc_" + fwdKernelNames[k]
		cname := append([]byte(name), 0)
		err := d.check("cuModuleGetFunction "+name, d.call("cuModuleGetFunction", ptr(&b.fwdFns[k]), b.mod, bptr(cname)))
		runtime.KeepAlive(cname)
		if err != nil {
			return err
		}
	}
	for _, s := range []*uintptr{&b.copyS, &b.compS} {
		if err := d.check("cuStreamCreate", d.call("cuStreamCreate", ptr(s), streamNonBlock)); err != nil {
			return err
		}
	}
	if err := checkBlas("cublasCreate", d.call("cublasCreate_v2", ptr(&b.blas))); err != nil {
		return fmt.Errorf("%w: %s: %v", ErrNoDevice, d.cublasPath, err)
	}
	if err := checkBlas("cublasSetStream", d.call("cublasSetStream_v2", b.blas, b.compS)); err != nil {
		return err
	}
	if err := b.uploadWeights(w); err != nil {
		return err
	}
	return b.sync()
}

// sync waits for everything queued on the device, synchronous copies from
// pageable memory included (they may return before their DMA lands, and the
// restore streams do not wait for the legacy stream). Call on a locked
// thread with the context current.
func (b *Backend) sync() error {
	return b.d.check("cuCtxSynchronize", b.d.call("cuCtxSynchronize"))
}

// Config is the model the backend projects for.
func (b *Backend) Config() *model.Config { return b.cfg }

// live reports an error once the backend is closed. Call with b.mu held.
func (b *Backend) live() error {
	if b.closed {
		return errors.New("cuda: backend closed")
	}
	return nil
}

// uploadWeights writes each layer's [Wk; Wv] in the model dtype (exact: the
// weights are dtype values) and the K||V bias in float32.
func (b *Backend) uploadWeights(w *model.Weights) error {
	c := b.cfg
	kvd, hid := c.KVDim(), c.HiddenSize
	eb := c.ElemBytes()
	host := make([]byte, 2*kvd*hid*eb)
	b.weights = make([]uintptr, c.Layers)
	b.biases = make([]uintptr, c.Layers)
	for l := range w.Layers {
		lw := &w.Layers[l]
		if len(lw.Wk) != kvd*hid || len(lw.Wv) != kvd*hid {
			return fmt.Errorf("cuda: layer %d K/V weights missing or misshapen", l)
		}
		c.EncodeRow(host[:kvd*hid*eb], lw.Wk)
		c.EncodeRow(host[kvd*hid*eb:], lw.Wv)
		p, err := b.alloc(len(host))
		if err != nil {
			return fmt.Errorf("cuda: layer %d weights: %w", l, err)
		}
		b.weights[l] = p
		if err := b.htod(p, host); err != nil {
			return err
		}
		if lw.Bk != nil || lw.Bv != nil {
			bias := make([]float32, 2*kvd)
			copy(bias, lw.Bk)
			copy(bias[kvd:], lw.Bv)
			bp, err := b.alloc(4 * len(bias))
			if err != nil {
				return err
			}
			b.biases[l] = bp
			if err := b.htod(bp, f32bytes(bias)); err != nil {
				return err
			}
		}
	}
	return nil
}

func f32bytes(f []float32) []byte {
	if len(f) == 0 {
		return nil
	}
	return unsafe.Slice((*byte)(unsafe.Pointer(&f[0])), 4*len(f))
}

func cStringBytes(b []byte) string {
	for i, c := range b {
		if c == 0 {
			return string(b[:i])
		}
	}
	return string(b)
}

// Name implements gpu.Backend.
func (b *Backend) Name() string { return "cuda" }

// Device names the GPU.
func (b *Backend) Device() string { return b.devName }

// CublasPath is the cuBLAS library loaded.
func (b *Backend) CublasPath() string { return b.d.cublasPath }

// alloc and htod run with the context current on a locked thread.
func (b *Backend) alloc(n int) (uintptr, error) {
	var p uintptr
	if n == 0 {
		n = 1
	}
	if err := b.d.check(fmt.Sprintf("cuMemAlloc(%d bytes)", n), b.d.call("cuMemAlloc_v2", ptr(&p), uintptr(n))); err != nil {
		return 0, err
	}
	return p, nil
}

func (b *Backend) free(p uintptr) {
	if p != 0 {
		b.d.call("cuMemFree_v2", p)
	}
}

func (b *Backend) htod(dst uintptr, src []byte) error {
	if len(src) == 0 {
		return nil
	}
	err := b.d.check("cuMemcpyHtoD", b.d.call("cuMemcpyHtoD_v2", dst, bptr(src), uintptr(len(src))))
	runtime.KeepAlive(src)
	return err
}

func (b *Backend) dtoh(dst []byte, src uintptr) error {
	if len(dst) == 0 {
		return nil
	}
	err := b.d.check("cuMemcpyDtoH", b.d.call("cuMemcpyDtoH_v2", bptr(dst), src, uintptr(len(dst))))
	runtime.KeepAlive(dst)
	return err
}

// with runs fn on a locked OS thread with the backend's context current.
func (b *Backend) with(fn func() error) error {
	if err := b.d.lockThread(b.ctx); err != nil {
		return err
	}
	defer runtime.UnlockOSThread()
	return fn()
}

// HostRegister page-locks host memory for the copy engine
// (cuMemHostRegister): the store's ReadBuffers hook, so restore buffers are
// pinned once and copied from directly.
func (b *Backend) HostRegister(mem []byte) error {
	if len(mem) == 0 {
		return nil
	}
	return b.with(func() error {
		return b.d.check("cuMemHostRegister", b.d.call("cuMemHostRegister_v2", bptr(mem), uintptr(len(mem)), 0))
	})
}

// HostUnregister undoes HostRegister.
func (b *Backend) HostUnregister(mem []byte) {
	if len(mem) == 0 {
		return
	}
	b.with(func() error {
		b.d.call("cuMemHostUnregister", bptr(mem))
		return nil
	})
}

// Close frees everything Open made. Restores in flight must have ended.
func (b *Backend) Close() error {
	if b == nil || b.d == nil {
		return nil
	}
	b.busy.Lock()
	defer b.busy.Unlock()
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return nil
	}
	b.closed = true
	if b.ctx == 0 {
		return nil
	}
	return b.with(func() error {
		d := b.d
		d.call("cuCtxSynchronize")
		for c := range b.caches {
			c.release()
		}
		b.caches = nil
		for _, p := range b.weights {
			b.free(p)
		}
		for _, p := range b.biases {
			b.free(p)
		}
		if b.fwd != nil {
			b.fwd.release(b)
		}
		b.fwdScr.release(b)
		b.free(b.toks.ptr)
		b.free(b.rope)
		b.free(b.staging.ptr)
		b.free(b.gemm.ptr)
		b.free(b.pos)
		for _, e := range b.events {
			d.call("cuEventDestroy_v2", e)
		}
		if b.blas != 0 {
			d.call("cublasDestroy_v2", b.blas)
		}
		for _, s := range []uintptr{b.copyS, b.compS} {
			if s != 0 {
				d.call("cuStreamDestroy_v2", s)
			}
		}
		if b.mod != 0 {
			d.call("cuModuleUnload", b.mod)
		}
		d.call("cuDevicePrimaryCtxRelease_v2", uintptr(b.dev))
		return nil
	})
}

// RopeTable is the kernels' rotation table for positions [0, n): for each
// position and frequency, cos then sin of the angle, computed as
// tensor.Rope computes them (float32 angle, float64 cos and sin rounded to
// float32).
func RopeTable(invFreq []float32, n int) []float32 {
	half := len(invFreq)
	tab := make([]float32, n*half*2)
	for pos := 0; pos < n; pos++ {
		for i, f := range invFreq {
			ang := float32(pos) * f
			tab[(pos*half+i)*2] = float32(math.Cos(float64(ang)))
			tab[(pos*half+i)*2+1] = float32(math.Sin(float64(ang)))
		}
	}
	return tab
}

// ensureRope makes the cos/sin table cover positions [0, n). The angles are
// computed as tensor.Rope computes them (float32 angle, float64 cos and sin
// rounded to float32), so the kernel rotates with the CPU reference's
// factors. Call with b.mu held on a locked thread.
func (b *Backend) ensureRope(n int) error {
	if !b.cfg.UsesRope() || n <= b.ropeLen {
		return nil
	}
	size := 1024
	for size < n {
		size *= 2
	}
	tab := RopeTable(b.invFreq, size)
	p, err := b.alloc(4 * len(tab))
	if err != nil {
		return err
	}
	if err := b.htod(p, f32bytes(tab)); err != nil {
		b.free(p)
		return err
	}
	b.free(b.rope)
	b.rope, b.ropeLen = p, size
	return nil
}

// ensureBuffers sizes the staging slots and the GEMM output for n tokens.
func (b *Backend) ensureBuffers(n int) error {
	c := b.cfg
	slot := n * max(c.HiddenRowBytes(), c.KVRowBytes())
	slot = (slot + 255) &^ 255
	if need := slot * b.opts.Slots; need > b.staging.size {
		b.free(b.staging.ptr)
		b.staging = devBuf{}
		p, err := b.alloc(need)
		if err != nil {
			return err
		}
		b.staging = devBuf{p, need}
	}
	if need := n * 2 * c.KVDim() * 4; need > b.gemm.size {
		b.free(b.gemm.ptr)
		b.gemm = devBuf{}
		p, err := b.alloc(need)
		if err != nil {
			return err
		}
		b.gemm = devBuf{p, need}
	}
	return nil
}

func (b *Backend) event() (uintptr, error) {
	if n := len(b.events); n > 0 {
		e := b.events[n-1]
		b.events = b.events[:n-1]
		return e, nil
	}
	var e uintptr
	if err := b.d.check("cuEventCreate", b.d.call("cuEventCreate", ptr(&e), eventNoTiming)); err != nil {
		return 0, err
	}
	return e, nil
}

// Project implements gpu.Backend for a host-memory cache: the cache is
// copied to the device, the layer projected and scattered there, and the
// cache copied back. It is the checked, slow path (tests, the CPU-shaped
// serve.Restore); restores into device memory use Begin.
func (b *Backend) Project(layer int, hidden []byte, positions []int, dst *gpu.PagedKV) error {
	return b.hostRoundTrip(layer, hidden, positions, dst, true)
}

// LoadKV implements gpu.Backend like Project.
func (b *Backend) LoadKV(layer int, rows []byte, positions []int, dst *gpu.PagedKV) error {
	return b.hostRoundTrip(layer, rows, positions, dst, false)
}

func (b *Backend) hostRoundTrip(layer int, rows []byte, positions []int, dst *gpu.PagedKV, hidden bool) error {
	if dst == nil {
		return errors.New("cuda: nil destination cache")
	}
	c := b.cfg
	if dst.KVHeads != c.KVHeads || dst.HeadDim != c.HeadDim || dst.ElemBytes != c.ElemBytes() {
		return fmt.Errorf("cuda: destination cache is %d heads x %d x %d bytes, the model %d x %d x %d",
			dst.KVHeads, dst.HeadDim, dst.ElemBytes, c.KVHeads, c.HeadDim, c.ElemBytes())
	}
	bb := dst.BlockTokens * c.KVDim() * c.ElemBytes()
	if bb == 0 || len(dst.K)%bb != 0 || len(dst.V) != len(dst.K) {
		return errors.New("cuda: destination cache K/V sizes are not whole blocks")
	}
	cache, err := b.NewCache(1, len(dst.K)/bb, dst.BlockTokens)
	if err != nil {
		return err
	}
	defer cache.Free()
	if err := cache.SetBlockTable(dst.BlockTable); err != nil {
		return err
	}
	if err := cache.Upload(0, dst.K, dst.V); err != nil {
		return err
	}
	r, err := b.Begin(cache, positions)
	if err != nil {
		return err
	}
	r.layerMap = func(int) int { return 0 }
	if hidden {
		err = r.Hidden(layer, rows, nil)
	} else {
		err = r.KV(layer, rows, nil)
	}
	if _, werr := r.Wait(); err == nil {
		err = werr
	}
	if err != nil {
		return err
	}
	return cache.Download(0, dst.K, dst.V)
}

var _ gpu.Backend = (*Backend)(nil)
