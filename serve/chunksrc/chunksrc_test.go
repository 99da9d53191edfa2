package chunksrc_test

import (
	"bytes"
	"testing"

	"github.com/hcache/hcache/chunk"
	"github.com/hcache/hcache/serve"
	"github.com/hcache/hcache/serve/chunksrc"
)

// TestStreamByTokens: a restorer over the adapted store streams by name and
// by tokens (the longest stored prefix, then with the named context's
// tail); the rows are the saved ones.
func TestStreamByTokens(t *testing.T) {
	st, err := chunk.Open(chunk.Options{Dir: t.TempDir(), ChunkTokens: 4, SegmentBytes: 8 << 20, GCInterval: -1, Logf: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	ident := &chunk.Identity{Model: []byte("m"), Plan: []chunk.LayerPlan{{Kind: chunk.LayerKV, RowBytes: 2}}}
	tokens := []uint32{5, 6, 7, 8, 9, 10}
	rows := []byte{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11}
	w, _, err := st.CreateTokens("ns", "a", ident, tokens, chunk.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := w.AppendLayer(0, rows); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	r := serve.NewRestorer(chunksrc.New(st), nil, serve.Settings{})
	cases := []struct {
		name string
		req  serve.StreamRequest
		want int
	}{
		{"by name", serve.StreamRequest{NS: "ns", ID: "a", Ident: ident}, 6},
		{"by tokens", serve.StreamRequest{NS: "ns", Ident: ident, ByTokens: true, Tokens: []int{5, 6, 7, 8, 9, 99}}, 4},
		{"by tokens with the context's tail", serve.StreamRequest{NS: "ns", ID: "a", Ident: ident, ByTokens: true, Tokens: []int{5, 6, 7, 8, 9, 99}}, 5},
		{"nothing stored", serve.StreamRequest{NS: "ns", Ident: ident, ByTokens: true, Tokens: []int{1, 2, 3, 4}}, 0},
	}
	for _, cs := range cases {
		var got []byte
		rs, err := r.Stream(cs.req, func(l serve.StreamLayer) error { got = append(got, l.Rows...); return nil })
		if err != nil || rs.Tokens != cs.want || !bytes.Equal(got, rows[:2*cs.want]) {
			t.Errorf("%s: %d tokens %v, %v; want %d tokens %v", cs.name, rs.Tokens, got, err, cs.want, rows[:2*cs.want])
		}
	}
}
