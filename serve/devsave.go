package serve

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/hcache/hcache/gpu"
	"github.com/hcache/hcache/state"
)

// ErrStagingFull is returned (wrapped) by DeviceSaver.SaveLayer and
// SaveToken when the host staging holds as many copies as it can: nothing
// of the call was queued, and the caller may retry after earlier copies
// complete (WaitCopied, or a later step), save the rows another way, or
// ask to wait (DeviceSaveOptions.WaitFull). DeviceSaveStats.Full counts
// them; rows are never dropped silently.
var ErrStagingFull = errors.New("serve: device save staging is full")

// Device saver defaults.
const (
	DefaultStagingBytes = 256 << 20 // host staging of a DeviceSaver
	MinSlotBytes        = 64 << 10  // the smallest default staging slot
)

// DeviceSaveOptions configure a DeviceSaver. Zero values take the defaults.
type DeviceSaveOptions struct {
	// StagingBytes bounds the host staging (page-locked on CUDA) the
	// saver's copies land in: rows copied and not yet handed to the writer
	// (default DefaultStagingBytes). Slots are allocated as they are first
	// needed.
	StagingBytes int64
	// SlotBytes is the staging unit (default: one token's rows of every
	// layer, at least MinSlotBytes or the whole staging when that is
	// smaller; never less than one token's rows): a
	// decode token takes one slot, a prefill layer as many as its rows
	// fill, each slot one device-to-host copy.
	SlotBytes int
	// Preallocate allocates the whole staging in NewDeviceSaver, as one
	// region carved into slots (page-locking memory is slow on CUDA: a
	// latency-sensitive engine pays it once, before its first step).
	Preallocate bool
	// WaitFull is how long a call waits for staging when it is full
	// before returning ErrStagingFull; 0 returns it at once (the caller's
	// thread never blocks).
	WaitFull time.Duration
}

// DeviceSaveStats are a DeviceSaver's counters (the daemon exports them).
type DeviceSaveStats struct {
	Calls     int64 `json:"calls"`      // SaveLayer and SaveToken calls queued
	Bytes     int64 `json:"bytes"`      // bytes of rows queued
	Copied    int64 `json:"copied"`     // calls whose device copies completed
	Written   int64 `json:"written"`    // calls handed to the writer
	Full      int64 `json:"full"`       // calls refused with ErrStagingFull
	Waits     int64 `json:"waits"`      // calls that waited for staging (WaitFull)
	WaitNanos int64 `json:"wait_ns"`    // time they waited
	Slots     int   `json:"slots"`      // staging slots allowed
	SlotBytes int   `json:"slot_bytes"` // bytes per slot
	InUse     int   `json:"in_use"`     // slots holding rows now
	Peak      int   `json:"peak"`       // most slots held at once
}

// DeviceAppender is the writer a DeviceSaver hands rows to: a context's
// *chunk.Writer.
type DeviceAppender interface {
	Appender
	// Flush makes what was appended durable.
	Flush() error
}

// DeviceSaver saves a context's rows from device memory without making the
// caller wait (issue 24). Each SaveLayer (prefill: many tokens of one
// layer) or SaveToken (decode: one token of every stored layer) call takes
// host staging, asks the copier to copy the rows after the work queued on
// the caller's stream (an event recorded there, which the copier's own
// stream waits for), and returns. A completion goroutine waits for each
// copy, in call order, and passes the rows to a writer goroutine, which
// appends them (AppendLayer, AppendToken) and then releases their staging.
// The caller's stream waits for nothing of hcache's and the caller's
// thread blocks only when it asked to (WaitFull).
//
// The device rows must be laid out as the plan stores them (RowLayout,
// codec none): hidden rows, or K then V per token for a KV layer. They must
// stay unchanged until their copy completes (WaitCopied, Copied).
//
// Acknowledgement means durable: Flush returns nil once every call before
// it has been copied, appended and flushed by the writer. An error of a
// copy or of the writer stops the saver: later rows are not appended (a
// context's tokens stay in order), and the next call and Flush return it.
//
// Calls come from one goroutine (the engine's step loop); Stats and
// Copied may be called from any.
type DeviceSaver struct {
	plan      []state.LayerPlan
	w         DeviceAppender
	cp        gpu.AsyncCopier
	o         DeviceSaveOptions
	tokBytes  int // one token's rows of every layer
	nslots    int
	copyQ     chan *devItem
	writeQ    chan *devItem
	exited    chan struct{}
	closeOnce sync.Once
	closeErr  error

	mu      sync.Mutex
	cond    *sync.Cond // slots freed, copies completed, rows written
	free    [][]byte
	allocs  []func() error
	carved  bool   // every slot was carved from one preallocated region
	seq     uint64 // last call queued
	copied  uint64 // last call whose copies completed
	written uint64 // last call the writer dealt with
	err     error  // first copy or writer error
	closed  bool
	st      DeviceSaveStats

	flushWaitHook func() // test seam: called (s.mu held) when Flush waits for calls in flight
}

type devItem struct {
	seq   uint64
	ev    gpu.Event
	layer int      // -1: a decode token
	rows  [][]byte // per slot (a layer), or per layer (a token)
	slots [][]byte
}

// NewDeviceSaver wraps w, the writer of a context stored under plan (codec
// none), copying through cp.
func NewDeviceSaver(plan []state.LayerPlan, w DeviceAppender, cp gpu.AsyncCopier, o DeviceSaveOptions) (*DeviceSaver, error) {
	if w == nil || cp == nil {
		return nil, errors.New("serve: NewDeviceSaver needs a writer and a copier")
	}
	if len(plan) == 0 {
		return nil, errors.New("serve: NewDeviceSaver with an empty plan")
	}
	if o.StagingBytes == 0 {
		o.StagingBytes = DefaultStagingBytes
	}
	if o.StagingBytes < 0 || o.SlotBytes < 0 || o.WaitFull < 0 {
		return nil, fmt.Errorf("serve: DeviceSaveOptions %+v: negative setting", o)
	}
	s := &DeviceSaver{plan: plan, w: w, cp: cp}
	for _, p := range plan {
		s.tokBytes += int(p.RowBytes)
	}
	if s.tokBytes == 0 {
		return nil, errors.New("serve: NewDeviceSaver: the plan stores no layer")
	}
	if o.SlotBytes == 0 {
		o.SlotBytes = max(s.tokBytes, int(min(MinSlotBytes, o.StagingBytes)))
	}
	o.SlotBytes = max(o.SlotBytes, s.tokBytes)
	s.nslots = int(o.StagingBytes / int64(o.SlotBytes))
	if s.nslots < 1 {
		return nil, fmt.Errorf("serve: DeviceSaveOptions.StagingBytes %d is less than one slot of %d bytes (one token of every layer is %d)", o.StagingBytes, o.SlotBytes, s.tokBytes)
	}
	s.o = o
	s.st.Slots, s.st.SlotBytes = s.nslots, o.SlotBytes
	s.cond = sync.NewCond(&s.mu)
	if o.Preallocate {
		buf, free, err := cp.AllocHost(s.nslots * o.SlotBytes)
		if err != nil {
			return nil, fmt.Errorf("serve: NewDeviceSaver: allocating %d bytes of staging: %w", s.nslots*o.SlotBytes, err)
		}
		s.allocs = append(s.allocs, free)
		for i := s.nslots - 1; i >= 0; i-- {
			s.free = append(s.free, buf[i*o.SlotBytes:(i+1)*o.SlotBytes:(i+1)*o.SlotBytes])
		}
		s.carved = true
	}
	// Every queued item holds a slot, so at most nslots are queued: the
	// sends to these never block.
	s.copyQ, s.writeQ = make(chan *devItem, s.nslots), make(chan *devItem, s.nslots)
	s.exited = make(chan struct{})
	go s.completer()
	go s.writer()
	return s, nil
}

// SaveLayer queues the copy of tokens rows of layer (prefill: the next
// tokens of that layer) from src, after the work queued on stream. It
// returns the call's sequence number (for WaitCopied) once the copy is
// queued. A layer's rows may come in several calls (consecutive tokens);
// a call whose rows exceed the whole staging is refused with an error
// naming the setting (split it).
func (s *DeviceSaver) SaveLayer(ctx context.Context, layer int, src gpu.DevicePtr, tokens int, stream gpu.Stream) (uint64, error) {
	if layer < 0 || layer >= len(s.plan) {
		return 0, fmt.Errorf("serve: SaveLayer: layer %d out of range [0, %d)", layer, len(s.plan))
	}
	rb := int(s.plan[layer].RowBytes)
	if rb == 0 {
		return 0, fmt.Errorf("serve: SaveLayer: layer %d stores nothing in this plan", layer)
	}
	if tokens <= 0 {
		return 0, fmt.Errorf("serve: SaveLayer: layer %d: %d tokens", layer, tokens)
	}
	if src == 0 {
		return 0, fmt.Errorf("serve: SaveLayer: layer %d: a null device pointer", layer)
	}
	per := s.o.SlotBytes / rb // rows per slot, >= 1
	k := (tokens + per - 1) / per
	if k > s.nslots {
		return 0, fmt.Errorf("serve: SaveLayer: layer %d: %d tokens of %d-byte rows need %d staging slots of %d bytes, more than the %d of DeviceSaveOptions.StagingBytes %d: save the layer in parts",
			layer, tokens, rb, k, s.o.SlotBytes, s.nslots, s.o.StagingBytes)
	}
	slots, err := s.take(ctx, k)
	if err != nil {
		return 0, fmt.Errorf("serve: SaveLayer: layer %d: %w", layer, err)
	}
	it := &devItem{layer: layer, slots: slots}
	copies := make([]gpu.Copy, k)
	for i := range k {
		n := min(per, tokens-i*per) * rb
		dst := slots[i][:n]
		copies[i] = gpu.Copy{Src: src + gpu.DevicePtr(i*per*rb), Bytes: n, Dst: dst}
		it.rows = append(it.rows, dst)
	}
	return s.queue(it, copies, stream, int64(tokens*rb))
}

// SaveToken queues the copy of one token's rows of every layer (decode):
// rows[l] is layer l's row in device memory, 0 for a layer that stores
// nothing. One event orders all of them after the work queued on stream.
func (s *DeviceSaver) SaveToken(ctx context.Context, rows []gpu.DevicePtr, stream gpu.Stream) (uint64, error) {
	if len(rows) != len(s.plan) {
		return 0, fmt.Errorf("serve: SaveToken got %d layers, the plan has %d", len(rows), len(s.plan))
	}
	for l, p := range rows {
		if (p == 0) != (s.plan[l].RowBytes == 0) {
			if p == 0 {
				return 0, fmt.Errorf("serve: SaveToken: layer %d stores %d-byte rows, got a null device pointer", l, s.plan[l].RowBytes)
			}
			return 0, fmt.Errorf("serve: SaveToken: layer %d stores nothing, got a device pointer (pass 0)", l)
		}
	}
	slots, err := s.take(ctx, 1)
	if err != nil {
		return 0, fmt.Errorf("serve: SaveToken: %w", err)
	}
	it := &devItem{layer: -1, slots: slots, rows: make([][]byte, len(rows))}
	var copies []gpu.Copy
	off := 0
	for l, p := range rows {
		rb := int(s.plan[l].RowBytes)
		if rb == 0 {
			continue
		}
		dst := slots[0][off : off+rb]
		off += rb
		it.rows[l] = dst
		copies = append(copies, gpu.Copy{Src: p, Bytes: rb, Dst: dst})
	}
	return s.queue(it, copies, stream, int64(s.tokBytes))
}

// queue issues the copies and hands the item to the completion goroutine;
// on an error the slots go back and nothing was queued.
func (s *DeviceSaver) queue(it *devItem, copies []gpu.Copy, stream gpu.Stream, bytes int64) (uint64, error) {
	ev, err := s.cp.CopyToHost(context.Background(), stream, copies...)
	s.mu.Lock()
	defer s.mu.Unlock()
	if err != nil {
		s.put(it.slots)
		return 0, fmt.Errorf("serve: device save of %s: %w", it.what(), err)
	}
	s.seq++
	it.seq, it.ev = s.seq, ev
	s.st.Calls++
	s.st.Bytes += bytes
	s.copyQ <- it
	return it.seq, nil
}

func (it *devItem) what() string {
	if it.layer < 0 {
		return "a decode token"
	}
	return fmt.Sprintf("layer %d", it.layer)
}

// take returns k staging slots, allocating up to the bound, waiting for
// some to be freed only as DeviceSaveOptions.WaitFull allows.
func (s *DeviceSaver) take(ctx context.Context, k int) ([][]byte, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	var deadline time.Time
	var t0 time.Time
	waited := false
	for {
		if s.closed {
			return nil, errors.New("device saver is closed")
		}
		if s.err != nil {
			return nil, s.err
		}
		if len(s.free)+s.unallocated() >= k {
			break
		}
		if s.o.WaitFull == 0 {
			s.st.Full++
			return nil, fmt.Errorf("%w: %d of %d slots of %d bytes hold rows not yet written (DeviceSaveOptions.StagingBytes %d); this call needs %d",
				ErrStagingFull, s.st.InUse, s.nslots, s.o.SlotBytes, s.o.StagingBytes, k)
		}
		now := time.Now()
		if !waited {
			waited, t0, deadline = true, now, now.Add(s.o.WaitFull)
			s.st.Waits++
			stop := context.AfterFunc(ctx, func() { s.mu.Lock(); s.cond.Broadcast(); s.mu.Unlock() })
			defer stop()
			tm := time.AfterFunc(s.o.WaitFull, func() { s.mu.Lock(); s.cond.Broadcast(); s.mu.Unlock() })
			defer tm.Stop()
		}
		if err := ctx.Err(); err != nil {
			s.st.WaitNanos += int64(time.Since(t0))
			return nil, err
		}
		if !now.Before(deadline) {
			s.st.Full++
			s.st.WaitNanos += int64(now.Sub(t0))
			return nil, fmt.Errorf("%w after waiting %v: %d of %d slots of %d bytes hold rows not yet written (DeviceSaveOptions.StagingBytes %d); this call needs %d",
				ErrStagingFull, s.o.WaitFull, s.st.InUse, s.nslots, s.o.SlotBytes, s.o.StagingBytes, k)
		}
		s.cond.Wait()
	}
	if waited {
		s.st.WaitNanos += int64(time.Since(t0))
	}
	out := make([][]byte, 0, k)
	for len(out) < k && len(s.free) > 0 {
		out = append(out, s.free[len(s.free)-1])
		s.free = s.free[:len(s.free)-1]
	}
	for len(out) < k {
		buf, free, err := s.cp.AllocHost(s.o.SlotBytes)
		if err != nil {
			s.free = append(s.free, out...)
			return nil, fmt.Errorf("allocating a %d-byte staging slot: %w", s.o.SlotBytes, err)
		}
		s.allocs = append(s.allocs, free)
		out = append(out, buf)
	}
	s.st.InUse += k
	s.st.Peak = max(s.st.Peak, s.st.InUse)
	return out, nil
}

// unallocated is how many slots may still be allocated (s.mu held).
func (s *DeviceSaver) unallocated() int {
	if s.carved {
		return 0
	}
	return s.nslots - len(s.allocs)
}

// put returns slots (s.mu held).
func (s *DeviceSaver) put(slots [][]byte) {
	s.free = append(s.free, slots...)
	s.st.InUse -= len(slots)
	s.cond.Broadcast()
}

// completer waits for each call's copies, in call order (one copy stream
// completes them in order), and passes the rows to the writer.
func (s *DeviceSaver) completer() {
	defer close(s.writeQ)
	for it := range s.copyQ {
		err := it.ev.Wait()
		it.ev.Release()
		s.mu.Lock()
		if err != nil && s.err == nil {
			s.err = fmt.Errorf("serve: device copy of %s (call %d): %w", it.what(), it.seq, err)
		}
		s.copied = it.seq
		s.st.Copied++
		s.cond.Broadcast()
		s.mu.Unlock()
		s.writeQ <- it
	}
}

// writer appends each call's rows, then releases its staging. After the
// first error it appends nothing more.
func (s *DeviceSaver) writer() {
	defer close(s.exited)
	for it := range s.writeQ {
		s.mu.Lock()
		failed := s.err != nil
		s.mu.Unlock()
		var err error
		if !failed {
			if it.layer < 0 {
				err = s.w.AppendToken(it.rows)
			} else {
				for _, r := range it.rows {
					if err = s.w.AppendLayer(it.layer, r); err != nil {
						break
					}
				}
			}
		}
		s.mu.Lock()
		if err != nil && s.err == nil {
			s.err = fmt.Errorf("serve: device save: appending %s (call %d): %w", it.what(), it.seq, err)
		}
		s.written = it.seq
		if !failed && err == nil {
			s.st.Written++
		}
		s.put(it.slots)
		s.mu.Unlock()
	}
}

// Copied returns the sequence number of the last call whose device copies
// completed: the device rows of calls up to it may change.
func (s *DeviceSaver) Copied() uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.copied
}

// WaitCopied waits until the copies of call seq (and every call before it)
// completed, and returns the saver's error if any.
func (s *DeviceSaver) WaitCopied(seq uint64) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if seq > s.seq {
		return fmt.Errorf("serve: WaitCopied(%d): only %d calls were queued", seq, s.seq)
	}
	for s.copied < seq {
		s.cond.Wait()
	}
	return s.err
}

// WaitWritten waits until the rows of call seq (and every call before it)
// have been handed to the writer (appended, not yet durable: Flush) and
// their staging released, and returns the saver's error if any.
func (s *DeviceSaver) WaitWritten(seq uint64) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if seq > s.seq {
		return fmt.Errorf("serve: WaitWritten(%d): only %d calls were queued", seq, s.seq)
	}
	for s.written < seq {
		s.cond.Wait()
	}
	return s.err
}

// Flush waits for every call queued so far to be copied and appended, then
// flushes the writer: it returns nil once their rows are durable, or the
// first error that prevented it (a copy's, the writer's).
func (s *DeviceSaver) Flush() error {
	s.mu.Lock()
	for s.written < s.seq {
		if s.flushWaitHook != nil {
			s.flushWaitHook()
		}
		s.cond.Wait()
	}
	err := s.err
	s.mu.Unlock()
	if err != nil {
		return err
	}
	if err := s.w.Flush(); err != nil {
		err = fmt.Errorf("serve: device save: flushing the writer: %w", err)
		s.mu.Lock()
		if s.err == nil {
			s.err = err
		}
		s.mu.Unlock()
		return err
	}
	return nil
}

// Err returns the saver's first error (nil while none).
func (s *DeviceSaver) Err() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.err
}

// Stats returns the saver's counters.
func (s *DeviceSaver) Stats() DeviceSaveStats {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.st
}

// Close flushes (Flush), stops the saver's goroutines and frees its
// staging. The writer stays open (its owner closes it); the copier too.
// Calling it again returns the first call's result.
func (s *DeviceSaver) Close() error {
	s.closeOnce.Do(func() {
		err := s.Flush()
		s.mu.Lock()
		s.closed = true
		s.cond.Broadcast()
		s.mu.Unlock()
		close(s.copyQ)
		<-s.exited
		s.mu.Lock()
		for _, f := range s.allocs {
			err = errors.Join(err, f())
		}
		s.allocs, s.free = nil, nil
		s.mu.Unlock()
		s.closeErr = err
	})
	return s.closeErr
}
