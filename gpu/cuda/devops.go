package cuda

import (
	"fmt"
	"runtime"
	"time"
	"unsafe"
)

// devOps is everything the restore path asks of the device: memory, streams,
// events, asynchronous copies, kernel launches and GEMMs. On a GPU it is
// cudaOps (the driver and cuBLAS through purego); the host tests put a model
// of streams and events in its place (restore_host_test.go: the host-built
// kernels and a Go GEMM run when a seeded scheduler picks them, in any order
// the events allow), so Begin, Hidden, KV, Recompute and Wait run their real
// code without a GPU, as fwdOps and devMem let the forward pass run.
type devOps interface {
	devMem // alloc, htod (synchronous), free
	dtoh(dst []byte, src uintptr) error
	memset(p uintptr, v byte, n int) error
	// with runs fn where device calls may be made (on a GPU: a locked OS
	// thread with the context current).
	with(fn func() error) error
	// syncAll waits for everything queued on the device.
	syncAll() error
	newStream() (uintptr, error)
	destroyStream(s uintptr)
	syncStream(s uintptr) error
	// newBlas makes a cuBLAS handle whose work runs on stream.
	newBlas(stream uintptr) (uintptr, error)
	destroyBlas(h uintptr)
	// newEvent makes an event; timing events can be measured (elapsed).
	newEvent(timing bool) (uintptr, error)
	destroyEvent(e uintptr)
	record(e, stream uintptr) error
	// waitEvent makes stream's later work wait for e's last record.
	waitEvent(stream, e uintptr) error
	syncEvent(e uintptr) error
	elapsed(e0, e1 uintptr) (time.Duration, error)
	// copyAsync queues a host-to-device copy of src on stream; src must
	// stay unchanged until an event recorded after it has completed.
	copyAsync(dst uintptr, src []byte, stream uintptr) error
	launch(stream uintptr, l kLaunch) error
	// gemm queues out[n x m] (float32) = x[n x k] . w[m x k]^T on the
	// stream blas is bound to.
	gemm(blas uintptr, g fwdGemm) error
}

// kLaunch is one kernel launch: a function of a loaded module (on the host:
// its hc_host_launch_ entry), a one-dimensional grid, and the parameters as
// cuLaunchKernel takes them (one pointer per parameter; keep holds what
// they point into until the launch is queued).
type kLaunch struct {
	fn                   uintptr
	name                 string
	grid, threads, shmem int
	params               []unsafe.Pointer
	keep                 any
}

// cudaOps is devOps on a GPU.
type cudaOps struct {
	b *Backend
}

func (o cudaOps) d() *driver { return o.b.d }

func (o cudaOps) alloc(n int) (uintptr, error) {
	var p uintptr
	if n == 0 {
		n = 1
	}
	if err := o.d().check(fmt.Sprintf("cuMemAlloc(%d bytes)", n), o.d().call("cuMemAlloc_v2", ptr(&p), uintptr(n))); err != nil {
		return 0, err
	}
	return p, nil
}

func (o cudaOps) free(p uintptr) {
	if p != 0 {
		o.d().call("cuMemFree_v2", p)
	}
}

func (o cudaOps) htod(dst uintptr, src []byte) error {
	if len(src) == 0 {
		return nil
	}
	err := o.d().check("cuMemcpyHtoD", o.d().call("cuMemcpyHtoD_v2", dst, bptr(src), uintptr(len(src))))
	runtime.KeepAlive(src)
	return err
}

func (o cudaOps) dtoh(dst []byte, src uintptr) error {
	if len(dst) == 0 {
		return nil
	}
	err := o.d().check("cuMemcpyDtoH", o.d().call("cuMemcpyDtoH_v2", bptr(dst), src, uintptr(len(dst))))
	runtime.KeepAlive(dst)
	return err
}

func (o cudaOps) memset(p uintptr, v byte, n int) error {
	return o.d().check("cuMemsetD8", o.d().call("cuMemsetD8_v2", p, uintptr(v), uintptr(n)))
}

func (o cudaOps) with(fn func() error) error {
	if err := o.d().lockThread(o.b.ctx); err != nil {
		return err
	}
	defer runtime.UnlockOSThread()
	return fn()
}

func (o cudaOps) syncAll() error {
	return o.d().check("cuCtxSynchronize", o.d().call("cuCtxSynchronize"))
}

func (o cudaOps) newStream() (uintptr, error) {
	var s uintptr
	if err := o.d().check("cuStreamCreate", o.d().call("cuStreamCreate", ptr(&s), streamNonBlock)); err != nil {
		return 0, err
	}
	return s, nil
}

func (o cudaOps) destroyStream(s uintptr) {
	if s != 0 {
		o.d().call("cuStreamDestroy_v2", s)
	}
}

func (o cudaOps) syncStream(s uintptr) error {
	return o.d().check("cuStreamSynchronize", o.d().call("cuStreamSynchronize", s))
}

func (o cudaOps) newBlas(stream uintptr) (uintptr, error) {
	var h uintptr
	if err := checkBlas("cublasCreate", o.d().call("cublasCreate_v2", ptr(&h))); err != nil {
		return 0, fmt.Errorf("%w: %s: %v", ErrNoDevice, o.d().cublasPath, err)
	}
	if err := checkBlas("cublasSetStream", o.d().call("cublasSetStream_v2", h, stream)); err != nil {
		o.d().call("cublasDestroy_v2", h)
		return 0, err
	}
	return h, nil
}

func (o cudaOps) destroyBlas(h uintptr) {
	if h != 0 {
		o.d().call("cublasDestroy_v2", h)
	}
}

func (o cudaOps) newEvent(timing bool) (uintptr, error) {
	var e uintptr
	flags := uintptr(eventNoTiming)
	if timing {
		flags = 0
	}
	if err := o.d().check("cuEventCreate", o.d().call("cuEventCreate", ptr(&e), flags)); err != nil {
		return 0, err
	}
	return e, nil
}

func (o cudaOps) destroyEvent(e uintptr) {
	if e != 0 {
		o.d().call("cuEventDestroy_v2", e)
	}
}

func (o cudaOps) record(e, stream uintptr) error {
	return o.d().check("cuEventRecord", o.d().call("cuEventRecord", e, stream))
}

func (o cudaOps) waitEvent(stream, e uintptr) error {
	return o.d().check("cuStreamWaitEvent", o.d().call("cuStreamWaitEvent", stream, e, 0))
}

func (o cudaOps) syncEvent(e uintptr) error {
	return o.d().check("cuEventSynchronize", o.d().call("cuEventSynchronize", e))
}

func (o cudaOps) elapsed(e0, e1 uintptr) (time.Duration, error) {
	ms := new(float32)
	if err := o.d().check("cuEventElapsedTime", o.d().call("cuEventElapsedTime", ptr(ms), e0, e1)); err != nil {
		return 0, err
	}
	return time.Duration(float64(*ms) * float64(time.Millisecond)), nil
}

func (o cudaOps) copyAsync(dst uintptr, src []byte, stream uintptr) error {
	if len(src) == 0 {
		return nil
	}
	err := o.d().check("cuMemcpyHtoDAsync", o.d().call("cuMemcpyHtoDAsync_v2", dst, bptr(src), uintptr(len(src)), stream))
	runtime.KeepAlive(src)
	return err
}

func (o cudaOps) launch(stream uintptr, l kLaunch) error {
	if l.fn == 0 || len(l.params) == 0 {
		return fmt.Errorf("cuda: kernel %s not loaded", l.name)
	}
	escape(l.params)
	escape(l.keep)
	code := o.d().call("cuLaunchKernel", l.fn, uintptr(l.grid), 1, 1, uintptr(l.threads), 1, 1, uintptr(l.shmem), stream,
		uintptr(unsafe.Pointer(&l.params[0])), 0)
	runtime.KeepAlive(l.params)
	runtime.KeepAlive(l.keep)
	return o.d().check("cuLaunchKernel "+l.name, code)
}

func (o cudaOps) gemm(blas uintptr, g fwdGemm) error {
	b := o.b
	code := b.d.call("cublasGemmEx", blas, cublasOpT, cublasOpN, uintptr(g.m), uintptr(g.n), uintptr(g.k),
		ptr(&b.alpha), g.w, uintptr(b.gemmT), uintptr(g.k),
		g.x, uintptr(b.gemmT), uintptr(g.k),
		ptr(&b.beta), g.out, cudaR32F, uintptr(g.m),
		cublasCompute32F, gemmAlgoDefault)
	return checkBlas(fmt.Sprintf("cublasGemmEx %s (%d x %d x %d)", g.what, g.m, g.n, g.k), code)
}

// laneOps runs the forward pass's steps on a lane's compute stream: fwdOps
// over devOps.
type laneOps struct {
	b *Backend
	l *lane
}

func (o laneOps) launch(l fwdLaunch) error {
	return o.b.ops.launch(o.l.compS, kLaunch{fn: o.b.fwdFns[l.k], name: "hc_" + fwdKernelNames[l.k], grid: l.grid,
		threads: l.threads, shmem: l.shmem, params: l.params, keep: l.keep})
}

func (o laneOps) gemm(g fwdGemm) error { return o.b.ops.gemm(o.l.blas, g) }
