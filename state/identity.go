package state

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
)

// LayerKind says what the store keeps for one layer of a context.
type LayerKind uint8

// Layer kinds.
const (
	LayerNone   LayerKind = 0 // nothing: the layer is recomputed on restore
	LayerHidden LayerKind = 1 // the hidden state entering the K/V projection
	LayerKV     LayerKind = 2 // the K and V rows themselves
)

func (k LayerKind) String() string {
	switch k {
	case LayerNone:
		return "none"
	case LayerHidden:
		return "hidden"
	case LayerKV:
		return "kv"
	}
	return fmt.Sprintf("kind(%d)", uint8(k))
}

// LayerPlan is what one layer stores and how many bytes one token's row takes.
type LayerPlan struct {
	Kind     LayerKind
	RowBytes uint32 // 0 for LayerNone
}

// Identity is everything a stored state must match before it is served: the
// model fingerprint (architecture, dimensions, dtype, layout, rope settings
// and weights revision, computed by the caller; opaque bytes to the store)
// and the per-layer plan. Together with the namespace and the context id it
// forms the binding that seeds every slice checksum.
type Identity struct {
	Model []byte
	Plan  []LayerPlan
}

// Limits on identities.
const (
	MaxModelBytes = 4096
	MaxLayers     = 1024
	MaxRowBytes   = 1 << 20
)

var identityMagic = []byte("HCID")

const identityVersion = 1

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// ErrIdentity is wrapped by identity validation and decode errors.
var ErrIdentity = errors.New("state: bad identity")

// Validate checks the identity's limits.
func (id *Identity) Validate() error {
	if len(id.Model) == 0 || len(id.Model) > MaxModelBytes {
		return fmt.Errorf("%w: model fingerprint of %d bytes (want 1..%d)", ErrIdentity, len(id.Model), MaxModelBytes)
	}
	if len(id.Plan) == 0 || len(id.Plan) > MaxLayers {
		return fmt.Errorf("%w: plan of %d layers (want 1..%d)", ErrIdentity, len(id.Plan), MaxLayers)
	}
	stored := 0
	for l, p := range id.Plan {
		switch p.Kind {
		case LayerNone:
			if p.RowBytes != 0 {
				return fmt.Errorf("%w: layer %d stores nothing but has row bytes %d", ErrIdentity, l, p.RowBytes)
			}
		case LayerHidden, LayerKV:
			if p.RowBytes == 0 || p.RowBytes > MaxRowBytes || p.RowBytes%2 != 0 {
				return fmt.Errorf("%w: layer %d (%s) row bytes %d (want an even number in 2..%d)", ErrIdentity, l, p.Kind, p.RowBytes, MaxRowBytes)
			}
			stored++
		default:
			return fmt.Errorf("%w: layer %d has unknown kind %d", ErrIdentity, l, p.Kind)
		}
	}
	if stored == 0 {
		return fmt.Errorf("%w: plan stores no layer", ErrIdentity)
	}
	return nil
}

// Encode returns the identity's binary form:
// "HCID" version(u16) modelLen(u16) model layers(u16) {kind(u8) rowBytes(u32)}* crc32c(u32).
func (id *Identity) Encode() []byte {
	b := append([]byte(nil), identityMagic...)
	b = binary.LittleEndian.AppendUint16(b, identityVersion)
	b = binary.LittleEndian.AppendUint16(b, uint16(len(id.Model)))
	b = append(b, id.Model...)
	b = binary.LittleEndian.AppendUint16(b, uint16(len(id.Plan)))
	for _, p := range id.Plan {
		b = append(b, byte(p.Kind))
		b = binary.LittleEndian.AppendUint32(b, p.RowBytes)
	}
	return binary.LittleEndian.AppendUint32(b, crc32.Checksum(b, castagnoli))
}

// DecodeIdentity parses Encode's output and validates it.
func DecodeIdentity(b []byte) (*Identity, error) {
	if len(b) < 4+2+2+2+4 || !bytes.Equal(b[:4], identityMagic) {
		return nil, fmt.Errorf("%w: missing magic", ErrIdentity)
	}
	body, sum := b[:len(b)-4], binary.LittleEndian.Uint32(b[len(b)-4:])
	if crc32.Checksum(body, castagnoli) != sum {
		return nil, fmt.Errorf("%w: checksum mismatch", ErrIdentity)
	}
	if v := binary.LittleEndian.Uint16(b[4:]); v != identityVersion {
		return nil, fmt.Errorf("%w: version %d, this build reads %d", ErrIdentity, v, identityVersion)
	}
	p := body[6:]
	ml := int(binary.LittleEndian.Uint16(p))
	p = p[2:]
	if len(p) < ml+2 {
		return nil, fmt.Errorf("%w: truncated model fingerprint", ErrIdentity)
	}
	id := &Identity{Model: append([]byte(nil), p[:ml]...)}
	p = p[ml:]
	n := int(binary.LittleEndian.Uint16(p))
	p = p[2:]
	if len(p) != n*5 {
		return nil, fmt.Errorf("%w: %d layers but %d plan bytes", ErrIdentity, n, len(p))
	}
	id.Plan = make([]LayerPlan, n)
	for i := range id.Plan {
		id.Plan[i] = LayerPlan{Kind: LayerKind(p[0]), RowBytes: binary.LittleEndian.Uint32(p[1:])}
		p = p[5:]
	}
	if err := id.Validate(); err != nil {
		return nil, err
	}
	return id, nil
}

// Equal reports whether two identities are the same.
func (id *Identity) Equal(o *Identity) bool {
	if !bytes.Equal(id.Model, o.Model) || len(id.Plan) != len(o.Plan) {
		return false
	}
	for i := range id.Plan {
		if id.Plan[i] != o.Plan[i] {
			return false
		}
	}
	return true
}

// TokenBytes is the bytes one token takes over the stored layers: the sum of
// the plan's row sizes (0 for a nil identity).
func (id *Identity) TokenBytes() int {
	if id == nil {
		return 0
	}
	n := 0
	for _, p := range id.Plan {
		n += int(p.RowBytes)
	}
	return n
}

// Binding is the digest that ties stored bytes to one context: sha256 over
// the namespace, the context id, the generation and the encoded identity.
type Binding [32]byte

// NewBinding computes the binding of a context.
func NewBinding(ns, ctxID string, gen uint64, id *Identity) Binding {
	h := sha256.New()
	h.Write([]byte("hcache binding v1\x00"))
	h.Write([]byte(ns))
	h.Write([]byte{0})
	h.Write([]byte(ctxID))
	h.Write([]byte{0})
	var g [8]byte
	binary.LittleEndian.PutUint64(g[:], gen)
	h.Write(g[:])
	h.Write(id.Encode())
	var b Binding
	h.Sum(b[:0])
	return b
}
