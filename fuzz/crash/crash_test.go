package crash

import (
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2/vfs"

	"github.com/hcache/hcache/chunk"
)

func TestSimulatedCrashesKeepAcknowledged(t *testing.T) {
	seed := time.Now().UnixNano()
	t.Logf("seed %d (rerun: hcache crashtest --seed %d --cycles 4)", seed, seed)
	rep := Simulate(SimOptions{Seed: seed, Cycles: 4, Ops: 120, WriteProb: 0.05})
	t.Logf("%+v", *rep)
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
