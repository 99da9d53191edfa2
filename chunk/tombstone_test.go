package chunk

import (
	"errors"
	"fmt"
	randv2 "math/rand/v2"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"

	"github.com/cockroachdb/pebble/v2/vfs"

	"github.com/hcache/hcache/fuzz/faultfs"
	"github.com/hcache/hcache/lsm"
)

// crashRecorder takes a crash image of the file system at every sync while
// armed: one keeping none of the unsynced data, one keeping all of it.
type crashRecorder struct {
	mem    *vfs.MemFS
	ffs    *faultfs.FS
	armed  bool
	images []crashImage
}

type crashImage struct {
	where string
	fs    *vfs.MemFS
	after bool // taken after the operation returned (acknowledged)
}

func newCrashRecorder() *crashRecorder {
	r := &crashRecorder{mem: vfs.NewCrashableMem()}
	r.ffs = faultfs.New(r.mem, 1)
	r.ffs.OnSync = func(name string) {
		if r.armed {
			r.snap("sync "+name, false)
		}
	}
	return r
}

func (r *crashRecorder) snap(where string, after bool) {
	for _, pct := range []int{0, 100} {
		// The RNG picks which unsynced writes survive; at 0% and 100%
		// there is no choice to make, so a fixed seed replays.
		cfg := vfs.CrashCloneCfg{UnsyncedDataPercent: pct, RNG: randv2.New(randv2.NewPCG(1, uint64(len(r.images))))}
		r.images = append(r.images, crashImage{fmt.Sprintf("%s (%d%% unsynced kept)", where, pct), r.mem.CrashClone(cfg), after})
	}
}

// tokensIn opens a store on fs and restores id: the tokens, or -1 when it is
// not found. Rows that are not id's are a test failure.
func tokensIn(t *testing.T, o Options, ident *Identity, id string) int {
	t.Helper()
	s, err := Open(o)
	if err != nil {
		t.Fatalf("open: %v", err)
	}
	defer s.Close()
	return restoredTokens(t, s, ident, id)
}

func restoredTokens(t *testing.T, s *Store, ident *Identity, id string) int {
	t.Helper()
	n, err := s.Restore("ns", id, ident, func(layer int, rows []byte) error {
		rb := int(ident.Plan[layer].RowBytes)
		if string(rows) != string(expectLayer(id, layer, len(rows)/rb, rb)) {
			return fmt.Errorf("layer %d: rows that are not %s's", layer, id)
		}
		return nil
	})
	if errors.Is(err, ErrNotFound) {
		return -1
	}
	if err != nil {
		t.Fatalf("restore %s: %v", id, err)
	}
	return n
}

// loseIndexAndRepair deletes the index of the store in fs and rebuilds it
// from the segments.
func loseIndexAndRepair(t *testing.T, o Options) {
	t.Helper()
	if err := o.FS.RemoveAll(o.FS.PathJoin(o.Dir, "index")); err != nil {
		t.Fatal(err)
	}
	if _, err := Repair(RepairOptions{FS: o.FS, Dir: o.Dir, ChunkTokens: o.ChunkTokens}); err != nil {
		t.Fatalf("repair: %v", err)
	}
}

// TestDeletesSurviveCrashesAndRepair crashes at every sync point of a
// delete, an eviction and a GC that carries a tombstone, then reopens the
// image, and separately loses its index and repairs it. After the operation
// returned, the context is gone both ways; before, the reopened store and
// the repaired one agree on whether it exists, and when it does, rows
// appended to it afterwards survive a repair (a tombstone that was durable
// but not indexed must not delete them later).
func TestDeletesSurviveCrashesAndRepair(t *testing.T) {
	ident := testIdentity("m")
	const victimTokens = 64
	mk := func(t *testing.T, s *Store, id string, n int) {
		t.Helper()
		w, err := s.Create("ns", id, ident, CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		appendPrefill(t, w, ident, id, 0, n)
		if err := w.Close(); err != nil {
			t.Fatal(err)
		}
	}
	cases := []struct {
		name string
		mod  func(*Options)
		// setup writes "victim" and whatever else; act is the operation
		// crashed at each sync point.
		setup func(t *testing.T, s *Store)
		act   func(t *testing.T, s *Store)
	}{
		{
			name:  "delete",
			setup: func(t *testing.T, s *Store) { mk(t, s, "victim", victimTokens); mk(t, s, "other", 16) },
			act: func(t *testing.T, s *Store) {
				if err := s.Delete("ns", "victim"); err != nil {
					t.Fatal(err)
				}
			},
		},
		{
			// The full disk seals the active segment: the tombstone goes to
			// a new segment file, which the index lists only from the
			// delete's commit on.
			name: "delete on a full disk",
			setup: func(t *testing.T, s *Store) {
				mk(t, s, "victim", victimTokens)
				fillToENOSPC(t, s, ident)
			},
			act: func(t *testing.T, s *Store) {
				if err := s.Delete("ns", "victim"); err != nil {
					t.Fatal(err)
				}
			},
		},
		{
			name: "eviction",
			// victim (about 33 KB live) is evicted when "next" is flushed.
			mod:   func(o *Options) { o.CapacityBytes = 48 << 10 },
			setup: func(t *testing.T, s *Store) { mk(t, s, "victim", victimTokens) },
			act: func(t *testing.T, s *Store) {
				w, err := s.Create("ns", "next", ident, CreateOptions{})
				if err != nil {
					t.Fatal(err)
				}
				appendPrefill(t, w, ident, "next", 0, victimTokens)
				if err := w.Flush(); err != nil {
					t.Fatal(err)
				}
				if st := s.Stats(); st.Evictions != 1 {
					t.Fatalf("%d evictions, want 1", st.Evictions)
				}
				if err := w.Close(); err != nil {
					t.Fatal(err)
				}
			},
		},
		{
			name: "gc carrying the tombstone",
			mod:  func(o *Options) { o.GCLiveRatio = 0.5 },
			// victim's records sit in segment 1, its tombstone in segment
			// 2, which GC compacts (segment 1 stays: big is live).
			setup: func(t *testing.T, s *Store) {
				mk(t, s, "big", 1200)
				mk(t, s, "victim", victimTokens)
				for i := 0; len(s.Segments()) < 2; i++ {
					mk(t, s, fmt.Sprint("keep", i), 64)
				}
				if err := s.Delete("ns", "victim"); err != nil {
					t.Fatal(err)
				}
				var tmp []string
				for i := 0; len(s.Segments()) < 3; i++ {
					id := fmt.Sprint("tmp", i)
					mk(t, s, id, 64)
					tmp = append(tmp, id)
				}
				for _, id := range tmp {
					if err := s.Delete("ns", id); err != nil {
						t.Fatal(err)
					}
				}
			},
			act: func(t *testing.T, s *Store) {
				before := s.Segments()
				if res := s.GC(); res.Err != nil || res.Segments == 0 {
					t.Fatalf("GC %+v of %+v", res, before)
				}
				if s.Segments()[0].ID != 1 {
					t.Fatalf("GC removed segment 1, which holds the deleted records: %+v", s.Segments())
				}
			},
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			rec := newCrashRecorder()
			o := Options{FS: rec.ffs, Dir: "/s", ChunkTokens: 16, SegmentBytes: MinSegmentBytes, GCInterval: -1, Logf: t.Logf}
			if tc.mod != nil {
				tc.mod(&o)
			}
			s, err := Open(o)
			if err != nil {
				t.Fatal(err)
			}
			testFFS = rec.ffs
			tc.setup(t, s)
			rec.armed = true
			tc.act(t, s)
			rec.armed = false
			rec.snap("after it returned", true)
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			if len(rec.images) < 4 {
				t.Fatalf("only %d crash images", len(rec.images))
			}
			rolled := 0
			for _, im := range rec.images {
				co := o
				co.FS, co.Logf, co.CapacityBytes = im.fs, func(string, ...any) {}, -1
				// A copy of the image that loses its index before any open.
				direct := co
				direct.FS = im.fs.CrashClone(vfs.CrashCloneCfg{UnsyncedDataPercent: 100, RNG: randv2.New(randv2.NewPCG(2, 3))})
				loseIndexAndRepair(t, direct)
				repairedFirst := tokensIn(t, direct, ident, "victim")
				opened := tokensIn(t, co, ident, "victim")
				if opened >= 0 && opened != victimTokens {
					t.Fatalf("%s: reopened victim holds %d tokens, not %d", im.where, opened, victimTokens)
				}
				if opened < 0 && !im.after {
					rolled++
				}
				if opened >= 0 {
					// Still there: a writer appends and is acknowledged.
					s, err := Open(co)
					if err != nil {
						t.Fatal(err)
					}
					w, err := s.Append("ns", "victim", ident)
					if err != nil {
						t.Fatalf("%s: append: %v", im.where, err)
					}
					appendPrefill(t, w, ident, "victim", victimTokens, victimTokens+8)
					if err := w.Close(); err != nil {
						t.Fatalf("%s: close: %v", im.where, err)
					}
					s.Close()
				}
				loseIndexAndRepair(t, co)
				repaired := tokensIn(t, co, ident, "victim")
				switch {
				case im.after && (opened >= 0 || repaired >= 0 || repairedFirst >= 0):
					t.Errorf("%s: acknowledged %s, yet the reopened store has %d tokens and the repaired ones %d and %d (-1: none)", im.where, tc.name, opened, repairedFirst, repaired)
				case (opened < 0) != (repairedFirst < 0):
					t.Errorf("%s: the reopened store has %d tokens of the victim, a repair of the same image %d (-1: none)", im.where, opened, repairedFirst)
				case opened < 0 && repaired >= 0:
					t.Errorf("%s: deleted in the reopened store, yet repair restored %d tokens", im.where, repaired)
				case opened >= 0 && repaired != victimTokens+8:
					t.Errorf("%s: the reopened store kept the context and acknowledged %d tokens, the repaired one has %d (-1: none)", im.where, victimTokens+8, repaired)
				}
			}
			if tc.name != "gc carrying the tombstone" && rolled == 0 {
				t.Errorf("no crash image caught the %s between its tombstone and its index commit", tc.name)
			}
			t.Logf("%d crash images checked", len(rec.images))
		})
	}
}

// testFFS is the fault-injecting file system of the running case.
var testFFS *faultfs.FS

// fillToENOSPC writes until a segment write meets ENOSPC (injected on
// testFFS): the store is then in the disk-full state, its active segment
// sealed.
func fillToENOSPC(t *testing.T, s *Store, ident *Identity) {
	t.Helper()
	w, err := s.Create("ns", "fill", ident, CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	testFFS.SetRules(faultfs.Rule{Fault: faultfs.ENOSPC, Match: "segments/", Nth: 1})
	defer testFFS.SetRules()
	for i := 0; ; i++ {
		appendPrefill(t, w, ident, "fill", i*64, (i+1)*64)
		if err := w.Flush(); err != nil {
			if !errors.Is(err, syscall.ENOSPC) {
				t.Fatalf("flush: %v, want a full disk", err)
			}
			break
		}
		if i > 100 {
			t.Fatal("the disk never filled")
		}
	}
	w.Abandon()
}

// TestDeleteFailsWhenTombstoneCannotBeWritten: when the tombstone's write
// fails (twice: on the active segment and on a fresh one), Delete returns
// the error, the context is unchanged in the store, after a reopen and
// after a repair, and the store refuses further writes (a tombstone may
// have reached the disk) but still serves reads.
func TestDeleteFailsWhenTombstoneCannotBeWritten(t *testing.T) {
	ident := testIdentity("m")
	cases := []struct {
		name      string
		fault     faultfs.Fault
		wantFatal bool // the store refuses writes afterwards
	}{
		{"eio", faultfs.EIOWrite, true},
		{"short write", faultfs.ShortWrite, true},
		{"enospc", faultfs.ENOSPC, true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			mem := vfs.NewCrashableMem()
			ffs := faultfs.New(mem, 7)
			o := Options{FS: ffs, Dir: "/s", ChunkTokens: 16, SegmentBytes: MinSegmentBytes, GCInterval: -1, Logf: t.Logf}
			s, err := Open(o)
			if err != nil {
				t.Fatal(err)
			}
			w, err := s.Create("ns", "c", ident, CreateOptions{})
			if err != nil {
				t.Fatal(err)
			}
			appendPrefill(t, w, ident, "c", 0, 40)
			if err := w.Close(); err != nil {
				t.Fatal(err)
			}
			ffs.SetRules(faultfs.Rule{Fault: tc.fault, Match: "segments/", Prob: 1})
			err = s.Delete("ns", "c")
			ffs.SetRules()
			if err == nil {
				t.Fatal("Delete succeeded though no tombstone could be written")
			}
			t.Logf("delete: %v", err)
			if got := restoredTokens(t, s, ident, "c"); got != 40 {
				t.Fatalf("after the failed delete: %d tokens, want 40", got)
			}
			if _, err := s.Create("ns", "d", ident, CreateOptions{}); (err != nil) != tc.wantFatal {
				t.Fatalf("create after the failed delete: %v (want refused: %v)", err, tc.wantFatal)
			}
			s.Close()
			co := o
			co.FS = mem.CrashClone(vfs.CrashCloneCfg{})
			if got := tokensIn(t, co, ident, "c"); got != 40 {
				t.Fatalf("reopened: %d tokens, want 40", got)
			}
		})
	}
}

// TestDeleteOnFullDisk: with the disk full (a segment allocation met
// ENOSPC), a delete still writes its tombstone (in the room the released
// ballast left) and succeeds, and a repair keeps it deleted.
func TestDeleteOnFullDisk(t *testing.T) {
	ident := testIdentity("m")
	mem := vfs.NewCrashableMem()
	ffs := faultfs.New(mem, 3)
	o := Options{FS: ffs, Dir: "/s", ChunkTokens: 16, SegmentBytes: MinSegmentBytes, GCInterval: -1, BallastBytes: 1 << 20, Logf: t.Logf}
	s, err := Open(o)
	if err != nil {
		t.Fatal(err)
	}
	w, _ := s.Create("ns", "c", ident, CreateOptions{})
	appendPrefill(t, w, ident, "c", 0, 40)
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	testFFS = ffs
	fillToENOSPC(t, s, ident)
	if err := s.Delete("ns", "c"); err != nil {
		t.Fatalf("delete on a full disk: %v", err)
	}
	s.Close()
	co := o
	co.FS = mem.CrashClone(vfs.CrashCloneCfg{})
	loseIndexAndRepair(t, co)
	if got := tokensIn(t, co, ident, "c"); got >= 0 {
		t.Fatalf("repair brought back a context deleted on a full disk (%d tokens)", got)
	}
}

// TestTombstoneGenerationsNotReused: after the context with the newest
// generation is deleted and the store reopened, a context created again
// under its name gets a newer generation than the tombstone's, so a repair
// keeps it.
func TestTombstoneGenerationsNotReused(t *testing.T) {
	ident := testIdentity("m")
	o := Options{FS: vfs.NewCrashableMem(), Dir: "/s", ChunkTokens: 16, SegmentBytes: MinSegmentBytes, GCInterval: -1, Logf: t.Logf}
	mk := func(s *Store, id string, n int) {
		w, err := s.Create("ns", id, ident, CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		appendPrefill(t, w, ident, id, 0, n)
		if err := w.Close(); err != nil {
			t.Fatal(err)
		}
	}
	s, err := Open(o)
	if err != nil {
		t.Fatal(err)
	}
	mk(s, "a", 16)
	mk(s, "x", 16)
	if err := s.Delete("ns", "x"); err != nil {
		t.Fatal(err)
	}
	s.Close()
	s, err = Open(o)
	if err != nil {
		t.Fatal(err)
	}
	mk(s, "x", 20)
	s.Close()
	loseIndexAndRepair(t, o)
	if got := tokensIn(t, o, ident, "x"); got != 20 {
		t.Fatalf("x, created again after its delete and a restart: %d tokens after repair, want 20", got)
	}
}

// TestTombstoneOutlivesSupersededRecords: a context's partial first group
// flushed into segment 1 and later rewritten whole into segment 2; the
// context is deleted and GC compacts segment 2 (its tombstone's). Segment 1
// still holds the superseded partial group, a valid record of the deleted
// generation, so the tombstone must be carried, or a repair brings the
// context back with that group's tokens.
func TestTombstoneOutlivesSupersededRecords(t *testing.T) {
	ident := testIdentity("m")
	o := Options{FS: vfs.NewCrashableMem(), Dir: "/s", ChunkTokens: 16, SegmentBytes: MinSegmentBytes, GCInterval: -1, GCLiveRatio: 0.5, Logf: t.Logf}
	s, err := Open(o)
	if err != nil {
		t.Fatal(err)
	}
	mk := func(id string, n int) {
		w, err := s.Create("ns", id, ident, CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		appendPrefill(t, w, ident, id, 0, n)
		if err := w.Close(); err != nil {
			t.Fatal(err)
		}
	}
	del := func(id string) {
		if err := s.Delete("ns", id); err != nil {
			t.Fatal(err)
		}
	}
	mk("big", 800) // keeps segment 1 mostly live
	x, err := s.Create("ns", "x", ident, CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	appendPrefill(t, x, ident, "x", 0, 4)
	if err := x.Flush(); err != nil { // group 0, 4 tokens, in segment 1
		t.Fatal(err)
	}
	xSegs := func() map[uint32]bool {
		out := map[uint32]bool{}
		if err := s.db.ScanChunks("ns", "x", func(_ uint32, ch *lsm.Chunk) error {
			out[ch.Segment] = true
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		return out
	}
	if got := xSegs(); !got[1] || len(got) != 1 {
		t.Fatalf("x's partial group is in segments %v, want segment 1 (the test's layout changed)", got)
	}
	var fill []string
	for i := 0; len(s.Segments()) < 2; i++ {
		fill = append(fill, fmt.Sprint("fill", i))
		mk(fill[i], 64)
	}
	appendPrefill(t, x, ident, "x", 4, 64)
	if err := x.Close(); err != nil { // groups 0-3 whole, in segment 2
		t.Fatal(err)
	}
	if got := xSegs(); got[1] || !got[2] {
		t.Fatalf("x's groups are in segments %v, want segment 2 only (the test's layout changed)", got)
	}
	del("x")
	for _, id := range fill {
		del(id)
	}
	for i := 0; len(s.Segments()) < 3; i++ {
		id := fmt.Sprint("tmp", i)
		mk(id, 64)
		del(id)
	}
	if res := s.GC(); res.Err != nil {
		t.Fatal(res.Err)
	}
	segs := s.Segments()
	if len(segs) == 0 || segs[0].ID != 1 || (len(segs) > 1 && segs[1].ID == 2) {
		t.Fatalf("GC should have compacted segment 2 and kept segment 1: %+v", segs)
	}
	s.Close()
	loseIndexAndRepair(t, o)
	if got := tokensIn(t, o, ident, "x"); got >= 0 {
		t.Fatalf("repair brought back the deleted x from its superseded first group: %d tokens", got)
	}
	if got := tokensIn(t, o, ident, "big"); got != 800 {
		t.Fatalf("big: %d tokens after repair, want 800", got)
	}
}

// TestEvictionTombstonesBatched: one eviction pass that removes many
// contexts writes their tombstones with one segment fdatasync and one index
// commit, not one of each per context; a repair keeps them all gone.
func TestEvictionTombstonesBatched(t *testing.T) {
	ident := testIdentity("m")
	mem := vfs.NewCrashableMem()
	ffs := faultfs.New(mem, 5)
	// OnSync runs on the syncing goroutine (Pebble's WAL flusher among
	// them): the switch and the counts are atomic.
	var segSyncs, indexSyncs atomic.Int64
	var counting atomic.Bool
	ffs.OnSync = func(name string) {
		if !counting.Load() {
			return
		}
		switch {
		case strings.Contains(name, "/segments/"):
			segSyncs.Add(1)
		case strings.Contains(name, "/index/") && strings.HasSuffix(name, ".log"):
			indexSyncs.Add(1)
		}
	}
	const victims = 8
	// Each 16-token context holds about 16 KB; the next one's flush
	// pushes the store over and evicts all eight.
	o := Options{FS: ffs, Dir: "/s", ChunkTokens: 16, SegmentBytes: MinSegmentBytes, GCInterval: -1, CapacityBytes: victims*16<<10 + 8<<10, Logf: t.Logf}
	s, err := Open(o)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < victims; i++ {
		id := fmt.Sprint("v", i)
		w, err := s.Create("ns", id, ident, CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		appendPrefill(t, w, ident, id, 0, 16)
		if err := w.Close(); err != nil {
			t.Fatal(err)
		}
	}
	if n := s.Stats().Evictions; n != 0 {
		t.Fatalf("%d evictions before the big write", n)
	}
	w, err := s.Create("ns", "big", ident, CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	appendPrefill(t, w, ident, "big", 0, victims*16)
	counting.Store(true)
	err = w.Flush()
	counting.Store(false)
	if err != nil {
		t.Fatal(err)
	}
	if n := s.Stats().Evictions; n != victims {
		t.Fatalf("%d evictions, want %d", n, victims)
	}
	// One fdatasync and one index commit for the data, one of each for
	// the eight tombstones.
	if segSyncs.Load() != 2 || indexSyncs.Load() != 2 {
		t.Fatalf("the flush and its eviction of %d contexts took %d segment syncs and %d index syncs, want 2 and 2", victims, segSyncs.Load(), indexSyncs.Load())
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	s.Close()
	co := o
	co.FS = mem.CrashClone(vfs.CrashCloneCfg{})
	loseIndexAndRepair(t, co)
	for i := 0; i < victims; i++ {
		if got := tokensIn(t, co, ident, fmt.Sprint("v", i)); got >= 0 {
			t.Fatalf("repair brought back evicted v%d (%d tokens)", i, got)
		}
	}
}
