package chunk

import (
	"encoding/binary"
	"hash/crc32"

	"github.com/hcache/hcache/state"
)

// What a state is lives in package state (no I/O); these aliases keep the
// engine's names.
type (
	LayerKind = state.LayerKind
	LayerPlan = state.LayerPlan
	Identity  = state.Identity
	Binding   = state.Binding
)

// Layer kinds (see state.LayerKind).
const (
	LayerNone   = state.LayerNone
	LayerHidden = state.LayerHidden
	LayerKV     = state.LayerKV
)

// Limits on identities (see state).
const (
	MaxModelBytes = state.MaxModelBytes
	MaxLayers     = state.MaxLayers
	MaxRowBytes   = state.MaxRowBytes
)

// ErrIdentity is wrapped by identity validation and decode errors (state.ErrIdentity).
var ErrIdentity = state.ErrIdentity

// DecodeIdentity parses Identity.Encode's output and validates it (state.DecodeIdentity).
func DecodeIdentity(b []byte) (*Identity, error) { return state.DecodeIdentity(b) }

// NewBinding computes the binding of a context (state.NewBinding).
func NewBinding(ns, ctxID string, gen uint64, id *Identity) Binding {
	return state.NewBinding(ns, ctxID, gen, id)
}

// sliceSeed is the crc32c state a slice checksum starts from: it covers the
// binding, the group and the layer, so a slice served for another context,
// group or layer fails its check even when its bytes are intact.
func sliceSeed(b *Binding, group uint32, layer uint16) uint32 {
	var buf [32 + 6]byte
	copy(buf[:], b[:])
	binary.LittleEndian.PutUint32(buf[32:], group)
	binary.LittleEndian.PutUint16(buf[36:], layer)
	return crc32.Checksum(buf[:], castagnoli)
}

// sliceCRC checksums raw rows of a slice.
func sliceCRC(b *Binding, group uint32, layer uint16, rows []byte) uint32 {
	return crc32.Update(sliceSeed(b, group, layer), castagnoli, rows)
}
