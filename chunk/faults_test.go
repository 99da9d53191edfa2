package chunk

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"

	"github.com/cockroachdb/pebble/v2/vfs"
	"github.com/cockroachdb/pebble/v2/vfs/errorfs"

	"github.com/hcache/hcache/fuzz/faultfs"
	"github.com/hcache/hcache/lsm"
)

// chunkOf returns the location of one group of a context.
func chunkOf(t *testing.T, s *Store, id string, g uint32) *lsm.Chunk {
	t.Helper()
	ch, err := s.db.GetChunk("ns", id, g)
	if err != nil {
		t.Fatal(err)
	}
	return ch
}

// TestDamagedFiles is the table of DESIGN.md's "bad input and faults":
// damage done to the files of a closed store, and what reopening and
// restoring then does. The victim was written after the bystander.
func TestDamagedFiles(t *testing.T) {
	cases := []struct {
		name        string
		newSegment  bool // victim in its own segment
		damage      func(t *testing.T, dir string, victim *lsm.Chunk)
		victimErr   error
		fsckFinds   bool
		bystanderOK bool
	}{
		{"truncated segment (index points past EOF)", false, func(t *testing.T, dir string, v *lsm.Chunk) {
			if err := os.Truncate(filepath.Join(dir, "segments", segName(v.Segment)), int64(v.Offset)+BlockBytes); err != nil {
				t.Fatal(err)
			}
		}, ErrCorrupt, true, true},
		{"corrupt segment bytes", false, func(t *testing.T, dir string, v *lsm.Chunk) {
			f, _ := os.OpenFile(filepath.Join(dir, "segments", segName(v.Segment)), os.O_RDWR, 0)
			f.WriteAt([]byte("garbage!"), int64(v.Offset)+int64(v.Slices[0].Off)+100)
			f.Close()
		}, ErrCorrupt, true, true},
		{"missing segment file", true, func(t *testing.T, dir string, v *lsm.Chunk) {
			if err := os.Remove(filepath.Join(dir, "segments", segName(v.Segment))); err != nil {
				t.Fatal(err)
			}
		}, ErrDamaged, true, true},
		{"zeroed record header", false, func(t *testing.T, dir string, v *lsm.Chunk) {
			f, _ := os.OpenFile(filepath.Join(dir, "segments", segName(v.Segment)), os.O_RDWR, 0)
			f.WriteAt(make([]byte, 512), int64(v.Offset))
			f.Close()
		}, nil, true, true}, // slices still check out: restore serves, fsck reports the header
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			e := newEnv(t, "disk", func(o *Options) { o.SegmentBytes = 1 << 20 })
			s := e.open()
			ident := testIdentity("m")
			for _, id := range []string{"bystander", "victim"} {
				if id == "victim" && c.newSegment {
					// Fill the bystander's segment so the victim starts a new one.
					for i := 0; len(s.Segments()) < 2; i++ {
						w, _ := s.Create("ns", "filler"+string(rune('a'+i)), ident, CreateOptions{})
						appendPrefill(t, w, ident, "filler", 0, 64)
						w.Close()
					}
				}
				w, _ := s.Create("ns", id, ident, CreateOptions{})
				appendTokens(t, w, ident, id, 0, 40)
				if err := w.Close(); err != nil {
					t.Fatal(err)
				}
			}
			victim := chunkOf(t, s, "victim", 1)
			s.Close()
			c.damage(t, e.dir, victim)
			s = e.open()
			defer s.Close()
			_, err := s.Restore("ns", "victim", ident, func(int, []byte) error { return nil })
			if c.victimErr == nil {
				if err != nil {
					t.Fatalf("victim: %v", err)
				}
			} else if !errors.Is(err, c.victimErr) {
				t.Fatalf("victim: %v, want %v", err, c.victimErr)
			}
			if c.bystanderOK {
				verify(t, s, "ns", "bystander", ident, 40)
			}
			if r := s.Check(nil); c.fsckFinds == (r.OK() && len(r.DamagedContexts) == 0) {
				t.Fatalf("fsck found %v / damaged %v", r.Errors, r.DamagedContexts)
			}
		})
	}
}

// TestInjectedFaults runs the store on the fault-injecting file system.
func TestInjectedFaults(t *testing.T) {
	ident := testIdentity("m")
	t.Run("ENOSPC mid-flush", func(t *testing.T) {
		ffs := faultfs.New(vfs.NewMem(), 1)
		s, err := Open(Options{FS: ffs, Dir: "/s", ChunkTokens: 16, SegmentBytes: 1 << 20, Logf: t.Logf})
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		w, _ := s.Create("ns", "c", ident, CreateOptions{})
		appendTokens(t, w, ident, "c", 0, 20)
		if err := w.Flush(); err != nil {
			t.Fatal(err)
		}
		other, _ := s.Create("ns", "other", ident, CreateOptions{})
		appendTokens(t, other, ident, "other", 0, 5)
		ffs.SetRules(faultfs.Rule{Fault: faultfs.ENOSPC, Match: "segments/", Nth: 1})
		appendTokens(t, w, ident, "c", 20, 50)
		if err := w.Flush(); !errors.Is(err, syscall.ENOSPC) {
			t.Fatalf("flush on a full disk: %v, want ENOSPC", err)
		}
		if err := w.Close(); !errors.Is(err, syscall.ENOSPC) {
			t.Fatalf("close after the failed flush: %v, want the same error", err)
		}
		// What was acknowledged is intact and restores; writes are
		// refused (the disk is full) until GC has freed space.
		verify(t, s, "ns", "c", ident, 20)
		if err := other.Close(); !errors.Is(err, ErrDiskFull) || !errors.Is(err, syscall.ENOSPC) {
			t.Fatalf("other context on a full disk: %v, want ErrDiskFull (ENOSPC)", err)
		}
		if !s.Stats().DiskFull {
			t.Fatal("Stats().DiskFull is false after ENOSPC")
		}
		// This file system reports no usage: a GC that completes ends the
		// state (on a real one, enough free space does).
		if res := s.GC(); res.Err != nil {
			t.Fatal(res.Err)
		}
		if s.Stats().DiskFull {
			t.Fatal("still refusing writes after GC")
		}
		other, err = s.Append("ns", "other", ident)
		if err != nil {
			t.Fatal(err)
		}
		appendTokens(t, other, ident, "other", 0, 5)
		if err := other.Close(); err != nil {
			t.Fatalf("other context after GC: %v", err)
		}
		verify(t, s, "ns", "other", ident, 5)
		// A new writer continues from the durable state.
		w, err = s.Append("ns", "c", ident)
		if err != nil {
			t.Fatal(err)
		}
		appendTokens(t, w, ident, "c", 20, 30)
		if err := w.Close(); err != nil {
			t.Fatal(err)
		}
		verify(t, s, "ns", "c", ident, 30)
		if r := s.Check(nil); !r.OK() {
			t.Fatal(r.Errors)
		}
	})
	t.Run("EIO and bit flips on read", func(t *testing.T) {
		ffs := faultfs.New(vfs.NewMem(), 2)
		s, err := Open(Options{FS: ffs, Dir: "/s", ChunkTokens: 16, SegmentBytes: 1 << 20, Logf: t.Logf})
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		for _, id := range []string{"a", "b"} {
			w, _ := s.Create("ns", id, ident, CreateOptions{})
			appendTokens(t, w, ident, id, 0, 40)
			if err := w.Close(); err != nil {
				t.Fatal(err)
			}
		}
		ffs.SetRules(faultfs.Rule{Fault: faultfs.EIORead, Match: "segments/", Nth: 2})
		called := 0
		_, err = s.Restore("ns", "a", ident, func(int, []byte) error { called++; return nil })
		if !errors.Is(err, syscall.EIO) {
			t.Fatalf("restore with EIO: %v", err)
		}
		if called > 1 {
			t.Fatalf("consumer saw %d layers though a read of the second failed", called)
		}
		// EIO may be transient: the context is not marked damaged.
		ffs.SetRules()
		verify(t, s, "ns", "a", ident, 40)
		ffs.SetRules(faultfs.Rule{Fault: faultfs.BitFlip, Match: "segments/", Nth: 1})
		if _, err := s.Restore("ns", "b", ident, func(int, []byte) error { return nil }); !errors.Is(err, ErrCorrupt) {
			t.Fatalf("restore with a flipped bit: %v", err)
		}
		ffs.SetRules()
		if _, err := s.Restore("ns", "b", ident, func(int, []byte) error { return nil }); !errors.Is(err, ErrDamaged) {
			t.Fatalf("restore after a checksum failure: %v, want ErrDamaged", err)
		}
		verify(t, s, "ns", "a", ident, 40)
	})
	t.Run("short writes", func(t *testing.T) {
		ffs := faultfs.New(vfs.NewMem(), 3)
		s, err := Open(Options{FS: ffs, Dir: "/s", ChunkTokens: 16, SegmentBytes: 1 << 20, Logf: t.Logf})
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		w, _ := s.Create("ns", "c", ident, CreateOptions{})
		appendTokens(t, w, ident, "c", 0, 16)
		w.Flush()
		ffs.SetRules(faultfs.Rule{Fault: faultfs.ShortWrite, Match: "segments/", Nth: 1})
		appendTokens(t, w, ident, "c", 16, 40)
		if err := w.Flush(); err == nil {
			t.Fatal("flush with a short write succeeded")
		}
		ffs.SetRules()
		verify(t, s, "ns", "c", ident, 16)
	})
}

// TestIndexCommitFailure injects an error into the sync of Pebble's WAL with
// Pebble's errorfs: the flush that needed it fails, the store refuses further
// writes, and after a reopen everything acknowledged before is intact.
func TestIndexCommitFailure(t *testing.T) {
	mem := vfs.NewCrashableMem()
	toggle := &errorfs.Toggle{Injector: errorfs.ErrInjected.If(walSync{})}
	fs := errorfs.Wrap(mem, toggle)
	opts := Options{FS: fs, Dir: "/s", ChunkTokens: 16, SegmentBytes: 1 << 20, Logf: t.Logf}
	s, err := Open(opts)
	if err != nil {
		t.Fatal(err)
	}
	ident := testIdentity("m")
	w, _ := s.Create("ns", "c", ident, CreateOptions{})
	appendTokens(t, w, ident, "c", 0, 20)
	if err := w.Flush(); err != nil {
		t.Fatal(err)
	}
	toggle.On()
	appendTokens(t, w, ident, "c", 20, 40)
	if err := w.Flush(); err == nil {
		t.Fatal("flush succeeded though the index could not sync")
	}
	if _, err := s.Create("ns", "d", ident, CreateOptions{}); err == nil {
		t.Fatal("a failed store accepted a new context")
	}
	toggle.Off()
	if err := s.Close(); err != nil {
		t.Logf("close of the failed store: %v", err)
	}
	// Power cut, reopen: the acknowledged 20 tokens are there.
	o := opts
	o.FS = mem.CrashClone(vfs.CrashCloneCfg{})
	s2, err := Open(o)
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	n, err := s2.Restore("ns", "c", ident, func(layer int, rows []byte) error {
		if want := expectLayer("c", layer, len(rows)/int(ident.Plan[layer].RowBytes), int(ident.Plan[layer].RowBytes)); string(rows) != string(want) {
			t.Fatalf("layer %d torn", layer)
		}
		return nil
	})
	if err != nil || n < 20 {
		t.Fatalf("after reopen: %d tokens, %v", n, err)
	}
}

// walSync matches syncs of Pebble's write-ahead log.
type walSync struct{}

func (walSync) Evaluate(op errorfs.Op) bool {
	return (op.Kind == errorfs.OpFileSync || op.Kind == errorfs.OpFileSyncData) && strings.HasSuffix(op.Path, ".log")
}
func (walSync) String() string { return "wal-sync" }

// TestSegmentSyncFailure: an fdatasync of a segment fails once (errorfs).
// The flush fails, nothing written to that segment before the failure is
// ever indexed, the segment is sealed, and writing resumes in a new one.
func TestSegmentSyncFailure(t *testing.T) {
	var armed atomic.Bool
	inj := errorfs.InjectorFunc(func(op errorfs.Op) error {
		if (op.Kind == errorfs.OpFileSyncData || op.Kind == errorfs.OpFileSync) && strings.Contains(op.Path, "seg-") && armed.CompareAndSwap(true, false) {
			return errorfs.ErrInjected
		}
		return nil
	})
	s, err := Open(Options{FS: errorfs.Wrap(vfs.NewMem(), inj), Dir: "/s", ChunkTokens: 16, SegmentBytes: 1 << 20, Logf: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	ident := testIdentity("m")
	w, _ := s.Create("ns", "c", ident, CreateOptions{})
	appendTokens(t, w, ident, "c", 0, 40)
	if err := w.Flush(); err != nil {
		t.Fatal(err)
	}
	first := s.Segments()
	armed.Store(true)
	appendTokens(t, w, ident, "c", 40, 80)
	if err := w.Flush(); !errors.Is(err, errorfs.ErrInjected) {
		t.Fatalf("flush over a failed fdatasync: %v", err)
	}
	verify(t, s, "ns", "c", ident, 40)
	if err := w.Close(); err == nil {
		t.Fatal("close of the failed writer succeeded")
	}
	w, err = s.Append("ns", "c", ident)
	if err != nil {
		t.Fatal(err)
	}
	appendTokens(t, w, ident, "c", 40, 60)
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	verify(t, s, "ns", "c", ident, 60)
	segs := s.Segments()
	if len(segs) <= len(first) || !segs[0].Sealed {
		t.Fatalf("segments before %+v, after %+v: want the failed one sealed and a new one", first, segs)
	}
	if r := s.Check(nil); !r.OK() {
		t.Fatal(r.Errors)
	}
}

// TestLiveCountRecountedOnOpen: a stored segment live count that disagrees
// with the chunk keys is recounted on open and reported.
func TestLiveCountRecountedOnOpen(t *testing.T) {
	e := newEnv(t, "mem", nil)
	s := e.open()
	ident := testIdentity("m")
	w, _ := s.Create("ns", "c", ident, CreateOptions{})
	appendTokens(t, w, ident, "c", 0, 40)
	w.Close()
	seg := s.Segments()[0]
	s.Close()
	// Tamper with the stored count while the store is closed.
	db, err := lsm.Open(e.fs, e.fs.PathJoin(e.dir, "index"), lsm.Options{})
	if err != nil {
		t.Fatal(err)
	}
	b := db.NewBatch()
	b.PutSegment(seg.ID, &lsm.Segment{Written: seg.Written, Live: seg.Live + 4096})
	if err := b.Commit(true); err != nil {
		t.Fatal(err)
	}
	db.Close()
	s = e.open()
	defer s.Close()
	if n := s.Recovery().LiveRecounted; n != 1 {
		t.Fatalf("LiveRecounted = %d, want 1", n)
	}
	if got := s.Segments()[0].Live; got != seg.Live {
		t.Fatalf("live after recount %d, want %d", got, seg.Live)
	}
	r := s.Check(nil)
	if !r.OK() || len(r.Orphans) == 0 {
		t.Fatalf("fsck: errors %v, notes %v", r.Errors, r.Orphans)
	}
	verify(t, s, "ns", "c", ident, 40)
}

// TestSecondOpenRefused: a store directory in use is refused to a second
// opener (one process per directory), and free again once closed.
func TestSecondOpenRefused(t *testing.T) {
	e := newEnv(t, "disk", nil)
	s := e.open()
	if s2, err := Open(e.opts); err == nil {
		s2.Close()
		t.Fatal("a second Open of a directory in use succeeded")
	} else if !strings.Contains(err.Error(), "in use") {
		t.Fatalf("second Open: %v, want an error saying the directory is in use", err)
	}
	s.Close()
	e.open().Close()
}
