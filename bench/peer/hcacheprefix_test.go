package peer

import (
	"fmt"
	"path/filepath"
	"testing"

	"github.com/hcache/hcache/bench/prefixwl"
	"github.com/hcache/hcache/internal/testseed"
	"github.com/hcache/hcache/state"
)

// TestHcachePrefixWorkloads: on every shared-prefix workload, hcache's
// lookups (naming the conversation) equal the workload's best hits, it
// writes and keeps exactly the workload's unique groups, restores hand
// back the saved rows, and each conversation keeps one context.
func TestHcachePrefixWorkloads(t *testing.T) {
	seed := testseed.Seed(t)
	for _, name := range prefixwl.Names() {
		t.Run(name, func(t *testing.T) {
			p := prefixwl.Defaults[name]
			p.Conversations, p.Documents, p.DocTokens, p.Traces = 12, 3, 1500, 2
			w, err := p.Generate(seed)
			if err != nil {
				t.Fatal(err)
			}
			spec := Spec{Dir: filepath.Join(t.TempDir(), "h"), Layers: 2, RowBytes: 64}
			ident := &state.Identity{Model: []byte("peer test"), Plan: []state.LayerPlan{{Kind: state.LayerKV, RowBytes: 64}, {Kind: state.LayerKV, RowBytes: 64}}}
			h, err := NewHcachePrefix(spec, ident, "ns")
			if err != nil {
				t.Fatal(err)
			}
			defer h.Close()
			want, hits, err := w.Count(h.GroupTokens())
			if err != nil {
				t.Fatal(err)
			}
			src := NewSource(seed)
			var written int64
			for i, r := range w.Requests {
				ctx := fmt.Sprint("s", r.Session)
				n, err := h.Lookup(ctx, r.Tokens[:r.Prompt])
				if err != nil || n != hits[i].Best() {
					t.Fatalf("request %d: lookup %d (%v), the workload says %+v", i, n, err, hits[i])
				}
				if n > 0 && i%5 == 0 {
					checkRestore(t, h, ctx, src, spec, r.Tokens[:r.Prompt], n)
				}
				k, err := h.SaveTokens(ctx, r.Tokens, src.PrefixRows(r.Tokens, spec.RowBytes).Rows)
				if err != nil {
					t.Fatal(err)
				}
				written += int64(k)
			}
			if written != want.UniqueGroups || h.StoredGroups() != want.UniqueGroups {
				t.Fatalf("%d groups written, %d stored; the workload has %d unique", written, h.StoredGroups(), want.UniqueGroups)
			}
			if n := len(h.Store().Contexts()); n != w.Sessions {
				t.Fatalf("%d contexts for %d conversations", n, w.Sessions)
			}
		})
	}
}
