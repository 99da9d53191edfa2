package par

import (
	"runtime"
	"sync/atomic"
	"testing"
)

// Each calls fn once for every index, never more than GOMAXPROCS at once.
func TestEach(t *testing.T) {
	for _, n := range []int{0, 1, 7, 100} {
		seen := make([]atomic.Int32, n)
		var running, peak atomic.Int32
		Each(n, func(i int) {
			r := running.Add(1)
			for p := peak.Load(); r > p && !peak.CompareAndSwap(p, r); p = peak.Load() {
			}
			seen[i].Add(1)
			runtime.Gosched()
			running.Add(-1)
		})
		for i := range seen {
			if c := seen[i].Load(); c != 1 {
				t.Fatalf("n=%d: fn(%d) called %d times", n, i, c)
			}
		}
		if p := int(peak.Load()); p > runtime.GOMAXPROCS(0) {
			t.Fatalf("n=%d: %d calls at once, GOMAXPROCS %d", n, p, runtime.GOMAXPROCS(0))
		}
	}
}
