package daemon_test

import (
	"bytes"
	"context"
	"testing"

	hcachev1 "github.com/hcache/hcache/proto/hcache/v1"
)

// TestRegionSliceReusableAfterAppend pins what hcache_client.Saver's ring
// relies on: when AppendLayer or AppendTokens naming a region slice returns,
// the daemon has copied the rows out, so the client may write over the slice
// at once (here: every append reuses offset 0, scribbled over after each
// reply, before the next append and before the flush).
func TestRegionSliceReusableAfterAppend(t *testing.T) {
	e := start(t, nil)
	c := e.dial()
	ctx := context.Background()
	g, err := c.NewRegion(ctx, 1<<16)
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	w, err := c.Create(ctx, "ns", "reuse", ident, false)
	if err != nil {
		t.Fatal(err)
	}
	scribble := func() {
		for i := range g.Mem {
			g.Mem[i] = 0xA5
		}
	}
	const pre, step = 48, 16
	for _, l := range []int{0, 2} {
		rb := int(ident.Plan[l].RowBytes)
		for from := 0; from < pre; from += step {
			r := rows("reuse", l, from, step, rb)
			copy(g.Mem, r)
			if err := w.AppendLayerRegion(ctx, l, g, 0, uint64(len(r))); err != nil {
				t.Fatal(err)
			}
			scribble()
		}
	}
	for tok := 48; tok < 52; tok++ {
		r := append(rows("reuse", 0, tok, 1, 64), rows("reuse", 2, tok, 1, 32)...)
		copy(g.Mem, r)
		_, err := c.API.AppendTokens(ctx, &hcachev1.AppendTokensRequest{Ctx: &hcachev1.ContextRef{Namespace: "ns", Id: "reuse"}, Count: 1,
			Rows: &hcachev1.Rows{Where: &hcachev1.Rows_Region{Region: &hcachev1.RegionSlice{Region: g.ID, Offset: 0, Length: uint64(len(r))}}}})
		if err != nil {
			t.Fatal(err)
		}
		scribble()
	}
	if err := w.Close(ctx); err != nil {
		t.Fatal(err)
	}
	n, err := c.Restore(ctx, "ns", "reuse", ident, func(l int, got []byte) error {
		if want := rows("reuse", l, 0, 52, int(ident.Plan[l].RowBytes)); !bytes.Equal(got, want) {
			t.Errorf("layer %d: restored rows differ from the appended ones (the slice was reused after each reply)", l)
		}
		return nil
	})
	if err != nil || n != 52 {
		t.Fatalf("restore: %d tokens, %v; want 52", n, err)
	}
}
