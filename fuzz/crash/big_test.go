package crash

import (
	"os"
	"strconv"
	"testing"
)

// TestSimulatedLong is the long form, run by `make crash` through
// `hcache crashtest`; here only when HCACHE_CRASH_CYCLES is set.
func TestSimulatedLong(t *testing.T) {
	n, _ := strconv.Atoi(os.Getenv("HCACHE_CRASH_CYCLES"))
	if n == 0 {
		t.Skip("set HCACHE_CRASH_CYCLES to run")
	}
	seed, _ := strconv.ParseInt(os.Getenv("HCACHE_CRASH_SEED"), 10, 64)
	rep := Simulate(SimOptions{Seed: seed, Cycles: n, Ops: 200, WriteProb: 0.05})
	t.Logf("seed %d: %d crash points, lost %d, torn %d, fsck %d, trace %s", seed, rep.CrashPoints, rep.LostAcked, rep.TornServed, rep.FsckErrors, rep.Trace)
	if !rep.OK() {
		t.Fatal(rep.Failures)
	}
}
