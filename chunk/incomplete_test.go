package chunk

import (
	"errors"
	"strings"
	"testing"
)

// TestCloseNamesIncompleteTokens: a writer closed after tokens were
// appended in only some layers stores the complete tokens and returns
// ErrIncompleteTokens naming the lost ones (it returned nil and the tokens
// vanished); a writer whose layers agree closes with nil.
func TestCloseNamesIncompleteTokens(t *testing.T) {
	ident := testIdentity("m") // stored layers 0, 1 and 3
	cases := []struct {
		name     string
		extra    map[int]int // layer: tokens appended past the 10 complete ones
		want     string      // "" : Close returns nil
		complete int
	}{
		{"complete", nil, "", 10},
		{"one layer of a token", map[int]int{0: 1}, "tokens [10, 11) (layer 0 has 11", 10},
		{"two layers, one ahead", map[int]int{0: 1, 3: 3}, "tokens [10, 13) (layer 3 has 13", 10},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			e := newEnv(t, "mem", nil)
			s := e.open()
			defer s.Close()
			w, err := s.Create("ns", "c", ident, CreateOptions{})
			if err != nil {
				t.Fatal(err)
			}
			appendPrefill(t, w, ident, "c", 0, 10)
			for l, n := range c.extra {
				rb := int(ident.Plan[l].RowBytes)
				var rows []byte
				for tok := 10; tok < 10+n; tok++ {
					rows = append(rows, row("c", l, tok, rb)...)
				}
				if err := w.AppendLayer(l, rows); err != nil {
					t.Fatal(err)
				}
			}
			err = w.Close()
			switch {
			case c.want == "" && err != nil:
				t.Fatalf("Close: %v; want nil", err)
			case c.want != "" && (!errors.Is(err, ErrIncompleteTokens) || !strings.Contains(err.Error(), c.want)):
				t.Fatalf("Close: %v; want ErrIncompleteTokens with %q", err, c.want)
			}
			if again := w.Close(); !errors.Is(again, err) && again != err {
				t.Fatalf("second Close: %v; want the first's %v", again, err)
			}
			verify(t, s, "ns", "c", ident, c.complete)
		})
	}
}
