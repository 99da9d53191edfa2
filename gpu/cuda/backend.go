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
	// Restores is how many restores run on the backend at once, each with
	// its own pair of streams, cuBLAS handle and staging buffers (a lane);
	// Begin waits while all are in use (default DefaultRestores, at most
	// MaxRestores).
	Restores int
	// RestoreMemory is the most device memory, in bytes, the restore lanes
	// may hold together (staging slots, GEMM outputs, decoded rows,
	// recompute buffers); a restore that would need more is refused with
	// ErrRestoreMemory. Default: a quarter of the device's memory.
	RestoreMemory int64
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
// biases, RoPE table, kernels, and up to Options.Restores lanes (streams,
// cuBLAS handle, buffers), one per restore in progress: that many restores
// run on it at once, side by side on their own streams.
type Backend struct {
	d        *driver // nil when ops is a host model (tests)
	ops      devOps
	cfg      *model.Config
	opts     Options
	ctx      uintptr
	dev      int32
	devName  string
	mod      uintptr
	codecMod uintptr
	fProj    uintptr
	fKV      uintptr
	fDeq     uintptr // hc_fp8_dequant
	dtype    int     // hc* code of the cache dtype
	gemmT    int     // cuda data type of the GEMM inputs
	weights  []uintptr
	biases   []uintptr
	invFreq  []float32
	alpha    float32 // GEMM scalars, read by cuBLAS from host memory
	beta     float32

	laneSem chan struct{} // one token per restore in progress (cap Restores)
	excl    sync.Mutex    // serialises exclusive()

	mu        sync.Mutex // guards what follows
	rope      *ropeTable // [n x head_dim/2 x 2] float32 cos, sin
	events    []uintptr  // pool of timing-free events
	idle      []*lane    // lanes no restore holds
	lanesMade int
	laneBytes int64 // device memory the lanes hold
	closed    bool
	caches    map[*Cache]bool // live caches, freed by Close
	memory    int64           // the device's total memory

	fwdFns [numFwdKernels]uintptr // the forward-pass kernels
	fwd    *fwdWeights            // LoadRecompute's weights (changed only under exclusive)
}

type devBuf struct {
	ptr  uintptr
	size int
}

// Open loads CUDA, selects the device and uploads w's K/V weights (w needs
// only the model.WeightsKV set).
func Open(c *model.Config, w *model.Weights, o Options) (*Backend, error) {
	b, err := newBackend(c, w, o)
	if err != nil {
		return nil, err
	}
	d, err := loadDriver(o.CublasPath)
	if err != nil {
		return nil, err
	}
	b.d = d
	b.ops = cudaOps{b}
	if err := b.init(w); err != nil {
		b.Close()
		return nil, err
	}
	return b, nil
}

// newBackend checks the options and the model and fills in the defaults;
// nothing touches a device.
func newBackend(c *model.Config, w *model.Weights, o Options) (*Backend, error) {
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
	if o.Restores == 0 {
		o.Restores = DefaultRestores
	}
	if o.Restores < 1 || o.Restores > MaxRestores {
		return nil, fmt.Errorf("cuda: Restores %d: between 1 and %d", o.Restores, MaxRestores)
	}
	if o.RestoreMemory < 0 || o.RecomputeMemory < 0 {
		return nil, fmt.Errorf("cuda: RestoreMemory %d, RecomputeMemory %d: negative", o.RestoreMemory, o.RecomputeMemory)
	}
	if len(w.Layers) != c.Layers {
		return nil, fmt.Errorf("cuda: weights have %d layers, config %d", len(w.Layers), c.Layers)
	}
	b := &Backend{cfg: c, opts: o, invFreq: c.InvFreq(), alpha: 1, laneSem: make(chan struct{}, o.Restores)}
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
	cptx := append(append([]byte(nil), codecPTX...), 0)
	if err := d.check("cuModuleLoadData codec", d.call("cuModuleLoadData", ptr(&b.codecMod), bptr(cptx))); err != nil {
		return fmt.Errorf("%w: the driver cannot load the codec kernel's PTX: %v", ErrNoDevice, err)
	}
	runtime.KeepAlive(cptx)
	dname := append([]byte("hc_fp8_dequant"), 0)
	err := d.check("cuModuleGetFunction hc_fp8_dequant", d.call("cuModuleGetFunction", ptr(&b.fDeq), b.codecMod, bptr(dname)))
	runtime.KeepAlive(dname)
	if err != nil {
		return err
	}
	// One lane now, so that a missing cuBLAS shows at Open.
	l, err := b.newLane(0)
	if err != nil {
		return err
	}
	b.idle, b.lanesMade = []*lane{l}, 1
	if err := b.uploadWeights(w); err != nil {
		return err
	}
	return b.sync()
}

// sync waits for everything queued on the device, synchronous copies from
// pageable memory included (they may return before their DMA lands, and the
// restore streams do not wait for the legacy stream). Call on a locked
// thread with the context current.
func (b *Backend) sync() error { return b.ops.syncAll() }

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

// alloc and htod run with the context current on a locked thread (inside
// with).
func (b *Backend) alloc(n int) (uintptr, error)       { return b.ops.alloc(n) }
func (b *Backend) free(p uintptr)                     { b.ops.free(p) }
func (b *Backend) htod(dst uintptr, src []byte) error { return b.ops.htod(dst, src) }
func (b *Backend) dtoh(dst []byte, src uintptr) error { return b.ops.dtoh(dst, src) }

// with runs fn on a locked OS thread with the backend's context current.
func (b *Backend) with(fn func() error) error { return b.ops.with(fn) }

// HostRegister page-locks host memory for the copy engine
// (cuMemHostRegister): the store's ReadBuffers hook, so restore buffers are
// pinned once and copied from directly.
func (b *Backend) HostRegister(mem []byte) error {
	if len(mem) == 0 || b.d == nil {
		return nil
	}
	return b.with(func() error {
		return b.d.check("cuMemHostRegister", b.d.call("cuMemHostRegister_v2", bptr(mem), uintptr(len(mem)), 0))
	})
}

// HostUnregister undoes HostRegister.
func (b *Backend) HostUnregister(mem []byte) {
	if len(mem) == 0 || b.d == nil {
		return
	}
	b.with(func() error {
		b.d.call("cuMemHostUnregister", bptr(mem))
		return nil
	})
}

// Close frees everything Open made. Restores in flight must have ended.
func (b *Backend) Close() error {
	if b == nil || b.ops == nil {
		return nil
	}
	done := b.exclusive()
	defer done()
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return nil
	}
	b.closed = true
	b.mu.Unlock()
	if b.d != nil && b.ctx == 0 {
		return nil
	}
	return b.with(func() error {
		b.sync()
		b.mu.Lock()
		caches, lanes := b.caches, b.idle
		b.caches, b.idle = nil, nil
		b.mu.Unlock()
		for c := range caches {
			c.release()
		}
		for _, l := range lanes {
			l.release(b)
		}
		for _, p := range b.weights {
			b.free(p)
		}
		for _, p := range b.biases {
			b.free(p)
		}
		if b.fwd != nil {
			b.fwd.release(b)
		}
		if b.rope != nil {
			b.free(b.rope.ptr)
			b.rope = nil
		}
		for _, e := range b.events {
			b.ops.destroyEvent(e)
		}
		b.events = nil
		if d := b.d; d != nil {
			if b.mod != 0 {
				d.call("cuModuleUnload", b.mod)
			}
			if b.codecMod != 0 {
				d.call("cuModuleUnload", b.codecMod)
			}
			d.call("cuDevicePrimaryCtxRelease_v2", uintptr(b.dev))
		}
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

// event takes a timing-free event from the pool (or makes one). Call inside
// with.
func (b *Backend) event() (uintptr, error) {
	b.mu.Lock()
	if n := len(b.events); n > 0 {
		e := b.events[n-1]
		b.events = b.events[:n-1]
		b.mu.Unlock()
		return e, nil
	}
	b.mu.Unlock()
	return b.ops.newEvent(false)
}

// putEvents hands events back to the pool.
func (b *Backend) putEvents(evs ...uintptr) {
	b.mu.Lock()
	b.events = append(b.events, evs...)
	b.mu.Unlock()
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
