package state

import (
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
)

// Chain keys address stored state by the tokens it was computed from.
//
// A token list is cut into groups of G tokens from position 0 (G is the
// store's chunk size). Every full group has a key, a SHA-256 digest of the
// previous group's key, the group's token ids and the chain's root; the root
// digests the namespace, an optional salt and the encoded identity (model
// fingerprint, plan and codec), so a key names one prefix of one prompt under
// one identity in one namespace, and nothing else. Keys are pure functions of
// their inputs: stable across processes, restarts, machines and versions of
// hcache (TestChainKeyVectors pins them). Another implementation computes
// them as follows (all integers little-endian, || is concatenation):
//
//	root    = SHA-256("hcache chain root v1\x00" || u16 len(ns) || ns ||
//	                  u16 len(salt) || salt || u32 len(ident) || ident)
//	key[0]  = SHA-256("hcache chain key v1\x00" || root || 32 zero bytes ||
//	                  u32 n || token[0] .. token[n-1] as u32)
//	key[i]  = SHA-256("hcache chain key v1\x00" || root || key[i-1] ||
//	                  u32 n || tokens of group i as u32)
//
// where ident is Identity.Encode() and n is the group's token count (G for a
// full group). A lookup probes keys in order; the first missing key ends the
// stored prefix.
//
// A key is an address, not a proof: the store also keeps TokensDigest of each
// group's tokens (an independent digest under another domain) and a restore
// compares it with the request's tokens, so a colliding key (or a bug that
// computes the wrong one) serves nothing rather than another prompt's state.

// ChainKey is the key of one group of a token chain.
type ChainKey [32]byte

// IsZero reports whether k is the zero key (the parent of a chain's first group).
func (k ChainKey) IsZero() bool { return k == ChainKey{} }

// String is the key's first 8 bytes in hex, for logs and errors.
func (k ChainKey) String() string { return fmt.Sprintf("%x", k[:8]) }

// MaxSaltBytes bounds a chain salt.
const MaxSaltBytes = 255

// ErrChain is wrapped by chain argument errors.
var ErrChain = errors.New("state: bad chain")

// Chain computes the keys of token groups under one namespace, salt and
// identity. Its zero value is not usable: use NewChain.
type Chain struct {
	root [32]byte
}

// NewChain returns the chain of a namespace, an optional salt (nil for
// none: sharing across tenants that agree on a salt is opt-in) and an
// identity. It validates the identity and the namespace name.
func NewChain(ns string, salt []byte, id *Identity) (Chain, error) {
	if id == nil {
		return Chain{}, fmt.Errorf("%w: nil identity", ErrChain)
	}
	if err := id.Validate(); err != nil {
		return Chain{}, err
	}
	if err := ValidateName("namespace", ns); err != nil {
		return Chain{}, err
	}
	if len(salt) > MaxSaltBytes {
		return Chain{}, fmt.Errorf("%w: salt of %d bytes (at most %d)", ErrChain, len(salt), MaxSaltBytes)
	}
	enc := id.Encode()
	h := sha256.New()
	h.Write([]byte("hcache chain root v1\x00"))
	var n [4]byte
	binary.LittleEndian.PutUint16(n[:2], uint16(len(ns)))
	h.Write(n[:2])
	h.Write([]byte(ns))
	binary.LittleEndian.PutUint16(n[:2], uint16(len(salt)))
	h.Write(n[:2])
	h.Write(salt)
	binary.LittleEndian.PutUint32(n[:], uint32(len(enc)))
	h.Write(n[:])
	h.Write(enc)
	var c Chain
	h.Sum(c.root[:0])
	return c, nil
}

// Root is the chain's root digest.
func (c Chain) Root() [32]byte { return c.root }

// Next returns the key of the group of tokens that follows parent (the zero
// key for a chain's first group).
func (c Chain) Next(parent ChainKey, tokens []uint32) ChainKey {
	h := sha256.New()
	h.Write([]byte("hcache chain key v1\x00"))
	h.Write(c.root[:])
	h.Write(parent[:])
	buf := make([]byte, 4+4*len(tokens))
	binary.LittleEndian.PutUint32(buf, uint32(len(tokens)))
	for i, t := range tokens {
		binary.LittleEndian.PutUint32(buf[4+4*i:], t)
	}
	h.Write(buf)
	var k ChainKey
	h.Sum(k[:0])
	return k
}

// Keys returns the keys of every full group of tokens, groups of group
// tokens from position 0 (a partial last group has no key).
func (c Chain) Keys(tokens []uint32, group int) ([]ChainKey, error) {
	if group <= 0 {
		return nil, fmt.Errorf("%w: group of %d tokens", ErrChain, group)
	}
	keys := make([]ChainKey, len(tokens)/group)
	var parent ChainKey
	for i := range keys {
		parent = c.Next(parent, tokens[i*group:(i+1)*group])
		keys[i] = parent
	}
	return keys, nil
}

// TokensDigest is the second, independent check of a group's tokens: the
// first 16 bytes of SHA-256("hcache tokens v1\x00" || u32 n || tokens as
// u32). It depends on the tokens alone; the chain key binds the rest.
func TokensDigest(tokens []uint32) [16]byte {
	h := sha256.New()
	h.Write([]byte("hcache tokens v1\x00"))
	buf := make([]byte, 4+4*len(tokens))
	binary.LittleEndian.PutUint32(buf, uint32(len(tokens)))
	for i, t := range tokens {
		binary.LittleEndian.PutUint32(buf[4+4*i:], t)
	}
	h.Write(buf)
	var d [16]byte
	copy(d[:], h.Sum(nil))
	return d
}
