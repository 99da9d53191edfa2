// Package fuzz holds hcache's fuzz targets: every decoder of bytes that come
// from disk or from a user (record and segment headers of package
// chunk/format, a segment tail as scanned on open, index records, the
// identity/plan encoding, Hugging Face configs, safetensors headers). Each must reject bad input with an error and
// never panic, and what it accepts must re-encode to the same meaning.
// Seed corpora live in testdata/fuzz/<Target>/; `make fuzz-smoke` runs each
// target briefly, `make fuzz` longer. A crash found becomes a file there.
package fuzz

import (
	"bytes"
	"reflect"
	"testing"

	"github.com/hcache/hcache/chunk"
	"github.com/hcache/hcache/chunk/format"
	"github.com/hcache/hcache/fuzz/crash"
	"github.com/hcache/hcache/lsm"
	"github.com/hcache/hcache/model"
	"github.com/hcache/hcache/serve/sched"
)

func sampleHeader() *format.RecordHeader {
	return &format.RecordHeader{HeaderBytes: 4096, RecordBytes: 4096 * 3, Segment: 7, ChunkTokens: 64, Tokens: 10, Group: 3, Gen: 9,
		Slices: []format.Slice{{Layer: 0, Off: 4096, Stored: 640, Raw: 640, CRC: 1}, {Layer: 2, Flags: format.SliceLZ4, Off: 8192, Stored: 300, Raw: 1280, CRC: 2}}}
}

func encodeHeader(h *format.RecordHeader) []byte {
	b := make([]byte, h.HeaderBytes)
	h.Encode(b)
	return b
}

func FuzzRecordHeader(f *testing.F) {
	f.Add(encodeHeader(sampleHeader()))
	f.Add([]byte("HCCHUNK1"))
	f.Fuzz(func(t *testing.T, data []byte) {
		h, err := format.DecodeRecordHeader(data)
		if err != nil {
			return
		}
		again, err := format.DecodeRecordHeader(encodeHeader(h))
		if err != nil || !reflect.DeepEqual(h, again) {
			t.Fatalf("accepted header does not round-trip: %v", err)
		}
	})
}

func FuzzSegmentScan(f *testing.F) {
	rec := encodeHeader(sampleHeader())
	f.Add(append(append([]byte{}, rec...), make([]byte, 8192)...), uint64(4096))
	f.Add(append(append(append([]byte{}, rec...), make([]byte, 8192)...), rec[:100]...), uint64(0))
	f.Fuzz(func(t *testing.T, data []byte, base uint64) {
		base &= 1<<40 - 1
		prev := base
		for _, r := range format.ScanRecords(data, base) {
			if r.Offset != prev {
				t.Fatalf("record at %d, want it at %d (back to back)", r.Offset, prev)
			}
			if r.Offset-base+r.Header.RecordBytes > uint64(len(data)) {
				t.Fatalf("record [%d, +%d) runs past the %d scanned bytes", r.Offset, r.Header.RecordBytes, len(data))
			}
			prev = r.Offset + r.Header.RecordBytes
		}
	})
}

func FuzzSegmentHeader(f *testing.F) {
	b := make([]byte, format.BlockBytes)
	(&format.SegmentHeader{ID: 3, CreatedNanos: 42}).Encode(b)
	f.Add(b)
	f.Fuzz(func(t *testing.T, data []byte) {
		h, err := format.DecodeSegmentHeader(data)
		if err != nil {
			return
		}
		out := make([]byte, format.BlockBytes)
		h.Encode(out)
		if h2, err := format.DecodeSegmentHeader(out); err != nil || *h2 != *h {
			t.Fatal("segment header does not round-trip")
		}
	})
}

func FuzzIndexRecords(f *testing.F) {
	f.Add((&lsm.Chunk{Segment: 1, Offset: 4096, Length: 8192, Tokens: 64, Slices: sampleHeader().Slices}).Encode())
	f.Add((&lsm.Context{Identity: crash.Identity().Encode(), Tokens: 100, Gen: 3, Flags: lsm.FlagPinned}).Encode())
	f.Add((&lsm.Segment{Written: 1 << 20, Live: 4096, Sealed: true}).Encode())
	f.Add((&lsm.Meta{StoreVersion: 1, ChunkTokens: 64, CreatedNanos: 5}).Encode())
	f.Add(lsm.EncodeNanos(lsm.KindLastUse, 77))
	f.Fuzz(func(t *testing.T, v []byte) {
		if c, err := lsm.DecodeChunk(v); err == nil && !bytes.Equal(c.Encode(), v) {
			t.Fatal("chunk record does not round-trip")
		}
		if c, err := lsm.DecodeContext(v); err == nil && !bytes.Equal(c.Encode(), v) {
			t.Fatal("context record does not round-trip")
		}
		if s, err := lsm.DecodeSegment(v); err == nil && !bytes.Equal(s.Encode(), v) {
			t.Fatal("segment record does not round-trip")
		}
		if m, err := lsm.DecodeMeta(v); err == nil && !bytes.Equal(m.Encode(), v) {
			t.Fatal("meta record does not round-trip")
		}
		if n, err := lsm.DecodeNanos(lsm.KindLastUse, v); err == nil && !bytes.Equal(lsm.EncodeNanos(lsm.KindLastUse, n), v) {
			t.Fatal("timestamp does not round-trip")
		}
		// Keys too: what a key decoder accepts encodes back to itself.
		if err := lsm.CheckKeyDecoding(v); err != nil {
			t.Fatal(err)
		}
	})
}

func FuzzIdentity(f *testing.F) {
	f.Add(crash.Identity().Encode())
	c, _ := model.Preset("llama3-8b")
	f.Add((&chunk.Identity{Model: model.ShapeFingerprint(c), Plan: sched.DefaultPlan(c)}).Encode())
	f.Fuzz(func(t *testing.T, data []byte) {
		id, err := chunk.DecodeIdentity(data)
		if err != nil {
			return
		}
		if err := id.Validate(); err != nil {
			t.Fatalf("decoded identity fails validation: %v", err)
		}
		if !bytes.Equal(id.Encode(), data) {
			t.Fatal("identity does not round-trip")
		}
	})
}

func FuzzHFConfig(f *testing.F) {
	for _, name := range model.PresetNames() {
		c, _ := model.Preset(name)
		j, _ := c.HFJSON()
		f.Add(j)
	}
	f.Add([]byte(`{"architectures":["LlamaForCausalLM"],"rope_scaling":null}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := model.ParseHFConfig(data)
		if err != nil {
			return
		}
		if err := c.Validate(); err != nil {
			t.Fatalf("accepted config fails validation: %v", err)
		}
		j, err := c.HFJSON()
		if err != nil {
			t.Fatal(err)
		}
		back, err := model.ParseHFConfig(j)
		if err != nil || back.ArchFingerprint() != c.ArchFingerprint() {
			t.Fatalf("accepted config does not round-trip: %v", err)
		}
	})
}

func FuzzSafetensorsHeader(f *testing.F) {
	hdr := []byte(`{"a":{"dtype":"F16","shape":[2,2],"data_offsets":[0,8]},"__metadata__":{"format":"pt"}}`)
	img := append([]byte{byte(len(hdr)), 0, 0, 0, 0, 0, 0, 0}, hdr...)
	f.Add(append(img, make([]byte, 8)...))
	f.Fuzz(func(t *testing.T, data []byte) {
		model.ParseSafetensorsHeader(data)
	})
}
