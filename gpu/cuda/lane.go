package cuda

import (
	"errors"
	"fmt"

	"github.com/hcache/hcache/state"
	"github.com/hcache/hcache/state/codec"
)

// A lane is what one restore in progress owns on the device: a copy and a
// compute stream, a cuBLAS handle bound to the compute stream, Slots staging
// buffers, the GEMM output, the decoded rows of an encoded layer, the
// positions, the dequantize kernel's flag and the recompute buffers. A
// Backend has at most Options.Restores lanes, made when first needed and
// kept (their buffers grown as restores need) until Close; every lane
// buffer counts against Options.RestoreMemory. Begin takes an idle lane
// (waiting while all are in use) and Wait hands it back once everything
// queued on its streams has finished, so a lane's buffers are never
// written by one restore while another reads them.
type lane struct {
	id           int
	copyS, compS uintptr
	blas         uintptr
	staging      devBuf // Slots x slot bytes
	gemm         devBuf // [tokens x 2 kv_dim] float32
	dec          devBuf // one layer's rows decoded into the model dtype
	pos          devBuf // int32 positions
	bad          devBuf // int32: the dequantize kernel's "not an encoding" flag
	toks         devBuf // int32 token ids of a recompute
	scr          fwdScratch
	sizes        map[uintptr]int // the lane's allocations
}

// Defaults of the restore pool.
const (
	// DefaultRestores is how many restores run on a Backend at once.
	DefaultRestores = 4
	// MaxRestores bounds Options.Restores.
	MaxRestores = 64
)

// ErrRestoreMemory is wrapped when a restore's device buffers would take the
// backend's restore lanes past Options.RestoreMemory.
var ErrRestoreMemory = errors.New("cuda: restore buffers exceed Options.RestoreMemory")

// restoreLimit is the memory all lanes may hold.
func (b *Backend) restoreLimit() int64 {
	if b.opts.RestoreMemory > 0 {
		return b.opts.RestoreMemory
	}
	if b.memory > 0 {
		return b.memory / 4
	}
	return 1 << 62
}

// laneMem is devMem for one lane: every allocation is counted against the
// backend's restore memory.
type laneMem struct {
	b *Backend
	l *lane
}

func (m laneMem) alloc(n int) (uintptr, error) {
	b := m.b
	n = max(n, 1)
	b.mu.Lock()
	if b.laneBytes+int64(n) > b.restoreLimit() {
		used := b.laneBytes
		b.mu.Unlock()
		return 0, fmt.Errorf("%w: %d more bytes on top of the %d the restore lanes hold, the limit is %d", ErrRestoreMemory, n, used, b.restoreLimit())
	}
	b.laneBytes += int64(n)
	b.mu.Unlock()
	p, err := b.ops.alloc(n)
	if err != nil {
		b.mu.Lock()
		b.laneBytes -= int64(n)
		b.mu.Unlock()
		return 0, err
	}
	if m.l.sizes == nil {
		m.l.sizes = map[uintptr]int{}
	}
	m.l.sizes[p] = n
	return p, nil
}

func (m laneMem) free(p uintptr) {
	n, ok := m.l.sizes[p]
	if !ok {
		return
	}
	delete(m.l.sizes, p)
	m.b.ops.free(p)
	m.b.mu.Lock()
	m.b.laneBytes -= int64(n)
	m.b.mu.Unlock()
}

func (m laneMem) htod(dst uintptr, src []byte) error { return m.b.ops.htod(dst, src) }

// grow makes buf at least n bytes (its contents are not kept).
func (m laneMem) grow(buf *devBuf, n int) error {
	if n <= buf.size {
		return nil
	}
	m.free(buf.ptr)
	*buf = devBuf{}
	p, err := m.alloc(n)
	if err != nil {
		return err
	}
	*buf = devBuf{p, n}
	return nil
}

// slotBytes is the staging slot of a restore of n tokens: one layer's rows
// in the model dtype or under any codec the device decodes, of either kind.
func (b *Backend) slotBytes(n int) int {
	c := b.cfg
	row := max(c.HiddenRowBytes(), c.KVRowBytes())
	for _, cd := range deviceCodecs {
		row = max(row, codec.HiddenRowBytes(cd, c.DType, c.HiddenSize), codec.KVRowBytes(cd, c.DType, c.KVDim()))
	}
	return (n*row + 255) &^ 255
}

// deviceCodecs are the codecs a restore decodes on the device
// (hc_fp8_dequant).
var deviceCodecs = []state.Codec{state.CodecFP8Token, state.CodecFP8Block}

// ensure sizes the lane's buffers for a restore of n tokens.
func (l *lane) ensure(b *Backend, n int) error {
	m := laneMem{b, l}
	c := b.cfg
	if err := m.grow(&l.staging, b.slotBytes(n)*b.opts.Slots); err != nil {
		return err
	}
	if err := m.grow(&l.gemm, n*2*c.KVDim()*4); err != nil {
		return err
	}
	if err := m.grow(&l.pos, 4*n); err != nil {
		return err
	}
	return m.grow(&l.bad, 4)
}

// ensureDecode sizes the decode buffer for n rows of the model dtype.
func (l *lane) ensureDecode(b *Backend, n int) error {
	c := b.cfg
	return laneMem{b, l}.grow(&l.dec, n*max(c.HiddenRowBytes(), c.KVRowBytes()))
}

// release frees everything the lane holds. Call with its work finished.
func (l *lane) release(b *Backend) {
	m := laneMem{b, l}
	l.scr.release(m)
	for _, p := range []*devBuf{&l.staging, &l.gemm, &l.dec, &l.pos, &l.bad, &l.toks} {
		m.free(p.ptr)
		*p = devBuf{}
	}
	b.ops.destroyBlas(l.blas)
	b.ops.destroyStream(l.copyS)
	b.ops.destroyStream(l.compS)
	l.blas, l.copyS, l.compS = 0, 0, 0
}

// newLane makes a lane's streams and cuBLAS handle. Call inside b.ops.with.
func (b *Backend) newLane(id int) (*lane, error) {
	l := &lane{id: id}
	var err error
	if l.copyS, err = b.ops.newStream(); err != nil {
		return nil, err
	}
	if l.compS, err = b.ops.newStream(); err != nil {
		l.release(b)
		return nil, err
	}
	if l.blas, err = b.ops.newBlas(l.compS); err != nil {
		l.release(b)
		return nil, err
	}
	return l, nil
}

// acquireLane waits for one of the Options.Restores lanes and returns it
// (made on first use). Call inside b.ops.with.
func (b *Backend) acquireLane() (*lane, error) {
	b.laneSem <- struct{}{}
	b.mu.Lock()
	if err := b.live(); err != nil {
		b.mu.Unlock()
		<-b.laneSem
		return nil, err
	}
	if n := len(b.idle); n > 0 {
		l := b.idle[n-1]
		b.idle = b.idle[:n-1]
		b.mu.Unlock()
		return l, nil
	}
	id := b.lanesMade
	b.lanesMade++
	b.mu.Unlock()
	l, err := b.newLane(id)
	if err != nil {
		b.mu.Lock()
		b.lanesMade--
		b.mu.Unlock()
		<-b.laneSem
		return nil, err
	}
	return l, nil
}

// releaseLane hands an idle lane back to the pool.
func (b *Backend) releaseLane(l *lane) {
	b.mu.Lock()
	b.idle = append(b.idle, l)
	b.mu.Unlock()
	<-b.laneSem
}

// exclusive takes every lane's turn: no restore runs until the returned
// function is called (LoadRecompute, CodecCopy, Close).
func (b *Backend) exclusive() func() {
	b.excl.Lock()
	for i := 0; i < cap(b.laneSem); i++ {
		b.laneSem <- struct{}{}
	}
	return func() {
		for i := 0; i < cap(b.laneSem); i++ {
			<-b.laneSem
		}
		b.excl.Unlock()
	}
}

// ropeTable is a cos/sin table on the device. A restore holds the table it
// began with; a larger one replaces it for later restores, and the old one
// is freed once no restore holds it.
type ropeTable struct {
	ptr     uintptr
	n       int
	refs    int
	retired bool
}

// holdRope makes the table cover positions [0, n) and takes a reference to
// it (nil for a model without RoPE); made reports a new table, uploaded by
// a synchronous copy the restore streams do not wait for. Call with b.mu held, inside
// b.ops.with.
func (b *Backend) holdRope(n int) (t *ropeTable, made bool, err error) {
	if !b.cfg.UsesRope() {
		return nil, false, nil
	}
	if b.rope == nil || n > b.rope.n {
		made = true
		size := 1024
		for size < n {
			size *= 2
		}
		tab := RopeTable(b.invFreq, size)
		p, err := b.alloc(4 * len(tab))
		if err != nil {
			return nil, false, err
		}
		if err := b.htod(p, f32bytes(tab)); err != nil {
			b.free(p)
			return nil, false, err
		}
		if old := b.rope; old != nil {
			old.retired = true
			if old.refs == 0 {
				b.free(old.ptr)
			}
		}
		b.rope = &ropeTable{ptr: p, n: size}
	}
	b.rope.refs++
	return b.rope, made, nil
}

// dropRope gives a reference back. Call with b.mu held, inside b.ops.with.
func (b *Backend) dropRope(t *ropeTable) {
	if t == nil {
		return
	}
	t.refs--
	if t.retired && t.refs == 0 {
		b.free(t.ptr)
		t.ptr = 0
	}
}

func (t *ropeTable) devPtr() uintptr {
	if t == nil {
		return 0
	}
	return t.ptr
}
