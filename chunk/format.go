package chunk

// On-disk formats of the chunk store. All integers are little-endian; all
// checksums are CRC-32C (Castagnoli).
//
// # Segment file (seg-NNNNNNNN.hcs)
//
// A segment is preallocated, append-only, and written in 4096-byte units:
//
//	[0, 4096)          segment header
//	[4096, Written)    chunk group records, back to back, each 4096-aligned
//	[Written, size)    unused, or the remains of records never indexed
//
// Segment header: magic "HCSEGMT1" (8) | version u16 | reserved u16 |
// segment id u32 | created unix nanos u64 | crc32c u32 of the bytes before it.
// A segment whose header is unreadable is reported by fsck; its chunks fail
// their own checks on restore.
//
// # Chunk group record
//
// One record holds the rows of up to ChunkTokens tokens for every stored layer
// of one context (a "chunk group"), laid out layer-major so that restore reads
// one layer's slice of every group:
//
//	[0, headerBytes)   record header (headerBytes is a multiple of 4096)
//	slices             slice i at Off_i, Stored_i bytes, padded to 4096
//
// Record header: magic "HCCHUNK1" (8) | version u16 | flags u16 |
// headerBytes u32 | recordBytes u64 | segment u32 | slices u16 |
// chunkTokens u16 | tokens u16 | reserved u16 | group u32 | generation u64 |
// binding [32] | slice table (slices x 20 bytes: layer u16, flags u16, off u32,
// stored u32, raw u32, crc u32) | [version 2: context descriptor: namespace
// length u16 | context id length u16 | identity length u32 | namespace |
// context id | encoded identity] | crc32c u32 of the bytes before it.
//
// Flags (version 2): bit 0 marks a tombstone, the record of a delete: no
// slices, no tokens, a descriptor naming the context; it deletes the
// context's generations up to its generation (Repair honours it).
//
// Version 2 records describe themselves: with the descriptor, a record holds
// everything the index holds about it (namespace, id, identity, generation,
// group, token count, slices and their checksums), so the index can be
// rebuilt from the segments alone (Repair). The binding in the header must
// equal the one the descriptor computes. Version 1 records (no descriptor)
// are still read through the index; Repair cannot attribute them and sets
// them aside.
//
// Slice checksums cover the raw rows (after decompression) and start from a
// seed derived from the context binding, the group and the layer (see
// sliceSeed), so they prove the rows belong to this context and place.
//
// # What a reader does with torn or corrupt bytes
//
// The index is the only authority on what exists: a record is used only
// through a chunk key, and that key is committed after the record's bytes were
// made durable by fdatasync. On restore every slice is checked against the
// index's checksum before it is handed over; a mismatch is ErrCorrupt naming
// the context, layer and group, and the context is marked damaged. Bytes
// beyond a segment's Written mark are never read as data: open scans them
// only to count the records that a crash left unindexed (ScanRecords stops at
// the first header whose magic, version, bounds or checksum is wrong, which is
// how a torn tail ends), and the next append overwrites them.

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"

	"github.com/hcache/hcache/lsm"
)

// BlockBytes is the unit of every segment write and read (O_DIRECT alignment).
const BlockBytes = 4096

const (
	formatVersion     = 2 // what this build writes
	formatVersionV1   = 1 // records without a context descriptor: read, never written
	segHeaderBytes    = BlockBytes
	recordFixedBytes  = 8 + 2 + 2 + 4 + 8 + 4 + 2 + 2 + 2 + 2 + 4 + 8 + 32
	sliceEntryBytes   = 20
	segHeaderUsed     = 8 + 2 + 2 + 4 + 8 + 4
	maxRecordSlices   = MaxLayers
	maxRecordBytesCap = 1 << 34
	maxIdentityBytes  = 4 + 2 + 2 + MaxModelBytes + 4 + MaxLayers*5 + 4 + 64
	maxHeaderBytes    = 64 << 10
)

var (
	segMagic    = []byte("HCSEGMT1")
	recordMagic = []byte("HCCHUNK1")
	castagnoli  = crc32.MakeTable(crc32.Castagnoli)
)

// ErrCorrupt is wrapped by every error about bytes that fail their checks.
var ErrCorrupt = errors.New("chunk: corrupt data")

func roundUp(n int) int { return (n + BlockBytes - 1) &^ (BlockBytes - 1) }

// SegmentHeader is the first block of a segment file.
type SegmentHeader struct {
	ID           uint32
	CreatedNanos int64
}

// Encode writes the header into a BlockBytes block.
func (h *SegmentHeader) Encode(block []byte) {
	clear(block[:segHeaderBytes])
	copy(block, segMagic)
	binary.LittleEndian.PutUint16(block[8:], formatVersion)
	binary.LittleEndian.PutUint32(block[12:], h.ID)
	binary.LittleEndian.PutUint64(block[16:], uint64(h.CreatedNanos))
	binary.LittleEndian.PutUint32(block[24:], crc32.Checksum(block[:24], castagnoli))
}

// DecodeSegmentHeader parses a segment header block.
func DecodeSegmentHeader(b []byte) (*SegmentHeader, error) {
	if len(b) < segHeaderUsed || !bytes.Equal(b[:8], segMagic) {
		return nil, fmt.Errorf("%w: segment header magic missing", ErrCorrupt)
	}
	if crc32.Checksum(b[:24], castagnoli) != binary.LittleEndian.Uint32(b[24:]) {
		return nil, fmt.Errorf("%w: segment header checksum mismatch", ErrCorrupt)
	}
	if v := binary.LittleEndian.Uint16(b[8:]); v != formatVersion {
		return nil, fmt.Errorf("%w: segment format version %d, this build reads %d", ErrCorrupt, v, formatVersion)
	}
	return &SegmentHeader{ID: binary.LittleEndian.Uint32(b[12:]), CreatedNanos: int64(binary.LittleEndian.Uint64(b[16:]))}, nil
}

// RecordHeader is the header of a chunk group record.
type RecordHeader struct {
	HeaderBytes uint32
	RecordBytes uint64
	Segment     uint32
	ChunkTokens uint16
	Tokens      uint16
	Group       uint32
	Gen         uint64
	Binding     Binding
	Slices      []lsm.Slice
	// Version is the record format version (0 encodes the current one).
	// Version 2 carries the context descriptor below.
	Version uint16
	// Flags: RecordTombstone marks a deletion record (version 2): no
	// slices, no tokens; it says the context's generations up to Gen were
	// deleted.
	Flags     uint16
	Namespace string
	ContextID string
	Identity  []byte // encoded Identity
}

// descBytes is the size of the context descriptor of a version 2 header.
func (h *RecordHeader) descBytes() int {
	if h.Version == formatVersionV1 {
		return 0
	}
	return 8 + len(h.Namespace) + len(h.ContextID) + len(h.Identity)
}

func headerBytesFor(slices, desc int) int {
	return roundUp(recordFixedBytes + slices*sliceEntryBytes + desc + 4)
}

// Encode writes the header into block, which must hold HeaderBytes bytes.
func (h *RecordHeader) Encode(block []byte) {
	n := int(h.HeaderBytes)
	clear(block[:n])
	copy(block, recordMagic)
	if h.Version == 0 {
		h.Version = formatVersion
	}
	binary.LittleEndian.PutUint16(block[8:], h.Version)
	binary.LittleEndian.PutUint16(block[10:], h.Flags)
	binary.LittleEndian.PutUint32(block[12:], h.HeaderBytes)
	binary.LittleEndian.PutUint64(block[16:], h.RecordBytes)
	binary.LittleEndian.PutUint32(block[24:], h.Segment)
	binary.LittleEndian.PutUint16(block[28:], uint16(len(h.Slices)))
	binary.LittleEndian.PutUint16(block[30:], h.ChunkTokens)
	binary.LittleEndian.PutUint16(block[32:], h.Tokens)
	binary.LittleEndian.PutUint32(block[36:], h.Group)
	binary.LittleEndian.PutUint64(block[40:], h.Gen)
	copy(block[48:80], h.Binding[:])
	p := block[recordFixedBytes:]
	for _, s := range h.Slices {
		binary.LittleEndian.PutUint16(p[0:], s.Layer)
		binary.LittleEndian.PutUint16(p[2:], s.Flags)
		binary.LittleEndian.PutUint32(p[4:], s.Off)
		binary.LittleEndian.PutUint32(p[8:], s.Stored)
		binary.LittleEndian.PutUint32(p[12:], s.Raw)
		binary.LittleEndian.PutUint32(p[16:], s.CRC)
		p = p[sliceEntryBytes:]
	}
	end := recordFixedBytes + len(h.Slices)*sliceEntryBytes
	if h.Version != formatVersionV1 {
		binary.LittleEndian.PutUint16(block[end:], uint16(len(h.Namespace)))
		binary.LittleEndian.PutUint16(block[end+2:], uint16(len(h.ContextID)))
		binary.LittleEndian.PutUint32(block[end+4:], uint32(len(h.Identity)))
		end += 8
		end += copy(block[end:], h.Namespace)
		end += copy(block[end:], h.ContextID)
		end += copy(block[end:], h.Identity)
	}
	binary.LittleEndian.PutUint32(block[end:], crc32.Checksum(block[:end], castagnoli))
}

// DecodeRecordHeader parses and checks a record header from the bytes at the
// start of a record (at least the header's bytes).
func DecodeRecordHeader(b []byte) (*RecordHeader, error) {
	if len(b) < recordFixedBytes+4 || !bytes.Equal(b[:8], recordMagic) {
		return nil, fmt.Errorf("%w: record magic missing", ErrCorrupt)
	}
	v := binary.LittleEndian.Uint16(b[8:])
	if v != formatVersion && v != formatVersionV1 {
		return nil, fmt.Errorf("%w: record format version %d, this build reads %d and %d", ErrCorrupt, v, formatVersionV1, formatVersion)
	}
	h := &RecordHeader{
		Version:     v,
		Flags:       binary.LittleEndian.Uint16(b[10:]),
		HeaderBytes: binary.LittleEndian.Uint32(b[12:]),
		RecordBytes: binary.LittleEndian.Uint64(b[16:]),
		Segment:     binary.LittleEndian.Uint32(b[24:]),
		ChunkTokens: binary.LittleEndian.Uint16(b[30:]),
		Tokens:      binary.LittleEndian.Uint16(b[32:]),
		Group:       binary.LittleEndian.Uint32(b[36:]),
		Gen:         binary.LittleEndian.Uint64(b[40:]),
	}
	n := int(binary.LittleEndian.Uint16(b[28:]))
	tomb := h.Flags&RecordTombstone != 0
	if h.Flags&^RecordTombstone != 0 || (tomb && (v == formatVersionV1 || n != 0)) {
		return nil, fmt.Errorf("%w: record flags %#x with %d slices", ErrCorrupt, h.Flags, n)
	}
	if (n == 0 && !tomb) || n > maxRecordSlices || len(b) < int(h.HeaderBytes) || h.HeaderBytes > maxHeaderBytes {
		return nil, fmt.Errorf("%w: record header of %d bytes with %d slices", ErrCorrupt, h.HeaderBytes, n)
	}
	end := recordFixedBytes + n*sliceEntryBytes
	desc := 0
	if v != formatVersionV1 {
		if end+8+4 > int(h.HeaderBytes) {
			return nil, fmt.Errorf("%w: record header of %d bytes with %d slices", ErrCorrupt, h.HeaderBytes, n)
		}
		nl, il, dl := int(binary.LittleEndian.Uint16(b[end:])), int(binary.LittleEndian.Uint16(b[end+2:])), int(binary.LittleEndian.Uint32(b[end+4:]))
		if nl > lsm.MaxNameBytes || il > lsm.MaxNameBytes || dl > maxIdentityBytes {
			return nil, fmt.Errorf("%w: record descriptor lengths %d/%d/%d", ErrCorrupt, nl, il, dl)
		}
		desc = 8 + nl + il + dl
		if int(h.HeaderBytes) != headerBytesFor(n, desc) {
			return nil, fmt.Errorf("%w: record header of %d bytes with %d slices and a %d-byte descriptor", ErrCorrupt, h.HeaderBytes, n, desc)
		}
		p := b[end+8:]
		h.Namespace = string(p[:nl])
		h.ContextID = string(p[nl : nl+il])
		h.Identity = append([]byte(nil), p[nl+il:nl+il+dl]...)
	} else if int(h.HeaderBytes) != headerBytesFor(n, 0) {
		return nil, fmt.Errorf("%w: record header of %d bytes with %d slices", ErrCorrupt, h.HeaderBytes, n)
	}
	end += desc
	if crc32.Checksum(b[:end], castagnoli) != binary.LittleEndian.Uint32(b[end:]) {
		return nil, fmt.Errorf("%w: record header checksum mismatch", ErrCorrupt)
	}
	if h.RecordBytes%BlockBytes != 0 || h.RecordBytes < uint64(h.HeaderBytes) || h.RecordBytes > maxRecordBytesCap {
		return nil, fmt.Errorf("%w: record length %d", ErrCorrupt, h.RecordBytes)
	}
	if tomb {
		if h.Tokens != 0 || h.RecordBytes != uint64(h.HeaderBytes) {
			return nil, fmt.Errorf("%w: tombstone with %d tokens in %d bytes", ErrCorrupt, h.Tokens, h.RecordBytes)
		}
	} else if h.Tokens == 0 || h.Tokens > h.ChunkTokens {
		return nil, fmt.Errorf("%w: record holds %d tokens of a %d-token chunk", ErrCorrupt, h.Tokens, h.ChunkTokens)
	}
	copy(h.Binding[:], b[48:80])
	if n > 0 {
		h.Slices = make([]lsm.Slice, n)
	}
	p := b[recordFixedBytes:]
	for i := range h.Slices {
		s := lsm.Slice{
			Layer: binary.LittleEndian.Uint16(p[0:]), Flags: binary.LittleEndian.Uint16(p[2:]),
			Off: binary.LittleEndian.Uint32(p[4:]), Stored: binary.LittleEndian.Uint32(p[8:]),
			Raw: binary.LittleEndian.Uint32(p[12:]), CRC: binary.LittleEndian.Uint32(p[16:]),
		}
		if s.Off < h.HeaderBytes || uint64(s.Off)+uint64(s.Stored) > h.RecordBytes {
			return nil, fmt.Errorf("%w: slice %d outside its record", ErrCorrupt, i)
		}
		h.Slices[i] = s
		p = p[sliceEntryBytes:]
	}
	return h, nil
}

// RecordTombstone is the header flag of a deletion record.
const RecordTombstone = 1

// ScannedRecord is one record found by ScanRecords.
type ScannedRecord struct {
	Offset uint64
	Header *RecordHeader
}

// ScanRecords walks the records laid back to back in data, which starts at
// segment offset base, and returns those whose headers check, stopping at the
// first block that is not a valid header (a torn or unwritten tail).
func ScanRecords(data []byte, base uint64) []ScannedRecord {
	var out []ScannedRecord
	off := 0
	for off+recordFixedBytes+4 <= len(data) {
		h, err := DecodeRecordHeader(data[off:])
		if err != nil || h.RecordBytes > uint64(len(data)-off) {
			break
		}
		out = append(out, ScannedRecord{Offset: base + uint64(off), Header: h})
		off += int(h.RecordBytes)
	}
	return out
}
