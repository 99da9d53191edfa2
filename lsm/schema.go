package lsm

import (
	"bytes"
	"fmt"
	"math"
)

// Typed operations, one set per kind of record. Callers never see key bytes:
// each operation builds its keys, and each scan decodes keys and values.
// A value that fails to decode is an error wrapping ErrCorrupt naming the
// record; scans never skip it (the scans of every key of a kind hand it to
// the callback, which decides).

// keyed prefixes an error with the record it is about.
func keyed(what string, err error) error { return fmt.Errorf("%s: %w", what, err) }

// Meta.

// GetMeta returns the store record (ErrNotFound if the index has none).
func (d *DB) GetMeta() (*Meta, error) {
	v, err := d.get(metaKey())
	if err != nil {
		return nil, err
	}
	m, err := DecodeMeta(v)
	if err != nil {
		return nil, keyed("store record", err)
	}
	return m, nil
}

// PutMeta writes the store record.
func (b *Batch) PutMeta(m *Meta) { b.set(metaKey(), m.Encode()) }

// Namespaces.

// PutNamespace records a namespace and its creation time.
func (b *Batch) PutNamespace(ns string, createdNanos int64) {
	b.set(namespaceKey(ns), EncodeNanos(KindNamespace, createdNanos))
}

// Contexts.

// PutContext writes a context's record.
func (b *Batch) PutContext(ns, id string, c *Context) { b.set(contextKey(ns, id), c.Encode()) }

// ScanContexts calls fn for every context record in key order (namespace,
// then id). err is the record's decode error (wrapping ErrCorrupt), c nil
// then; fn decides what it means. A key that does not parse stops the scan.
func (d *DB) ScanContexts(fn func(ns, id string, c *Context, err error) error) error {
	return d.scan([]byte{'c'}, []byte{'d'}, func(k, v []byte) error {
		ns, id, err := parseContextKey(k)
		if err != nil {
			return err
		}
		c, err := DecodeContext(v)
		if err != nil {
			return fn(ns, id, nil, keyed(fmt.Sprintf("context %s/%s", ns, id), err))
		}
		return fn(ns, id, c, nil)
	})
}

// DeleteContext removes everything the index holds about a context: its
// record, its last-use time and every chunk key.
func (b *Batch) DeleteContext(ns, id string) {
	b.deleteRange(chunkPrefix(ns, id), chunkPrefixEnd(ns, id))
	b.del(contextKey(ns, id))
	b.del(lastUseKey(ns, id))
}

// Last use.

// PutLastUse writes a context's last-use time.
func (b *Batch) PutLastUse(ns, id string, nanos int64) {
	b.set(lastUseKey(ns, id), EncodeNanos(KindLastUse, nanos))
}

// ScanLastUse calls fn for every last-use time; err as in ScanContexts.
func (d *DB) ScanLastUse(fn func(ns, id string, nanos int64, err error) error) error {
	return d.scan([]byte{'u'}, []byte{'v'}, func(k, v []byte) error {
		ns, id, err := parseContextKey(k)
		if err != nil {
			return err
		}
		t, err := DecodeNanos(KindLastUse, v)
		if err != nil {
			return fn(ns, id, 0, keyed(fmt.Sprintf("last use of %s/%s", ns, id), err))
		}
		return fn(ns, id, t, nil)
	})
}

// Chunks.

// PutChunk writes the location of chunk group g of a context.
func (b *Batch) PutChunk(ns, id string, g uint32, c *Chunk) { b.set(chunkKey(ns, id, g), c.Encode()) }

// GetChunk returns the location of chunk group g of a context
// (ErrNotFound if the index has none).
func (d *DB) GetChunk(ns, id string, g uint32) (*Chunk, error) {
	v, err := d.get(chunkKey(ns, id, g))
	if err != nil {
		return nil, err
	}
	c, err := DecodeChunk(v)
	if err != nil {
		return nil, keyed(fmt.Sprintf("%s/%s group %d", ns, id, g), err)
	}
	return c, nil
}

// ScanChunks calls fn for each chunk group of one context, in group order.
// A key or value that does not decode stops the scan with its error.
func (d *DB) ScanChunks(ns, id string, fn func(g uint32, c *Chunk) error) error {
	return d.scan(chunkPrefix(ns, id), chunkPrefixEnd(ns, id), func(k, v []byte) error {
		_, _, g, err := parseChunkKey(k)
		if err != nil {
			return err
		}
		c, err := DecodeChunk(v)
		if err != nil {
			return keyed(fmt.Sprintf("%s/%s group %d", ns, id, g), err)
		}
		return fn(g, c)
	})
}

// ScanAllChunks calls fn for every chunk key of the index, in key order.
// err is the key's or the value's decode error (wrapping ErrCorrupt; for a
// key that does not parse, ns and id are empty), c nil then; fn decides.
func (d *DB) ScanAllChunks(fn func(ns, id string, g uint32, c *Chunk, err error) error) error {
	return d.scan([]byte{'k'}, []byte{'l'}, func(k, v []byte) error {
		ns, id, g, err := parseChunkKey(k)
		if err != nil {
			return fn("", "", 0, nil, err)
		}
		c, err := DecodeChunk(v)
		if err != nil {
			return fn(ns, id, g, nil, keyed(fmt.Sprintf("%s/%s group %d", ns, id, g), err))
		}
		return fn(ns, id, g, c, nil)
	})
}

// Segments.

// PutSegment writes a segment's record.
func (b *Batch) PutSegment(id uint32, s *Segment) { b.set(segmentKey(id), s.Encode()) }

// DeleteSegment removes a segment's record.
func (b *Batch) DeleteSegment(id uint32) { b.del(segmentKey(id)) }

// ScanSegments calls fn for every segment record, by id. A key or value
// that does not decode stops the scan with its error.
func (d *DB) ScanSegments(fn func(id uint32, s *Segment) error) error {
	return d.scan([]byte{'s'}, []byte{'t'}, func(k, v []byte) error {
		id, err := parseSegmentKey(k)
		if err != nil {
			return err
		}
		s, err := DecodeSegment(v)
		if err != nil {
			return keyed(fmt.Sprintf("segment %d", id), err)
		}
		return fn(id, s)
	})
}

// Tombstones.

// PutTombstone indexes the deletion record at (segment, offset).
func (b *Batch) PutTombstone(seg uint32, off uint64, t *Tombstone) {
	b.set(tombstoneKey(seg, off), t.Encode())
}

// DeleteTombstone removes the index entry of the deletion record at
// (segment, offset).
func (b *Batch) DeleteTombstone(seg uint32, off uint64) { b.del(tombstoneKey(seg, off)) }

// ScanTombstones calls fn for every indexed deletion record, by location.
// A key or value that does not decode stops the scan with its error.
func (d *DB) ScanTombstones(fn func(seg uint32, off uint64, t *Tombstone) error) error {
	return d.scanTombstones([]byte{'t'}, []byte{'u'}, fn)
}

// ScanSegmentTombstones is ScanTombstones for the deletion records in one
// segment.
func (d *DB) ScanSegmentTombstones(seg uint32, fn func(off uint64, t *Tombstone) error) error {
	return d.scanTombstones(tombstoneKey(seg, 0), tombstoneKey(seg, math.MaxUint64), func(_ uint32, off uint64, t *Tombstone) error {
		return fn(off, t)
	})
}

func (d *DB) scanTombstones(lo, hi []byte, fn func(seg uint32, off uint64, t *Tombstone) error) error {
	return d.scan(lo, hi, func(k, v []byte) error {
		seg, off, err := parseTombstoneKey(k)
		if err != nil {
			return err
		}
		t, err := DecodeTombstone(v)
		if err != nil {
			return keyed(fmt.Sprintf("tombstone at segment %d offset %d", seg, off), err)
		}
		return fn(seg, off, t)
	})
}

// Whole index.

// ReadAll reads every key and value of the index (Pebble checks every
// block it reads), decoding nothing.
func (d *DB) ReadAll() error {
	return d.scan(nil, nil, func(k, v []byte) error { return nil })
}

// CheckKeyDecoding parses k as every kind of key and, for each kind that
// accepts it, checks that the parts decoded encode back to k. It is the
// fuzz targets' handle on the private key schema (no caller builds keys).
func CheckKeyDecoding(k []byte) error {
	if ns, id, g, err := parseChunkKey(k); err == nil && !bytes.Equal(chunkKey(ns, id, g), k) {
		return fmt.Errorf("chunk key %q parses to %q %q %d, which encode to %q", k, ns, id, g, chunkKey(ns, id, g))
	}
	if ns, id, err := parseContextKey(k); err == nil && !bytes.Equal(ctxKey(k[0], ns, id), k) {
		return fmt.Errorf("context key %q parses to %q %q, which encode to %q", k, ns, id, ctxKey(k[0], ns, id))
	}
	if id, err := parseSegmentKey(k); err == nil && !bytes.Equal(segmentKey(id), k) {
		return fmt.Errorf("segment key %q parses to %d", k, id)
	}
	if seg, off, err := parseTombstoneKey(k); err == nil && !bytes.Equal(tombstoneKey(seg, off), k) {
		return fmt.Errorf("tombstone key %q parses to %d %d", k, seg, off)
	}
	if ns, key, err := parseGroupKey(k); err == nil && !bytes.Equal(groupKey(ns, key), k) {
		return fmt.Errorf("group key %q parses to %q %x", k, ns, key)
	}
	return nil
}
