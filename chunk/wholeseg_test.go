package chunk

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2/vfs"
)

// TestWholeSegments: a store that has filled a segment preallocates its
// next segments whole (growing one while writes to it are in flight drains
// them on ext4: alloc.go), also after a reopen; a store that never filled
// one keeps growing its first from 1 MiB; data written across the switch
// restores.
func TestWholeSegments(t *testing.T) {
	ident := testIdentity("m")
	const segBytes = 4 << 20
	size := func(e *env, id uint32) int64 {
		t.Helper()
		st, err := os.Stat(filepath.Join(e.dir, "segments", segName(id)))
		if err != nil {
			t.Fatal(err)
		}
		return st.Size()
	}
	for _, tc := range []struct {
		name   string
		tokens int  // of the first context (512 bytes per token)
		reopen bool // reopen before the second context
		want2  bool // segment 2 exists and is whole from its creation
	}{
		{"one segment, never filled", 2000, false, false},
		{"filled", 9000, false, true},
		{"filled, then reopened", 9000, true, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, "disk", func(o *Options) { o.SegmentBytes = segBytes; o.GCInterval = -1 })
			s := e.open()
			w, _ := s.Create("ns", "a", ident, CreateOptions{})
			appendPrefill(t, w, ident, "a", 0, tc.tokens)
			if err := w.Close(); err != nil {
				t.Fatal(err)
			}
			if !tc.want2 {
				if got := size(e, 1); got >= segBytes {
					t.Fatalf("a store of %d tokens preallocated a whole segment (%d bytes)", tc.tokens, got)
				}
				s.Close()
				return
			}
			if tc.reopen {
				s.Close()
				s = e.open()
				s.allocMu.Lock()
				whole := s.wholeSegments
				s.allocMu.Unlock()
				if !whole {
					t.Fatal("reopened with a whole segment on disk, the store grows new segments again")
				}
			}
			// A few groups more: whatever segment they land in was
			// created whole, and every later one too.
			w, _ = s.Create("ns", "b", ident, CreateOptions{})
			appendPrefill(t, w, ident, "b", 0, 9000)
			if err := w.Close(); err != nil {
				t.Fatal(err)
			}
			segs := s.Segments()
			for _, sg := range segs[1:] {
				if got := size(e, sg.ID); got != segBytes {
					t.Errorf("segment %d (created after one filled) is %d bytes, want %d", sg.ID, got, segBytes)
				}
			}
			verify(t, s, "ns", "a", ident, tc.tokens)
			verify(t, s, "ns", "b", ident, 9000)
			s.Close()
		})
	}
}

// preallocFS fails a segment's preallocation past limit bytes with ENOSPC
// and records the sizes asked for.
type preallocFS struct {
	vfs.FS
	limit int64
	mu    sync.Mutex
	asked []int64
}

type preallocFile struct {
	vfs.File
	fs *preallocFS
}

func (f *preallocFS) OpenReadWrite(name string, c vfs.DiskWriteCategory, opts ...vfs.OpenOption) (vfs.File, error) {
	file, err := f.FS.OpenReadWrite(name, c, opts...)
	if err != nil || !strings.Contains(name, "segments/") {
		return file, err
	}
	return &preallocFile{file, f}, nil
}

func (p *preallocFile) Preallocate(off, n int64) error {
	p.fs.mu.Lock()
	p.fs.asked = append(p.fs.asked, off+n)
	p.fs.mu.Unlock()
	if off+n > p.fs.limit {
		return &os.PathError{Op: "fallocate", Path: "segment", Err: syscall.ENOSPC}
	}
	return p.File.Preallocate(off, n)
}

// TestWholeSegmentENOSPC: when a whole segment does not fit the disk, the
// new segment is preallocated small and grown as before; the store does
// not enter its disk-full state and the writes succeed.
func TestWholeSegmentENOSPC(t *testing.T) {
	ident := testIdentity("m")
	const segBytes = 4 << 20
	ffs := &preallocFS{FS: vfs.NewMem(), limit: 2 << 20}
	s, err := Open(Options{FS: ffs, Dir: "/s", ChunkTokens: 16, SegmentBytes: segBytes, GCInterval: -1, Logf: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	s.allocMu.Lock()
	s.wholeSegments = true // as after a filled segment
	s.allocMu.Unlock()
	w, _ := s.Create("ns", "a", ident, CreateOptions{})
	appendPrefill(t, w, ident, "a", 0, 1000)
	if err := w.Close(); err != nil {
		t.Fatalf("a write whose whole segment did not fit: %v", err)
	}
	if s.Stats().DiskFull {
		t.Fatal("the store entered its disk-full state when only a whole segment did not fit")
	}
	ffs.mu.Lock()
	asked := append([]int64(nil), ffs.asked...)
	ffs.mu.Unlock()
	if len(asked) < 2 || asked[0] != segBytes || asked[1] != initialSegmentBytes {
		t.Fatalf("preallocations %v, want %d (refused) then %d", asked, segBytes, initialSegmentBytes)
	}
	verify(t, s, "ns", "a", ident, 1000)
}

// TestSaveStagesBusy: SaveStages counts the time writes were in flight
// (within the save's wall time, and at least the longest single write) and
// the segment files created or grown.
func TestSaveStagesBusy(t *testing.T) {
	ident := testIdentity("m")
	e := newEnv(t, "disk", func(o *Options) { o.GCInterval = -1 })
	s := e.open()
	defer s.Close()
	before := s.SaveStages()
	start := time.Now()
	w, _ := s.Create("ns", "a", ident, CreateOptions{})
	appendPrefill(t, w, ident, "a", 0, 3000)
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	wall := time.Since(start)
	st := s.SaveStages()
	busy, writes := st.Busy-before.Busy, st.Writes-before.Writes
	if writes == 0 || busy <= 0 || busy > wall {
		t.Fatalf("%d writes, busy %v over a %v save", writes, busy, wall)
	}
	if busy < (st.Write-before.Write)/time.Duration(writes) {
		t.Fatalf("busy %v is less than the mean write (%v over %d)", busy, st.Write-before.Write, writes)
	}
	if st.Segments-before.Segments == 0 || st.Segment <= before.Segment {
		t.Fatalf("segment creates/grows %d, %v: the save created a segment", st.Segments-before.Segments, st.Segment-before.Segment)
	}
}

// TestNextData: nextData skips space never written (a sparse gap, an
// unwritten preallocated range) to the block holding the next data, says
// size when nothing follows, and reads every block where it cannot tell (a
// file without a descriptor).
func TestNextData(t *testing.T) {
	path := filepath.Join(t.TempDir(), "f")
	f, err := vfs.Default.Create(path, vfs.WriteCategoryUnspecified)
	if err != nil {
		t.Fatal(err)
	}
	data := make([]byte, BlockBytes)
	data[0] = 1
	const far = 8<<20 + 3*BlockBytes
	for _, off := range []int64{0, far} {
		if _, err := f.WriteAt(data, off); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Preallocate(0, 64<<20); err != nil { // unwritten past far
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	size := int64(64 << 20)
	for _, c := range []struct{ off, want int64 }{
		{0, 0},                   // data here
		{BlockBytes, far},        // the gap is skipped
		{far, far},               // data here
		{far + BlockBytes, size}, // only unwritten space follows
	} {
		if got := nextData(f, c.off, size); got != c.want {
			t.Errorf("nextData(%d) = %d, want %d", c.off, got, c.want)
		}
	}
	f.Close()
	mem := vfs.NewMem()
	mf, _ := mem.Create("f", vfs.WriteCategoryUnspecified)
	mf.WriteAt(data, far)
	if got := nextData(mf, BlockBytes, far+BlockBytes); got != BlockBytes {
		t.Errorf("a file without a descriptor: nextData(%d) = %d, want %d (no skipping)", BlockBytes, got, BlockBytes)
	}
}

// readCountFS counts the reads of segment files.
type readCountFS struct {
	vfs.FS
	reads atomic.Int64
}

type readCountFile struct {
	vfs.File
	fs *readCountFS
}

func (f *readCountFS) Open(name string, opts ...vfs.OpenOption) (vfs.File, error) {
	file, err := f.FS.Open(name, opts...)
	if err != nil || !strings.Contains(name, "segments/") {
		return file, err
	}
	return &readCountFile{file, f}, nil
}

func (f *readCountFile) ReadAt(p []byte, off int64) (int, error) {
	f.fs.reads.Add(1)
	return f.File.ReadAt(p, off)
}

// TestOpenSkipsUnwrittenTail: reopening a store whose active segment was
// preallocated whole reads a few blocks of its unwritten tail, not every
// one (the tombstone scan: nextData); a deleted context stays deleted; so
// does a repair of the lost index, which reads few blocks too.
func TestOpenSkipsUnwrittenTail(t *testing.T) {
	ident := testIdentity("m")
	const segBytes = 64 << 20
	rfs := &readCountFS{FS: vfs.Default}
	e := newEnv(t, "disk", func(o *Options) { o.FS = rfs; o.SegmentBytes = segBytes; o.GCInterval = -1 })
	s := e.open()
	s.allocMu.Lock()
	s.wholeSegments = true // as after a filled segment
	s.allocMu.Unlock()
	for _, id := range []string{"a", "b"} {
		w, _ := s.Create("ns", id, ident, CreateOptions{})
		appendPrefill(t, w, ident, id, 0, 100)
		if err := w.Close(); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.Delete("ns", "b"); err != nil {
		t.Fatal(err)
	}
	s.Close()
	if st, err := os.Stat(filepath.Join(e.dir, "segments", segName(1))); err != nil || st.Size() != segBytes {
		t.Fatalf("segment 1: %v, %v; want a whole %d-byte segment", st, err, segBytes)
	}
	rfs.reads.Store(0)
	s = e.open()
	defer s.Close()
	if n := rfs.reads.Load(); n > 256 {
		t.Fatalf("Open read segment files %d times (a 64 MiB segment is %d blocks)", n, segBytes/BlockBytes)
	}
	check := func(s *Store, how string) {
		t.Helper()
		verify(t, s, "ns", "a", ident, 100)
		if _, err := s.Restore("ns", "b", ident, func(int, []byte) error { return nil }); !errors.Is(err, ErrNotFound) {
			t.Fatalf("%s: restore of the deleted context: %v, want ErrNotFound", how, err)
		}
	}
	check(s, "reopened")
	s.Close()
	// Repair scans every segment file block by block where no record
	// is: it too skips the unwritten tail, and finds the same store.
	rfs.reads.Store(0)
	loseIndexAndRepair(t, e.opts)
	if n := rfs.reads.Load(); n > 512 {
		t.Fatalf("repair read segment files %d times (a 64 MiB segment is %d blocks)", n, segBytes/BlockBytes)
	}
	s = e.open()
	check(s, "repaired")
}
