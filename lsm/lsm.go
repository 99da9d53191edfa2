// Package lsm is hcache's metadata index on Pebble: namespaces, contexts,
// chunk-group locations and segment liveness. The chunk store (package chunk)
// is its only writer.
//
// The package owns the index schema: callers use typed operations per kind
// of record (Batch.PutChunk, DB.GetChunk, DB.ScanChunks, Batch.DeleteContext,
// Batch.PutSegment, DB.ScanTombstones, ...; schema.go) and never see key
// bytes or prefixes. A value that fails to decode reaches the caller as an
// error wrapping ErrCorrupt that names the record; no scan skips it.
//
// # Keys
//
//	"m" "meta"                              -> Meta      (format version, chunk tokens)
//	"n" ns                                  -> Namespace (creation time)
//	"c" ns 0x00 id                          -> Context   (identity, tokens, generation, flags)
//	"u" ns 0x00 id                          -> last use  (unix nanoseconds)
//	"k" ns 0x00 id 0x00 group(uint32 BE)    -> Chunk     (segment, offset, per-layer slices)
//	"s" segment(uint32 BE)                  -> Segment   (written bytes, live bytes, sealed[, location])
//	"t" segment(uint32 BE) offset(uint64 BE) -> Tombstone (a deletion record in a segment)
//	"g" ns 0x00 chain key[32]               -> Group     (a shared group record of a token chain; group.go)
//
// Namespaces and context ids are 1..255 bytes without NUL, so the 0x00
// separators keep one context's keys contiguous and apart from its neighbours.
//
// # Values
//
// A Context with FlagTokens (a token-addressed context, issue 19) appends a
// chain section to its value: salt length u16 | salt | tip key [32] | tail
// token count u16 | tail token ids u32 each. Its full groups are the chain
// its tip key ends (walked back through the Group entries' parent keys);
// its only chunk key is at its full group count (its partial tail, or a tip
// record with no rows). Reference counts of groups are derived from these
// chains at open, never stored.
//
// Every value is framed as kind(1) version(1) payload crc32c(4), the checksum
// (Castagnoli) covering kind, version and payload. A value whose frame, kind,
// version or checksum is wrong decodes to an error wrapping ErrCorrupt; the
// store treats the context (or segment) it belongs to as damaged and never
// serves data through it.
package lsm

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"

	"github.com/hcache/hcache/chunk/format"
	"github.com/hcache/hcache/state"
)

// FormatVersion is the version of every value this package writes.
const FormatVersion = 1

// Value kinds.
const (
	KindMeta      = 'M'
	KindNamespace = 'N'
	KindContext   = 'C'
	KindChunk     = 'K'
	KindSegment   = 'S'
	KindLastUse   = 'U'
	KindTombstone = 'T'
)

// ErrCorrupt is wrapped by every decode error.
var ErrCorrupt = errors.New("lsm: corrupt index record")

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// MaxNameBytes bounds namespace and context id lengths (state.MaxNameBytes).
const MaxNameBytes = state.MaxNameBytes

// ValidateName checks a namespace or context id (state.ValidateName, where
// the rule lives so that callers need not link the index).
func ValidateName(what, s string) error { return state.ValidateName(what, s) }

// Key builders.

// metaKey is the key of the store's Meta record.
func metaKey() []byte { return []byte("mmeta") }

// namespaceKey is the key of a namespace.
func namespaceKey(ns string) []byte { return append([]byte{'n'}, ns...) }

// contextKey is the key of a context record.
func contextKey(ns, id string) []byte { return ctxKey('c', ns, id) }

// lastUseKey is the key of a context's last-use time.
func lastUseKey(ns, id string) []byte { return ctxKey('u', ns, id) }

func ctxKey(p byte, ns, id string) []byte {
	k := make([]byte, 0, 2+len(ns)+len(id))
	k = append(k, p)
	k = append(k, ns...)
	k = append(k, 0)
	return append(k, id...)
}

// chunkPrefix is the prefix of all chunk keys of one context; chunkPrefixEnd
// is its exclusive upper bound.
func chunkPrefix(ns, id string) []byte { return append(ctxKey('k', ns, id), 0) }

// chunkPrefixEnd is the exclusive upper bound of chunkPrefix.
func chunkPrefixEnd(ns, id string) []byte { return append(ctxKey('k', ns, id), 1) }

// chunkKey is the key of chunk group g of a context.
func chunkKey(ns, id string, g uint32) []byte {
	return binary.BigEndian.AppendUint32(chunkPrefix(ns, id), g)
}

// parseChunkKey returns the group of a chunk key.
func parseChunkKey(k []byte) (ns, id string, g uint32, err error) {
	if len(k) < 1+1+1+1+4 || k[0] != 'k' {
		return "", "", 0, fmt.Errorf("%w: bad chunk key %q", ErrCorrupt, k)
	}
	body := k[1 : len(k)-5]
	if k[len(k)-5] != 0 {
		return "", "", 0, fmt.Errorf("%w: bad chunk key %q", ErrCorrupt, k)
	}
	i := bytes.IndexByte(body, 0)
	if i <= 0 || i == len(body)-1 {
		return "", "", 0, fmt.Errorf("%w: bad chunk key %q", ErrCorrupt, k)
	}
	return string(body[:i]), string(body[i+1:]), binary.BigEndian.Uint32(k[len(k)-4:]), nil
}

// parseContextKey splits a context (or last-use) key.
func parseContextKey(k []byte) (ns, id string, err error) {
	if len(k) < 4 || (k[0] != 'c' && k[0] != 'u') {
		return "", "", fmt.Errorf("%w: bad context key %q", ErrCorrupt, k)
	}
	i := bytes.IndexByte(k[1:], 0)
	if i <= 0 || 1+i+1 >= len(k) {
		return "", "", fmt.Errorf("%w: bad context key %q", ErrCorrupt, k)
	}
	return string(k[1 : 1+i]), string(k[2+i:]), nil
}

// segmentKey is the key of a segment record.
func segmentKey(id uint32) []byte { return binary.BigEndian.AppendUint32([]byte{'s'}, id) }

// parseSegmentKey returns the id in a segment key.
func parseSegmentKey(k []byte) (uint32, error) {
	if len(k) != 5 || k[0] != 's' {
		return 0, fmt.Errorf("%w: bad segment key %q", ErrCorrupt, k)
	}
	return binary.BigEndian.Uint32(k[1:]), nil
}

// Framing.

func frame(kind byte, payload []byte) []byte {
	out := make([]byte, 0, 2+len(payload)+4)
	out = append(out, kind, FormatVersion)
	out = append(out, payload...)
	return binary.LittleEndian.AppendUint32(out, crc32.Checksum(out, castagnoli))
}

func unframe(kind byte, v []byte) ([]byte, error) {
	if len(v) < 6 {
		return nil, fmt.Errorf("%w: %c record of %d bytes is too short", ErrCorrupt, kind, len(v))
	}
	if v[0] != kind {
		return nil, fmt.Errorf("%w: record kind %q, want %q", ErrCorrupt, v[0], kind)
	}
	if v[1] != FormatVersion {
		return nil, fmt.Errorf("%w: %c record version %d, this build reads %d", ErrCorrupt, kind, v[1], FormatVersion)
	}
	body := v[:len(v)-4]
	if got, want := crc32.Checksum(body, castagnoli), binary.LittleEndian.Uint32(v[len(v)-4:]); got != want {
		return nil, fmt.Errorf("%w: %c record checksum %08x, stored %08x", ErrCorrupt, kind, got, want)
	}
	return v[2 : len(v)-4], nil
}

// reader decodes little-endian fields and remembers the first short read.
type reader struct {
	b   []byte
	err bool
}

func (r *reader) take(n int) []byte {
	if r.err || n < 0 || len(r.b) < n {
		r.err = true
		return make([]byte, max(n, 0))
	}
	v := r.b[:n]
	r.b = r.b[n:]
	return v
}
func (r *reader) u8() uint8   { return r.take(1)[0] }
func (r *reader) u16() uint16 { return binary.LittleEndian.Uint16(r.take(2)) }
func (r *reader) u32() uint32 { return binary.LittleEndian.Uint32(r.take(4)) }
func (r *reader) u64() uint64 { return binary.LittleEndian.Uint64(r.take(8)) }
func (r *reader) done(kind byte) error {
	if r.err {
		return fmt.Errorf("%w: %c record payload is truncated", ErrCorrupt, kind)
	}
	if len(r.b) != 0 {
		return fmt.Errorf("%w: %c record has %d trailing bytes", ErrCorrupt, kind, len(r.b))
	}
	return nil
}

// Meta describes the store as a whole.
type Meta struct {
	StoreVersion uint32
	ChunkTokens  uint32
	CreatedNanos int64
}

// Encode frames m.
func (m *Meta) Encode() []byte {
	var p []byte
	p = binary.LittleEndian.AppendUint32(p, m.StoreVersion)
	p = binary.LittleEndian.AppendUint32(p, m.ChunkTokens)
	p = binary.LittleEndian.AppendUint64(p, uint64(m.CreatedNanos))
	return frame(KindMeta, p)
}

// DecodeMeta parses a Meta value.
func DecodeMeta(v []byte) (*Meta, error) {
	p, err := unframe(KindMeta, v)
	if err != nil {
		return nil, err
	}
	r := reader{b: p}
	m := &Meta{StoreVersion: r.u32(), ChunkTokens: r.u32(), CreatedNanos: int64(r.u64())}
	return m, r.done(KindMeta)
}

// Context flags.
const (
	FlagPinned  = 1 << 0 // never evicted
	FlagDamaged = 1 << 1 // a read found corrupt or missing data; never served
	// FlagTokens marks a token-addressed context: its record carries the
	// chain section (Salt, Tip, TailIDs) and its full groups are shared
	// group entries (group.go).
	FlagTokens = 1 << 2
)

// Context is a context's durable record.
type Context struct {
	Identity []byte // encoded identity (package chunk owns its format)
	Tokens   uint64 // tokens durable in chunk records
	Gen      uint64 // generation: unique per creation, binds chunks to it
	Flags    uint32
	// The chain section, encoded only with FlagTokens (so a legacy
	// context's value is the same bytes as before it existed).
	Salt    []byte
	Tip     [32]byte // key of the last full group (zero: none)
	TailIDs []uint32 // token ids of the partial tail (Tokens % ChunkTokens of them)
}

// Encode frames c.
func (c *Context) Encode() []byte {
	var p []byte
	p = binary.LittleEndian.AppendUint64(p, c.Tokens)
	p = binary.LittleEndian.AppendUint64(p, c.Gen)
	p = binary.LittleEndian.AppendUint32(p, c.Flags)
	p = binary.LittleEndian.AppendUint32(p, uint32(len(c.Identity)))
	p = append(p, c.Identity...)
	if c.Flags&FlagTokens != 0 {
		p = binary.LittleEndian.AppendUint16(p, uint16(len(c.Salt)))
		p = append(p, c.Salt...)
		p = append(p, c.Tip[:]...)
		p = binary.LittleEndian.AppendUint16(p, uint16(len(c.TailIDs)))
		for _, t := range c.TailIDs {
			p = binary.LittleEndian.AppendUint32(p, t)
		}
	}
	return frame(KindContext, p)
}

// DecodeContext parses a Context value.
func DecodeContext(v []byte) (*Context, error) {
	p, err := unframe(KindContext, v)
	if err != nil {
		return nil, err
	}
	r := reader{b: p}
	c := &Context{Tokens: r.u64(), Gen: r.u64(), Flags: r.u32()}
	n := r.u32()
	if n > 1<<20 {
		return nil, fmt.Errorf("%w: identity of %d bytes", ErrCorrupt, n)
	}
	c.Identity = append([]byte(nil), r.take(int(n))...)
	if c.Flags&FlagTokens != 0 {
		sl := int(r.u16())
		if sl > 255 {
			return nil, fmt.Errorf("%w: context salt of %d bytes", ErrCorrupt, sl)
		}
		c.Salt = append([]byte(nil), r.take(sl)...)
		copy(c.Tip[:], r.take(32))
		nt := int(r.u16())
		if nt > 0 {
			c.TailIDs = make([]uint32, nt)
			for i := range c.TailIDs {
				c.TailIDs[i] = r.u32()
			}
		}
	}
	return c, r.done(KindContext)
}

// Slice locates one layer's rows inside a chunk group record: the entry of
// the record header's slice table (format.Slice), held by chunk records too.
type Slice = format.Slice

// Slice flags (format.SliceLZ4).
const (
	SliceLZ4 = format.SliceLZ4 // stored bytes are lz4 of the byte-plane shuffled rows
)

// Chunk locates a chunk group record in a segment.
type Chunk struct {
	Segment uint32
	Offset  uint64 // of the record in the segment file
	Length  uint32 // record bytes on disk, header included (multiple of 4096)
	Tokens  uint16 // rows of each layer in this group
	Slices  []Slice
}

// Encode frames c.
func (c *Chunk) Encode() []byte {
	p := make([]byte, 0, 20+len(c.Slices)*20)
	p = binary.LittleEndian.AppendUint32(p, c.Segment)
	p = binary.LittleEndian.AppendUint64(p, c.Offset)
	p = binary.LittleEndian.AppendUint32(p, c.Length)
	p = binary.LittleEndian.AppendUint16(p, c.Tokens)
	p = binary.LittleEndian.AppendUint16(p, uint16(len(c.Slices)))
	for _, s := range c.Slices {
		p = binary.LittleEndian.AppendUint16(p, s.Layer)
		p = binary.LittleEndian.AppendUint16(p, s.Flags)
		p = binary.LittleEndian.AppendUint32(p, s.Off)
		p = binary.LittleEndian.AppendUint32(p, s.Stored)
		p = binary.LittleEndian.AppendUint32(p, s.Raw)
		p = binary.LittleEndian.AppendUint32(p, s.CRC)
	}
	return frame(KindChunk, p)
}

// DecodeChunk parses a Chunk value.
func DecodeChunk(v []byte) (*Chunk, error) {
	p, err := unframe(KindChunk, v)
	if err != nil {
		return nil, err
	}
	r := reader{b: p}
	c := &Chunk{Segment: r.u32(), Offset: r.u64(), Length: r.u32(), Tokens: r.u16()}
	n := int(r.u16())
	if !r.err && len(r.b) != n*20 {
		return nil, fmt.Errorf("%w: chunk record with %d slices has %d payload bytes", ErrCorrupt, n, len(r.b))
	}
	c.Slices = make([]Slice, n)
	for i := range c.Slices {
		c.Slices[i] = Slice{Layer: r.u16(), Flags: r.u16(), Off: r.u32(), Stored: r.u32(), Raw: r.u32(), CRC: r.u32()}
		s := c.Slices[i]
		if uint64(s.Off)+uint64(s.Stored) > uint64(c.Length) {
			return nil, fmt.Errorf("%w: slice of layer %d [%d, +%d) outside its record of %d bytes", ErrCorrupt, s.Layer, s.Off, s.Stored, c.Length)
		}
	}
	return c, r.done(KindChunk)
}

// Segment is a segment file's accounting, and where it lives.
type Segment struct {
	Written uint64 // bytes of the file in use (header and records), the append point
	Live    uint64 // bytes of records still referenced by chunk keys
	Sealed  bool   // no more appends
	// Location names the object provider that holds the sealed segment
	// (chunk.ObjectProvider); "" is the store's own segment file. It is
	// encoded only when set, so a local segment's value is the same bytes
	// as before the field existed and old stores open unchanged.
	Location string
}

// MaxLocationBytes bounds Segment.Location.
const MaxLocationBytes = 255

// Encode frames s.
func (s *Segment) Encode() []byte {
	var p []byte
	p = binary.LittleEndian.AppendUint64(p, s.Written)
	p = binary.LittleEndian.AppendUint64(p, s.Live)
	sealed := byte(0)
	if s.Sealed {
		sealed = 1
	}
	p = append(p, sealed)
	if s.Location != "" {
		p = binary.LittleEndian.AppendUint16(p, uint16(len(s.Location)))
		p = append(p, s.Location...)
	}
	return frame(KindSegment, p)
}

// DecodeSegment parses a Segment value.
func DecodeSegment(v []byte) (*Segment, error) {
	p, err := unframe(KindSegment, v)
	if err != nil {
		return nil, err
	}
	r := reader{b: p}
	s := &Segment{Written: r.u64(), Live: r.u64()}
	switch r.u8() {
	case 0:
	case 1:
		s.Sealed = true
	default:
		return nil, fmt.Errorf("%w: segment sealed flag is not 0 or 1", ErrCorrupt)
	}
	if len(r.b) > 0 && !r.err {
		// A location (absent from values written before it existed).
		n := int(r.u16())
		if n == 0 || n > MaxLocationBytes {
			return nil, fmt.Errorf("%w: segment location of %d bytes", ErrCorrupt, n)
		}
		s.Location = string(r.take(n))
	}
	if err := r.done(KindSegment); err != nil {
		return nil, err
	}
	if s.Live > s.Written {
		return nil, fmt.Errorf("%w: segment live bytes %d exceed written %d", ErrCorrupt, s.Live, s.Written)
	}
	return s, nil
}

// EncodeNanos frames a timestamp (namespace creation, last use).
func EncodeNanos(kind byte, t int64) []byte {
	return frame(kind, binary.LittleEndian.AppendUint64(nil, uint64(t)))
}

// DecodeNanos parses a timestamp value.
func DecodeNanos(kind byte, v []byte) (int64, error) {
	p, err := unframe(kind, v)
	if err != nil {
		return 0, err
	}
	r := reader{b: p}
	t := int64(r.u64())
	return t, r.done(kind)
}

// tombstoneKey is the key of the deletion record at (segment, offset).
func tombstoneKey(seg uint32, off uint64) []byte {
	return binary.BigEndian.AppendUint64(binary.BigEndian.AppendUint32([]byte{'t'}, seg), off)
}

// parseTombstoneKey returns the location in a tombstone key.
func parseTombstoneKey(k []byte) (uint32, uint64, error) {
	if len(k) != 13 || k[0] != 't' {
		return 0, 0, fmt.Errorf("%w: bad tombstone key %q", ErrCorrupt, k)
	}
	return binary.BigEndian.Uint32(k[1:]), binary.BigEndian.Uint64(k[5:]), nil
}

// Tombstone records a deletion record written to a segment: the context
// and generation it deletes, and the segments that held the context's
// records when it was deleted (the tombstone is kept, through GC, while any
// of them exists).
type Tombstone struct {
	Namespace, ID string
	Gen           uint64
	Segments      []uint32
}

// Encode frames t.
func (t *Tombstone) Encode() []byte {
	var p []byte
	p = binary.LittleEndian.AppendUint16(p, uint16(len(t.Namespace)))
	p = append(p, t.Namespace...)
	p = binary.LittleEndian.AppendUint16(p, uint16(len(t.ID)))
	p = append(p, t.ID...)
	p = binary.LittleEndian.AppendUint64(p, t.Gen)
	p = binary.LittleEndian.AppendUint32(p, uint32(len(t.Segments)))
	for _, s := range t.Segments {
		p = binary.LittleEndian.AppendUint32(p, s)
	}
	return frame(KindTombstone, p)
}

// DecodeTombstone parses a Tombstone value.
func DecodeTombstone(v []byte) (*Tombstone, error) {
	p, err := unframe(KindTombstone, v)
	if err != nil {
		return nil, err
	}
	r := reader{b: p}
	t := &Tombstone{}
	t.Namespace = string(r.take(int(r.u16())))
	t.ID = string(r.take(int(r.u16())))
	t.Gen = r.u64()
	n := r.u32()
	if n > 1<<20 {
		return nil, fmt.Errorf("%w: tombstone lists %d segments", ErrCorrupt, n)
	}
	for i := uint32(0); i < n && !r.err; i++ {
		t.Segments = append(t.Segments, r.u32())
	}
	return t, r.done(KindTombstone)
}
