package serve

import (
	"errors"
	"fmt"

	"github.com/hcache/hcache/chunk"
	"github.com/hcache/hcache/gpu/cuda"
	"github.com/hcache/hcache/state"
)

// DefaultDeviceAhead is how many restore buffers a device restore lets the
// store hold at once: the ones whose copies are queued on the GPU and the
// ones being read.
const DefaultDeviceAhead = 4

// RestoreToDevice streams a context from the store into a device paged KV
// cache: each layer's restore buffer goes straight to the backend's copy
// stream (pinned through the store's ReadBuffers hooks, set to the
// backend's HostRegister/HostUnregister) and is released when its copy has
// completed, while the store reads the next layers. Tokens land at
// positions start, start+1, ...; hidden layers are projected, KV layers
// scattered. A plan with recomputed layers is refused: those need the
// forward pass; so is a plan or cache whose shape is not the backend's
// model. (That the identity names the backend's weights is the caller's to
// ensure: the store checks the identity against the stored one, the backend
// holds weights, and only the caller knows both.) ahead <= 0 takes
// DefaultDeviceAhead.
func RestoreToDevice(st *chunk.Store, ns, id string, ident *state.Identity, b *cuda.Backend, cache *cuda.Cache, start, ahead int) (int, cuda.Timing, error) {
	var t cuda.Timing
	if st == nil || b == nil || cache == nil || ident == nil {
		return 0, t, errors.New("serve: RestoreToDevice needs a store, identity, backend and cache")
	}
	if start < 0 {
		return 0, t, fmt.Errorf("serve: start position %d", start)
	}
	for l, p := range ident.Plan {
		if p.Kind == state.LayerNone {
			return 0, t, fmt.Errorf("serve: layer %d is planned for recomputation, which a device restore does not run", l)
		}
	}
	c := b.Config()
	if len(ident.Plan) != c.Layers {
		return 0, t, fmt.Errorf("serve: a %d-layer plan for a %d-layer model", len(ident.Plan), c.Layers)
	}
	if cache.Layers != c.Layers {
		return 0, t, fmt.Errorf("serve: a %d-layer cache for a %d-layer model", cache.Layers, c.Layers)
	}
	for l, p := range ident.Plan {
		want := c.HiddenRowBytes()
		if p.Kind == state.LayerKV {
			want = c.KVRowBytes()
		}
		if int(p.RowBytes) != want {
			return 0, t, fmt.Errorf("serve: layer %d (%s) stores %d-byte rows; the backend's model has %d", l, p.Kind, p.RowBytes, want)
		}
	}
	if ahead <= 0 {
		ahead = DefaultDeviceAhead
	}
	var r *cuda.Restore
	tokens, err := st.RestoreOwned(ns, id, ident, ahead, func(layer int, rows []byte, release func()) error {
		if r == nil {
			n := len(rows) / int(ident.Plan[layer].RowBytes)
			positions := make([]int, n)
			for i := range positions {
				positions[i] = start + i
			}
			var err error
			if r, err = b.Begin(cache, positions); err != nil {
				release()
				return err
			}
		}
		if ident.Plan[layer].Kind == state.LayerHidden {
			return r.Hidden(layer, rows, release)
		}
		return r.KV(layer, rows, release)
	})
	if r != nil {
		var werr error
		t, werr = r.Wait()
		if err == nil {
			err = werr
		}
	}
	return tokens, t, err
}
