package iouring

import (
	"fmt"
	"os"
	"unsafe"

	"golang.org/x/sys/unix"
)

// AlignedBuffer is page-aligned anonymous memory from mmap, outside the Go
// heap: it never moves, satisfies O_DIRECT alignment, can be registered with
// a ring, and can later be pinned for a GPU (cuMemHostRegister).
type AlignedBuffer struct {
	mem  []byte
	raw  []byte // the whole mapping (mem lies inside it)
	huge bool   // 2 MiB-aligned and advised MADV_HUGEPAGE
}

// HugePageBytes is the transparent huge page size buffers of at least this
// size are aligned to and advised for.
const HugePageBytes = 2 << 20

// Alloc maps n bytes rounded up to Alignment, with every page faulted in.
//
// Buffers of HugePageBytes or more are 2 MiB-aligned and advised
// MADV_HUGEPAGE: a 1 MiB transfer from 4 KiB pages that are not physically
// contiguous needs 256 segments, more than a virtio disk takes in one
// request (max_segments 254 here), so it is split in two; huge pages keep it
// whole. Pages are populated up front: on the development machine first-
// touch faults cost 1.9 s per GiB against 0.27 s populated.
func Alloc(n int) (*AlignedBuffer, error) {
	if n <= 0 {
		return nil, fmt.Errorf("iouring: Alloc(%d): size must be positive", n)
	}
	size := RoundUp(n)
	if size < HugePageBytes {
		return AllocSmallPages(n)
	}
	size = (size + HugePageBytes - 1) &^ (HugePageBytes - 1)
	raw, err := unix.Mmap(-1, 0, size+HugePageBytes, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return nil, fmt.Errorf("iouring: mmap %d bytes: %w", size, err)
	}
	off := int((HugePageBytes - uintptr(unsafe.Pointer(&raw[0]))%HugePageBytes) % HugePageBytes)
	mem := raw[off : off+size : off+size]
	_ = unix.Madvise(mem, unix.MADV_HUGEPAGE) // best effort: THP may be off
	if err := unix.Madvise(mem, madvPopulateWrite); err != nil {
		for i := 0; i < len(mem); i += 4096 { // kernels before 5.14
			mem[i] = 0
		}
	}
	return &AlignedBuffer{mem: mem[:RoundUp(n)], raw: raw, huge: true}, nil
}

// AllocSmallPages maps n bytes rounded up to Alignment in base pages, every
// one faulted in, never advised for huge pages. Mapping huge pages can stall
// for seconds where memory is fragmented (the kernel compacts it first),
// while transfers into base pages run slower (more segments per request):
// a caller that cannot wait takes these and maps huge pages off its
// critical path (chunk's restore buffers; figures in DESIGN.md).
func AllocSmallPages(n int) (*AlignedBuffer, error) {
	if n <= 0 {
		return nil, fmt.Errorf("iouring: AllocSmallPages(%d): size must be positive", n)
	}
	size := RoundUp(n)
	mem, err := unix.Mmap(-1, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_POPULATE)
	if err != nil {
		return nil, fmt.Errorf("iouring: mmap %d bytes: %w", size, err)
	}
	return &AlignedBuffer{mem: mem, raw: mem}, nil
}

// HugePages reports whether the buffer was advised for huge pages (Alloc of
// HugePageBytes or more); whether the kernel granted them is its own choice.
func (b *AlignedBuffer) HugePages() bool { return b.huge }

// madvPopulateWrite is MADV_POPULATE_WRITE (Linux 5.14).
const madvPopulateWrite = 23

// Bytes returns the whole buffer.
func (b *AlignedBuffer) Bytes() []byte { return b.mem }

// Free unmaps the buffer; its Bytes must not be used afterwards.
func (b *AlignedBuffer) Free() error {
	if b.raw == nil {
		return nil
	}
	err := unix.Munmap(b.raw)
	b.mem, b.raw = nil, nil
	return err
}

// RoundUp rounds n up to a multiple of Alignment.
func RoundUp(n int) int { return (n + Alignment - 1) &^ (Alignment - 1) }

// Pool is a fixed set of equal, aligned slabs carved from one mapping, so the
// whole pool registers with a ring as a single fixed buffer. Get blocks while
// every slab is out: the pool's size is the bound on staging memory.
type Pool struct {
	buf       *AlignedBuffer
	slabBytes int
	free      chan []byte
}

// NewPool maps count slabs of slabBytes (rounded up to Alignment).
func NewPool(slabBytes, count int) (*Pool, error) {
	if count <= 0 {
		return nil, fmt.Errorf("iouring: NewPool: count %d must be positive", count)
	}
	slabBytes = RoundUp(slabBytes)
	b, err := Alloc(slabBytes * count)
	if err != nil {
		return nil, err
	}
	p := &Pool{buf: b, slabBytes: slabBytes, free: make(chan []byte, count)}
	for i := 0; i < count; i++ {
		p.free <- b.mem[i*slabBytes : (i+1)*slabBytes : (i+1)*slabBytes]
	}
	return p, nil
}

// SlabBytes is the size of each slab.
func (p *Pool) SlabBytes() int { return p.slabBytes }

// Count is the number of slabs.
func (p *Pool) Count() int { return cap(p.free) }

// Memory is the pool's whole mapping (what a ring or a GPU registers).
func (p *Pool) Memory() []byte { return p.buf.mem }

// Get takes a slab, waiting for one if all are out.
func (p *Pool) Get() []byte { return <-p.free }

// Put returns a slab taken from this pool.
func (p *Pool) Put(b []byte) {
	if cap(b) != p.slabBytes {
		panic("iouring: Pool.Put of a slab from another pool")
	}
	p.free <- b[:p.slabBytes]
}

// Free unmaps the pool; every slab must have been returned.
func (p *Pool) Free() error { return p.buf.Free() }

// RegisterPool registers the pool's memory with e for fixed-buffer I/O. Locked
// memory counts against RLIMIT_MEMLOCK on some kernels: the limit is raised
// when the process may, and if registration still fails the pool is used
// unregistered (plain READ/WRITE), with the reason logged. It returns whether
// the buffers are registered.
func RegisterPool(e Engine, p *Pool, logf func(string, ...any)) bool {
	if _, ok := e.(*Ring); !ok {
		return false
	}
	need := uint64(len(p.Memory()))
	var lim unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_MEMLOCK, &lim); err == nil && lim.Cur != unix.RLIM_INFINITY && lim.Cur < need {
		want := lim
		want.Cur = need + lim.Cur
		if want.Max != unix.RLIM_INFINITY && want.Max < want.Cur {
			want.Max = want.Cur // needs CAP_SYS_RESOURCE
		}
		if err := unix.Setrlimit(unix.RLIMIT_MEMLOCK, &want); err != nil && logf != nil {
			logf("iouring: cannot raise RLIMIT_MEMLOCK from %d to %d bytes: %v", lim.Cur, want.Cur, err)
		}
	}
	if err := e.RegisterBuffers([][]byte{p.Memory()}); err != nil {
		if logf != nil {
			logf("iouring: using unregistered buffers: %v", err)
		}
		return false
	}
	return true
}

// OpenDirect opens path with O_DIRECT (and flags) and returns the descriptor.
func OpenDirect(path string, flags int, perm os.FileMode) (int, error) {
	fd, err := unix.Open(path, flags|unix.O_DIRECT|unix.O_CLOEXEC, uint32(perm))
	if err != nil {
		return -1, fmt.Errorf("iouring: open %s with O_DIRECT: %w", path, err)
	}
	return fd, nil
}
