package benchfleet

import (
	"bytes"
	"testing"
)

// TestTokenRowsFollowThePrefix: the prefix workload's rows of a token are a
// function of the tokens up to it: two prompts sharing a prefix have equal
// rows there and different rows from the first differing token on (what
// makes the workload's restores checkable after a dedup or a promotion).
func TestTokenRowsFollowThePrefix(t *testing.T) {
	a := []uint32{5, 6, 7, 8, 9, 10}
	b := []uint32{5, 6, 7, 1, 9, 10}
	ha, hb := prefixHashes(a), prefixHashes(b)
	for _, tc := range []struct {
		from, n int
		equal   bool
	}{
		{0, 3, true},
		{3, 1, false},
		{4, 2, false}, // same ids, but after a differing token
	} {
		ra, rb := tokenRows(ha, 2, tc.from, tc.n, 64), tokenRows(hb, 2, tc.from, tc.n, 64)
		if bytes.Equal(ra, rb) != tc.equal {
			t.Errorf("tokens [%d, %d): rows equal %v, want %v", tc.from, tc.from+tc.n, !tc.equal, tc.equal)
		}
	}
	if bytes.Equal(tokenRows(ha, 1, 0, 1, 64), tokenRows(ha, 2, 0, 1, 64)) {
		t.Error("two layers of a token have equal rows")
	}
	if !bytes.Equal(tokenRows(ha, 1, 2, 3, 64)[64:], tokenRows(ha, 1, 3, 2, 64)) {
		t.Error("rows depend on the range asked, not the token")
	}
}
