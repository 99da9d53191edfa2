package benchprefix

import (
	"fmt"
	"math/rand"

	"github.com/hcache/hcache/bench/peer"
	"github.com/hcache/hcache/chunk"
	"github.com/hcache/hcache/state"
)

func init() { openers["hcache"] = openHcache }

// fillIdentity is the identity of the lookup-at-scale fill: one layer of
// 2-byte rows, so a million groups cost little to write (a lookup reads
// only the in-memory group table, whatever the rows).
var fillIdentity = &state.Identity{Model: []byte("hcache bench prefix lookup fill"), Plan: []state.LayerPlan{{Kind: state.LayerKV, RowBytes: 2}}}

func openHcache(dir string, o Options, _ state.Chain) (*system, error) {
	h, err := peer.NewHcachePrefix(peer.Spec{Dir: dir, Layers: o.Layers, RowBytes: o.RowBytes}, Identity(o), Namespace)
	if err != nil {
		return nil, err
	}
	st := h.Store()
	return &system{PrefixSystem: h, namedTails: true,
		fill: func(groups, promptTokens int, rng *rand.Rand) (func() (int, error), string, error) {
			g := st.ChunkTokens()
			if promptTokens < g {
				return nil, "", fmt.Errorf("a lookup prompt of %d tokens holds no group of %d", promptTokens, g)
			}
			var prompt []uint32
			zeros := make([]byte, 2*promptTokens)
			n := 0
			for added := 0; added < groups; added += promptTokens / g {
				prompt = randomTokens(rng, promptTokens)
				w, stored, err := st.CreateTokens(Namespace, fmt.Sprint("lookup-fill.", n), fillIdentity, prompt, chunk.CreateOptions{})
				if err != nil {
					return nil, "", err
				}
				if stored != 0 {
					w.Close()
					return nil, "", fmt.Errorf("a random fill prompt found %d tokens stored", stored)
				}
				if err := w.AppendLayer(0, zeros); err != nil {
					w.Close()
					return nil, "", err
				}
				if err := w.Close(); err != nil {
					return nil, "", err
				}
				n++
			}
			p := chunk.Prefix{Namespace: Namespace, Identity: fillIdentity, Tokens: prompt}
			return func() (int, error) { return st.Lookup(p) }, fmt.Sprintf("written: %d contexts of %d random tokens saved by CreateTokens in the same store and namespace "+
				"under a 1-layer, 2-byte-row identity (a lookup reads only the in-memory group table); the timed lookup is the last one's prompt", n, promptTokens), nil
		},
		storedGroups: h.StoredGroups,
		indexBytes:   h.IndexBytes,
		close:        h.Close,
	}, nil
}
