package serve

import (
	"strings"
	"testing"

	"github.com/hcache/hcache/chunk"
	"github.com/hcache/hcache/gpu/cuda"
)

// RestoreToDevice refuses what it cannot run before touching the store or
// the GPU.
func TestRestoreToDeviceRefuses(t *testing.T) {
	ident := &chunk.Identity{Model: []byte("m"), Plan: []chunk.LayerPlan{{Kind: chunk.LayerNone}, {Kind: chunk.LayerHidden, RowBytes: 8}}}
	st := &chunk.Store{}
	cases := []struct {
		name  string
		st    *chunk.Store
		ident *chunk.Identity
		b     *cuda.Backend
		cache *cuda.Cache
		start int
		want  string
	}{
		{"nil store", nil, ident, &cuda.Backend{}, &cuda.Cache{}, 0, "needs a store"},
		{"nil backend", st, ident, nil, &cuda.Cache{}, 0, "needs a store"},
		{"nil identity", st, nil, &cuda.Backend{}, &cuda.Cache{}, 0, "needs a store"},
		{"negative start", st, ident, &cuda.Backend{}, &cuda.Cache{}, -1, "start position -1"},
		{"recomputed layer", st, ident, &cuda.Backend{}, &cuda.Cache{}, 0, "layer 0 is planned for recomputation"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, _, err := RestoreToDevice(tc.st, "ns", "id", tc.ident, tc.b, tc.cache, tc.start, 0)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want one containing %q", err, tc.want)
			}
		})
	}
}
