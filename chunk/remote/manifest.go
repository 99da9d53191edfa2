package remote

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"hash/crc32"

	"github.com/hcache/hcache/chunk"
	"github.com/hcache/hcache/chunk/format"
)

// A named context in the bucket is two objects:
//
// The context object (ctx/STORE/BINDING.hcx) holds one generation of the
// context, layer-major, so one ranged GET (or a few, split) reads one
// layer's rows for every token:
//
//	[0, H)          header: the description below with magic "HCRCTX01",
//	                its layer checksums zero (not known yet when it is
//	                written), padded with zeros to H (a multiple of 4096)
//	layer i         at Layers[i].Off, Layers[i].Bytes bytes of rows
//	                (tokens x the layer's row bytes), zero-padded to 4096
//	[T, T+H)        trailer: the same description, magic "HCRTRL01", with
//	                the checksums
//
// The manifest (name/NS/ID.hcm) is the same description with magic
// "HCMANIF1": written last, once the context object is uploaded and
// checked, it is the commit point (a reader never sees a context object
// without it; a context object without one is garbage for remote gc).
//
// The description: magic (8) | version u16 | reserved u16 | gen u64 |
// tokens u64 | created unix nanos u64 | object bytes u64 | header bytes u32 |
// binding [32] | namespace length u16 | context id length u16 | identity
// length u32 | store length u16 | key length u16 | layers u16 | namespace |
// context id | encoded identity | store | object key | layers x (layer u16,
// off u64, bytes u64, crc u32) | crc32c u32 of the bytes before it.
//
// A layer's checksum is format.SliceCRC of its rows with the context's
// binding (state.NewBinding of namespace, id, generation, identity) and
// group 0xFFFFFFFF: rows served for another context, generation, model
// or layer fail it. A reader checks the manifest's checksum, that the
// binding is the one its namespace, id, generation and identity compute,
// and every layer's checksum before handing the layer over.

const (
	manifestVersion = 1
	magicManifest   = "HCMANIF1"
	magicHeader     = "HCRCTX01"
	magicTrailer    = "HCRTRL01"
	maxManifest     = 1 << 20
	layerEntryBytes = 2 + 8 + 8 + 4
	wholeGroup      = ^uint32(0)
)

// LayerRef locates one stored layer's rows in the context object.
type LayerRef struct {
	Layer      uint16
	Off, Bytes uint64
	CRC        uint32
}

// Manifest describes one generation of a named context in the bucket.
type Manifest struct {
	Namespace, ID string
	Identity      *chunk.Identity
	Gen, Tokens   uint64
	Created       int64
	Binding       [32]byte
	Store         string // the store that wrote it
	Object        string // the context object's key
	ObjectBytes   uint64
	HeaderBytes   uint32
	Layers        []LayerRef
}

func (m *Manifest) encode(magic string) []byte {
	ident := m.Identity.Encode()
	var p []byte
	p = append(p, magic...)
	p = binary.LittleEndian.AppendUint16(p, manifestVersion)
	p = binary.LittleEndian.AppendUint16(p, 0)
	p = binary.LittleEndian.AppendUint64(p, m.Gen)
	p = binary.LittleEndian.AppendUint64(p, m.Tokens)
	p = binary.LittleEndian.AppendUint64(p, uint64(m.Created))
	p = binary.LittleEndian.AppendUint64(p, m.ObjectBytes)
	p = binary.LittleEndian.AppendUint32(p, m.HeaderBytes)
	p = append(p, m.Binding[:]...)
	p = binary.LittleEndian.AppendUint16(p, uint16(len(m.Namespace)))
	p = binary.LittleEndian.AppendUint16(p, uint16(len(m.ID)))
	p = binary.LittleEndian.AppendUint32(p, uint32(len(ident)))
	p = binary.LittleEndian.AppendUint16(p, uint16(len(m.Store)))
	p = binary.LittleEndian.AppendUint16(p, uint16(len(m.Object)))
	p = binary.LittleEndian.AppendUint16(p, uint16(len(m.Layers)))
	p = append(p, m.Namespace...)
	p = append(p, m.ID...)
	p = append(p, ident...)
	p = append(p, m.Store...)
	p = append(p, m.Object...)
	for _, l := range m.Layers {
		p = binary.LittleEndian.AppendUint16(p, l.Layer)
		p = binary.LittleEndian.AppendUint64(p, l.Off)
		p = binary.LittleEndian.AppendUint64(p, l.Bytes)
		p = binary.LittleEndian.AppendUint32(p, l.CRC)
	}
	return seal(p)
}

type rd struct {
	b   []byte
	bad bool
}

func (r *rd) take(n int) []byte {
	if r.bad || n < 0 || n > len(r.b) {
		r.bad = true
		return make([]byte, max(n, 0))
	}
	v := r.b[:n]
	r.b = r.b[n:]
	return v
}
func (r *rd) u16() uint16 { return binary.LittleEndian.Uint16(r.take(2)) }
func (r *rd) u32() uint32 { return binary.LittleEndian.Uint32(r.take(4)) }
func (r *rd) u64() uint64 { return binary.LittleEndian.Uint64(r.take(8)) }

// appendU32s appends ids as little-endian u32s (what rd.u32s reads).
func appendU32s(p []byte, ids []uint32) []byte {
	for _, id := range ids {
		p = binary.LittleEndian.AppendUint32(p, id)
	}
	return p
}

// appendLayerRefs appends layer references as rd.layerRefs reads them.
func appendLayerRefs(p []byte, layers []LayerRef) []byte {
	for _, l := range layers {
		p = binary.LittleEndian.AppendUint16(p, l.Layer)
		p = binary.LittleEndian.AppendUint64(p, l.Bytes)
		p = binary.LittleEndian.AppendUint32(p, l.CRC)
	}
	return p
}

// seal appends the CRC-32C of p (what rd.sealed checks).
func seal(p []byte) []byte {
	return binary.LittleEndian.AppendUint32(p, crc32.Checksum(p, format.Castagnoli))
}

// u32s reads n u32s, stopping early once the input runs short (r.bad).
func (r *rd) u32s(n int) []uint32 {
	out := make([]uint32, 0, min(n, 1<<16))
	for range n {
		if r.bad {
			break
		}
		out = append(out, r.u32())
	}
	return out
}

// layerRefs reads n layer references of a group or tip object (layer u16,
// bytes u64, crc u32), stopping early once the input runs short.
func (r *rd) layerRefs(n int) []LayerRef {
	var out []LayerRef
	for range n {
		if r.bad {
			break
		}
		out = append(out, LayerRef{Layer: r.u16(), Bytes: r.u64(), CRC: r.u32()})
	}
	return out
}

// sealed reads the CRC-32C that ends a description read from b (r holds
// b's unread rest) and checks it over the bytes before it; it returns the
// description's length with the checksum. what names it in errors.
func (r *rd) sealed(b []byte, what string) (int, error) {
	end := len(b) - len(r.b)
	sum := r.u32()
	if r.bad {
		return 0, fmt.Errorf("%w: %s truncated", format.ErrCorrupt, what)
	}
	if crc32.Checksum(b[:end], format.Castagnoli) != sum {
		return 0, fmt.Errorf("%w: %s checksum mismatch", format.ErrCorrupt, what)
	}
	return end + 4, nil
}

// decodeManifest parses and checks a description with the given magic (b
// may carry zero padding after it). It checks the checksum, the version,
// the identity, that the binding is the one the names compute, and that
// the layers match the identity's plan and tile the object.
func decodeManifest(b []byte, magic string) (*Manifest, error) {
	if len(b) < 8 || !bytes.Equal(b[:8], []byte(magic)) {
		return nil, fmt.Errorf("%w: no %s magic", format.ErrCorrupt, magic)
	}
	r := &rd{b: b[8:]}
	m := &Manifest{}
	v := r.u16()
	r.u16()
	m.Gen, m.Tokens, m.Created, m.ObjectBytes = r.u64(), r.u64(), int64(r.u64()), r.u64()
	m.HeaderBytes = r.u32()
	copy(m.Binding[:], r.take(32))
	nl, il, dl, sl, kl, ll := int(r.u16()), int(r.u16()), int(r.u32()), int(r.u16()), int(r.u16()), int(r.u16())
	if r.bad || dl > maxManifest {
		return nil, fmt.Errorf("%w: %s description truncated", format.ErrCorrupt, magic)
	}
	m.Namespace, m.ID = string(r.take(nl)), string(r.take(il))
	identB := r.take(dl)
	m.Store, m.Object = string(r.take(sl)), string(r.take(kl))
	m.Layers = make([]LayerRef, 0, min(ll, 4096))
	for range ll {
		if r.bad {
			break
		}
		m.Layers = append(m.Layers, LayerRef{Layer: r.u16(), Off: r.u64(), Bytes: r.u64(), CRC: r.u32()})
	}
	end := len(b) - len(r.b)
	sum := r.u32()
	if r.bad {
		return nil, fmt.Errorf("%w: %s description truncated", format.ErrCorrupt, magic)
	}
	if crc32.Checksum(b[:end], format.Castagnoli) != sum {
		return nil, fmt.Errorf("%w: %s checksum mismatch", format.ErrCorrupt, magic)
	}
	if v != manifestVersion {
		return nil, fmt.Errorf("%w: %s version %d, this build reads %d", format.ErrCorrupt, magic, v, manifestVersion)
	}
	id, err := chunk.DecodeIdentity(identB)
	if err != nil {
		return nil, fmt.Errorf("%w: %s identity: %v", format.ErrCorrupt, magic, err)
	}
	m.Identity = id
	if chunk.NewBinding(m.Namespace, m.ID, m.Gen, id) != m.Binding {
		return nil, fmt.Errorf("%w: %s binding is not the one %s/%s generation %d computes", format.ErrCorrupt, magic, m.Namespace, m.ID, m.Gen)
	}
	if m.Tokens > 1<<32 {
		return nil, fmt.Errorf("%w: %s holds %d tokens", format.ErrCorrupt, magic, m.Tokens)
	}
	want := &Manifest{Namespace: m.Namespace, ID: m.ID, Identity: id, Tokens: m.Tokens, Store: m.Store, Object: m.Object}
	want.place()
	if len(want.Layers) != len(m.Layers) || want.HeaderBytes != m.HeaderBytes || want.ObjectBytes != m.ObjectBytes {
		return nil, fmt.Errorf("%w: %s layout does not match its identity and %d tokens", format.ErrCorrupt, magic, m.Tokens)
	}
	for i, l := range want.Layers {
		if g := m.Layers[i]; g.Layer != l.Layer || g.Off != l.Off || g.Bytes != l.Bytes {
			return nil, fmt.Errorf("%w: %s layer entry %d does not match the layout", format.ErrCorrupt, magic, i)
		}
	}
	return m, nil
}

// place fixes the header size from the description's encoded size (which
// depends on the names, the identity and the number of layers, not on the
// checksums) and assigns the stored layers' offsets.
func (m *Manifest) place() {
	m.Layers = m.Layers[:0]
	for l, p := range m.Identity.Plan {
		if p.Kind != chunk.LayerNone {
			m.Layers = append(m.Layers, LayerRef{Layer: uint16(l), Bytes: m.Tokens * uint64(p.RowBytes)})
		}
	}
	m.HeaderBytes = uint32(format.RoundUp(len(m.encode(magicHeader))))
	off := uint64(m.HeaderBytes)
	for i := range m.Layers {
		m.Layers[i].Off = off
		off += uint64(format.RoundUp(int(m.Layers[i].Bytes)))
	}
	m.ObjectBytes = off + uint64(m.HeaderBytes)
}
