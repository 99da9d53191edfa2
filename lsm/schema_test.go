package lsm

import (
	"bytes"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/cockroachdb/pebble/v2/vfs"
)

// TestSchemaStaysInLSM: the index schema (key bytes, prefixes) lives in this
// package alone. No Go file outside lsm/ calls a key constructor, and the
// engine (chunk/) spells no raw key prefix.
func TestSchemaStaysInLSM(t *testing.T) {
	keyFunc := regexp.MustCompile(`\blsm\.\w*(Key|Prefix|PrefixEnd)\(`)
	rawPrefix := regexp.MustCompile(`\[\]byte\{'[a-z]'\}`)
	root := ".."
	n := 0
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			if name := d.Name(); path != root && (name == "lsm" && filepath.Dir(path) == root || name == "testdata" || strings.HasPrefix(name, ".")) {
				return filepath.SkipDir
			}
			return nil
		}
		if !strings.HasSuffix(path, ".go") {
			return nil
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		n++
		if m := keyFunc.Find(b); m != nil {
			t.Errorf("%s calls %s: index keys are built only inside package lsm (use its typed operations)", path, m)
		}
		if strings.HasPrefix(filepath.ToSlash(path), "../chunk/") {
			if m := rawPrefix.Find(b); m != nil {
				t.Errorf("%s spells a raw key prefix %s: the index schema is package lsm's", path, m)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if n < 50 {
		t.Fatalf("walked %d Go files: not the module", n)
	}
}

// TestTypedOperations: each kind's put, get, scan and delete go through
// the right keys: one context's chunks stay apart from its neighbour's, a
// context's delete takes its record, last use and chunks and nothing else,
// and a value that does not decode reaches the caller as an error.
func TestTypedOperations(t *testing.T) {
	db, err := Open(vfs.NewMem(), "/idx", Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	b := db.NewBatch()
	b.PutMeta(&Meta{StoreVersion: 1, ChunkTokens: 16})
	for _, id := range []string{"c", "c0"} {
		b.PutContext("n", id, &Context{Identity: []byte(id), Tokens: 3, Gen: 1})
		b.PutLastUse("n", id, 7)
		for g := uint32(0); g < 3; g++ {
			b.PutChunk("n", id, g, &Chunk{Segment: g, Offset: 4096, Length: 4096, Tokens: 1})
		}
	}
	b.PutSegment(2, &Segment{Written: 8192, Live: 4096})
	b.PutTombstone(2, 4096, &Tombstone{Namespace: "n", ID: "x", Gen: 1, Segments: []uint32{2}})
	if err := b.Commit(true); err != nil {
		t.Fatal(err)
	}
	var groups []uint32
	if err := db.ScanChunks("n", "c", func(g uint32, c *Chunk) error { groups = append(groups, g); return nil }); err != nil || len(groups) != 3 {
		t.Fatalf("ScanChunks(n, c): %v %v, want groups 0-2 of c alone", groups, err)
	}
	b = db.NewBatch()
	b.DeleteContext("n", "c")
	if err := b.Commit(true); err != nil {
		t.Fatal(err)
	}
	if _, err := db.GetChunk("n", "c", 1); !errors.Is(err, ErrNotFound) {
		t.Fatalf("chunk of a deleted context: %v", err)
	}
	var ctxs, uses, chunks []string
	db.ScanContexts(func(ns, id string, c *Context, err error) error { ctxs = append(ctxs, id); return err })
	db.ScanLastUse(func(ns, id string, _ int64, err error) error { uses = append(uses, id); return err })
	db.ScanAllChunks(func(ns, id string, g uint32, c *Chunk, err error) error { chunks = append(chunks, id); return err })
	if strings.Join(ctxs, ",") != "c0" || strings.Join(uses, ",") != "c0" || len(chunks) != 3 {
		t.Fatalf("after deleting c: contexts %v, last uses %v, chunks %v; want c0's alone", ctxs, uses, chunks)
	}
	var tombs int
	if err := db.ScanSegmentTombstones(2, func(off uint64, tb *Tombstone) error { tombs++; return nil }); err != nil || tombs != 1 {
		t.Fatalf("tombstones of segment 2: %d %v", tombs, err)
	}
	// A chunk value that does not decode (a slice outside its record).
	b = db.NewBatch()
	b.PutChunk("n", "c0", 1, &Chunk{Segment: 1, Offset: 4096, Length: 4096, Tokens: 1, Slices: []Slice{{Off: 4096, Stored: 1}}})
	if err := b.Commit(true); err != nil {
		t.Fatal(err)
	}
	if _, err := db.GetChunk("n", "c0", 1); !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), "n/c0 group 1") {
		t.Fatalf("GetChunk of a bad value: %v, want ErrCorrupt naming n/c0 group 1", err)
	}
	if err := db.ScanChunks("n", "c0", func(uint32, *Chunk) error { return nil }); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("ScanChunks over a bad value: %v, want ErrCorrupt", err)
	}
	var handed error
	db.ScanAllChunks(func(ns, id string, g uint32, c *Chunk, err error) error {
		if err != nil {
			handed = err
		}
		return nil
	})
	if !errors.Is(handed, ErrCorrupt) {
		t.Fatalf("ScanAllChunks handed %v for a bad value, want ErrCorrupt", handed)
	}
	if m, err := db.GetMeta(); err != nil || m.ChunkTokens != 16 {
		t.Fatalf("GetMeta: %+v %v", m, err)
	}
	if err := CheckKeyDecoding(chunkKey("n", "c", 5)); err != nil {
		t.Fatal(err)
	}
	if !bytes.HasPrefix(chunkKey("n", "c", 5), chunkPrefix("n", "c")) {
		t.Fatal("chunk key outside its prefix")
	}
}

// TestSegmentLocationCompatible: a local segment's record is the same bytes
// as before the location field existed (old stores open unchanged, and old
// builds read new local records); a location round-trips; an empty or
// oversized one is refused.
func TestSegmentLocationCompatible(t *testing.T) {
	// A value written before the field existed: written, live, sealed.
	legacy := frame(KindSegment, append(append(make([]byte, 0, 17),
		0x00, 0x20, 0, 0, 0, 0, 0, 0, // written 8192
		0x00, 0x10, 0, 0, 0, 0, 0, 0), // live 4096
		1)) // sealed
	s, err := DecodeSegment(legacy)
	if err != nil || *s != (Segment{Written: 8192, Live: 4096, Sealed: true}) {
		t.Fatalf("legacy segment value: %+v %v", s, err)
	}
	if !bytes.Equal(s.Encode(), legacy) {
		t.Fatal("a local segment's record changed encoding")
	}
	s.Location = "s3"
	got, err := DecodeSegment(s.Encode())
	if err != nil || *got != *s {
		t.Fatalf("location round trip: %+v %v", got, err)
	}
	for _, bad := range [][]byte{{0, 0}, {0xff, 0xff}} {
		v := frame(KindSegment, append(legacy[2:len(legacy)-4:len(legacy)-4], bad...))
		if _, err := DecodeSegment(v); !errors.Is(err, ErrCorrupt) {
			t.Errorf("location length %v: %v, want ErrCorrupt", bad, err)
		}
	}
}
