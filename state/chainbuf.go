package state

import (
	"crypto/sha256"
	"encoding/binary"
)

// ChainHasher computes chain keys and token digests (the same values as
// Chain.Next and TokensDigest, the spec in chain.go) into one reused buffer,
// without allocating: a lookup of a long prompt hashes one group after
// another. Not safe for concurrent use.
type ChainHasher struct {
	buf []byte
}

const (
	keyDomain    = "hcache chain key v1\x00"
	digestDomain = "hcache tokens v1\x00"
)

// Next is c.Next(parent, tokens).
func (h *ChainHasher) Next(c Chain, parent ChainKey, tokens []uint32) ChainKey {
	b := h.grow(len(keyDomain) + 32 + 32 + 4 + 4*len(tokens))
	n := copy(b, keyDomain)
	n += copy(b[n:], c.root[:])
	n += copy(b[n:], parent[:])
	binary.LittleEndian.PutUint32(b[n:], uint32(len(tokens)))
	n += 4
	for _, t := range tokens {
		binary.LittleEndian.PutUint32(b[n:], t)
		n += 4
	}
	return ChainKey(sha256.Sum256(b[:n]))
}

// TokensDigest is TokensDigest(tokens).
func (h *ChainHasher) TokensDigest(tokens []uint32) [16]byte {
	b := h.grow(len(digestDomain) + 4 + 4*len(tokens))
	n := copy(b, digestDomain)
	binary.LittleEndian.PutUint32(b[n:], uint32(len(tokens)))
	n += 4
	for _, t := range tokens {
		binary.LittleEndian.PutUint32(b[n:], t)
		n += 4
	}
	sum := sha256.Sum256(b[:n])
	var d [16]byte
	copy(d[:], sum[:16])
	return d
}

func (h *ChainHasher) grow(n int) []byte {
	if cap(h.buf) < n {
		h.buf = make([]byte, n)
	}
	return h.buf[:n]
}
