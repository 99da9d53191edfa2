package state

import (
	"math/rand"
	"testing"
)

// TestChainHasherMatchesSpec: the allocation-free hasher computes exactly
// Chain.Next's keys and TokensDigest's digests (the spec's functions).
func TestChainHasherMatchesSpec(t *testing.T) {
	id := &Identity{Model: []byte("m"), Plan: []LayerPlan{{Kind: LayerKV, RowBytes: 64}}}
	c, err := NewChain("ns", []byte("salt"), id)
	if err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewSource(1))
	var h ChainHasher
	var parent ChainKey
	for _, n := range []int{0, 1, 16, 64, 3, 4096} {
		tok := make([]uint32, n)
		for i := range tok {
			tok[i] = rng.Uint32()
		}
		if got, want := h.Next(c, parent, tok), c.Next(parent, tok); got != want {
			t.Fatalf("%d tokens: key %v, spec %v", n, got, want)
		}
		if got, want := h.TokensDigest(tok), TokensDigest(tok); got != want {
			t.Fatalf("%d tokens: digest %x, spec %x", n, got, want)
		}
		parent = c.Next(parent, tok)
	}
	if a := testing.AllocsPerRun(10, func() { h.Next(c, parent, make([]uint32, 0)) }); a > 0 {
		t.Fatalf("Next allocates %v times", a)
	}
}

// BenchmarkChainHasher128K: the keys of a 128K-token prompt in 64-token
// groups (what a lookup that matches everything hashes).
func BenchmarkChainHasher128K(b *testing.B) {
	id := &Identity{Model: []byte("m"), Plan: []LayerPlan{{Kind: LayerKV, RowBytes: 64}}}
	c, _ := NewChain("ns", nil, id)
	tok := make([]uint32, 128<<10)
	var h ChainHasher
	for b.Loop() {
		var parent ChainKey
		for i := 0; i < len(tok); i += 64 {
			parent = h.Next(c, parent, tok[i:i+64])
		}
	}
}
