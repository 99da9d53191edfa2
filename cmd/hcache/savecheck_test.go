package main

import (
	"fmt"
	"io"
	"sync"
	"testing"

	"github.com/hcache/hcache/gpu"
)

// cpuCheckDevice runs `gpu save-check` on the CPU device. Its streams are
// held from the first Memset after the first Synchronize (the busy work)
// until the first Marker's query has been made, so that "the caller's stream was still busy after the calls" is
// decided by the check's code, not by timing.
type cpuCheckDevice struct {
	d      *gpu.CPUDevice
	mu     sync.Mutex
	mem    map[gpu.DevicePtr][]byte
	gate   chan struct{}
	opened sync.Once
	armed  bool
	skip   bool // corrupt: CopyAsync does nothing (the rows are never written)
}

func (c *cpuCheckDevice) bytesAt(p gpu.DevicePtr, n int) []byte {
	c.mu.Lock()
	defer c.mu.Unlock()
	for base, b := range c.mem {
		if p >= base && uintptr(p-base)+uintptr(n) <= uintptr(len(b)) {
			return b[p-base : int(p-base)+n]
		}
	}
	panic(fmt.Sprintf("no allocation holds [%#x, +%d)", uintptr(p), n))
}

func (c *cpuCheckDevice) Alloc(n int) (gpu.DevicePtr, error) {
	p, b, err := c.d.Alloc(n)
	if err == nil {
		c.mu.Lock()
		c.mem[p] = b
		c.mu.Unlock()
	}
	return p, err
}

func (c *cpuCheckDevice) Free(p gpu.DevicePtr) error {
	c.mu.Lock()
	delete(c.mem, p)
	c.mu.Unlock()
	return c.d.Free(p)
}

func (c *cpuCheckDevice) Upload(p gpu.DevicePtr, b []byte) error {
	copy(c.bytesAt(p, len(b)), b)
	return nil
}

func (c *cpuCheckDevice) Download(b []byte, p gpu.DevicePtr) error {
	copy(b, c.bytesAt(p, len(b)))
	return nil
}

func (c *cpuCheckDevice) NewStream() (gpu.Stream, error) { return c.d.NewStream() }
func (c *cpuCheckDevice) DestroyStream(gpu.Stream) error { return nil }
func (c *cpuCheckDevice) Synchronize(s gpu.Stream) error {
	err := c.d.Synchronize(s)
	c.armed = true
	return err
}

func (c *cpuCheckDevice) Memset(s gpu.Stream, p gpu.DevicePtr, v byte, n int) error {
	b := c.bytesAt(p, n)
	gate := c.gate
	armed := c.armed
	return c.d.Launch(s, func() {
		if armed {
			<-gate
		}
		for i := range b {
			b[i] = v
		}
	})
}

func (c *cpuCheckDevice) CopyAsync(s gpu.Stream, dst, src gpu.DevicePtr, n int) error {
	d, sb := c.bytesAt(dst, n), c.bytesAt(src, n)
	if c.skip {
		return nil
	}
	return c.d.Launch(s, func() { copy(d, sb) })
}

func (c *cpuCheckDevice) Marker(s gpu.Stream) (func() (bool, error), func(), error) {
	done := make(chan struct{})
	if err := c.d.Launch(s, func() { close(done) }); err != nil {
		return nil, nil, err
	}
	query := func() (bool, error) {
		defer c.opened.Do(func() { close(c.gate) })
		select {
		case <-done:
			return true, nil
		default:
			return false, nil
		}
	}
	return query, func() {}, nil
}

// TestSaveCheckOnCPU runs the GPU check's code on the CPU device: it
// passes, and it fails when the saved rows are not the engine's (the
// copies that write them are dropped).
func TestSaveCheckOnCPU(t *testing.T) {
	for _, skip := range []bool{false, true} {
		d := gpu.NewCPUDevice()
		dev := &cpuCheckDevice{d: d, mem: map[gpu.DevicePtr][]byte{}, gate: make(chan struct{}), skip: skip}
		res, err := runSaveCheck(t.TempDir(), d, dev, 4, 64, 40, 24, 2, 1, io.Discard)
		d.Close()
		if err != nil {
			t.Fatal(err)
		}
		if res.OK == skip || (res.Mismatches > 0) != skip || !res.StreamBusyAfter {
			t.Fatalf("skip copies %v: ok %v, %d mismatches, stream busy after the calls %v, notes %v", skip, res.OK, res.Mismatches, res.StreamBusyAfter, res.Notes)
		}
		if s := res.Stats; s.Calls != 4+24 || s.Written != s.Calls {
			t.Fatalf("saver stats %+v: want 28 calls written", s)
		}
	}
}
