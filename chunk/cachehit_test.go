package chunk

import (
	"fmt"
	"testing"
)

// TestCacheHitsNotOverwrittenByDirectReads: a restore serves some groups of a
// layer from the DRAM tier and reads the others with O_DIRECT straight into
// the layer's buffer. A direct read is rounded up to whole blocks, so a
// group whose slice is not a multiple of a block reads past its own bytes
// into the next groups' place in the buffer; a cache hit already copied
// there was overwritten with the disk's following bytes and served
// unverified (found by the metamorphic crash simulation, seed 457033).
// Cases: which groups the cache still holds when the restore runs.
func TestCacheHitsNotOverwrittenByDirectReads(t *testing.T) {
	cases := []struct {
		name   string
		groups int   // 16-token groups of 1 KiB per layer
		cache  int64 // DRAM tier bytes: holds the newest cache/1KiB groups
	}{
		{"first group read, next three hit", 5, 4 << 10},
		{"first two read, rest hit", 6, 4 << 10},
		{"every group hit", 4, 4 << 10},
		{"no cache", 5, 0},
	}
	for _, backend := range []string{"disk", "mem"} {
		for _, tc := range cases {
			t.Run(fmt.Sprintf("%s/%s", backend, tc.name), func(t *testing.T) {
				e := newEnv(t, backend, func(o *Options) { o.CacheBytes = tc.cache })
				s := e.open()
				defer s.Close()
				ident := &Identity{Model: []byte("cache-hit model"), Plan: []LayerPlan{{Kind: LayerHidden, RowBytes: 64}}}
				w, err := s.Create("ns", "c", ident, CreateOptions{})
				if err != nil {
					t.Fatal(err)
				}
				appendTokens(t, w, ident, "c", 0, 16*tc.groups)
				if err := w.Close(); err != nil {
					t.Fatal(err)
				}
				hits := s.Stats().CacheHits
				verify(t, s, "ns", "c", ident, 16*tc.groups)
				if tc.cache > 0 && s.Stats().CacheHits == hits {
					t.Fatalf("no slice came from the DRAM tier: the case tests nothing")
				}
			})
		}
	}
}
