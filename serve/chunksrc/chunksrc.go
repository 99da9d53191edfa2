// Package chunksrc adapts the chunk store to serve's sources, so that serve
// itself links none of the storage engine: New(st) restores by name (as
// *chunk.Store itself) and by tokens (serve.PrefixSource).
package chunksrc

import (
	"github.com/hcache/hcache/chunk"
	"github.com/hcache/hcache/serve"
	"github.com/hcache/hcache/state"
)

// Source is a *chunk.Store as a serve.PrefixSource.
type Source struct{ *chunk.Store }

// New adapts st.
func New(st *chunk.Store) Source { return Source{st} }

var _ serve.PrefixSource = Source{}

func prefix(p serve.Prefix) chunk.Prefix {
	return chunk.Prefix{Namespace: p.Namespace, Salt: p.Salt, Identity: p.Identity, Tokens: p.Tokens, Context: p.Context}
}

// RestoreOwned is chunk.Store.RestoreOwned.
func (s Source) RestoreOwned(ns, id string, ident *state.Identity, ahead int, fn func(layer int, rows []byte, release func()) error) (int, error) {
	return s.Store.RestoreOwned(ns, id, ident, ahead, fn)
}

// LookupPrefix is chunk.Store.Lookup.
func (s Source) LookupPrefix(p serve.Prefix) (int, error) { return s.Store.Lookup(prefix(p)) }

// RestorePrefixOwned is chunk.Store.RestoreTokensOwned.
func (s Source) RestorePrefixOwned(p serve.Prefix, ahead int, fn func(layer int, rows []byte, release func()) error) (int, error) {
	return s.Store.RestoreTokensOwned(prefix(p), ahead, fn)
}
