package cuda

import (
	"errors"
	"fmt"
	"slices"
	"time"
	"unsafe"

	"github.com/hcache/hcache/gpu"
	"github.com/hcache/hcache/state"
	"github.com/hcache/hcache/state/codec"
)

// Restore is one context's restore into a device cache in progress: layers
// are submitted in any order with Hidden, KV or Encoded (each returns once
// its work is queued), and Wait ends it. Each Restore runs on a lane of its
// own (streams, cuBLAS handle, staging slots); up to Options.Restores run
// on a Backend at once.
type Restore struct {
	b          *Backend
	c          *Cache
	lane       *lane
	rope       *ropeTable
	n          int
	maxPos     int
	slot       int // bytes per staging slot
	k          int // layers submitted through the staging slots
	recomputed int // layers Recompute queued
	encoded    int // layers decoded on the device
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

// Concurrency implements gpu.Backend: Options.Restores restores run on a
// Backend at once, each on its own lane; BeginRestore and Begin wait while
// all lanes are in use.
func (b *Backend) Concurrency() int { return b.opts.Restores }

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

// Begin starts a restore of the tokens at positions into c on a lane of
// its own; it waits while Options.Restores restores are in progress.
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
	r := &Restore{b: b, c: c, n: len(positions), maxPos: maxPos, t0: time.Now(), layerMap: func(l int) int { return l }, fromZero: fromZero}
	err := b.with(func() error {
		l, err := b.acquireLane()
		if err != nil {
			return err
		}
		r.lane = l
		b.mu.Lock()
		if err := b.live(); err != nil {
			b.mu.Unlock()
			return err
		}
		if !b.caches[c] {
			b.mu.Unlock()
			return errors.New("cuda: Begin on a freed cache")
		}
		var made bool
		r.rope, made, err = b.holdRope(maxPos + 1)
		b.mu.Unlock()
		if err != nil {
			return err
		}
		if err := l.ensure(b, len(positions)); err != nil {
			return err
		}
		host := make([]int32, len(positions))
		for i, p := range positions {
			host[i] = int32(p)
		}
		// On the lane's compute stream, ahead of every kernel that reads
		// them (from pageable memory: each call returns once its bytes are
		// staged). No device-wide synchronisation: other lanes' restores
		// keep running.
		if err := b.ops.copyAsync(l.pos.ptr, i32bytes(host), l.compS); err != nil {
			return err
		}
		if err := b.ops.copyAsync(l.bad.ptr, make([]byte, 4), l.compS); err != nil {
			return err
		}
		r.slot = b.slotBytes(len(positions))
		for _, e := range []*uintptr{&r.start, &r.end} {
			if *e, err = b.ops.newEvent(true); err != nil {
				return err
			}
		}
		if made {
			// A new RoPE table went up by a synchronous copy from pageable
			// memory, which the non-blocking streams do not wait for.
			if err := b.sync(); err != nil {
				return err
			}
		}
		return b.ops.record(r.start, l.copyS)
	})
	if err != nil {
		b.with(func() error {
			for _, e := range []uintptr{r.start, r.end} {
				if e != 0 {
					b.ops.destroyEvent(e)
				}
			}
			b.mu.Lock()
			b.dropRope(r.rope)
			b.mu.Unlock()
			return nil
		})
		if r.lane != nil {
			b.releaseLane(r.lane)
		}
		return nil, err
	}
	r.rel, r.relDone = make(chan relItem, 64), make(chan struct{})
	go r.releaser()
	return r, nil
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
				r.b.ops.syncEvent(it.ev)
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
	return r.submit(layer, rows, release, kindHidden, state.CodecNone)
}

// KV queues one layer saved as KV: rows ([tokens x 2 x kv_dim], K then V per
// token) are copied and scattered into the cache.
func (r *Restore) KV(layer int, rows []byte, release func()) error {
	return r.submit(layer, rows, release, kindKV, state.CodecNone)
}

// DecodesOnDevice implements gpu.DeviceDecoder: rows under the fp8 codecs
// are copied as stored and decoded on the device (hc_fp8_dequant).
func (r *Restore) DecodesOnDevice(cd state.Codec) bool {
	return slices.Contains(deviceCodecs, cd)
}

// Encoded implements gpu.DeviceDecoder: it queues one layer stored under
// codec cd (rows as stored: state/codec's rows of a hidden or KV layer).
// The copy moves the encoded bytes into a staging slot; on the compute
// stream hc_fp8_dequant decodes them into the model dtype, and the layer
// goes on as Hidden or KV would (GEMM, RoPE and scatter; or scatter). Rows
// that are not an encoding (a NaN code, a bad scale) make Wait fail.
func (r *Restore) Encoded(layer int, kind state.LayerKind, cd state.Codec, rows []byte, release func()) error {
	if !r.DecodesOnDevice(cd) {
		err := fmt.Errorf("cuda: layer %d: no device decode for codec %s", layer, cd)
		if release != nil {
			release()
		}
		if r.err == nil {
			r.err = err
		}
		return err
	}
	switch kind {
	case state.LayerHidden:
		return r.submit(layer, rows, release, kindHidden, cd)
	case state.LayerKV:
		return r.submit(layer, rows, release, kindKV, cd)
	}
	if release != nil {
		release()
	}
	return fmt.Errorf("cuda: layer %d: nothing is stored for a %s layer", layer, kind)
}

// Copy queues only the host-to-device copy of rows (a benchmark's
// copy-only baseline: the same bytes moved, nothing computed).
func (r *Restore) Copy(rows []byte, release func()) error {
	return r.submit(0, rows, release, kindCopy, state.CodecNone)
}

const (
	kindHidden = iota
	kindKV
	kindCopy
)

func (r *Restore) submit(layer int, rows []byte, release func(), kind int, cd state.Codec) (err error) {
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
	want := r.n * codec.HiddenRowBytes(cd, cfg.DType, cfg.HiddenSize)
	if kind == kindKV {
		want = r.n * codec.KVRowBytes(cd, cfg.DType, cfg.KVDim())
	}
	if kind == kindCopy && len(rows) <= r.slot {
		want = len(rows)
	}
	if len(rows) != want {
		if cd != state.CodecNone {
			return fmt.Errorf("cuda: layer %d: %d bytes of rows under codec %s for %d tokens, want %d", layer, len(rows), cd, r.n, want)
		}
		return fmt.Errorf("cuda: layer %d: %d bytes of rows for %d tokens, want %d", layer, len(rows), r.n, want)
	}
	return b.with(func() error {
		o, ln := b.ops, r.lane
		if cd != state.CodecNone {
			if err := ln.ensureDecode(b, r.n); err != nil {
				return err
			}
		}
		slotIdx := r.k % b.opts.Slots
		sp := ln.staging.ptr + uintptr(slotIdx*r.slot)
		if r.k >= b.opts.Slots {
			// The slot's previous layer must have been consumed.
			if err := o.waitEvent(ln.copyS, r.done[r.k-b.opts.Slots]); err != nil {
				return err
			}
		}
		cp, err := b.event()
		if err != nil {
			return err
		}
		r.copied = append(r.copied, cp)
		if err := o.copyAsync(sp, rows, ln.copyS); err != nil {
			return err
		}
		if err := o.record(cp, ln.copyS); err != nil {
			// The copy is queued: the rows go back only once it is done.
			o.syncStream(ln.copyS)
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
		stream := ln.compS
		src := sp
		if kind != kindCopy {
			if err := o.waitEvent(ln.compS, cp); err != nil {
				return err
			}
			if cd != state.CodecNone {
				if err := r.launchDequant(kind, cd, sp); err != nil {
					return err
				}
				src = ln.dec.ptr
				r.encoded++
			}
		}
		switch kind {
		case kindCopy:
			stream = ln.copyS
		case kindHidden:
			if err := r.gemm(layer, src); err != nil {
				return err
			}
			if err := r.launchProject(layer, li); err != nil {
				return err
			}
		case kindKV:
			if err := r.launchKV(li, src); err != nil {
				return err
			}
		}
		return o.record(dn, stream)
	})
}

// gemm computes out[n x 2kvd] = rows[n x hidden] . W[2kvd x hidden]^T in
// float32. cuBLAS is column-major: C (2kvd x n) = op(A) . B with A the
// weights seen as hidden x 2kvd (transposed) and B the rows seen as
// hidden x n.
func (r *Restore) gemm(layer int, rows uintptr) error {
	b, cfg := r.b, r.b.cfg
	return b.ops.gemm(r.lane.blas, fwdGemm{m: 2 * cfg.KVDim(), n: r.n, k: cfg.HiddenSize, w: b.weights[layer], x: rows,
		out: r.lane.gemm.ptr, what: fmt.Sprintf("layer %d", layer)})
}

// dequantArgs are hc_fp8_dequant's parameters (kernels/codec.cu).
type dequantArgs struct {
	src, dst                                          uint64
	nseg, segs, vals, block, segBytes, rowBytes, dtyp int32
	bad                                               uint64
}

// params are hc_fp8_dequant's parameters, one pointer each, in order.
func (a *dequantArgs) params() []unsafe.Pointer {
	return []unsafe.Pointer{unsafe.Pointer(&a.src), unsafe.Pointer(&a.dst), unsafe.Pointer(&a.nseg), unsafe.Pointer(&a.segs),
		unsafe.Pointer(&a.vals), unsafe.Pointer(&a.block), unsafe.Pointer(&a.segBytes), unsafe.Pointer(&a.rowBytes),
		unsafe.Pointer(&a.dtyp), unsafe.Pointer(&a.bad)}
}

// newDequantArgs describes n rows of a layer under cd at src decoded to dst:
// a hidden row is one segment of hidden_size values, a KV row K then V
// segments of kv_dim values (as serve's host decode reads them).
func newDequantArgs(cfgDType string, hidden, kvDim int, dtype int, kind int, cd state.Codec, n int, src, dst, bad uintptr) *dequantArgs {
	segs, vals := 1, hidden
	if kind == kindKV {
		segs, vals = 2, kvDim
	}
	block := vals
	if cd == state.CodecFP8Block {
		block = codec.BlockSize
	}
	return &dequantArgs{src: uint64(src), dst: uint64(dst), nseg: int32(n * segs), segs: int32(segs), vals: int32(vals),
		block: int32(block), segBytes: int32(codec.SegmentBytes(cd, cfgDType, vals)),
		rowBytes: int32(codec.RowBytes(cd, cfgDType, segs, vals)), dtyp: int32(dtype), bad: uint64(bad)}
}

// launchDequant decodes the rows in a staging slot into the lane's decode
// buffer, one block per segment, on the compute stream.
func (r *Restore) launchDequant(kind int, cd state.Codec, src uintptr) error {
	b, cfg := r.b, r.b.cfg
	a := newDequantArgs(cfg.DType, cfg.HiddenSize, cfg.KVDim(), b.dtype, kind, cd, r.n, src, r.lane.dec.ptr, r.lane.bad.ptr)
	return r.launch(b.fDeq, "hc_fp8_dequant", int(a.nseg), a.params(), a)
}

type projectArgs struct {
	gemm, bias, rope, pos, table      uint64
	n, nblocks, bt, kvh, hd, il, dtyp int32
	k, v                              uint64
}

func (r *Restore) launchProject(layer, li int) error {
	b, cfg := r.b, r.b.cfg
	a := &projectArgs{
		gemm: uint64(r.lane.gemm.ptr), bias: uint64(b.biases[layer]), pos: uint64(r.lane.pos.ptr), table: uint64(r.c.table),
		n: int32(r.n), nblocks: int32(len(r.c.hostTable)), bt: int32(r.c.BlockTokens),
		kvh: int32(cfg.KVHeads), hd: int32(cfg.HeadDim), dtyp: int32(b.dtype),
		k: uint64(r.c.K[li]), v: uint64(r.c.V[li]),
	}
	if cfg.UsesRope() {
		a.rope = uint64(r.rope.devPtr())
	}
	if cfg.RotaryInterleaved {
		a.il = 1
	}
	return r.launch(b.fProj, "hc_project_scatter", r.n, a.params(), a)
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
		rows: uint64(rows), pos: uint64(r.lane.pos.ptr), table: uint64(r.c.table),
		n: int32(r.n), nblocks: int32(len(r.c.hostTable)), bt: int32(r.c.BlockTokens),
		rwords: int32(cfg.KVDim() * cfg.ElemBytes() / 4),
		k:      uint64(r.c.K[li]), v: uint64(r.c.V[li]),
	}
	return r.launch(b.fKV, "hc_kv_scatter", r.n, a.params(), a)
}

// params are hc_kv_scatter's parameters, one pointer each, in order.
func (a *kvArgs) params() []unsafe.Pointer {
	return []unsafe.Pointer{
		unsafe.Pointer(&a.rows), unsafe.Pointer(&a.pos), unsafe.Pointer(&a.table), unsafe.Pointer(&a.n),
		unsafe.Pointer(&a.nblocks), unsafe.Pointer(&a.bt), unsafe.Pointer(&a.rwords),
		unsafe.Pointer(&a.k), unsafe.Pointer(&a.v),
	}
}

// launch runs a kernel of grid blocks (one per token, or per segment) on the
// lane's compute stream.
func (r *Restore) launch(f uintptr, name string, grid int, params []unsafe.Pointer, keep any) error {
	return r.b.ops.launch(r.lane.compS, kLaunch{fn: f, name: name, grid: grid, threads: r.b.opts.Threads, params: params, keep: keep})
}

// Wait ends the restore: it waits for every queued copy and kernel, for
// every release to have been called, and hands the lane back for the next
// restore. It returns the first error of the restore.
func (r *Restore) Wait() (Timing, error) {
	if r.ended {
		return Timing{}, errEnded
	}
	r.ended = true
	b, ln := r.b, r.lane
	t := Timing{Layers: r.k + r.recomputed, Bytes: r.bytes}
	err := b.with(func() error {
		o := b.ops
		// The end event follows everything on both streams.
		last, err := b.event()
		if err != nil {
			return err
		}
		defer b.putEvents(last)
		if err := o.record(last, ln.copyS); err != nil {
			return err
		}
		if err := o.waitEvent(ln.compS, last); err != nil {
			return err
		}
		if err := o.record(r.end, ln.compS); err != nil {
			return err
		}
		if err := o.syncEvent(r.end); err != nil {
			return fmt.Errorf("cuda: restore on the device: %w", err)
		}
		if d, err := o.elapsed(r.start, r.end); err == nil {
			t.GPU = d
		}
		if r.encoded > 0 {
			bad := make([]byte, 4)
			if err := b.dtoh(bad, ln.bad.ptr); err != nil {
				return err
			}
			if bad[0]|bad[1]|bad[2]|bad[3] != 0 {
				return errors.New("cuda: rows stored under an fp8 codec hold a NaN code or a negative or non-finite scale: not an encoding (the dequantize kernel flagged them)")
			}
		}
		return nil
	})
	close(r.rel)
	<-r.relDone
	b.with(func() error {
		if err != nil {
			// Whatever is still queued must finish before the lane's
			// buffers are reused.
			b.sync()
		}
		b.putEvents(r.copied...)
		b.putEvents(r.done...)
		b.ops.destroyEvent(r.start)
		b.ops.destroyEvent(r.end)
		b.mu.Lock()
		b.dropRope(r.rope)
		b.mu.Unlock()
		return nil
	})
	t.Wall = time.Since(r.t0)
	b.releaseLane(ln)
	if r.err != nil {
		return t, r.err
	}
	return t, err
}
