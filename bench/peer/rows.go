package peer

import (
	"hash/fnv"
	"math/rand"
)

// Source makes deterministic fp16-like rows: row (context, layer, token) is a
// window of a seeded random pool at an offset hashed from the three, so any
// system's restore can be checked byte for byte and rows differ per token.
type Source struct {
	pool []byte
}

// NewSource makes a 4 MiB pool from seed.
func NewSource(seed int64) *Source {
	rng := rand.New(rand.NewSource(seed))
	p := make([]byte, 4<<20)
	for i := 0; i+1 < len(p); i += 2 {
		// Random mantissa, exponents of values around 0.01-1.
		p[i] = byte(rng.Intn(256))
		p[i+1] = byte(0x20+rng.Intn(24)) | byte(rng.Intn(2))<<7
	}
	return &Source{pool: p}
}

// CtxKey hashes a context id.
func CtxKey(id string) uint64 {
	h := fnv.New64a()
	h.Write([]byte(id))
	return h.Sum64()
}

// Row writes the row of (ctx, layer, token) into dst (len = row bytes).
func (s *Source) Row(dst []byte, ctx uint64, layer, token int) {
	x := ctx ^ uint64(layer)*0x9e3779b97f4a7c15 ^ uint64(token)*0xc2b2ae3d27d4eb4f
	x ^= x >> 29
	x *= 0xbf58476d1ce4e5b9
	x ^= x >> 32
	off := int(x%uint64(len(s.pool)-len(dst))) &^ 1
	copy(dst, s.pool[off:off+len(dst)])
}

// Fill writes rows [from, to) of one layer into dst.
func (s *Source) Fill(dst []byte, ctx uint64, layer, from, to, rowBytes int) {
	for t := from; t < to; t++ {
		s.Row(dst[(t-from)*rowBytes:(t-from+1)*rowBytes], ctx, layer, t)
	}
}
