package chunk

import (
	"encoding/binary"
	"testing"

	"github.com/hcache/hcache/state"
)

// fillGroupTable puts n committed groups in the table: the first stored
// groups of prompt's chain, then random keys (a store of a million groups
// without writing them).
func fillGroupTable(tb testing.TB, s *Store, ns string, ident *Identity, prompt []uint32, stored, n int) {
	tb.Helper()
	ch, err := state.NewChain(ns, nil, ident)
	if err != nil {
		tb.Fatal(err)
	}
	keys := s.chainKeys(ch, prompt)
	s.mu.Lock()
	defer s.mu.Unlock()
	var parent ChainKey
	for i := 0; i < stored; i++ {
		s.groups[gid{ns, keys[i]}] = &groupEnt{ns: ns, key: keys[i], parent: parent, index: uint32(i), committed: true, refs: 1,
			digest: state.TokensDigest(prompt[i*s.ct : (i+1)*s.ct]), sum: tokensSum(prompt[i*s.ct : (i+1)*s.ct])}
		parent = keys[i]
	}
	for i := stored; i < n; i++ {
		var k ChainKey
		binary.LittleEndian.PutUint64(k[:], uint64(i)*0x9e3779b97f4a7c15)
		binary.LittleEndian.PutUint64(k[8:], uint64(i))
		s.groups[gid{ns, k}] = &groupEnt{ns: ns, key: k, index: uint32(i % 2048), committed: true, refs: 1}
	}
}

// BenchmarkLookup128K: a 128K-token prompt (2048 groups of 64 tokens)
// against a table of a million groups; half of the prompt's groups are
// stored, or all, or none.
func BenchmarkLookup128K(b *testing.B) {
	for _, tc := range []struct {
		name   string
		stored int
	}{{"none", 0}, {"half", 1024}, {"all", 2048}} {
		b.Run(tc.name, func(b *testing.B) {
			e := newEnv(&testing.T{}, "mem", func(o *Options) { o.ChunkTokens = 64; o.Logf = func(string, ...any) {} })
			s, err := Open(e.opts)
			if err != nil {
				b.Fatal(err)
			}
			defer s.Close()
			ident := testIdentity("m1")
			prompt := promptTokens(7, 128<<10)
			fillGroupTable(b, s, "ns", ident, prompt, tc.stored, 1<<20)
			p := Prefix{Namespace: "ns", Identity: ident, Tokens: prompt}
			b.ResetTimer()
			for b.Loop() {
				n, err := s.Lookup(p)
				if err != nil || n != tc.stored*64 {
					b.Fatalf("Lookup: %d, %v; want %d", n, err, tc.stored*64)
				}
			}
		})
	}
}

// TestLookupLargeTable runs the benchmark's lookups once each against a
// table of 128K groups (the benchmark's million, kept short here) and a
// 128K-token prompt: the answers are right.
func TestLookupLargeTable(t *testing.T) {
	e := newEnv(t, "mem", func(o *Options) { o.ChunkTokens = 64 })
	s := e.open()
	defer s.Close()
	ident := testIdentity("m1")
	prompt := promptTokens(7, 128<<10)
	fillGroupTable(t, s, "ns", ident, prompt, 1000, 1<<17)
	for _, tc := range []struct {
		tokens []uint32
		want   int
	}{{prompt, 1000 * 64}, {prompt[:500*64+3], 500 * 64}, {promptTokens(8, 128<<10), 0}} {
		if n, err := s.Lookup(Prefix{Namespace: "ns", Identity: ident, Tokens: tc.tokens}); err != nil || n != tc.want {
			t.Fatalf("Lookup of %d tokens: %d, %v; want %d", len(tc.tokens), n, err, tc.want)
		}
	}
}
