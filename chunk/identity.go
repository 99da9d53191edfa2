package chunk

import "github.com/hcache/hcache/state"

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
