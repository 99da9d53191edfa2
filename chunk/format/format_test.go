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
