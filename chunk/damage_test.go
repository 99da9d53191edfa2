package chunk

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"github.com/cockroachdb/pebble/v2/vfs"

	"github.com/hcache/hcache/lsm"
)

// treeDigest maps every path under dir to a digest of its content (or to
// "dir"), so two calls show whether anything was created, removed or
// written.
func treeDigest(t *testing.T, dir string) map[string]string {
	t.Helper()
	out := map[string]string{}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		if d.IsDir() {
			out[rel] = "dir"
			return nil
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		sum := sha256.Sum256(b)
		out[rel] = hex.EncodeToString(sum[:8])
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func diffTrees(a, b map[string]string) []string {
	var d []string
	for k, v := range a {
		if b[k] != v {
			d = append(d, k+": "+v+" -> "+b[k])
		}
	}
	for k, v := range b {
		if _, ok := a[k]; !ok {
			d = append(d, k+": created ("+v+")")
		}
	}
	sort.Strings(d)
	return d
}

// fillStore writes acknowledged contexts (each flushed, so each is its own
// synced index commit) of varied lengths, partial tail groups included, and
// returns their token counts.
func fillStore(t *testing.T, s *Store, n int) map[string]int {
	t.Helper()
	ident := testIdentity("m")
	want := map[string]int{}
	for i := 0; i < n; i++ {
		id := "ctx" + string(rune('a'+i))
		tokens := 5 + i*13 // ChunkTokens is 16: full and partial groups
		createFilled(t, s, ident, id, tokens)
		want[id] = tokens
	}
	// A context extended in a second turn: its partial tail group is
	// superseded by a fuller record.
	w, err := s.Append("ns", "ctxa", ident)
	if err != nil {
		t.Fatal(err)
	}
	appendPrefill(t, w, ident, "ctxa", want["ctxa"], want["ctxa"]+20)
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	want["ctxa"] += 20
	return want
}

func indexFiles(t *testing.T, dir, pattern string) []string {
	t.Helper()
	m, err := filepath.Glob(filepath.Join(dir, "index", pattern))
	if err != nil || len(m) == 0 {
		t.Fatalf("no index file %s in %s: %v", pattern, dir, err)
	}
	return m
}

func flipByte(t *testing.T, path string, at int64) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, 1)
	if _, err := f.ReadAt(b, at); err != nil {
		t.Fatal(err)
	}
	b[0] ^= 0x5a
	if _, err := f.WriteAt(b, at); err != nil {
		t.Fatal(err)
	}
}

// TestOpenRefusesDamagedIndex: whatever happened to the index, Open (and
// the read-only open of fsck) refuses with ErrIndexDamaged, names the
// damage, says to run repair and changes nothing on disk; Repair then
// rebuilds the index from the segments and every acknowledged context
// restores byte-exact.
func TestOpenRefusesDamagedIndex(t *testing.T) {
	cases := []struct {
		name   string
		flush  bool // put the index keys in sstables first
		damage func(t *testing.T, dir string)
		want   string // in the error
	}{
		{"index directory missing", false, func(t *testing.T, dir string) {
			if err := os.RemoveAll(filepath.Join(dir, "index")); err != nil {
				t.Fatal(err)
			}
		}, "index: no such file"},
		{"manifest marker missing", false, func(t *testing.T, dir string) {
			for _, p := range indexFiles(t, dir, "marker.manifest.*") {
				os.Remove(p)
			}
		}, "does not exist"},
		{"index replaced by an empty one", false, func(t *testing.T, dir string) {
			os.RemoveAll(filepath.Join(dir, "index"))
			db, err := lsm.Open(vfs.Default, filepath.Join(dir, "index"), lsm.Options{})
			if err != nil {
				t.Fatal(err)
			}
			db.Close()
		}, "holds no store record"},
		{"WAL byte flipped mid-log", false, func(t *testing.T, dir string) {
			wal := indexFiles(t, dir, "*.log")
			st, _ := os.Stat(wal[len(wal)-1])
			flipByte(t, wal[len(wal)-1], st.Size()/3)
		}, "corrupt"},
		{"sstable byte flipped", true, func(t *testing.T, dir string) {
			sst := indexFiles(t, dir, "*.sst")
			st, _ := os.Stat(sst[0])
			flipByte(t, sst[0], st.Size()/3)
		}, ""},
		{"creation marker missing", false, func(t *testing.T, dir string) {
			os.Remove(filepath.Join(dir, createdMarker))
		}, "hcache.created is missing"},
		{"creation marker corrupt", false, func(t *testing.T, dir string) {
			os.WriteFile(filepath.Join(dir, createdMarker), []byte("hcache store\nversion 1\ncrc32c 00000000\n"), 0o644)
		}, "checksum"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			e := newEnv(t, "disk", func(o *Options) { o.SegmentBytes = 1 << 20; o.GCInterval = -1 })
			s := e.open()
			want := fillStore(t, s, 6)
			if c.flush {
				if err := s.db.Flush(); err != nil {
					t.Fatal(err)
				}
			}
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			c.damage(t, e.dir)
			before := treeDigest(t, e.dir)
			for _, ro := range []bool{false, true} {
				o := e.opts
				o.ReadOnly = ro
				s, err := Open(o)
				if err == nil {
					s.Close()
					t.Fatalf("Open (read-only %v) of a store with a damaged index succeeded", ro)
				}
				if !errors.Is(err, ErrIndexDamaged) || !strings.Contains(err.Error(), "hcache repair") || !strings.Contains(err.Error(), c.want) {
					t.Fatalf("Open (read-only %v): %v; want ErrIndexDamaged naming %q and saying to run hcache repair", ro, err, c.want)
				}
				t.Logf("read-only %v: %v", ro, err)
				if d := diffTrees(before, treeDigest(t, e.dir)); len(d) > 0 {
					t.Fatalf("a refused Open (read-only %v) changed the store: %v", ro, d)
				}
			}
			rep, err := Repair(RepairOptions{Dir: e.dir})
			if err != nil {
				t.Fatalf("Repair: %v", err)
			}
			t.Logf("repair: adopted %v; set aside %v", rep.Adopted, rep.SetAside)
			if rep.Contexts != len(want) {
				t.Fatalf("Repair adopted %d contexts, want %d", rep.Contexts, len(want))
			}
			s = e.open()
			defer s.Close()
			for id, n := range want {
				verify(t, s, "ns", id, testIdentity("m"), n)
			}
			if r := s.Check(nil); !r.OK() {
				t.Fatalf("fsck after repair: %v", r.Errors)
			}
		})
	}
}

// TestOpenRefusesNonStore: a read-only open (fsck, stat) of a directory
// that is not a store, of a plain file, or of nothing fails naming it and
// creates nothing; a read-write open refuses to turn a non-empty directory
// into a store.
func TestOpenRefusesNonStore(t *testing.T) {
	dir := t.TempDir()
	plain := filepath.Join(dir, "plain")
	os.WriteFile(plain, []byte("hello"), 0o644)
	other := filepath.Join(dir, "other")
	os.MkdirAll(other, 0o755)
	os.WriteFile(filepath.Join(other, "notes.txt"), []byte("mine"), 0o644)
	empty := filepath.Join(dir, "empty")
	os.MkdirAll(empty, 0o755)
	cases := []struct {
		path string
		ro   bool
		want string
	}{
		{plain, true, "is a file"},
		{plain, false, "is a file"},
		{other, true, "has no hcache.created"},
		{other, false, "not empty"},
		{empty, true, "has no hcache.created"},
		{filepath.Join(dir, "missing"), true, "no such file"},
	}
	for _, c := range cases {
		before := treeDigest(t, dir)
		s, err := Open(Options{Dir: c.path, ReadOnly: c.ro, Logf: t.Logf})
		if err == nil {
			s.Close()
			t.Fatalf("Open(%s, read-only %v) succeeded", c.path, c.ro)
		}
		if !errors.Is(err, ErrNotStore) || !strings.Contains(err.Error(), c.want) {
			t.Fatalf("Open(%s, read-only %v): %v; want ErrNotStore with %q", c.path, c.ro, err, c.want)
		}
		if d := diffTrees(before, treeDigest(t, dir)); len(d) > 0 {
			t.Fatalf("Open(%s, read-only %v) changed the tree: %v", c.path, c.ro, d)
		}
	}
}

// TestRepairKeepsDeletesDeleted: a deleted context does not come back from
// a repair, even after GC moved its tombstone while the deleted records
// still sat in another segment.
func TestRepairKeepsDeletesDeleted(t *testing.T) {
	ident := testIdentity("m")
	e := newEnv(t, "disk", func(o *Options) { o.SegmentBytes = 1 << 20; o.GCInterval = -1; o.GCLiveRatio = 0.5 })
	s := e.open()
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
	mk("big", 400)
	mk("gone", 16)
	want := map[string]int{"big": 400}
	for i := 0; len(s.Segments()) < 2; i++ {
		id := fmt.Sprintf("keep%d", i)
		mk(id, 64)
		want[id] = 64
	}
	if err := s.Delete("ns", "gone"); err != nil {
		t.Fatal(err)
	}
	tombSeg := s.Segments()[len(s.Segments())-1].ID
	var doomed []string
	for i := 0; len(s.Segments()) < 3; i++ {
		id := fmt.Sprintf("tmp%d", i)
		mk(id, 64)
		doomed = append(doomed, id)
	}
	for _, id := range doomed {
		if err := s.Delete("ns", id); err != nil {
			t.Fatal(err)
		}
	}
	res := s.GC()
	if res.Err != nil {
		t.Fatal(res.Err)
	}
	if _, ok := func() (any, bool) {
		for _, sg := range s.Segments() {
			if sg.ID == tombSeg {
				return nil, true
			}
		}
		return nil, false
	}(); ok {
		t.Fatalf("GC %+v did not compact segment %d (the tombstone's): %+v", res, tombSeg, s.Segments())
	}
	if got := len(s.Segments()); got < 2 {
		t.Fatalf("segment 1 (holding the deleted records) was compacted too: %+v", s.Segments())
	}
	s.Close()
	if err := os.RemoveAll(filepath.Join(e.dir, "index")); err != nil {
		t.Fatal(err)
	}
	rep, err := Repair(RepairOptions{Dir: e.dir})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("repair: %d adopted, %d deleted records set aside; %v", rep.Contexts, rep.Deleted, rep.SetAside)
	if rep.Deleted == 0 {
		t.Fatal("repair found no deleted records")
	}
	s = e.open()
	defer s.Close()
	for _, c := range s.Contexts() {
		if _, ok := want[c.ID]; !ok {
			t.Fatalf("repair brought back %s, which was deleted", c.ID)
		}
	}
	for id, n := range want {
		verify(t, s, "ns", id, ident, n)
	}
}

// TestDamagedIndexLeavesOtherStoresWorking: a store whose index sstable is
// corrupt fails to open (read-write and read-only) with Pebble's message
// and no panic, while another store in the same process keeps writing and
// restoring.
func TestDamagedIndexLeavesOtherStoresWorking(t *testing.T) {
	ident := testIdentity("m")
	bad := newEnv(t, "disk", func(o *Options) { o.GCInterval = -1 })
	s := bad.open()
	fillStore(t, s, 3)
	if err := s.db.Flush(); err != nil {
		t.Fatal(err)
	}
	s.Close()
	good := newEnv(t, "disk", nil)
	g := good.open()
	defer g.Close()
	sst := indexFiles(t, bad.dir, "*.sst")
	for _, p := range sst {
		st, _ := os.Stat(p)
		flipByte(t, p, st.Size()/2)
	}
	for i, ro := range []bool{false, true, false} {
		o := bad.opts
		o.ReadOnly = ro
		if s, err := Open(o); err == nil {
			s.Close()
			t.Fatalf("open %d (read-only %v) of a store with a corrupt sstable succeeded", i, ro)
		} else if !errors.Is(err, ErrIndexDamaged) || !strings.Contains(err.Error(), "pebble") {
			t.Fatalf("open %d: %v, want ErrIndexDamaged with Pebble's message", i, err)
		}
		id := fmt.Sprintf("g%d", i)
		w, _ := g.Create("ns", id, ident, CreateOptions{})
		appendPrefill(t, w, ident, id, 0, 20)
		if err := w.Close(); err != nil {
			t.Fatalf("the other store after the failed open: %v", err)
		}
		verify(t, g, "ns", id, ident, 20)
	}
}
