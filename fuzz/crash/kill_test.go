package crash

import (
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"testing"
)

// TestMain doubles as the stress writer when re-executed by the kill loop.
func TestMain(m *testing.M) {
	if dir := os.Getenv("HCACHE_STRESS_DIR"); dir != "" {
		seed, _ := strconv.ParseInt(os.Getenv("HCACHE_STRESS_SEED"), 10, 64)
		if err := Stress(dir, seed, 0, StressChunkTokens, os.Stdout); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func TestSIGKILLKeepsAcknowledged(t *testing.T) {
	seed := testSeed(t)
	dir := t.TempDir()
	rep := &Report{Seed: seed}
	// The child is this test binary (slow under -race): it is killed after
	// a seeded number of acknowledgements, however long they take.
	err := KillLoop(KillOptions{Dir: dir, Cycles: 8, Seed: seed, MinAcks: 1, MaxAcks: 40, Command: func(s int64) *exec.Cmd {
		cmd := exec.Command(os.Args[0], "-test.run=^$")
		cmd.Env = append(os.Environ(), "HCACHE_STRESS_DIR="+dir, fmt.Sprint("HCACHE_STRESS_SEED=", s))
		return cmd
	}}, rep)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%d kill cycles, %d acknowledged contexts, lost %d, torn %d, fsck %d", rep.KillCycles, rep.AckedContexts, rep.LostAcked, rep.TornServed, rep.FsckErrors)
	if !rep.OK() {
		t.Fatalf("%v", rep.Failures)
	}
	if rep.KillCycles != 8 || rep.AckedContexts == 0 {
		t.Fatalf("kill loop too weak: %d cycles, %d acknowledged contexts", rep.KillCycles, rep.AckedContexts)
	}
}
