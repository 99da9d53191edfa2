package format

import (
	"errors"
	"os/exec"
	"reflect"
	"strings"
	"testing"

	"github.com/hcache/hcache/state"
)

func sampleRecord() *RecordHeader {
	id := &state.Identity{Model: []byte("m"), Plan: []state.LayerPlan{{Kind: state.LayerKV, RowBytes: 64}}}
	h := &RecordHeader{RecordBytes: 2 * BlockBytes, Segment: 3, ChunkTokens: 16, Tokens: 5, Group: 2, Gen: 7,
		Binding: state.NewBinding("ns", "ctx", 7, id), Namespace: "ns", ContextID: "ctx", Identity: id.Encode(),
		Slices: []Slice{{Layer: 0, Off: BlockBytes, Stored: 320, Raw: 320, CRC: 9}}}
	h.HeaderBytes = uint32(HeaderBytesFor(len(h.Slices), h.DescBytes()))
	return h
}

// TestRecordHeader: an encoded header decodes to itself, and each kind of
// damage is refused with ErrCorrupt naming what is wrong.
func TestRecordHeader(t *testing.T) {
	h := sampleRecord()
	good := make([]byte, h.RecordBytes)
	h.Encode(good)
	got, err := DecodeRecordHeader(good)
	if err != nil || !reflect.DeepEqual(got, h) {
		t.Fatalf("round trip: %v\n got %+v\nwant %+v", err, got, h)
	}
	for _, tc := range []struct {
		name string
		edit func(b []byte) []byte
		want string
	}{
		{"magic", func(b []byte) []byte { b[0] = 'X'; return b }, "magic"},
		{"version", func(b []byte) []byte { b[8] = 9; return b }, "version 9"},
		{"checksum", func(b []byte) []byte { b[60]++; return b }, "checksum"},
		{"short", func(b []byte) []byte { return b[:40] }, "magic"},
	} {
		b := tc.edit(append([]byte(nil), good...))
		_, err := DecodeRecordHeader(b)
		if !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: err %v, want ErrCorrupt naming %q", tc.name, err, tc.want)
		}
	}
	// A scan stops at the first block that is not a header (a torn tail).
	tail := append(append([]byte(nil), good...), good[:100]...)
	if recs := ScanRecords(tail, SegmentHeaderBytes); len(recs) != 1 || recs[0].Offset != SegmentHeaderBytes {
		t.Fatalf("scan found %+v, want one record at %d", recs, SegmentHeaderBytes)
	}
}

func TestSegmentHeader(t *testing.T) {
	b := make([]byte, BlockBytes)
	(&SegmentHeader{ID: 4, CreatedNanos: 42}).Encode(b)
	if h, err := DecodeSegmentHeader(b); err != nil || *h != (SegmentHeader{ID: 4, CreatedNanos: 42}) {
		t.Fatalf("round trip: %+v, %v", h, err)
	}
	b[13]++
	if _, err := DecodeSegmentHeader(b); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("a changed id byte: %v, want ErrCorrupt", err)
	}
}

// TestPure: the format package is a leaf: it links nothing of hcache (no
// index, no engine), so every layer can use it.
func TestPure(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", ".").Output()
	if err != nil {
		t.Skipf("go list: %v", err)
	}
	for _, dep := range strings.Fields(string(out)) {
		switch {
		case strings.HasPrefix(dep, "github.com/cockroachdb/"),
			strings.HasPrefix(dep, "github.com/hcache/hcache/") && dep != "github.com/hcache/hcache/chunk/format":
			t.Errorf("package format links %s", dep)
		}
	}
}

// TestLimitsMatchState: the decoding bounds repeated here are package
// state's.
func TestLimitsMatchState(t *testing.T) {
	if maxLayers != state.MaxLayers || maxModelBytes != state.MaxModelBytes || maxNameBytes != state.MaxNameBytes {
		t.Fatalf("limits %d/%d/%d, package state's %d/%d/%d", maxLayers, maxModelBytes, maxNameBytes, state.MaxLayers, state.MaxModelBytes, state.MaxNameBytes)
	}
}

// TestVersion3Records: group, tip and tail records of token-addressed
// contexts round-trip, and headers whose flags, descriptor or chain section
// contradict each other are refused with ErrCorrupt.
func TestVersion3Records(t *testing.T) {
	id := &state.Identity{Model: []byte("m"), Plan: []state.LayerPlan{{Kind: state.LayerKV, RowBytes: 64}}}
	ids := make([]uint32, 16)
	for i := range ids {
		ids[i] = uint32(1000 + i)
	}
	key := [32]byte{1, 2, 3}
	group := &RecordHeader{Version: VersionV3, Flags: RecordGroup, RecordBytes: 2 * BlockBytes, Segment: 3, ChunkTokens: 16, Tokens: 16, Group: 2,
		Namespace: "ns", Identity: id.Encode(), Salt: []byte("salt"), Key: key, Parent: [32]byte{9}, TokenIDs: ids,
		Slices: []Slice{{Layer: 0, Off: BlockBytes, Stored: 1024, Raw: 1024, CRC: 9}}}
	tip := &RecordHeader{Version: VersionV3, Flags: RecordTip, ChunkTokens: 16, Group: 3, Gen: 5, Namespace: "ns", ContextID: "c", Identity: id.Encode(), Key: key}
	tail := &RecordHeader{Version: VersionV3, RecordBytes: 2 * BlockBytes, ChunkTokens: 16, Tokens: 3, Group: 3, Gen: 5, Namespace: "ns", ContextID: "c",
		Identity: id.Encode(), Parent: key, TokenIDs: ids[:3], Slices: []Slice{{Layer: 0, Off: BlockBytes, Stored: 192, Raw: 192, CRC: 9}}}
	for _, h := range []*RecordHeader{group, tip, tail} {
		h.HeaderBytes = uint32(HeaderBytesFor(len(h.Slices), h.DescBytes()))
		if h.RecordBytes == 0 {
			h.RecordBytes = uint64(h.HeaderBytes)
		}
		b := make([]byte, h.RecordBytes)
		h.Encode(b)
		got, err := DecodeRecordHeader(b)
		if err != nil || !reflect.DeepEqual(got, h) {
			t.Fatalf("flags %#x round trip: %v\n got %+v\nwant %+v", h.Flags, err, got, h)
		}
	}
	for _, tc := range []struct {
		name string
		edit func(h *RecordHeader)
	}{
		{"group record naming a context", func(h *RecordHeader) { h.ContextID = "c" }},
		{"group record without a key", func(h *RecordHeader) { h.Key = [32]byte{} }},
		{"group record of a partial group", func(h *RecordHeader) { h.Tokens, h.TokenIDs = 15, ids[:15] }},
		{"group and tip", func(h *RecordHeader) { h.Flags |= RecordTip }},
		{"group flag on version 2", func(h *RecordHeader) { h.Version = Version }},
		{"unknown flag", func(h *RecordHeader) { h.Flags |= 8 }},
	} {
		h := *group
		tc.edit(&h)
		h.HeaderBytes = uint32(HeaderBytesFor(len(h.Slices), h.DescBytes()))
		b := make([]byte, max(h.RecordBytes, uint64(h.HeaderBytes)))
		h.Encode(b)
		if _, err := DecodeRecordHeader(b); !errors.Is(err, ErrCorrupt) {
			t.Errorf("%s: %v, want ErrCorrupt", tc.name, err)
		}
	}
	// Token ids that disagree with the token count are refused.
	h := *tail
	h.TokenIDs = ids[:4]
	h.HeaderBytes = uint32(HeaderBytesFor(len(h.Slices), h.DescBytes()))
	b := make([]byte, h.RecordBytes)
	h.Encode(b)
	if _, err := DecodeRecordHeader(b); !errors.Is(err, ErrCorrupt) {
		t.Errorf("4 ids for 3 tokens: %v, want ErrCorrupt", err)
	}
}
