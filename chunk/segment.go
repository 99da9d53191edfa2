package chunk

import (
	"fmt"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cockroachdb/pebble/v2/vfs"
	"golang.org/x/sys/unix"

	"github.com/hcache/hcache/chunk/format"
	"github.com/hcache/hcache/iouring"
)

// segFile is an open segment. Its vfs.File is the seam every operation goes
// through; when that file has a real descriptor, a second descriptor opened
// with O_DIRECT carries the data through the io_uring engine instead.
type segFile struct {
	id   uint32
	name string
	f    vfs.File
	fd   int // O_DIRECT descriptor, or -1
	eng  iouring.Engine
	// obj is the object of a sealed segment that another provider holds
	// (see object.go); f is nil then.
	obj ObjectReader

	allocated int64 // bytes preallocated (the flusher, the only allocator, owns it)

	// guarded by Store.mu
	refs       int  // restores reading it
	doomed     bool // removed from the index; delete the file at refs == 0
	syncFailed bool // an fdatasync failed: nothing written since opening is trusted
}

func segName(id uint32) string { return fmt.Sprintf("seg-%08d.hcs", id) }

func parseSegName(name string) (uint32, bool) {
	if !strings.HasPrefix(name, "seg-") || !strings.HasSuffix(name, ".hcs") {
		return 0, false
	}
	n, err := strconv.ParseUint(strings.TrimSuffix(strings.TrimPrefix(name, "seg-"), ".hcs"), 10, 32)
	if err != nil {
		return 0, false
	}
	return uint32(n), true
}

// openSeg opens (or creates) a segment file for reading and writing.
func openSeg(fs vfs.FS, dir string, id uint32, eng iouring.Engine, direct bool) (*segFile, error) {
	return openSegMode(fs, dir, id, eng, direct, false)
}

// openSegMode opens a segment file; readOnly opens an existing one for
// reading only.
func openSegMode(fs vfs.FS, dir string, id uint32, eng iouring.Engine, direct, readOnly bool) (*segFile, error) {
	name := fs.PathJoin(dir, segName(id))
	var f vfs.File
	var err error
	flags := unix.O_RDWR
	if readOnly {
		f, err = fs.Open(name)
		flags = unix.O_RDONLY
	} else {
		f, err = fs.OpenReadWrite(name, vfs.WriteCategoryUnspecified)
	}
	if err != nil {
		return nil, fmt.Errorf("chunk: open segment %s: %w", name, err)
	}
	s := &segFile{id: id, name: name, f: f, fd: -1, eng: eng}
	if direct && eng != nil && f.Fd() != vfs.InvalidFd {
		fd, err := iouring.OpenDirect(fmt.Sprintf("/proc/self/fd/%d", f.Fd()), flags, 0)
		if err == nil {
			s.fd = fd
		}
		// Without O_DIRECT (a file system that refuses it) the vfs.File
		// serves: correct, only slower.
	}
	return s, nil
}

// preallocate allocates size bytes for the segment.
func (s *segFile) preallocate(size int64) error {
	if s.obj != nil {
		return errNotLocal
	}
	if s.fd >= 0 {
		if err := unix.Fallocate(s.fd, 0, 0, size); err == nil {
			return nil
		}
	}
	return s.f.Preallocate(0, size)
}

// write writes bufs back to back at off and waits.
func (s *segFile) write(bufs [][]byte, off int64) error {
	if s.obj != nil {
		return errNotLocal
	}
	if s.fd >= 0 {
		return s.eng.Do(&iouring.Request{Op: iouring.OpWritev, Fd: s.fd, Iovecs: bufs, Off: off})
	}
	for _, b := range bufs {
		if _, err := s.f.WriteAt(b, off); err != nil {
			return fmt.Errorf("chunk: write %s at %d: %w", s.name, off, err)
		}
		off += int64(len(b))
	}
	return nil
}

// writeAsync starts a write of bufs at off and calls done with its result.
// Without a direct descriptor the write runs before writeAsync returns.
func (s *segFile) writeAsync(bufs [][]byte, off int64, done func(error)) {
	if s.fd < 0 {
		done(s.write(bufs, off))
		return
	}
	r := &iouring.Request{Op: iouring.OpWritev, Fd: s.fd, Iovecs: bufs, Off: off}
	if err := s.eng.Submit([]*iouring.Request{r}, func(r *iouring.Request) { done(r.Err) }); err != nil {
		done(err)
	}
}

// readReq is one read of a restore: len(buf) bytes at off.
type readReq struct {
	seg *segFile
	buf []byte
	off int64
}

// readBatch is a set of reads in flight.
type readBatch struct {
	left atomic.Int64
	// landed[i] is set once direct[i] has completed (then its N and Err
	// may be read), before progress is signalled; progress holds at most
	// one pending signal.
	landed   []atomic.Bool
	progress chan struct{}
	done     chan struct{} // closed when every read has completed (or none was sent)
	once     sync.Once
	direct   []*iouring.Request
	objErrs  []error // of the reads through an ObjectReader
	syncErr  error
	submitE  error
	start    time.Time // when the reads were started
	doneAt   atomic.Int64
}

// elapsed is the time from the start of the reads to the completion of
// the last one (nanoseconds); call after wait.
func (rb *readBatch) elapsed() int64 {
	if d := rb.doneAt.Load(); d != 0 {
		return d - rb.start.UnixNano()
	}
	return since(rb.start)
}

// ready is closed once every read of the batch has completed.
func (rb *readBatch) ready() <-chan struct{} { return rb.done }

// startReads issues every read at once (the engine bounds the queue depth):
// reads of direct segments go to the engine asynchronously, reads through
// the vfs.File happen before it returns.
func startReads(eng iouring.Engine, reqs []readReq) *readBatch {
	rb := &readBatch{done: make(chan struct{}), start: time.Now()}
	var objs []readReq
	for _, r := range reqs {
		if r.seg.obj != nil {
			objs = append(objs, r)
			continue
		}
		if r.seg.fd >= 0 {
			rb.direct = append(rb.direct, &iouring.Request{Op: iouring.OpRead, Fd: r.seg.fd, Buf: r.buf, Off: r.off})
			continue
		}
		if _, err := r.seg.f.ReadAt(r.buf, r.off); err != nil && rb.syncErr == nil {
			rb.syncErr = fmt.Errorf("chunk: read %s at %d len %d: %w", r.seg.name, r.off, len(r.buf), err)
		}
	}
	// The direct reads close directDone once complete (or not sent); with
	// no object reads that is done itself.
	directDone := rb.done
	if len(objs) > 0 {
		directDone = make(chan struct{})
	}
	if len(rb.direct) > 0 {
		rb.left.Store(int64(len(rb.direct)))
		rb.landed = make([]atomic.Bool, len(rb.direct))
		rb.progress = make(chan struct{}, 1)
		index := make(map[*iouring.Request]int, len(rb.direct))
		for i, r := range rb.direct {
			index[r] = i
		}
		if err := eng.Submit(rb.direct, func(r *iouring.Request) {
			rb.landed[index[r]].Store(true)
			select {
			case rb.progress <- struct{}{}:
			default:
			}
			if rb.left.Add(-1) == 0 {
				rb.doneAt.Store(time.Now().UnixNano())
				rb.once.Do(func() { close(directDone) })
			}
		}); err != nil {
			rb.submitE = err
			rb.once.Do(func() { close(directDone) })
		}
	} else {
		close(directDone)
	}
	if len(objs) > 0 {
		// Reads of objects another provider holds run concurrently, each
		// on its own goroutine (a remote read waits on the network, not a
		// CPU); done closes once they and the direct reads are complete.
		rb.objErrs = make([]error, len(objs))
		var wg sync.WaitGroup
		wg.Add(len(objs))
		for i, r := range objs {
			go func() {
				defer wg.Done()
				if _, err := r.seg.obj.ReadAt(r.buf, r.off); err != nil {
					rb.objErrs[i] = fmt.Errorf("chunk: read %s at %d len %d: %w", r.seg.name, r.off, len(r.buf), err)
				}
			}()
		}
		go func() {
			wg.Wait()
			<-directDone
			close(rb.done)
		}()
	}
	return rb
}

// wait waits for the reads and returns the first error.
func (rb *readBatch) wait() error {
	<-rb.done
	if rb.syncErr != nil {
		return rb.syncErr
	}
	if rb.submitE != nil {
		return rb.submitE
	}
	for _, r := range rb.direct {
		if r.Err != nil {
			return r.Err
		}
	}
	for _, err := range rb.objErrs {
		if err != nil {
			return err
		}
	}
	return nil
}

// readAll issues the reads and waits for all of them.
func readAll(eng iouring.Engine, reqs []readReq) error { return startReads(eng, reqs).wait() }

// readAt reads len(buf) bytes at off (buf aligned when the segment is direct).
func (s *segFile) readAt(buf []byte, off int64) error {
	return readAll(s.eng, []readReq{{s, buf, off}})
}

// segsByID lists a set of segments in id order, so that they are synced in
// the same order every run (a simulation replays its crash points).
func segsByID(set map[*segFile]bool) []*segFile {
	out := make([]*segFile, 0, len(set))
	for sg := range set {
		out = append(out, sg)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].id < out[j].id })
	return out
}

// datasync makes the segment's written data durable.
func (s *segFile) datasync() error {
	if s.obj != nil {
		return errNotLocal
	}
	if s.fd >= 0 {
		return s.eng.Do(&iouring.Request{Op: iouring.OpFdatasync, Fd: s.fd})
	}
	if err := s.f.SyncData(); err != nil {
		return fmt.Errorf("chunk: sync %s: %w", s.name, err)
	}
	return nil
}

func (s *segFile) close() error {
	if s.obj != nil {
		return s.obj.Close()
	}
	if s.fd >= 0 {
		unix.Close(s.fd)
		s.fd = -1
	}
	return s.f.Close()
}

// size returns the file's current size.
func (s *segFile) size() (int64, error) {
	if s.obj != nil {
		if so, ok := s.obj.(SizedObject); ok {
			return so.Stat()
		}
		return s.obj.Size(), nil
	}
	st, err := s.f.Stat()
	if err != nil {
		return 0, err
	}
	return st.Size(), nil
}

// alignedScratch hands out aligned temporary buffers (bounce buffers for
// compressed or unaligned slices, headers, restore buffers) and keeps the
// idle ones for reuse: with bounded set, at most limit bytes of them, the
// least recently returned freed first, and sizes rounded up to classes (a
// quarter of a power of two apart) so that contexts of different lengths
// share buffers; without, up to maxScratchPerSize per exact size.
//
// Bounded (the restore buffers), a request no idle buffer serves does not
// wait for huge pages: mapping them can stall for seconds where memory is
// fragmented (the kernel compacts it first), seconds a restore would add to
// its time to first token. It takes a buffer in base pages (mapped in a
// fraction of that, read into somewhat slower), and a buffer of its class
// in huge pages is mapped in the background and kept idle for the next
// restores, which prefer it; base-page buffers go first when idle memory
// is trimmed, and one is freed on return once a huge-page buffer of its
// size is idle. Writer.Close prepares the buffers its context's restore
// will take the same way, so a saved context's first restore finds them,
// and Open those of the stored contexts (prepareRestoreBuffers).
type alignedScratch struct {
	mu      sync.Mutex
	free    map[int][]*iouring.AlignedBuffer
	idle    []*iouring.AlignedBuffer // bounded: idle buffers, oldest first
	idleB   int64
	bounded bool
	limit   int64
	hooks   BufferHooks
	logf    func(string, ...any)
	// mapping counts, per class, the huge-page buffers being mapped in
	// the background (bounded only); mappers counts those goroutines, and
	// closed (set by release) makes them free what they mapped.
	mapping    map[int]int
	mappers    sync.WaitGroup
	closed     bool
	smallPages atomic.Uint64 // buffers handed out in base pages instead
	mapped     func()        // test seam: runs in a mapper once its buffer is mapped
}

// sizeClass rounds n up to a power of two plus one block (at least two
// blocks): contexts grow turn by turn, and a class that doubles keeps
// serving a context through many turns, where finer classes made nearly
// every restore of a grown context map new buffers. The extra block is the
// slack a layer's buffer carries beyond its rows (the last slice's read is
// rounded up to a block), so the usual power-of-two layer does not double.
func sizeClass(n int) int {
	n = format.RoundUp(n)
	p := BlockBytes
	for p+BlockBytes < n {
		p *= 2
	}
	return p + BlockBytes
}

func (a *alignedScratch) get(n int) (*iouring.AlignedBuffer, error) {
	n = format.RoundUp(n)
	a.mu.Lock()
	if a.bounded {
		need := n
		n = sizeClass(n)
		// The smallest idle buffer that holds the request, up to twice
		// its class, in huge pages if one of that size is idle: mapping
		// (and faulting in) a new buffer can cost more than the read it
		// serves.
		best := -1
		better := func(b, than *iouring.AlignedBuffer) bool {
			l, tl := len(b.Bytes()), len(than.Bytes())
			return l < tl || l == tl && b.HugePages() && !than.HugePages()
		}
		for i, b := range a.idle {
			if l := len(b.Bytes()); l >= need && l <= 2*n && (best < 0 || better(b, a.idle[best])) {
				best = i
			}
		}
		if best >= 0 {
			b := a.idle[best]
			a.idle = append(a.idle[:best], a.idle[best+1:]...)
			a.idleB -= int64(len(b.Bytes()))
			if l := len(b.Bytes()); !b.HugePages() && l >= iouring.HugePageBytes && int64(l) <= a.limit {
				a.mapInBackgroundLocked(l) // replace it
			}
			a.mu.Unlock()
			return b, nil
		}
		if n >= iouring.HugePageBytes && int64(n) <= a.limit && !a.closed {
			// Nothing idle fits: base pages now, huge pages for later.
			a.mapInBackgroundLocked(n)
			a.mu.Unlock()
			a.smallPages.Add(1)
			return a.alloc(n, iouring.AllocSmallPages)
		}
	} else if l := a.free[n]; len(l) > 0 {
		b := l[len(l)-1]
		a.free[n] = l[:len(l)-1]
		a.mu.Unlock()
		return b, nil
	}
	a.mu.Unlock()
	return a.alloc(n, iouring.Alloc)
}

// alloc maps a buffer of n bytes and registers it.
func (a *alignedScratch) alloc(n int, mapBuf func(int) (*iouring.AlignedBuffer, error)) (*iouring.AlignedBuffer, error) {
	b, err := mapBuf(n)
	if err == nil && a.hooks.Register != nil {
		if err := a.hooks.Register(b.Bytes()); err != nil && a.logf != nil {
			a.logf("chunk: registering a %d-byte read buffer: %v (used unregistered)", n, err)
		}
	}
	return b, err
}

// prepare has count huge-page buffers that serve requests of need bytes
// mapped in the background and kept idle, counting those idle or being
// mapped already, within the idle bound (a saved context's restore
// buffers: Writer.Close). Requests under a huge page need no preparing.
func (a *alignedScratch) prepare(need, count int) {
	n := sizeClass(need)
	a.mu.Lock()
	defer a.mu.Unlock()
	if !a.bounded || n < iouring.HugePageBytes || int64(n)*int64(count) > a.limit {
		return
	}
	have := a.mapping[n]
	for _, b := range a.idle {
		if l := len(b.Bytes()); b.HugePages() && l >= need && l <= 2*n {
			have++
		}
	}
	for ; have < count; have++ {
		a.startMapLocked(n)
	}
}

// mapInBackgroundLocked starts mapping an idle huge-page buffer of class n
// unless one is being mapped already. Call with a.mu held.
func (a *alignedScratch) mapInBackgroundLocked(n int) {
	if a.mapping[n] == 0 {
		a.startMapLocked(n)
	}
}

// startMapLocked starts mapping an idle huge-page buffer of class n. Call
// with a.mu held.
func (a *alignedScratch) startMapLocked(n int) {
	if a.closed {
		return
	}
	if a.mapping == nil {
		a.mapping = map[int]int{}
	}
	a.mapping[n]++
	a.mappers.Add(1)
	go func() {
		defer a.mappers.Done()
		// Compaction for the huge pages runs on this thread: lowest
		// priority, so restores keep the CPUs. Never unlocked: the thread
		// ends with the goroutine, its priority with it.
		runtime.LockOSThread()
		_ = unix.Setpriority(unix.PRIO_PROCESS, unix.Gettid(), 19)
		b, err := a.alloc(n, iouring.Alloc)
		if a.mapped != nil {
			a.mapped()
		}
		a.mu.Lock()
		defer a.mu.Unlock()
		if a.mapping[n]--; a.mapping[n] == 0 {
			delete(a.mapping, n)
		}
		if err != nil {
			if a.logf != nil {
				a.logf("chunk: mapping a %d-byte restore buffer in huge pages: %v (restores keep base pages)", n, err)
			}
			return
		}
		if a.closed {
			a.free1(b)
			return
		}
		a.idle = append(a.idle, b)
		a.idleB += int64(n)
		a.trimLocked()
	}()
}

func (a *alignedScratch) free1(b *iouring.AlignedBuffer) {
	if a.hooks.Unregister != nil {
		a.hooks.Unregister(b.Bytes())
	}
	b.Free()
}

// maxScratchPerSize bounds the idle buffers kept per size (unbounded mode).
const maxScratchPerSize = 8

func (a *alignedScratch) put(b *iouring.AlignedBuffer) {
	n := len(b.Bytes())
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.bounded {
		// A base-page buffer and a huge-page one of the same size: the
		// base-page one goes (it was handed out while the other was
		// being mapped, or in use).
		if n >= iouring.HugePageBytes {
			for i, o := range a.idle {
				if len(o.Bytes()) != n || o.HugePages() == b.HugePages() {
					continue
				}
				if o.HugePages() {
					a.free1(b)
					return
				}
				a.idle = append(a.idle[:i], a.idle[i+1:]...)
				a.idleB -= int64(n)
				a.free1(o)
				break
			}
		}
		a.idle = append(a.idle, b)
		a.idleB += int64(n)
		a.trimLocked()
		return
	}
	if a.free == nil {
		a.free = map[int][]*iouring.AlignedBuffer{}
	}
	if len(a.free[n]) >= maxScratchPerSize {
		a.free1(b)
		return
	}
	a.free[n] = append(a.free[n], b)
}

// trimLocked frees idle buffers past the limit: base-page ones first, then
// the least recently returned. Call with a.mu held (bounded).
func (a *alignedScratch) trimLocked() {
	for a.idleB > a.limit && len(a.idle) > 0 {
		i := 0
		for j, b := range a.idle {
			if !b.HugePages() && len(b.Bytes()) >= iouring.HugePageBytes {
				i = j
				break
			}
		}
		old := a.idle[i]
		a.idle = append(a.idle[:i], a.idle[i+1:]...)
		a.idleB -= int64(len(old.Bytes()))
		a.free1(old)
	}
}

// idleBytes is the memory held by idle buffers.
func (a *alignedScratch) idleBytes() int64 {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.bounded {
		return a.idleB
	}
	var n int64
	for sz, l := range a.free {
		n += int64(sz * len(l))
	}
	return n
}

// release frees every idle buffer and waits for the background mappers
// (each frees what it mapped once it sees closed).
func (a *alignedScratch) release() {
	defer a.mappers.Wait()
	a.mu.Lock()
	defer a.mu.Unlock()
	a.closed = true
	for _, l := range a.free {
		for _, b := range l {
			a.free1(b)
		}
	}
	for _, b := range a.idle {
		a.free1(b)
	}
	a.free, a.idle, a.idleB = nil, nil, 0
}
