// Package rows makes the deterministic row contents that tests and the
// crash harness store and check: the bytes of (context, layer, token)
// differ from those of any other context, layer, position or incarnation,
// so a row served from the wrong place never matches.
package rows

import (
	"fmt"
	"hash/fnv"
)

// Row returns n bytes for (ctx, layer, token).
func Row(ctx string, layer, token, n int) []byte {
	h := fnv.New64a()
	fmt.Fprintf(h, "%s|%d|%d", ctx, layer, token)
	x := h.Sum64() | 1
	b := make([]byte, n)
	for i := range b {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		b[i] = byte(x)
	}
	return b
}
