package cuda

import (
	"errors"
	"fmt"
	"runtime"
	"time"
	"unsafe"

	"github.com/hcache/hcache/gpu"
)

// Restore is one context's restore into a device cache in progress: layers
// are submitted in any order with Hidden or KV (each returns once its work
// is queued), and Wait ends it. Only one Restore runs on a Backend at a time.
type Restore struct {
	b          *Backend
	c          *Cache
	n          int
	maxPos     int
	slot       int // bytes per staging slot
	k          int // layers submitted through the staging slots
	recomputed int // layers Recompute queued
	copied     []uintptr
	done       []uintptr
	start      uintptr
	end        uintptr
	rel        chan relItem
	relDone    chan struct{}
	err        error
	bytes      int64
	t0         time.Time
	layerMap   func(int) int
	ended      bool
	fromZero   bool // positions are 0..n-1 (Recompute needs it)
}

type relItem struct {
	ev      uintptr
	release func()
}

// Timing of a finished restore (GPU: first copy queued to last kernel
// done, by device events).
type Timing = gpu.Timing

var errEnded = errors.New("cuda: restore already waited for")

// Concurrency implements gpu.Backend: one restore runs on a Backend at a
// time (its two streams and staging slots are the backend's); BeginRestore
// and Begin wait for the one in progress to end.
func (b *Backend) Concurrency() int { return 1 }

// BeginRestore implements gpu.Backend: a *Cache (device memory) restores
// through Begin, with layers streaming through the copy and compute
// streams; a gpu.HostCache takes the checked host path (Project and LoadKV,
// one synchronous round trip per layer; no recompute).
func (b *Backend) BeginRestore(dst gpu.Cache, positions []int) (gpu.Restore, error) {
	switch c := dst.(type) {
	case *Cache:
		return b.Begin(c, positions)
	case gpu.HostCache:
		if len(c) != b.cfg.Layers {
			return nil, fmt.Errorf("cuda: a %d-layer cache for a %d-layer model", len(c), b.cfg.Layers)
		}
		return &hostRestore{b: b, dst: c, positions: positions, t0: time.Now()}, nil
	}
	return nil, fmt.Errorf("cuda: cannot restore into a %T", dst)
}

// hostRestore is a restore into host memory: each layer a round trip.
type hostRestore struct {
	b         *Backend
	dst       gpu.HostCache
	positions []int
	t0        time.Time
	t         Timing
	err       error
}

func (r *hostRestore) Recompute([]int, int, func(int)) error {
	if r.err == nil {
		r.err = errors.New("cuda: recompute into a host cache is not supported: restore into a device cache (NewCache, WrapCache)")
	}
	return r.err
}

func (r *hostRestore) Hidden(layer int, rows []byte, release func()) error {
	return r.layer(layer, rows, release, true)
}

func (r *hostRestore) KV(layer int, rows []byte, release func()) error {
	return r.layer(layer, rows, release, false)
}

func (r *hostRestore) layer(layer int, rows []byte, release func(), hidden bool) error {
	if release != nil {
		defer release()
	}
	if r.err != nil {
		return r.err
	}
	if layer < 0 || layer >= len(r.dst) {
		r.err = fmt.Errorf("cuda: layer %d out of range [0, %d)", layer, len(r.dst))
		return r.err
	}
	r.err = r.b.hostRoundTrip(layer, rows, r.positions, r.dst[layer], hidden)
	if r.err == nil {
		r.t.Layers++
		r.t.Bytes += int64(len(rows))
	}
	return r.err
}

func (r *hostRestore) Abort() {}

func (r *hostRestore) Wait() (Timing, error) {
	r.t.Wall = time.Since(r.t0)
	return r.t, r.err
}

// Abort implements gpu.Restore: work already queued on the device runs to
// its end (Wait waits for it); nothing else is needed to stop.
func (r *Restore) Abort() {}

// Begin starts a restore of the tokens at positions into c. It waits for a
// restore already running on the backend to end.
func (b *Backend) Begin(c *Cache, positions []int) (*Restore, error) {
	if c == nil || c.b != b {
		return nil, errors.New("cuda: Begin needs a cache of this backend")
	}
	if len(positions) == 0 {
		return nil, errors.New("cuda: Begin with no positions")
	}
	maxPos := 0
	fromZero := true
	for i, p := range positions {
		fromZero = fromZero && p == i
		if p < 0 || p/c.BlockTokens >= len(c.hostTable) {
			return nil, fmt.Errorf("cuda: position %d (token %d) outside the block table (%d blocks of %d tokens)", p, i, len(c.hostTable), c.BlockTokens)
		}
		if p >= b.cfg.MaxPositions {
			return nil, fmt.Errorf("cuda: position %d (token %d) beyond the model's max_position_embeddings %d", p, i, b.cfg.MaxPositions)
		}
		maxPos = max(maxPos, p)
	}
	b.busy.Lock()
	r := &Restore{b: b, c: c, n: len(positions), maxPos: maxPos, t0: time.Now(), layerMap: func(l int) int { return l }, fromZero: fromZero}
	err := b.with(func() error {
		b.mu.Lock()
		defer b.mu.Unlock()
		if err := b.live(); err != nil {
			return err
		}
		if !b.caches[c] {
			return errors.New("cuda: Begin on a freed cache")
		}
		if err := b.ensureRope(maxPos + 1); err != nil {
			return err
		}
		if err := b.ensureBuffers(len(positions)); err != nil {
			return err
		}
		if err := b.ensurePositions(positions); err != nil {
			return err
		}
		cfg := b.cfg
		r.slot = (len(positions)*max(cfg.HiddenRowBytes(), cfg.KVRowBytes()) + 255) &^ 255
		for _, e := range []*uintptr{&r.start, &r.end} {
			if err := b.d.check("cuEventCreate", b.d.call("cuEventCreate", ptr(e), 0)); err != nil {
				return err
			}
		}
		// The uploads above were synchronous copies from pageable memory,
		// which the non-blocking restore streams do not wait for.
		if err := b.sync(); err != nil {
			return err
		}
		return b.d.check("cuEventRecord", b.d.call("cuEventRecord", r.start, b.copyS))
	})
	if err != nil {
		b.with(func() error {
			for _, e := range []uintptr{r.start, r.end} {
				if e != 0 {
					b.d.call("cuEventDestroy_v2", e)
				}
			}
			return nil
		})
		b.busy.Unlock()
		return nil, err
	}
	r.rel, r.relDone = make(chan relItem, 64), make(chan struct{})
	go r.releaser()
	return r, nil
}

func (b *Backend) ensurePositions(positions []int) error {
	host := make([]int32, len(positions))
	for i, p := range positions {
		host[i] = int32(p)
	}
	if len(host) > b.posLen {
		p, err := b.alloc(4 * len(host))
		if err != nil {
			return err
		}
		b.free(b.pos)
		b.pos, b.posLen = p, len(host)
	}
	return b.htod(b.pos, i32bytes(host))
}

// releaser hands host buffers back in submission order once their copies
// have completed.
func (r *Restore) releaser() {
	defer close(r.relDone)
	locked := r.b.with(func() error {
		for it := range r.rel {
			if it.ev != 0 {
				// A failure here is reported by Wait, through the end
				// event; the buffer is released either way.
				r.b.d.call("cuEventSynchronize", it.ev)
			}
			if it.release != nil {
				it.release()
			}
		}
		return nil
	})
	if locked != nil { // could not make the context current: release anyway
		for it := range r.rel {
			if it.release != nil {
				it.release()
			}
		}
	}
}

// Hidden queues one hidden layer: rows ([tokens x hidden] in the model dtype,
// one row per position given to Begin) are copied to the device, projected
// by the layer's K/V weights, rotated and scattered into the cache.
// release (may be nil) is called once the copy has read rows; Hidden calls
// it in every case, errors included.
func (r *Restore) Hidden(layer int, rows []byte, release func()) error {
	return r.submit(layer, rows, release, kindHidden)
}

// KV queues one layer saved as KV: rows ([tokens x 2 x kv_dim], K then V per
// token) are copied and scattered into the cache.
func (r *Restore) KV(layer int, rows []byte, release func()) error {
	return r.submit(layer, rows, release, kindKV)
}

// Copy queues only the host-to-device copy of rows (a benchmark's
// copy-only baseline: the same bytes moved, nothing computed).
func (r *Restore) Copy(rows []byte, release func()) error {
	return r.submit(0, rows, release, kindCopy)
}

const (
	kindHidden = iota
	kindKV
	kindCopy
)

func (r *Restore) submit(layer int, rows []byte, release func(), kind int) (err error) {
	handed := false
	defer func() {
		if !handed && release != nil {
			release()
		}
		if err != nil && r.err == nil {
			r.err = err
		}
	}()
	if r.ended {
		return errEnded
	}
	if r.err != nil {
		return r.err
	}
	b, cfg := r.b, r.b.cfg
	if layer < 0 || layer >= cfg.Layers {
		return fmt.Errorf("cuda: layer %d out of range [0, %d)", layer, cfg.Layers)
	}
	li := r.layerMap(layer)
	if kind != kindCopy && (li < 0 || li >= r.c.Layers) {
		return fmt.Errorf("cuda: layer %d has no place in a %d-layer cache", layer, r.c.Layers)
	}
	want := r.n * cfg.HiddenRowBytes()
	if kind == kindKV {
		want = r.n * cfg.KVRowBytes()
	}
	if kind == kindCopy && len(rows) <= r.slot {
		want = len(rows)
	}
	if len(rows) != want {
		return fmt.Errorf("cuda: layer %d: %d bytes of rows for %d tokens, want %d", layer, len(rows), r.n, want)
	}
	return b.with(func() error {
		d := b.d
		slotIdx := r.k % b.opts.Slots
		sp := b.staging.ptr + uintptr(slotIdx*r.slot)
		if r.k >= b.opts.Slots {
			// The slot's previous layer must have been consumed.
			if err := d.check("cuStreamWaitEvent", d.call("cuStreamWaitEvent", b.copyS, r.done[r.k-b.opts.Slots], 0)); err != nil {
				return err
			}
		}
		cp, err := b.event()
		if err != nil {
			return err
		}
		r.copied = append(r.copied, cp)
		if err := d.check("cuMemcpyHtoDAsync", d.call("cuMemcpyHtoDAsync_v2", sp, bptr(rows), uintptr(len(rows)), b.copyS)); err != nil {
			return err
		}
		if err := d.check("cuEventRecord", d.call("cuEventRecord", cp, b.copyS)); err != nil {
			// The copy is queued: the rows go back only once it is done.
			d.call("cuStreamSynchronize", b.copyS)
			return err
		}
		handed = true
		r.rel <- relItem{cp, release}
		r.bytes += int64(len(rows))
		dn, err := b.event()
		if err != nil {
			return err
		}
		r.done = append(r.done, dn)
		r.k++
		stream := b.compS
		switch kind {
		case kindCopy:
			stream = b.copyS
		case kindHidden:
			if err := d.check("cuStreamWaitEvent", d.call("cuStreamWaitEvent", b.compS, cp, 0)); err != nil {
				return err
			}
			if err := r.gemm(layer, sp); err != nil {
				return err
			}
			if err := r.launchProject(layer, li); err != nil {
				return err
			}
		case kindKV:
			if err := d.check("cuStreamWaitEvent", d.call("cuStreamWaitEvent", b.compS, cp, 0)); err != nil {
				return err
			}
			if err := r.launchKV(li, sp); err != nil {
				return err
			}
		}
		return d.check("cuEventRecord", d.call("cuEventRecord", dn, stream))
	})
}

// gemm computes out[n x 2kvd] = rows[n x hidden] . W[2kvd x hidden]^T in
// float32. cuBLAS is column-major: C (2kvd x n) = op(A) . B with A the
// weights seen as hidden x 2kvd (transposed) and B the rows seen as
// hidden x n.
func (r *Restore) gemm(layer int, rows uintptr) error {
	b, cfg := r.b, r.b.cfg
	m, n, k := 2*cfg.KVDim(), r.n, cfg.HiddenSize
	code := b.d.call("cublasGemmEx", b.blas, cublasOpT, cublasOpN, uintptr(m), uintptr(n), uintptr(k),
		ptr(&b.alpha), b.weights[layer], uintptr(b.gemmT), uintptr(k),
		rows, uintptr(b.gemmT), uintptr(k),
		ptr(&b.beta), b.gemm.ptr, cudaR32F, uintptr(m),
		cublasCompute32F, gemmAlgoDefault)
	return checkBlas(fmt.Sprintf("cublasGemmEx layer %d (%d x %d x %d)", layer, m, n, k), code)
}

type projectArgs struct {
	gemm, bias, rope, pos, table      uint64
	n, nblocks, bt, kvh, hd, il, dtyp int32
	k, v                              uint64
}

func (r *Restore) launchProject(layer, li int) error {
	b, cfg := r.b, r.b.cfg
	a := &projectArgs{
		gemm: uint64(b.gemm.ptr), bias: uint64(b.biases[layer]), pos: uint64(b.pos), table: uint64(r.c.table),
		n: int32(r.n), nblocks: int32(len(r.c.hostTable)), bt: int32(r.c.BlockTokens),
		kvh: int32(cfg.KVHeads), hd: int32(cfg.HeadDim), dtyp: int32(b.dtype),
		k: uint64(r.c.K[li]), v: uint64(r.c.V[li]),
	}
	if cfg.UsesRope() {
		a.rope = uint64(b.rope)
	}
	if cfg.RotaryInterleaved {
		a.il = 1
	}
	return r.launch(b.fProj, "hc_project_scatter", a.params(), a)
}

// params are hc_project_scatter's parameters, one pointer each, in the
// kernel's order (the host build's hc_host_launch_project_scatter reads
// them back the same way).
func (a *projectArgs) params() []unsafe.Pointer {
	return []unsafe.Pointer{
		unsafe.Pointer(&a.gemm), unsafe.Pointer(&a.bias), unsafe.Pointer(&a.rope), unsafe.Pointer(&a.pos),
		unsafe.Pointer(&a.table), unsafe.Pointer(&a.n), unsafe.Pointer(&a.nblocks), unsafe.Pointer(&a.bt),
		unsafe.Pointer(&a.kvh), unsafe.Pointer(&a.hd), unsafe.Pointer(&a.il), unsafe.Pointer(&a.dtyp),
		unsafe.Pointer(&a.k), unsafe.Pointer(&a.v),
	}
}

type kvArgs struct {
	rows, pos, table       uint64
	n, nblocks, bt, rwords int32
	k, v                   uint64
}

func (r *Restore) launchKV(li int, rows uintptr) error {
	b, cfg := r.b, r.b.cfg
	a := &kvArgs{
		rows: uint64(rows), pos: uint64(b.pos), table: uint64(r.c.table),
		n: int32(r.n), nblocks: int32(len(r.c.hostTable)), bt: int32(r.c.BlockTokens),
		rwords: int32(cfg.KVDim() * cfg.ElemBytes() / 4),
		k:      uint64(r.c.K[li]), v: uint64(r.c.V[li]),
	}
	return r.launch(b.fKV, "hc_kv_scatter", a.params(), a)
}

// params are hc_kv_scatter's parameters, one pointer each, in order.
func (a *kvArgs) params() []unsafe.Pointer {
	return []unsafe.Pointer{
		unsafe.Pointer(&a.rows), unsafe.Pointer(&a.pos), unsafe.Pointer(&a.table), unsafe.Pointer(&a.n),
		unsafe.Pointer(&a.nblocks), unsafe.Pointer(&a.bt), unsafe.Pointer(&a.rwords),
		unsafe.Pointer(&a.k), unsafe.Pointer(&a.v),
	}
}

// launch runs a kernel with one block per token on the compute stream.
func (r *Restore) launch(f uintptr, name string, params []unsafe.Pointer, keep any) error {
	b := r.b
	escape(params)
	escape(keep)
	code := b.d.call("cuLaunchKernel", f, uintptr(r.n), 1, 1, uintptr(b.opts.Threads), 1, 1, 0, b.compS,
		uintptr(unsafe.Pointer(&params[0])), 0)
	runtime.KeepAlive(params)
	runtime.KeepAlive(keep)
	return b.d.check("cuLaunchKernel "+name, code)
}

// Wait ends the restore: it waits for every queued copy and kernel, for
// every release to have been called, and frees the backend for the next
// restore. It returns the first error of the restore.
func (r *Restore) Wait() (Timing, error) {
	if r.ended {
		return Timing{}, errEnded
	}
	r.ended = true
	b := r.b
	t := Timing{Layers: r.k + r.recomputed, Bytes: r.bytes}
	err := b.with(func() error {
		d := b.d
		// The end event follows everything on both streams.
		last, err := b.event()
		if err != nil {
			return err
		}
		defer func() { b.events = append(b.events, last) }()
		if err := d.check("cuEventRecord", d.call("cuEventRecord", last, b.copyS)); err != nil {
			return err
		}
		if err := d.check("cuStreamWaitEvent", d.call("cuStreamWaitEvent", b.compS, last, 0)); err != nil {
			return err
		}
		if err := d.check("cuEventRecord", d.call("cuEventRecord", r.end, b.compS)); err != nil {
			return err
		}
		if err := d.check("restore on the device", d.call("cuEventSynchronize", r.end)); err != nil {
			return err
		}
		var ms float32
		if d.call("cuEventElapsedTime", ptr(&ms), r.start, r.end) == 0 {
			t.GPU = time.Duration(float64(ms) * float64(time.Millisecond))
		}
		return nil
	})
	close(r.rel)
	<-r.relDone
	b.with(func() error {
		if err != nil {
			// Whatever is still queued must finish before the next
			// restore reuses the staging buffers.
			b.sync()
		}
		b.mu.Lock()
		defer b.mu.Unlock()
		b.events = append(b.events, r.copied...)
		b.events = append(b.events, r.done...)
		b.d.call("cuEventDestroy_v2", r.start)
		b.d.call("cuEventDestroy_v2", r.end)
		return nil
	})
	t.Wall = time.Since(r.t0)
	b.busy.Unlock()
	if r.err != nil {
		return t, r.err
	}
	return t, err
}
