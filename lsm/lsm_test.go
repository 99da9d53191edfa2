package lsm

import (
	"bytes"
	"errors"
	"testing"

	"github.com/cockroachdb/pebble/v2/vfs"
)

func TestKeysRoundTripAndOrder(t *testing.T) {
	ns, id := "tenant", "conversation-1"
	k := chunkKey(ns, id, 7)
	gns, gid, g, err := parseChunkKey(k)
	if err != nil || gns != ns || gid != id || g != 7 {
		t.Fatalf("parseChunkKey: %q %q %d %v", gns, gid, g, err)
	}
	if !bytes.HasPrefix(k, chunkPrefix(ns, id)) || bytes.Compare(k, chunkPrefixEnd(ns, id)) >= 0 {
		t.Fatal("chunk key outside its context's range")
	}
	// A context whose id extends another's does not fall in its range.
	if k2 := chunkKey(ns, id+"0", 0); bytes.Compare(k2, chunkPrefix(ns, id)) >= 0 && bytes.Compare(k2, chunkPrefixEnd(ns, id)) < 0 {
		t.Fatal("chunk key of another context inside the range")
	}
	if bytes.Compare(chunkKey(ns, id, 1), chunkKey(ns, id, 256)) >= 0 {
		t.Fatal("groups do not sort numerically")
	}
	if gns, gid, err := parseContextKey(contextKey(ns, id)); err != nil || gns != ns || gid != id {
		t.Fatal("parseContextKey")
	}
	if sid, err := parseSegmentKey(segmentKey(42)); err != nil || sid != 42 {
		t.Fatal("parseSegmentKey")
	}
	for _, bad := range [][]byte{nil, []byte("k"), []byte("kabc"), []byte("cx"), []byte("s12")} {
		if _, _, _, err := parseChunkKey(bad); err == nil && bad != nil && bad[0] == 'k' {
			t.Errorf("parseChunkKey(%q) accepted", bad)
		}
	}
	for _, n := range []string{"", "a\x00b", string(make([]byte, 256))} {
		if ValidateName("ns", n) == nil {
			t.Errorf("ValidateName(%q) accepted", n)
		}
	}
}

func TestRecordsDetectCorruption(t *testing.T) {
	recs := []struct {
		name   string
		enc    []byte
		decode func([]byte) error
	}{
		{"chunk", (&Chunk{Segment: 1, Offset: 4096, Length: 8192, Tokens: 3, Slices: []Slice{{Layer: 1, Off: 4096, Stored: 10, Raw: 10, CRC: 5}}}).Encode(), func(b []byte) error { _, err := DecodeChunk(b); return err }},
		{"context", (&Context{Identity: []byte("id"), Tokens: 9, Gen: 2}).Encode(), func(b []byte) error { _, err := DecodeContext(b); return err }},
		{"segment", (&Segment{Written: 100, Live: 50}).Encode(), func(b []byte) error { _, err := DecodeSegment(b); return err }},
		{"meta", (&Meta{StoreVersion: 1, ChunkTokens: 64}).Encode(), func(b []byte) error { _, err := DecodeMeta(b); return err }},
	}
	for _, r := range recs {
		if err := r.decode(r.enc); err != nil {
			t.Fatalf("%s: intact record refused: %v", r.name, err)
		}
		for i := range r.enc {
			bad := append([]byte(nil), r.enc...)
			bad[i] ^= 0x04
			if err := r.decode(bad); !errors.Is(err, ErrCorrupt) {
				t.Fatalf("%s: flipped bit in byte %d: %v, want ErrCorrupt", r.name, i, err)
			}
		}
		if err := r.decode(r.enc[:len(r.enc)-1]); !errors.Is(err, ErrCorrupt) {
			t.Fatalf("%s: truncated record accepted", r.name)
		}
	}
	// A chunk whose slice lies outside its record is corrupt even with a good checksum.
	if _, err := DecodeChunk((&Chunk{Length: 4096, Slices: []Slice{{Off: 4000, Stored: 200}}}).Encode()); !errors.Is(err, ErrCorrupt) {
		t.Fatal("slice outside the record accepted")
	}
	if _, err := DecodeSegment((&Segment{Written: 10, Live: 20}).Encode()); !errors.Is(err, ErrCorrupt) {
		t.Fatal("live > written accepted")
	}
}

func TestDBBatchAndScan(t *testing.T) {
	db, err := Open(vfs.NewMem(), "/idx", Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	b := db.NewBatch()
	for g := uint32(0); g < 5; g++ {
		b.set(chunkKey("n", "c", g), []byte{byte(g)})
	}
	b.set(chunkKey("n", "d", 0), []byte{9})
	if err := b.Commit(true); err != nil {
		t.Fatal(err)
	}
	var got []byte
	db.scan(chunkPrefix("n", "c"), chunkPrefixEnd("n", "c"), func(k, v []byte) error { got = append(got, v...); return nil })
	if !bytes.Equal(got, []byte{0, 1, 2, 3, 4}) {
		t.Fatalf("scan of one context: %v", got)
	}
	b = db.NewBatch()
	b.deleteRange(chunkPrefix("n", "c"), chunkPrefixEnd("n", "c"))
	b.Commit(false)
	if _, err := db.get(chunkKey("n", "c", 2)); !errors.Is(err, ErrNotFound) {
		t.Fatalf("after DeleteRange: %v", err)
	}
	if v, err := db.get(chunkKey("n", "d", 0)); err != nil || v[0] != 9 {
		t.Fatal("DeleteRange removed a neighbour")
	}
}
