package crash

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"

	"github.com/cockroachdb/pebble/v2/vfs"

	"github.com/hcache/hcache/chunk"
)

func TestSimulatedCrashesKeepAcknowledged(t *testing.T) {
	seed := testSeed(t)
	t.Logf("(or: hcache crashtest --seed %d --cycles 4 --ops 120 --sync-prob 0.5)", seed)
	rep := Simulate(SimOptions{Seed: seed, Cycles: 4, Ops: 120, WriteProb: 0.05, SyncProb: 0.5})
	b, _ := json.Marshal(rep)
	t.Logf("%s", b)
	if !rep.OK() {
		t.Fatalf("lost %d, torn %d, fsck %d:\n%v", rep.LostAcked, rep.TornServed, rep.FsckErrors, rep.Failures)
	}
	if rep.CrashPoints < 50 || rep.AckedContexts == 0 {
		t.Fatalf("harness too weak: %d crash points, %d acknowledged contexts", rep.CrashPoints, rep.AckedContexts)
	}
}

// TestCheckContextVerdicts shows the checker tells lost, torn and deleted
// states apart (so the harness can fail).
func TestCheckContextVerdicts(t *testing.T) {
	st, err := chunk.Open(chunk.Options{FS: vfs.NewMem(), Dir: "/d", ChunkTokens: 8, Logf: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	ident := Identity()
	w, _ := st.Create("crash", "good", ident, chunk.CreateOptions{})
	for tok := 0; tok < 10; tok++ {
		w.AppendToken(TokenRows(ident, "good", tok))
	}
	w.Close()
	// "forged" holds the rows of another context: torn from its view.
	w, _ = st.Create("crash", "forged", ident, chunk.CreateOptions{})
	for tok := 0; tok < 10; tok++ {
		w.AppendToken(TokenRows(ident, "good", tok))
	}
	w.Close()
	cases := []struct {
		id   string
		e    Expect
		want Verdict
	}{
		{"good", Expect{MustExist: true, MayExist: true, MinTokens: 10, MaxTokens: 10}, OK},
		{"good", Expect{MustExist: true, MayExist: true, MinTokens: 12, MaxTokens: 14}, Lost},
		{"good", Expect{MayExist: true, MinTokens: 0, MaxTokens: 9}, Torn},
		{"good", Expect{}, Torn}, // deleted, yet served
		{"forged", Expect{MayExist: true, MaxTokens: 10}, Torn},
		{"missing", Expect{MustExist: true, MinTokens: 1, MaxTokens: 1}, Lost},
		{"missing", Expect{MayExist: true}, OK},
	}
	for _, c := range cases {
		if v, msg := CheckContext(st, "crash", c.id, ident, c.e); v != c.want {
			t.Errorf("%s %+v: verdict %d (%s), want %d", c.id, c.e, v, msg, c.want)
		}
	}
}

// TestSimulatedReplays runs one seed twice: the reports (with the digest of
// every crash point and what it found) must be byte-identical, so a failing
// seed replays.
func TestSimulatedReplays(t *testing.T) {
	seed := testSeed(t)
	var first []byte
	var firstTrace string
	for run := range 2 {
		var trace strings.Builder
		rep := Simulate(SimOptions{Seed: seed, Cycles: 3, Ops: 60, WriteProb: 0.05, SyncProb: 0.5, Trace: &trace})
		// Pebble flushes and compacts on its own goroutines: a crash point
		// at one of its tables would make the run timing-dependent. At
		// this size the index never flushes.
		if strings.Contains(trace.String(), ".sst") {
			t.Fatalf("run %d: Pebble wrote a table during the workload:\n%s", run, trace.String())
		}
		b, err := json.Marshal(rep)
		if err != nil {
			t.Fatal(err)
		}
		if rep.Trace == "" || rep.CrashPoints == 0 {
			t.Fatalf("run %d: no trace: %s", run, b)
		}
		if run == 0 {
			first, firstTrace = b, trace.String()
			continue
		}
		if string(b) != string(first) {
			a, b2 := strings.Split(firstTrace, "\n"), strings.Split(trace.String(), "\n")
			for i := range min(len(a), len(b2)) {
				if a[i] != b2[i] {
					t.Errorf("first difference, trace line %d:\n%s\n%s", i+1, a[i], b2[i])
					break
				}
			}
			t.Fatalf("seed %d gave two reports:\n%s\n%s", seed, first, b)
		}
	}
}

// TestSimulatedMetamorphic runs the same seeded operations on every
// configuration (chunk sizes, lz4, DRAM cache, GC eagerness; real files with
// io_uring or the fallback engine, O_DIRECT or buffered): each must keep
// what it acknowledged and all must end with the same contexts holding the
// same bytes.
func TestSimulatedMetamorphic(t *testing.T) {
	seed := testSeed(t)
	configs := append(MemConfigs(), RealConfigs(t.TempDir())...)
	for i := range 3 {
		s := seed + int64(i)
		rep := Metamorphic(SimOptions{Seed: s, Cycles: 1, Ops: 100, SyncProb: 0.1}, configs)
		t.Logf("seed %d: %d cycles, %d crash points, %d acknowledged contexts", s, rep.Cycles, rep.CrashPoints, rep.AckedContexts)
		if rep.Mismatches > 0 || rep.LostAcked > 0 || rep.FsckErrors > 0 {
			t.Fatalf("seed %d: mismatches %d, lost %d, torn %d, fsck %d:\n%v", s, rep.Mismatches, rep.LostAcked, rep.TornServed, rep.FsckErrors, rep.Failures)
		}
		if !rep.OK() {
			t.Fatalf("seed %d: lost %d, torn %d, fsck %d:\n%v", s, rep.LostAcked, rep.TornServed, rep.FsckErrors, rep.Failures)
		}
		if rep.AckedContexts == 0 {
			t.Fatalf("seed %d: nothing acknowledged", s)
		}
	}
}

// TestMetamorphicCatchesDifferentStates shows the comparison fails when two
// configurations restore different states.
func TestMetamorphicCatchesDifferentStates(t *testing.T) {
	cases := []struct {
		a, b []string
		same bool
	}{
		{[]string{"crash/x 3 tokens ab"}, []string{"crash/x 3 tokens ab"}, true},
		{[]string{"crash/x 3 tokens ab"}, []string{"crash/x 3 tokens ac"}, false},
		{[]string{"crash/x 3 tokens ab"}, nil, false},
		{nil, []string{"crash/y 0 tokens 00"}, false},
	}
	for _, c := range cases {
		if d := diffLines(c.a, c.b); (d == "") != c.same {
			t.Errorf("%v vs %v: diff %q, want same=%v", c.a, c.b, d, c.same)
		}
	}
}

// TestSimulatedDirectCache: the metamorphic run found that with O_DIRECT
// and the DRAM cache both on (io_uring or the fallback engine), seed
// 457033's restores on the running store (cycle 0, ops 80 and 82) served
// rows that were not what was appended: a direct read rounded up to whole
// blocks overwrote DRAM-tier hits already copied into the layer's buffer.
func TestSimulatedDirectCache(t *testing.T) {
	for _, engine := range []string{"fallback", "auto"} {
		rep := Simulate(SimOptions{Seed: 457033, Cycles: 1, Ops: 100, NoFaults: true,
			Config: Config{ChunkTokens: 16, RealDir: t.TempDir(), Engine: engine}})
		if !rep.OK() {
			t.Errorf("%s: lost %d, torn %d, fsck %d: %v", engine, rep.LostAcked, rep.TornServed, rep.FsckErrors, rep.Failures)
		}
	}
}

// TestSimulatedPrefixCrashes: token-addressed contexts with shared
// prefixes, forks and deletes of one sharer keep their acknowledgements at
// every crash point and after repair, by name and by tokens, and never
// serve rows of other tokens.
func TestSimulatedPrefixCrashes(t *testing.T) {
	seed := testSeed(t)
	rep := Simulate(SimOptions{Seed: seed, Cycles: 3, Ops: 120, WriteProb: 0.05, SyncProb: 0.5, Prefix: true})
	t.Logf("%d cycles, %d crash points (%d repaired), %d acknowledged contexts", rep.Cycles, rep.CrashPoints, rep.RepairChecks, rep.AckedContexts)
	if !rep.OK() {
		t.Fatalf("seed %d: %d lost, %d torn, %d fsck errors:\n%s", seed, rep.LostAcked, rep.TornServed, rep.FsckErrors, strings.Join(rep.Failures, "\n"))
	}
}

// TestSimulatedAdversarial: the operations the workload otherwise never
// does (writers abandoned and reopened, deletes and GC during a restore,
// forks of forks, of zero tokens, and forks the store must refuse) keep
// their exact predictions on the running store and every acknowledgement
// at every crash point and after repair. With token-addressed contexts it
// found that repair lost an abandoned and reopened context
// (TestRepairKeepsAbandonedDedupedCreate).
func TestSimulatedAdversarial(t *testing.T) {
	seed := testSeed(t)
	for _, prefix := range []bool{false, true} {
		t.Run(fmt.Sprintf("prefix=%v", prefix), func(t *testing.T) {
			var trace strings.Builder
			rep := Simulate(SimOptions{Seed: seed, Cycles: 3, Ops: 120, WriteProb: 0.02, SyncProb: 0.3, Prefix: prefix, Adversarial: true, Trace: &trace})
			t.Logf("seed %d: %d adversarial operations, %d crash points (%d repaired), %d acknowledged contexts", seed, rep.AdversarialOps, rep.CrashPoints, rep.RepairChecks, rep.AckedContexts)
			if !rep.OK() {
				t.Fatalf("seed %d: %d lost, %d torn, %d fsck errors:\n%s", seed, rep.LostAcked, rep.TornServed, rep.FsckErrors, strings.Join(rep.Failures, "\n"))
			}
			for _, op := range []string{"abandon", "reopen", "during its restore"} {
				if !strings.Contains(trace.String(), op) {
					t.Errorf("seed %d: no %q operation in the trace", seed, op)
				}
			}
		})
	}
}
