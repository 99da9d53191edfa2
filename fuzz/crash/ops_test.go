package crash

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"strings"
	"testing"
)

// TestSeedsReplayOperations: a seed draws the same numbers from the
// workload's generator and leaves the same model after every operation as
// it did when the digests below were recorded (at 7c7f605, before the
// flush-or-close step of sim.go and prefix.go became one), with and
// without the token-addressed contexts. Injected torn writes are left out
// (where they land depends on the store's write path, not on the
// workload) and crash points are rare (they never change the operations).
func TestSeedsReplayOperations(t *testing.T) {
	cases := []struct {
		seed   int64
		prefix bool
		digest string
	}{
		{1, false, "29cd3a182fe3bc58"},
		{42, false, "f14cfe9a6cc0a1ca"},
		{457033, false, "02eb1857d6f70397"},
		{1, true, "f2a1faa90b5673b0"},
		{42, true, "2b39af775ee5564b"},
		{457033, true, "62ba99e244ae3218"},
	}
	for _, c := range cases {
		t.Run(fmt.Sprintf("seed%d-prefix%v", c.seed, c.prefix), func(t *testing.T) {
			t.Logf("seed %d prefix %v", c.seed, c.prefix)
			got, lines := opDigest(c.seed, c.prefix, nil)
			if got != c.digest {
				t.Errorf("seed %d (prefix %v): operations digest %s, recorded %s: the seed no longer replays the operations it did (%d log lines; opDigest(%d, %v, w) writes them, to compare with the recording commit's)",
					c.seed, c.prefix, got, c.digest, lines, c.seed, c.prefix)
			}
		})
	}
}

// opDigest runs the seed's workload and digests its operations log (also
// written to w when not nil).
func opDigest(seed int64, prefix bool, w io.Writer) (string, int) {
	h := sha256.New()
	var n lineCounter
	out := io.MultiWriter(h, &n)
	if w != nil {
		out = io.MultiWriter(out, w)
	}
	Simulate(SimOptions{Seed: seed, Cycles: 3, Ops: 120, SyncProb: 0.02, NoFaults: true, Prefix: prefix, opLog: out})
	return hex.EncodeToString(h.Sum(nil))[:16], int(n)
}

type lineCounter int

func (c *lineCounter) Write(p []byte) (int, error) {
	*c += lineCounter(strings.Count(string(p), "\n"))
	return len(p), nil
}
