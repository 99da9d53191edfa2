// Package format is the chunk store's on-disk encoding of segments and
// records: pure functions over bytes (no I/O, no index), shared by the
// writer, GC, fsck, repair and the fuzz targets. It is the one description
// of the segment file format. All integers are little-endian; all checksums
// are CRC-32C (Castagnoli).
//
// # Store directory
//
//	DIR/hcache.lock          flock: one process per store directory (read-only opens take none)
//	DIR/hcache.created       creation marker: written once the new index holds its meta record
//	DIR/hcache.reserve       the ballast (preallocated, released on a full disk)
//	DIR/index/               the index (Pebble; its schema is described in package lsm)
//	DIR/index.damaged-T/     a damaged index that repair moved aside (never deleted)
//	DIR/segments/seg-NNNNNNNN.hcs
//
// The creation marker is text with a magic line, a version and a CRC-32C.
// The identity encoding (magic "HCID", version, model fingerprint, plan,
// CRC-32C) is package state's.
//
// # Segment file (seg-NNNNNNNN.hcs)
//
// A segment is preallocated in growing steps, append-only, and written in
// 4096-byte units:
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
// Version 3 records are those of token-addressed contexts (issue 19): the
// version 2 descriptor is followed by a chain section: salt length u16 |
// salt | key [32] | parent key [32] | token count u16 (= tokens) | token
// ids u32 each. Flags (version 3): bit 1 (RecordGroup) marks a group
// record, one full group of a chain shared by every context of the
// namespace whose chain reaches it: empty context id, generation 0, key
// its state.Chain key, parent the previous group's (zero for group 0),
// group its position, and binding the group binding
// (state.NewGroupBinding: namespace, key, identity; no context id). Bit 2
// (RecordTip) marks a tip record: no slices, no tokens, the context
// descriptor, key the context's last full group's key and group its full
// group count; written at a Flush that leaves no tail, so that repair finds
// the context. A token-addressed context's tail record has no flag, the
// context's binding, a zero key and the tail's token ids; its parent is the
// chain's tip. Readers still read version 1 and 2 records.
//
// Version 2 records describe themselves: with the descriptor, a record holds
// everything the index holds about it (namespace, id, identity, generation,
// group, token count, slices and their checksums), so the index can be
// rebuilt from the segments alone (hcache repair). The binding in the header
// must equal the one the descriptor computes. Version 1 records (no
// descriptor) are still read through the index; repair cannot attribute
// them and sets them aside.
//
// Slice checksums cover the raw rows (after decompression) and start from a
// seed derived from the context binding (state.NewBinding: SHA-256 of
// namespace, context id, generation and encoded identity), the group and the layer (SliceSeed), so
// a slice read for the wrong context, place or model fails its check even
// with intact bytes.
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
//
// A torn or corrupt group record is never served: its slices fail their
// checksums (seeded from the group binding of the request's namespace,
// identity and key) and a restore by tokens compares the index entry's
// token digest with the request's tokens before reading; the restore fails
// (ErrCorrupt or ErrCollision) and nothing of it reaches the caller. GC
// moves a group record only if its header checks (otherwise the GC stops
// and the segment stays). Repair adopts a group record only if its header,
// group binding and every slice check, and only while a live context's
// chain (from its newest tail or tip record) reaches it; a context whose
// newest state's chain is not whole in the segments falls back to its
// newest state whose chain is.
package format

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
)

// BlockBytes is the unit of every segment write and read (O_DIRECT alignment).
const BlockBytes = 4096

const (
	// Version is the record (and segment) format version this build writes.
	Version = 2
	// VersionV1 records carry no context descriptor: read, never written.
	VersionV1 = 1
	// VersionV3 records (of token-addressed contexts) add a chain section
	// to the version 2 descriptor: salt, chain key, parent key and the
	// token ids the record's rows were computed from. Segments keep
	// version Version; a segment holds records of every version.
	VersionV3 = 3
	// MaxSaltBytes bounds a chain salt (state.MaxSaltBytes).
	MaxSaltBytes = 255
	// SegmentHeaderBytes is the segment header block; records start after it.
	SegmentHeaderBytes = BlockBytes
	// MaxHeaderBytes bounds a record header.
	MaxHeaderBytes = 64 << 10

	recordFixedBytes  = 8 + 2 + 2 + 4 + 8 + 4 + 2 + 2 + 2 + 2 + 4 + 8 + 32
	sliceEntryBytes   = 20
	segHeaderUsed     = 8 + 2 + 2 + 4 + 8 + 4
	maxRecordSlices   = maxLayers
	maxRecordBytesCap = 1 << 34
	maxIdentityBytes  = 4 + 2 + 2 + maxModelBytes + 4 + maxLayers*5 + 4 + 64

	// The limits of package state (state.MaxLayers, MaxModelBytes,
	// MaxNameBytes), repeated so that this package imports nothing of
	// hcache; TestLimitsMatchState keeps them equal.
	maxLayers     = 1024
	maxModelBytes = 4096
	maxNameBytes  = 255
)

var (
	segMagic    = []byte("HCSEGMT1")
	recordMagic = []byte("HCCHUNK1")
	// Castagnoli is the CRC-32C table of every checksum of the store.
	Castagnoli = crc32.MakeTable(crc32.Castagnoli)
)

// ErrCorrupt is wrapped by every error about bytes that fail their checks.
var ErrCorrupt = errors.New("chunk: corrupt data")

// RoundUp rounds n up to a whole number of blocks.
func RoundUp(n int) int { return (n + BlockBytes - 1) &^ (BlockBytes - 1) }

// IsRecordMagic reports whether block starts like a record header.
func IsRecordMagic(block []byte) bool {
	return len(block) >= len(recordMagic) && bytes.Equal(block[:len(recordMagic)], recordMagic)
}

// RecordHeaderBytes returns the header size that a block starting a record
// declares, so that a reader knows how much to read before decoding it
// (false: the block does not start like a record header).
func RecordHeaderBytes(block []byte) (int, bool) {
	if len(block) < 16 || !IsRecordMagic(block) {
		return 0, false
	}
	n := int(binary.LittleEndian.Uint32(block[12:]))
	if n < BlockBytes || n > MaxHeaderBytes || n%BlockBytes != 0 {
		return 0, false
	}
	return n, true
}

// Slice locates one layer's rows inside a chunk group record (an entry of
// the record header's slice table; the index's chunk records hold the same).
type Slice struct {
	Layer  uint16
	Flags  uint16 // SliceLZ4 ...
	Off    uint32 // from the start of the record
	Stored uint32 // bytes on disk (before padding)
	Raw    uint32 // bytes of rows
	CRC    uint32 // crc32c of the raw rows, seeded with the context binding
}

// Slice flags.
const (
	SliceLZ4 = 1 << 0 // stored bytes are lz4 of the byte-plane shuffled rows
)

// SliceSeed is the crc32c state a slice checksum starts from: it covers the
// binding, the group and the layer, so a slice served for another context,
// group or layer fails its check even when its bytes are intact.
func SliceSeed(b [32]byte, group uint32, layer uint16) uint32 {
	var buf [32 + 6]byte
	copy(buf[:], b[:])
	binary.LittleEndian.PutUint32(buf[32:], group)
	binary.LittleEndian.PutUint16(buf[36:], layer)
	return crc32.Checksum(buf[:], Castagnoli)
}

// SliceCRC checksums raw rows of a slice.
func SliceCRC(b [32]byte, group uint32, layer uint16, rows []byte) uint32 {
	return crc32.Update(SliceSeed(b, group, layer), Castagnoli, rows)
}

// SegmentHeader is the first block of a segment file.
type SegmentHeader struct {
	ID           uint32
	CreatedNanos int64
}

// Encode writes the header into a BlockBytes block.
func (h *SegmentHeader) Encode(block []byte) {
	clear(block[:SegmentHeaderBytes])
	copy(block, segMagic)
	binary.LittleEndian.PutUint16(block[8:], Version)
	binary.LittleEndian.PutUint32(block[12:], h.ID)
	binary.LittleEndian.PutUint64(block[16:], uint64(h.CreatedNanos))
	binary.LittleEndian.PutUint32(block[24:], crc32.Checksum(block[:24], Castagnoli))
}

// DecodeSegmentHeader parses a segment header block.
func DecodeSegmentHeader(b []byte) (*SegmentHeader, error) {
	if len(b) < segHeaderUsed || !bytes.Equal(b[:8], segMagic) {
		return nil, fmt.Errorf("%w: segment header magic missing", ErrCorrupt)
	}
	if crc32.Checksum(b[:24], Castagnoli) != binary.LittleEndian.Uint32(b[24:]) {
		return nil, fmt.Errorf("%w: segment header checksum mismatch", ErrCorrupt)
	}
	if v := binary.LittleEndian.Uint16(b[8:]); v != Version {
		return nil, fmt.Errorf("%w: segment format version %d, this build reads %d", ErrCorrupt, v, Version)
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
	Binding     [32]byte // the context binding (state.NewBinding)
	Slices      []Slice
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

	// The chain section (version 3 only). A group record (RecordGroup)
	// holds one full group of a token chain: ContextID is empty, Key is
	// its chain key, Parent the previous group's (zero for group 0),
	// TokenIDs its ChunkTokens token ids, and Binding the group binding
	// (state.NewGroupBinding). A token-addressed context's tail record
	// (no flag) has the context descriptor, a zero Key, Parent = the
	// chain key of the context's last full group (zero if none) and the
	// tail's token ids. A tip record (RecordTip) has no slices and no
	// tokens: it says context (namespace, id, generation) holds Group full
	// groups ending at Key.
	Salt     []byte
	Key      [32]byte
	Parent   [32]byte
	TokenIDs []uint32
}

// DescBytes is the size of the context descriptor of a version 2 or 3
// header.
func (h *RecordHeader) DescBytes() int {
	switch h.Version {
	case VersionV1:
		return 0
	case VersionV3:
		return 8 + len(h.Namespace) + len(h.ContextID) + len(h.Identity) + chainBytes(len(h.Salt), len(h.TokenIDs))
	}
	return 8 + len(h.Namespace) + len(h.ContextID) + len(h.Identity)
}

// chainBytes is the size of a version 3 chain section.
func chainBytes(salt, tokens int) int { return 2 + salt + 32 + 32 + 2 + 4*tokens }

// HeaderBytesFor is the header size of a record of slices slices and a
// desc-byte context descriptor.
func HeaderBytesFor(slices, desc int) int {
	return RoundUp(recordFixedBytes + slices*sliceEntryBytes + desc + 4)
}

// Encode writes the header into block, which must hold HeaderBytes bytes.
func (h *RecordHeader) Encode(block []byte) {
	n := int(h.HeaderBytes)
	clear(block[:n])
	copy(block, recordMagic)
	if h.Version == 0 {
		h.Version = Version
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
	if h.Version != VersionV1 {
		binary.LittleEndian.PutUint16(block[end:], uint16(len(h.Namespace)))
		binary.LittleEndian.PutUint16(block[end+2:], uint16(len(h.ContextID)))
		binary.LittleEndian.PutUint32(block[end+4:], uint32(len(h.Identity)))
		end += 8
		end += copy(block[end:], h.Namespace)
		end += copy(block[end:], h.ContextID)
		end += copy(block[end:], h.Identity)
	}
	if h.Version == VersionV3 {
		binary.LittleEndian.PutUint16(block[end:], uint16(len(h.Salt)))
		end += 2
		end += copy(block[end:], h.Salt)
		end += copy(block[end:], h.Key[:])
		end += copy(block[end:], h.Parent[:])
		binary.LittleEndian.PutUint16(block[end:], uint16(len(h.TokenIDs)))
		end += 2
		for _, t := range h.TokenIDs {
			binary.LittleEndian.PutUint32(block[end:], t)
			end += 4
		}
	}
	binary.LittleEndian.PutUint32(block[end:], crc32.Checksum(block[:end], Castagnoli))
}

// DecodeRecordHeader parses and checks a record header from the bytes at the
// start of a record (at least the header's bytes).
func DecodeRecordHeader(b []byte) (*RecordHeader, error) {
	if len(b) < recordFixedBytes+4 || !bytes.Equal(b[:8], recordMagic) {
		return nil, fmt.Errorf("%w: record magic missing", ErrCorrupt)
	}
	v := binary.LittleEndian.Uint16(b[8:])
	if v != Version && v != VersionV1 && v != VersionV3 {
		return nil, fmt.Errorf("%w: record format version %d, this build reads %d, %d and %d", ErrCorrupt, v, VersionV1, Version, VersionV3)
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
	tip := h.Flags&RecordTip != 0
	group := h.Flags&RecordGroup != 0
	switch {
	case h.Flags&^(RecordTombstone|RecordGroup|RecordTip) != 0,
		tomb && (v == VersionV1 || n != 0 || group || tip),
		(group || tip) && v != VersionV3,
		group && tip,
		tip && n != 0:
		return nil, fmt.Errorf("%w: record flags %#x with %d slices (version %d)", ErrCorrupt, h.Flags, n, v)
	}
	if (n == 0 && !tomb && !tip) || n > maxRecordSlices || len(b) < int(h.HeaderBytes) || h.HeaderBytes > MaxHeaderBytes {
		return nil, fmt.Errorf("%w: record header of %d bytes with %d slices", ErrCorrupt, h.HeaderBytes, n)
	}
	end := recordFixedBytes + n*sliceEntryBytes
	desc := 0
	if v != VersionV1 {
		if end+8+4 > int(h.HeaderBytes) {
			return nil, fmt.Errorf("%w: record header of %d bytes with %d slices", ErrCorrupt, h.HeaderBytes, n)
		}
		nl, il, dl := int(binary.LittleEndian.Uint16(b[end:])), int(binary.LittleEndian.Uint16(b[end+2:])), int(binary.LittleEndian.Uint32(b[end+4:]))
		if nl > maxNameBytes || il > maxNameBytes || dl > maxIdentityBytes {
			return nil, fmt.Errorf("%w: record descriptor lengths %d/%d/%d", ErrCorrupt, nl, il, dl)
		}
		desc = 8 + nl + il + dl
		if v == VersionV3 {
			// The chain section follows the v2 descriptor.
			c := end + 8 + nl + il + dl
			if c+2 > int(h.HeaderBytes) {
				return nil, fmt.Errorf("%w: record header of %d bytes cut in its chain section", ErrCorrupt, h.HeaderBytes)
			}
			sl := int(binary.LittleEndian.Uint16(b[c:]))
			if sl > MaxSaltBytes || c+2+sl+64+2 > int(h.HeaderBytes) {
				return nil, fmt.Errorf("%w: record chain section with a %d-byte salt", ErrCorrupt, sl)
			}
			p := b[c+2:]
			h.Salt = append([]byte(nil), p[:sl]...)
			copy(h.Key[:], p[sl:sl+32])
			copy(h.Parent[:], p[sl+32:sl+64])
			nt := int(binary.LittleEndian.Uint16(p[sl+64:]))
			if nt != int(h.Tokens) || c+chainBytes(sl, nt) > int(h.HeaderBytes) {
				return nil, fmt.Errorf("%w: record chain section lists %d token ids for %d tokens", ErrCorrupt, nt, h.Tokens)
			}
			if nt > 0 {
				h.TokenIDs = make([]uint32, nt)
				for i := range h.TokenIDs {
					h.TokenIDs[i] = binary.LittleEndian.Uint32(p[sl+66+4*i:])
				}
			}
			desc += chainBytes(sl, nt)
			if group && (il != 0 || h.Key == [32]byte{}) || !group && il == 0 || tip && h.Key == [32]byte{} {
				return nil, fmt.Errorf("%w: record flags %#x with a %d-byte context id and key %x", ErrCorrupt, h.Flags, il, h.Key[:8])
			}
		}
		if int(h.HeaderBytes) != HeaderBytesFor(n, desc) {
			return nil, fmt.Errorf("%w: record header of %d bytes with %d slices and a %d-byte descriptor", ErrCorrupt, h.HeaderBytes, n, desc)
		}
		p := b[end+8:]
		h.Namespace = string(p[:nl])
		h.ContextID = string(p[nl : nl+il])
		h.Identity = append([]byte(nil), p[nl+il:nl+il+dl]...)
	} else if int(h.HeaderBytes) != HeaderBytesFor(n, 0) {
		return nil, fmt.Errorf("%w: record header of %d bytes with %d slices", ErrCorrupt, h.HeaderBytes, n)
	}
	end += desc
	if crc32.Checksum(b[:end], Castagnoli) != binary.LittleEndian.Uint32(b[end:]) {
		return nil, fmt.Errorf("%w: record header checksum mismatch", ErrCorrupt)
	}
	if h.RecordBytes%BlockBytes != 0 || h.RecordBytes < uint64(h.HeaderBytes) || h.RecordBytes > maxRecordBytesCap {
		return nil, fmt.Errorf("%w: record length %d", ErrCorrupt, h.RecordBytes)
	}
	if tomb || tip {
		if h.Tokens != 0 || h.RecordBytes != uint64(h.HeaderBytes) {
			return nil, fmt.Errorf("%w: tombstone or tip record with %d tokens in %d bytes", ErrCorrupt, h.Tokens, h.RecordBytes)
		}
	} else if h.Tokens == 0 || h.Tokens > h.ChunkTokens || group && h.Tokens != h.ChunkTokens {
		return nil, fmt.Errorf("%w: record holds %d tokens of a %d-token chunk", ErrCorrupt, h.Tokens, h.ChunkTokens)
	}
	copy(h.Binding[:], b[48:80])
	if n > 0 {
		h.Slices = make([]Slice, n)
	}
	p := b[recordFixedBytes:]
	for i := range h.Slices {
		s := Slice{
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

// Record flags.
const (
	// RecordTombstone is the header flag of a deletion record.
	RecordTombstone = 1
	// RecordGroup marks a group record (version 3): one full group of a
	// token chain, shared by every context whose chain reaches its key.
	RecordGroup = 2
	// RecordTip marks a tip record (version 3): no slices; it names the
	// last full group (Key, Group = the full group count) of a
	// token-addressed context generation, for repair.
	RecordTip = 4
)

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
