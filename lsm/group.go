package lsm

import (
	"bytes"
	"encoding/binary"
	"fmt"
)

// Group records: the index entries of shared chain groups (issue 19).
//
//	"g" ns 0x00 key[32]  -> Group (location, chain position, parent key,
//	                         group binding, token digest, token ids)
//
// A token-addressed context's record (Context with FlagTokens) names its
// chain: salt, the key of its last full group (Tip) and its partial tail's
// token ids; its full groups are the chain that Tip ends (walked back
// through Group.Parent), and only its partial tail has a chunk key. A group
// lives while a context's chain reaches it; reference counts are derived
// from the context records at open (package chunk), never stored.

// KindGroup is the value kind of a group entry.
const KindGroup = 'G'

// ChainKeyBytes is the size of a chain key (state.ChainKey).
const ChainKeyBytes = 32

// Group is the index entry of one shared group record.
type Group struct {
	Chunk           // where the record is (Tokens: the chain's group size)
	Index  uint32   // position in its chain (0 for the first group)
	Parent [32]byte // the previous group's key (zero for Index 0)
	Bind   [32]byte // the group binding its slice checksums start from
	Digest [16]byte // state.TokensDigest of TokenIDs
	IDs    []uint32 // the token ids the rows were computed from
}

func groupKey(ns string, key [32]byte) []byte {
	k := make([]byte, 0, 2+len(ns)+ChainKeyBytes)
	k = append(k, 'g')
	k = append(k, ns...)
	k = append(k, 0)
	return append(k, key[:]...)
}

func parseGroupKey(k []byte) (ns string, key [32]byte, err error) {
	if len(k) < 1+1+1+ChainKeyBytes || k[0] != 'g' || k[len(k)-ChainKeyBytes-1] != 0 {
		return "", key, fmt.Errorf("%w: bad group key %q", ErrCorrupt, k)
	}
	body := k[1 : len(k)-ChainKeyBytes-1]
	if bytes.IndexByte(body, 0) >= 0 {
		return "", key, fmt.Errorf("%w: bad group key %q", ErrCorrupt, k)
	}
	copy(key[:], k[len(k)-ChainKeyBytes:])
	return string(body), key, nil
}

// Encode frames g.
func (g *Group) Encode() []byte {
	ch := g.Chunk.Encode()
	body := ch[2 : len(ch)-4] // the Chunk payload
	p := make([]byte, 0, 2+len(body)+4+96+2+4*len(g.IDs))
	p = binary.LittleEndian.AppendUint16(p, uint16(len(body)))
	p = append(p, body...)
	p = binary.LittleEndian.AppendUint32(p, g.Index)
	p = append(p, g.Parent[:]...)
	p = append(p, g.Bind[:]...)
	p = append(p, g.Digest[:]...)
	p = binary.LittleEndian.AppendUint16(p, uint16(len(g.IDs)))
	for _, t := range g.IDs {
		p = binary.LittleEndian.AppendUint32(p, t)
	}
	return frame(KindGroup, p)
}

// DecodeGroup parses a Group value.
func DecodeGroup(v []byte) (*Group, error) {
	p, err := unframe(KindGroup, v)
	if err != nil {
		return nil, err
	}
	r := reader{b: p}
	n := int(r.u16())
	body := r.take(n)
	if r.err {
		return nil, fmt.Errorf("%w: G record payload is truncated", ErrCorrupt)
	}
	ch, err := DecodeChunk(frame(KindChunk, body))
	if err != nil {
		return nil, err
	}
	g := &Group{Chunk: *ch, Index: r.u32()}
	copy(g.Parent[:], r.take(32))
	copy(g.Bind[:], r.take(32))
	copy(g.Digest[:], r.take(16))
	nt := int(r.u16())
	if nt != int(g.Tokens) {
		return nil, fmt.Errorf("%w: group entry lists %d token ids for %d tokens", ErrCorrupt, nt, g.Tokens)
	}
	g.IDs = make([]uint32, nt)
	for i := range g.IDs {
		g.IDs[i] = r.u32()
	}
	return g, r.done(KindGroup)
}

// PutGroup writes the entry of group key in namespace ns.
func (b *Batch) PutGroup(ns string, key [32]byte, g *Group) { b.set(groupKey(ns, key), g.Encode()) }

// DeleteGroup removes the entry of group key in namespace ns.
func (b *Batch) DeleteGroup(ns string, key [32]byte) { b.del(groupKey(ns, key)) }

// GetGroup returns the entry of group key in namespace ns (ErrNotFound if
// the index has none).
func (d *DB) GetGroup(ns string, key [32]byte) (*Group, error) {
	v, err := d.get(groupKey(ns, key))
	if err != nil {
		return nil, err
	}
	g, err := DecodeGroup(v)
	if err != nil {
		return nil, keyed(fmt.Sprintf("group %s/%x", ns, key[:8]), err)
	}
	return g, nil
}

// ScanGroups calls fn for every group entry in key order. err is the
// value's decode error (wrapping ErrCorrupt), g nil then; a key that does
// not parse stops the scan.
func (d *DB) ScanGroups(fn func(ns string, key [32]byte, g *Group, err error) error) error {
	return d.scan([]byte{'g'}, []byte{'h'}, func(k, v []byte) error {
		ns, key, err := parseGroupKey(k)
		if err != nil {
			return err
		}
		g, err := DecodeGroup(v)
		if err != nil {
			return fn(ns, key, nil, keyed(fmt.Sprintf("group %s/%x", ns, key[:8]), err))
		}
		return fn(ns, key, g, nil)
	})
}

// DeleteChunk removes the chunk key of group g of a context (a
// token-addressed context's partial tail once that group is full and
// shared).
func (b *Batch) DeleteChunk(ns, id string, g uint32) { b.del(chunkKey(ns, id, g)) }
