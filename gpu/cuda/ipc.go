package cuda

import (
	"encoding/hex"
	"errors"
	"fmt"
	"runtime"
	"strings"
)

// IPCHandle is a CUDA IPC memory handle (CUipcMemHandle): another process
// on the same machine opens it to reach a device allocation of this one.
type IPCHandle [64]byte

// String is the handle in hex, for passing on a command line or a socket.
func (h IPCHandle) String() string { return hex.EncodeToString(h[:]) }

// ParseIPCHandle reads the hex form.
func ParseIPCHandle(s string) (IPCHandle, error) {
	var h IPCHandle
	b, err := hex.DecodeString(strings.TrimSpace(s))
	if err != nil || len(b) != len(h) {
		return h, fmt.Errorf("cuda: an IPC handle is %d bytes in hex, got %q", len(h), s)
	}
	copy(h[:], b)
	return h, nil
}

// ExportIPC returns an IPC handle of a cache NewCache allocated, with the
// byte offsets of each layer's K and V inside the allocation, for another
// process's OpenIPCCache.
func (c *Cache) ExportIPC() (h IPCHandle, kOff, vOff []int64, err error) {
	if c.owned == 0 {
		return h, nil, nil, errors.New("cuda: only a cache NewCache allocated can be exported")
	}
	if !c.b.d.has("cuIpcGetMemHandle") {
		return h, nil, nil, errors.New("cuda: this driver has no cuIpcGetMemHandle")
	}
	hp := new(IPCHandle)
	err = c.b.with(func() error {
		return c.b.d.check("cuIpcGetMemHandle", c.b.d.call("cuIpcGetMemHandle", ptr(hp), c.owned))
	})
	for l := range c.K {
		kOff = append(kOff, int64(c.K[l]-c.owned))
		vOff = append(vOff, int64(c.V[l]-c.owned))
	}
	return *hp, kOff, vOff, err
}

// OpenIPCCache opens another process's device allocation (ExportIPC's
// handle, or a serving engine's cache exported with cudaIpcGetMemHandle) as
// a cache: layer l's K and V start at kOff[l] and vOff[l] bytes into it and
// hold blocks x blockTokens token rows of this model. Free closes the
// handle; the memory stays the exporter's.
func (b *Backend) OpenIPCCache(h IPCHandle, kOff, vOff []int64, blocks, blockTokens int, blockTable []int) (*Cache, error) {
	if len(kOff) == 0 || len(kOff) != len(vOff) {
		return nil, fmt.Errorf("cuda: OpenIPCCache needs as many K as V offsets (%d, %d)", len(kOff), len(vOff))
	}
	if runtime.GOARCH != "amd64" {
		// The handle is a struct passed by value, placed here as the
		// x86-64 SysV ABI places it; other ABIs pass it differently.
		return nil, fmt.Errorf("cuda: OpenIPCCache is implemented for amd64, not %s", runtime.GOARCH)
	}
	if !b.d.has("cuIpcOpenMemHandle_v2") || !b.d.has("cuIpcCloseMemHandle") {
		return nil, errors.New("cuda: this driver has no cuIpcOpenMemHandle_v2")
	}
	for l := range kOff {
		if kOff[l] < 0 || vOff[l] < 0 {
			return nil, fmt.Errorf("cuda: layer %d has a negative offset", l)
		}
	}
	base := new(uintptr)
	err := b.with(func() error {
		// CUipcMemHandle is a 64-byte struct passed by value: the SysV ABI
		// puts it on the stack, after the register arguments (pdptr,
		// flags); the other four registers are unused.
		args := []uintptr{ptr(base), 1 /* CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS */, 0, 0, 0, 0}
		for i := 0; i < 8; i++ {
			var w uintptr
			for j := 0; j < 8; j++ {
				w |= uintptr(h[8*i+j]) << (8 * j)
			}
			args = append(args, w)
		}
		return b.d.check("cuIpcOpenMemHandle", b.d.call("cuIpcOpenMemHandle_v2", args...))
	})
	if err != nil {
		return nil, err
	}
	k, v := make([]uintptr, len(kOff)), make([]uintptr, len(vOff))
	for l := range kOff {
		k[l], v[l] = *base+uintptr(kOff[l]), *base+uintptr(vOff[l])
	}
	c, err := b.WrapCache(k, v, blocks, blockTokens, blockTable)
	if err != nil {
		b.with(func() error { b.d.call("cuIpcCloseMemHandle", *base); return nil })
		return nil, err
	}
	b.mu.Lock()
	c.ipcBase = *base
	b.mu.Unlock()
	return c, nil
}
