package chunk

import (
	"errors"
	"fmt"
	"syscall"
	"time"

	"github.com/cockroachdb/pebble/v2/vfs"
	"github.com/hcache/hcache/chunk/format"
	"github.com/hcache/hcache/lsm"
)

var (
	errSkipped    = errors.New("chunk: write skipped")
	errSyncFailed = errors.New("chunk: an fdatasync of the segment failed earlier")
)

// allocate allocates length bytes at the append point, rotating to a new
// segment when the active one is full. Writes are refused while the disk is
// full (ErrDiskFull); GC (gc true) may still allocate, with the room the
// released ballast left. It runs only on the flusher (the one
// allocator; evictions' tombstones on the committer take allocMu too), and
// holds no store-wide lock across fallocate, fdatasync or file creation.
func (s *Store) allocate(length uint64, gc bool) (*segFile, uint64, error) {
	s.allocMu.Lock()
	defer s.allocMu.Unlock()
	if length+format.SegmentHeaderBytes > uint64(s.opts.SegmentBytes) {
		return nil, 0, fmt.Errorf("chunk: a %d-byte record does not fit a %d-byte segment; raise SegmentBytes", length, s.opts.SegmentBytes)
	}
	s.mu.Lock()
	if s.diskFull && !gc && !s.spaceFreedLocked() {
		s.mu.Unlock()
		return nil, 0, errDiskFull()
	}
	sg := s.active
	var end uint64
	if sg != nil {
		rec := s.segRecs[sg.id]
		if end = rec.Written + length; end > uint64(s.opts.SegmentBytes) {
			rec.Sealed = true
			s.active, sg = nil, nil
			s.wholeSegments = true // this store fills segments
		}
	}
	s.mu.Unlock()
	if sg == nil {
		var err error
		t0 := time.Now()
		sg, err = s.newSegment()
		s.saveStages.segs.Add(1)
		s.saveStages.segNanos.Add(since(t0))
		if err != nil {
			return nil, 0, err
		}
		end = format.SegmentHeaderBytes + length
	}
	if err := s.grow(sg, end); err != nil {
		return nil, 0, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	rec := s.segRecs[sg.id]
	off := rec.Written
	rec.Written += length
	return sg, off, nil
}

// initialSegmentBytes is the size a new segment is preallocated with; it
// doubles as records arrive, up to SegmentBytes, so a small store takes
// little space.
//
// Once a store has filled a segment (or opens with one preallocated
// whole), its new segments are preallocated whole instead: growing the
// active segment waits for every write in flight to it (ext4's fallocate
// drains the file's direct I/O), so each of the ten doublings of a 1 GiB
// segment emptied the disk's queue in the middle of a save (bench store:
// 32 creates and grows, 300-390 ms of a 3.7-4.5 s save). A whole segment
// that does not fit the disk falls back to growing.
const initialSegmentBytes = 1 << 20

// grow makes sure sg has at least need bytes allocated (flusher only; no
// lock held across fallocate).
func (s *Store) grow(sg *segFile, need uint64) error {
	if int64(need) <= sg.allocated {
		return nil
	}
	size := min(s.opts.SegmentBytes, max(2*sg.allocated, int64(format.RoundUp(int(need)))))
	t0 := time.Now()
	err := sg.preallocate(size)
	s.saveStages.segs.Add(1)
	s.saveStages.segNanos.Add(since(t0))
	if err != nil {
		if errors.Is(err, syscall.ENOSPC) {
			s.mu.Lock()
			s.enterDiskFullLocked(err)
			s.mu.Unlock()
		}
		return fmt.Errorf("chunk: grow %s to %d bytes: %w", sg.name, size, err)
	}
	sg.allocated = size
	return nil
}

// ErrDiskFull is wrapped (with syscall.ENOSPC) by writes refused because
// the file system is full. Restores, deletes and GC go on; writes resume
// once GC has freed space.
var ErrDiskFull = errors.New("chunk: the disk is full: writes are refused until deleting contexts and GC free space")

func errDiskFull() error { return fmt.Errorf("%w (%w)", ErrDiskFull, syscall.ENOSPC) }

// spaceFreedLocked leaves the disk-full state when the file system reports
// room for the ballast and two new segments again (space freed from
// outside); it takes the ballast back first. Call with s.mu held.
func (s *Store) spaceFreedLocked() bool {
	du, err := s.fs.GetDiskUsage(s.dir)
	if err != nil || int64(du.AvailBytes) < s.opts.BallastBytes+2*initialSegmentBytes {
		return false
	}
	if err := s.takeBallast(); err != nil {
		return false
	}
	s.diskFull = false
	s.opts.Logf("chunk: %s: %d bytes free again; writes resume", s.dir, du.AvailBytes)
	return true
}

// enterDiskFullLocked switches to refusing writes after an ENOSPC: the
// ballast file is released, so that the index (deletes) and GC
// have room, and the active segment is sealed so GC may compact it. Call
// with s.mu held.
func (s *Store) enterDiskFullLocked(cause error) {
	if s.diskFull {
		return
	}
	s.diskFull = true
	s.stats.diskFull.Add(1)
	if s.active != nil {
		if rec := s.segRecs[s.active.id]; rec != nil {
			rec.Sealed = true
		}
		s.active = nil
	}
	released := s.releaseBallast()
	s.opts.Logf("chunk: %s: disk full (%v): writes refused until deletes and GC free space; ballast released: %v", s.dir, cause, released)
}

// newSegment creates, preallocates and syncs a segment file (and its
// directory entry), then makes it the active one. It becomes durable in the
// index at the next commit; until then a crash leaves an orphan file that
// Open removes (it holds no record) or keeps. Flusher only; call without
// s.mu.
func (s *Store) newSegment() (*segFile, error) {
	s.mu.Lock()
	id := s.nextSeg
	s.nextSeg++
	s.mu.Unlock()
	sg, err := openSeg(s.fs, s.segDir, id, s.eng, !s.opts.DisableDirect)
	if err != nil {
		return nil, err
	}
	fail := func(err error) (*segFile, error) {
		sg.close()
		s.fs.Remove(sg.name)
		return nil, err
	}
	size := min(s.opts.SegmentBytes, initialSegmentBytes)
	if s.wholeSegments {
		size = s.opts.SegmentBytes
	}
	err = sg.preallocate(size)
	if err != nil && size > initialSegmentBytes && errors.Is(err, syscall.ENOSPC) {
		size = initialSegmentBytes // no room for a whole one: grow it
		err = sg.preallocate(size)
	}
	if err != nil {
		if errors.Is(err, syscall.ENOSPC) {
			s.mu.Lock()
			s.enterDiskFullLocked(err)
			s.mu.Unlock()
		}
		return fail(fmt.Errorf("chunk: preallocate %s: %w", sg.name, err))
	}
	sg.allocated = size
	hdr, err := s.scratch.get(format.SegmentHeaderBytes)
	if err != nil {
		return fail(err)
	}
	(&SegmentHeader{ID: id, CreatedNanos: s.opts.Now()}).Encode(hdr.Bytes())
	err = sg.write([][]byte{hdr.Bytes()[:format.SegmentHeaderBytes]}, 0)
	s.scratch.put(hdr)
	if err == nil {
		err = sg.datasync()
	}
	if err == nil {
		err = syncDir(s.fs, s.segDir)
	}
	if err != nil {
		return fail(err)
	}
	s.mu.Lock()
	s.segs[id] = sg
	s.segRecs[id] = &lsm.Segment{Written: format.SegmentHeaderBytes}
	s.active = sg
	s.mu.Unlock()
	return sg, nil
}

func syncDir(fs vfs.FS, dir string) error {
	d, err := fs.OpenDir(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}
