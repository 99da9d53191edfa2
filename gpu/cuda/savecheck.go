package cuda

import (
	"errors"
	"fmt"

	"github.com/hcache/hcache/gpu"
)

// CheckDevice plays an engine for `hcache gpu save-check`: device memory,
// streams of the engine's own and work queued on them, in the copier's
// context. It is for checks on a GPU, not for serving.
type CheckDevice struct{ c *Copier }

// CheckDevice returns the copier's check device.
func (c *Copier) CheckDevice() *CheckDevice { return &CheckDevice{c: c} }

func (d *CheckDevice) do(what string, name string, args ...uintptr) error {
	return d.c.with(func() error { return d.c.check(what, d.c.d.call(name, args...)) })
}

// Alloc allocates n bytes of device memory.
func (d *CheckDevice) Alloc(n int) (gpu.DevicePtr, error) {
	if n <= 0 {
		return 0, fmt.Errorf("cuda: device allocation of %d bytes", n)
	}
	var p uintptr
	if err := d.do(fmt.Sprintf("cuMemAlloc (%d bytes)", n), "cuMemAlloc_v2", ptr(&p), uintptr(n)); err != nil {
		return 0, err
	}
	return gpu.DevicePtr(p), nil
}

// Free frees memory Alloc returned.
func (d *CheckDevice) Free(p gpu.DevicePtr) error {
	return d.do("cuMemFree", "cuMemFree_v2", uintptr(p))
}

// Upload copies b to p synchronously.
func (d *CheckDevice) Upload(p gpu.DevicePtr, b []byte) error {
	if len(b) == 0 {
		return errors.New("cuda: upload of no bytes")
	}
	return d.do("cuMemcpyHtoD", "cuMemcpyHtoD_v2", uintptr(p), bptr(b), uintptr(len(b)))
}

// Download copies n bytes at p into b synchronously (what an engine that
// saves by itself does today: the baseline of the check).
func (d *CheckDevice) Download(b []byte, p gpu.DevicePtr) error {
	if len(b) == 0 {
		return errors.New("cuda: download of no bytes")
	}
	return d.do("cuMemcpyDtoH", "cuMemcpyDtoH_v2", bptr(b), uintptr(p), uintptr(len(b)))
}

// NewStream creates a non-blocking stream (an engine's).
func (d *CheckDevice) NewStream() (gpu.Stream, error) {
	var s uintptr
	if err := d.do("cuStreamCreate", "cuStreamCreate", ptr(&s), streamNonBlock); err != nil {
		return 0, err
	}
	return gpu.Stream(s), nil
}

// DestroyStream destroys a stream NewStream created.
func (d *CheckDevice) DestroyStream(s gpu.Stream) error {
	return d.do("cuStreamDestroy", "cuStreamDestroy_v2", uintptr(s))
}

// Memset queues a byte fill of n bytes at p on s.
func (d *CheckDevice) Memset(s gpu.Stream, p gpu.DevicePtr, v byte, n int) error {
	return d.do("cuMemsetD8Async", "cuMemsetD8Async", uintptr(p), uintptr(v), uintptr(n), uintptr(s))
}

// CopyAsync queues a device-to-device copy of n bytes on s (an engine's
// kernel writing the rows to be saved).
func (d *CheckDevice) CopyAsync(s gpu.Stream, dst, src gpu.DevicePtr, n int) error {
	return d.do("cuMemcpyDtoDAsync", "cuMemcpyDtoDAsync_v2", uintptr(dst), uintptr(src), uintptr(n), uintptr(s))
}

// Synchronize waits for the work queued on s.
func (d *CheckDevice) Synchronize(s gpu.Stream) error {
	return d.do("cuStreamSynchronize", "cuStreamSynchronize", uintptr(s))
}

// Marker records an event on s and returns its query (true once the work
// queued on s before it is done) and its release.
func (d *CheckDevice) Marker(s gpu.Stream) (query func() (bool, error), release func(), err error) {
	var e uintptr
	if err := d.do("cuEventCreate", "cuEventCreate", ptr(&e), eventNoTiming); err != nil {
		return nil, nil, err
	}
	if err := d.do("cuEventRecord", "cuEventRecord", e, uintptr(s)); err != nil {
		d.do("cuEventDestroy", "cuEventDestroy_v2", e)
		return nil, nil, err
	}
	ev := &cudaEvent{c: d.c, ev: e}
	return ev.Query, func() { d.do("cuEventDestroy", "cuEventDestroy_v2", e) }, nil
}
