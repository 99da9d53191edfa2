package crash

import (
	"os"
	"strconv"
	"testing"
	"time"
)

// testSeed returns HCACHE_SEED when set (to replay a failure), else a
// clock seed; either way it logs how to replay the test.
func testSeed(t *testing.T) int64 {
	t.Helper()
	if v := os.Getenv("HCACHE_SEED"); v != "" {
		seed, err := strconv.ParseInt(v, 10, 64)
		if err != nil {
			t.Fatalf("HCACHE_SEED=%q: not an integer", v)
		}
		t.Logf("seed %d (from HCACHE_SEED)", seed)
		return seed
	}
	seed := time.Now().UnixNano() % 1000000
	t.Logf("seed %d (replay: HCACHE_SEED=%d go test ./fuzz/crash/ -run '^%s$')", seed, seed, t.Name())
	return seed
}
