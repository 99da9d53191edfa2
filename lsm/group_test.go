package lsm

import (
	"bytes"
	"errors"
	"reflect"
	"testing"

	"github.com/cockroachdb/pebble/v2/vfs"
)

// TestGroupEntries: group entries round-trip through the index, are kept
// apart per namespace even under the same key (and from every other kind of
// key), and a damaged value is ErrCorrupt naming the group.
func TestGroupEntries(t *testing.T) {
	db, err := Open(vfs.NewMem(), "/idx", Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	key := [32]byte{0, 1, 2, 0, 0xff}
	g := &Group{Chunk: Chunk{Segment: 3, Offset: 8192, Length: 12288, Tokens: 2, Slices: []Slice{{Layer: 1, Off: 4096, Stored: 256, Raw: 256, CRC: 7}}},
		Index: 4, Parent: [32]byte{9}, Bind: [32]byte{8}, Digest: [16]byte{7}, IDs: []uint32{11, 1 << 31}}
	b := db.NewBatch()
	b.PutGroup("a", key, g)
	g2 := *g
	g2.Segment = 5
	b.PutGroup("b", key, &g2)
	b.PutChunk("a", "x", 0, &g.Chunk)
	if err := b.Commit(true); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		ns   string
		want *Group
	}{{"a", g}, {"b", &g2}} {
		got, err := db.GetGroup(tc.ns, key)
		if err != nil || !reflect.DeepEqual(got, tc.want) {
			t.Fatalf("GetGroup(%s): %+v %v, want %+v", tc.ns, got, err, tc.want)
		}
	}
	var seen []string
	if err := db.ScanGroups(func(ns string, k [32]byte, got *Group, err error) error {
		if err != nil || k != key {
			t.Fatalf("ScanGroups: %s %x %v", ns, k, err)
		}
		seen = append(seen, ns)
		return nil
	}); err != nil || len(seen) != 2 {
		t.Fatalf("ScanGroups saw %v, %v", seen, err)
	}
	if err := CheckKeyDecoding(groupKey("a", key)); err != nil {
		t.Fatal(err)
	}
	b = db.NewBatch()
	b.DeleteGroup("a", key)
	if err := b.Commit(true); err != nil {
		t.Fatal(err)
	}
	if _, err := db.GetGroup("a", key); !errors.Is(err, ErrNotFound) {
		t.Fatalf("deleted group: %v", err)
	}
	if _, err := db.GetGroup("b", key); err != nil {
		t.Fatalf("the other namespace's group went too: %v", err)
	}
	v := g.Encode()
	for i := range v {
		bad := append([]byte(nil), v...)
		bad[i] ^= 0x40
		if _, err := DecodeGroup(bad); !errors.Is(err, ErrCorrupt) {
			t.Fatalf("byte %d flipped: %v, want ErrCorrupt", i, err)
		}
	}
}

// TestContextChainSection: a legacy context's value is the same bytes as
// before the chain section existed; a token-addressed one round-trips its
// salt, tip and tail ids.
func TestContextChainSection(t *testing.T) {
	legacy := &Context{Identity: []byte("id"), Tokens: 5, Gen: 2, Flags: FlagPinned}
	want := frame(KindContext, append([]byte{5, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0}, "id"...))
	if !bytes.Equal(legacy.Encode(), want) {
		t.Fatal("a legacy context's record changed encoding")
	}
	tok := &Context{Identity: []byte("id"), Tokens: 21, Gen: 3, Flags: FlagTokens, Salt: []byte("s"), Tip: [32]byte{1, 2}, TailIDs: []uint32{4, 5, 6, 7, 8}}
	got, err := DecodeContext(tok.Encode())
	if err != nil || !reflect.DeepEqual(got, tok) {
		t.Fatalf("round trip: %+v %v, want %+v", got, err, tok)
	}
	cut := tok.Encode()
	cut = frame(KindContext, cut[2:len(cut)-4-4])
	if _, err := DecodeContext(cut); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("a cut chain section: %v, want ErrCorrupt", err)
	}
}
