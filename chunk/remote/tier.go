package remote

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"sort"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hcache/hcache/chunk"
	"github.com/hcache/hcache/chunk/format"
)

// TierOptions configure the write-back of sealed segments.
type TierOptions struct {
	// QueueLen bounds the segments waiting for an upload (default 16):
	// past it the scan waits (backpressure on the tier, never on writers).
	QueueLen int
	// Uploaders is the number of segments uploaded at once (default 2).
	Uploaders int
	// LocalBytes bounds the bytes of sealed segments kept local once the
	// remote tier holds them: past it the oldest uploaded ones move to the
	// remote tier (their local files are deleted; restores read them
	// remotely). 0 keeps every local copy; -1 moves each right after its
	// upload.
	LocalBytes int64
	// Interval is how often sealed segments are looked for (default 2 s).
	Interval time.Duration
	// Logf reports failures (default: none).
	Logf func(string, ...any)
}

// Tier copies a store's sealed segments to the bucket in the background
// and moves them there once verified. Start it after opening the store
// with the client's Provider in chunk.Options.Providers.
type Tier struct {
	c     *Client
	s     *chunk.Store
	o     TierOptions
	queue chan uint32
	stop  chan struct{}
	wg    sync.WaitGroup
	kick  chan struct{}

	mu       sync.Mutex
	queued   map[uint32]bool
	uploaded map[uint32]bool // verified in the bucket, still local
	failed   map[uint32]time.Time

	st tierStats
}

type tierStats struct {
	uploads, uploadBytes, uploadErrs, moves, moveErrs, waits atomic.Int64
}

// TierStats counts the tier's work.
type TierStats struct {
	Queued, Uploaded          int   // segments waiting now; uploaded and still local now
	Uploads, UploadBytes      int64 // completed, verified uploads
	UploadErrors              int64
	Moves, MoveErrors         int64 // segments switched to the remote tier
	QueueFullWaits            int64 // times the scan waited for room (backpressure)
	Client                    ClientStats
	RemoteSegments, LocalSegs int // of the store now
}

// StartTier starts the write-back of s's sealed segments to c's bucket.
func StartTier(s *chunk.Store, c *Client, o TierOptions) *Tier {
	if o.QueueLen <= 0 {
		o.QueueLen = 16
	}
	if o.Uploaders <= 0 {
		o.Uploaders = 2
	}
	if o.Interval <= 0 {
		o.Interval = 2 * time.Second
	}
	if o.Logf == nil {
		o.Logf = func(string, ...any) {}
	}
	t := &Tier{c: c, s: s, o: o, queue: make(chan uint32, o.QueueLen), stop: make(chan struct{}), kick: make(chan struct{}, 1),
		queued: map[uint32]bool{}, uploaded: map[uint32]bool{}, failed: map[uint32]time.Time{}}
	for range o.Uploaders {
		t.wg.Add(1)
		go t.uploader()
	}
	t.wg.Add(1)
	go t.scanner()
	return t
}

// Close stops the tier; uploads in flight are abandoned (nothing partial
// becomes visible; the next start uploads them again).
func (t *Tier) Close() {
	select {
	case <-t.stop:
	default:
		close(t.stop)
	}
	t.wg.Wait()
}

// Kick asks for a scan now.
func (t *Tier) Kick() {
	select {
	case t.kick <- struct{}{}:
	default:
	}
}

// Stats returns the counters.
func (t *Tier) Stats() TierStats {
	t.mu.Lock()
	st := TierStats{Queued: len(t.queued), Uploaded: len(t.uploaded)}
	t.mu.Unlock()
	st.Uploads, st.UploadBytes, st.UploadErrors = t.st.uploads.Load(), t.st.uploadBytes.Load(), t.st.uploadErrs.Load()
	st.Moves, st.MoveErrors, st.QueueFullWaits = t.st.moves.Load(), t.st.moveErrs.Load(), t.st.waits.Load()
	st.Client = t.c.Stats()
	for _, sg := range t.s.Segments() {
		if sg.Location != "" {
			st.RemoteSegments++
		} else {
			st.LocalSegs++
		}
	}
	return st
}

func (t *Tier) scanner() {
	defer t.wg.Done()
	tick := time.NewTicker(t.o.Interval)
	defer tick.Stop()
	for {
		t.scan()
		select {
		case <-t.stop:
			return
		case <-tick.C:
		case <-t.kick:
		}
	}
}

// scan queues the sealed local segments not uploaded yet and moves the
// oldest uploaded ones past LocalBytes.
func (t *Tier) scan() {
	segs := t.s.Segments()
	for _, sg := range segs {
		if sg.Active || sg.Location != "" {
			continue
		}
		t.mu.Lock()
		skip := t.queued[sg.ID] || t.uploaded[sg.ID] || time.Since(t.failed[sg.ID]) < 4*t.o.Interval
		if !skip {
			t.queued[sg.ID] = true
		}
		t.mu.Unlock()
		if skip {
			continue
		}
		select {
		case t.queue <- sg.ID:
			continue
		default:
		}
		t.st.waits.Add(1)
		select {
		case t.queue <- sg.ID:
		case <-t.stop:
			return
		}
	}
	t.evict(segs)
}

// evict moves uploaded segments, oldest first, while the local sealed
// bytes they hold exceed LocalBytes.
func (t *Tier) evict(segs []chunk.SegmentInfo) {
	if t.o.LocalBytes == 0 {
		return
	}
	var local int64
	var cands []chunk.SegmentInfo
	t.mu.Lock()
	for _, sg := range segs {
		if sg.Location == "" && sg.Sealed && !sg.Active {
			local += int64(sg.Written)
			if t.uploaded[sg.ID] {
				cands = append(cands, sg)
			}
		}
	}
	t.mu.Unlock()
	sort.Slice(cands, func(i, j int) bool { return cands[i].ID < cands[j].ID })
	limit := max(t.o.LocalBytes, 0)
	for _, sg := range cands {
		if local <= limit {
			return
		}
		err := t.s.MoveSegment(sg.ID, LocationName(t.c.cfg))
		t.mu.Lock()
		delete(t.uploaded, sg.ID)
		t.mu.Unlock()
		if err != nil {
			t.st.moveErrs.Add(1)
			t.o.Logf("remote: move segment %d to the remote tier: %v", sg.ID, err)
			continue
		}
		t.st.moves.Add(1)
		local -= int64(sg.Written)
	}
}

func (t *Tier) uploader() {
	defer t.wg.Done()
	for {
		select {
		case <-t.stop:
			return
		case id := <-t.queue:
			err := t.upload(id)
			t.finish(id, err, nil)
			if err == nil && t.o.LocalBytes != 0 {
				t.Kick()
			}
		}
	}
}

// upload copies segment id unless the bucket holds it already, and checks
// the object: its size and its header block equal the local ones.
func (t *Tier) upload(id uint32) error {
	r, err := t.s.OpenSealedSegment(id)
	if err != nil {
		return err
	}
	defer r.Close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		select {
		case <-t.stop:
			cancel()
		case <-ctx.Done():
		}
	}()
	key := t.c.segKey(t.c.cfg.StoreID, id)
	size := r.Size()
	local := make([]byte, format.SegmentHeaderBytes)
	if _, err := r.ReadAt(local, 0); err != nil {
		return fmt.Errorf("read local header: %w", err)
	}
	if ok, err := t.verify(ctx, key, size, local); err != nil && !errors.Is(err, ErrNotFound) {
		return err
	} else if ok {
		return nil // uploaded before a restart
	}
	meta := map[string]string{"hcache-store": t.c.cfg.StoreID, "hcache-segment": strconv.FormatUint(uint64(id), 10)}
	if err := t.c.put(ctx, key, io.NewSectionReader(r, 0, size), size, meta); err != nil {
		return err
	}
	ok, err := t.verify(ctx, key, size, local)
	if err != nil {
		return err
	}
	if !ok {
		return fmt.Errorf("%w: the uploaded %s differs from the local segment", format.ErrCorrupt, key)
	}
	t.st.uploads.Add(1)
	t.st.uploadBytes.Add(size)
	return nil
}

// verify reports whether key holds size bytes starting with header.
func (t *Tier) verify(ctx context.Context, key string, size int64, header []byte) (bool, error) {
	oi, err := t.c.stat(ctx, key)
	if err != nil {
		return false, err
	}
	if oi.Size != size {
		return false, nil
	}
	got := make([]byte, len(header))
	if err := t.c.getRange(ctx, key, got, 0); err != nil {
		return false, err
	}
	return bytes.Equal(got, header), nil
}

// Sync uploads every sealed local segment now (waiting for uploads the
// background has in flight) and moves them per LocalBytes, returning the
// first failure (tests and shutdown).
func (t *Tier) Sync() error {
	var first error
	for _, sg := range t.s.Segments() {
		if sg.Active || sg.Location != "" {
			continue
		}
		for {
			t.mu.Lock()
			busy, done := t.queued[sg.ID], t.uploaded[sg.ID]
			if !busy && !done {
				t.queued[sg.ID] = true
			}
			t.mu.Unlock()
			if !busy {
				if !done {
					t.finish(sg.ID, t.upload(sg.ID), &first)
				}
				break
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	t.evict(t.s.Segments())
	return first
}

// finish records the end of an upload of id.
func (t *Tier) finish(id uint32, err error, first *error) {
	t.mu.Lock()
	delete(t.queued, id)
	if err == nil {
		t.uploaded[id] = true
		delete(t.failed, id)
	} else if !errors.Is(err, chunk.ErrNotSealed) {
		t.failed[id] = time.Now()
	}
	t.mu.Unlock()
	if err != nil && !errors.Is(err, chunk.ErrNotSealed) {
		t.st.uploadErrs.Add(1)
		t.o.Logf("remote: upload segment %d: %v (retried later)", id, err)
		if first != nil && *first == nil {
			*first = err
		}
	}
}
