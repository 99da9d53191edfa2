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

// Codec is how a state's rows are encoded (state/codec implements them).
// It is part of the identity: a state is never served to a consumer that
// expects another encoding, and a plan's RowBytes are the encoded (stored)
// row sizes.
type Codec uint8

// Codecs. CodecNone stores rows in the model dtype, as every identity did
// before codecs existed; the others are lossy fp8 and int8 encodings (a lossless
// compression of rows is the store's own, chunk.Options.Compression, and
// not part of the identity: it restores the same bytes).
const (
	CodecNone     Codec = 0 // model dtype (fp16, bf16 or f32)
	CodecFP8Token Codec = 1 // fp8 E4M3, one float32 scale per token per segment
	CodecFP8Block Codec = 2 // fp8 E4M3, one float32 scale per block of 128 values
	// int8, one bfloat16 scale per channel per aligned group of 64 tokens
	// (a row encoded alone: one float32 scale per segment); state/codec.
	CodecInt8Channel Codec = 3
	maxCodec               = CodecInt8Channel
)

var codecNames = [...]string{CodecNone: "none", CodecFP8Token: "fp8", CodecFP8Block: "fp8-block", CodecInt8Channel: "int8"}

func (c Codec) String() string {
	if c <= maxCodec {
		return codecNames[c]
	}
	return fmt.Sprintf("codec(%d)", uint8(c))
}

// Known reports whether this build knows the codec.
func (c Codec) Known() bool { return c <= maxCodec }

// ParseCodec parses a codec name (Codec.String's form).
func ParseCodec(s string) (Codec, error) {
	for c, n := range codecNames {
		if s == n {
			return Codec(c), nil
		}
	}
	return 0, fmt.Errorf("state: unknown codec %q (have none, fp8, fp8-block, int8)", s)
}

// Identity is everything a stored state must match before it is served: the
// model fingerprint (architecture, dimensions, dtype, layout, rope settings
// and weights revision, computed by the caller; opaque bytes to the store),
// the per-layer plan and the codec of its rows. Together with the namespace
// and the context id it forms the binding that seeds every slice checksum.
//
// Under a codec other than CodecNone a row's size is its encoded size (an fp8
// hidden row of 4096 values is 4160 bytes, not 8192): RowBytes is always
// what one token of the layer takes in the store.
type Identity struct {
	Model []byte
	Plan  []LayerPlan
	Codec Codec
}

// Limits on identities.
const (
	MaxModelBytes = 4096
	MaxLayers     = 1024
	MaxRowBytes   = 1 << 20
)

var identityMagic = []byte("HCID")

// Identity encodings: version 1 has no codec field and is the only form of
// a CodecNone identity (so identities from before codecs, and the chain keys
// and bindings computed from them, are unchanged); version 2 adds the codec
// byte and is used exactly when the codec is not CodecNone.
const (
	identityVersion   = 1
	identityVersionV2 = 2
)

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
	if !id.Codec.Known() {
		return fmt.Errorf("%w: unknown codec %d", ErrIdentity, uint8(id.Codec))
	}
	stored := 0
	for l, p := range id.Plan {
		switch p.Kind {
		case LayerNone:
			if p.RowBytes != 0 {
				return fmt.Errorf("%w: layer %d stores nothing but has row bytes %d", ErrIdentity, l, p.RowBytes)
			}
		case LayerHidden, LayerKV:
			if id.Codec == CodecNone && (p.RowBytes == 0 || p.RowBytes > MaxRowBytes || p.RowBytes%2 != 0) {
				return fmt.Errorf("%w: layer %d (%s) row bytes %d (want an even number in 2..%d)", ErrIdentity, l, p.Kind, p.RowBytes, MaxRowBytes)
			}
			if id.Codec != CodecNone && (p.RowBytes == 0 || p.RowBytes > MaxRowBytes) {
				return fmt.Errorf("%w: layer %d (%s) row bytes %d under codec %s (want 1..%d)", ErrIdentity, l, p.Kind, p.RowBytes, id.Codec, MaxRowBytes)
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

// Encode returns the identity's binary form. Without a codec (version 1):
// "HCID" version(u16)=1 modelLen(u16) model layers(u16) {kind(u8) rowBytes(u32)}* crc32c(u32);
// with one (version 2), the codec byte follows the plan:
// "HCID" version(u16)=2 modelLen(u16) model layers(u16) {kind(u8) rowBytes(u32)}* codec(u8) crc32c(u32).
func (id *Identity) Encode() []byte {
	b := append([]byte(nil), identityMagic...)
	if id.Codec != CodecNone {
		b = binary.LittleEndian.AppendUint16(b, identityVersionV2)
	} else {
		b = binary.LittleEndian.AppendUint16(b, identityVersion)
	}
	b = binary.LittleEndian.AppendUint16(b, uint16(len(id.Model)))
	b = append(b, id.Model...)
	b = binary.LittleEndian.AppendUint16(b, uint16(len(id.Plan)))
	for _, p := range id.Plan {
		b = append(b, byte(p.Kind))
		b = binary.LittleEndian.AppendUint32(b, p.RowBytes)
	}
	if id.Codec != CodecNone {
		b = append(b, byte(id.Codec))
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
	v := binary.LittleEndian.Uint16(b[4:])
	if v != identityVersion && v != identityVersionV2 {
		return nil, fmt.Errorf("%w: version %d, this build reads %d and %d", ErrIdentity, v, identityVersion, identityVersionV2)
	}
	p := body[6:]
	codec := CodecNone
	if v == identityVersionV2 {
		if len(p) < 2+2+1 {
			return nil, fmt.Errorf("%w: truncated version 2 identity", ErrIdentity)
		}
		codec = Codec(p[len(p)-1])
		p = p[:len(p)-1]
		if codec == CodecNone {
			return nil, fmt.Errorf("%w: version 2 identity with codec none (a codec-less identity is version 1)", ErrIdentity)
		}
	}
	ml := int(binary.LittleEndian.Uint16(p))
	p = p[2:]
	if len(p) < ml+2 {
		return nil, fmt.Errorf("%w: truncated model fingerprint", ErrIdentity)
	}
	id := &Identity{Model: append([]byte(nil), p[:ml]...), Codec: codec}
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
	if !bytes.Equal(id.Model, o.Model) || len(id.Plan) != len(o.Plan) || id.Codec != o.Codec {
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
