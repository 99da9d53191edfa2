package main

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"

	"github.com/hcache/hcache/fuzz/crash"
)

// TestCrashtestPrefix: `crashtest --prefix` runs the simulation with
// token-addressed contexts (the seed's operations and trace are those of
// crash.Simulate with SimOptions.Prefix), reports progress on stderr and
// sums them up; without the flag there are none.
func TestCrashtestPrefix(t *testing.T) {
	const seed = 3
	args := []string{"crashtest", "--cycles", "1", "--ops", "60", "--seed", "3", "--sync-prob", "0.2"}
	want := crash.Simulate(crash.SimOptions{Seed: seed, Cycles: 1, Ops: 60, WriteProb: 0.05, SyncProb: 0.2, Prefix: true})
	cases := []struct {
		name   string
		args   []string
		prefix bool
	}{
		{"prefix", []string{"--prefix"}, true},
		{"plain", nil, false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			code, out, errs := runCLI(append(append(append([]string{}, args...), c.args...), "--json")...)
			if code != 0 {
				t.Fatalf("seed %d: exit %d\n%s\n%s", seed, code, out, errs)
			}
			var rep crash.Report
			if err := json.Unmarshal([]byte(out), &rep); err != nil {
				t.Fatalf("seed %d: %v:\n%s", seed, err, out)
			}
			if !strings.Contains(errs, "operations (100%)") {
				t.Errorf("seed %d: no progress on stderr:\n%s", seed, errs)
			}
			if !c.prefix {
				if rep.TokContexts != 0 || rep.Trace == want.Trace {
					t.Fatalf("seed %d: token-addressed contexts without --prefix: %s", seed, out)
				}
				return
			}
			if rep.TokContexts == 0 || rep.CrashPoints == 0 {
				t.Fatalf("seed %d: no token-addressed contexts or crash points: %s", seed, out)
			}
			if rep.Trace != want.Trace || rep.TokContexts != want.TokContexts || rep.Forks != want.Forks || rep.TokensShared != want.TokensShared {
				t.Fatalf("seed %d: crashtest --prefix ran other operations than SimOptions.Prefix: %s, want trace %s, %d contexts, %d forks, %d shared",
					seed, out, want.Trace, want.TokContexts, want.Forks, want.TokensShared)
			}
			if !strings.Contains(errs, "token-addressed") {
				t.Errorf("seed %d: stderr does not say the run has token-addressed contexts:\n%s", seed, errs)
			}
		})
	}
	code, out, errs := runCLI(append(args, "--prefix")...)
	if code != 0 || !strings.Contains(out, "lost 0, torn 0") || !strings.Contains(out, "token-addressed contexts: ") || !strings.Contains(out, "checked by name and by tokens") {
		t.Fatalf("seed %d: summary: exit %d\n%s\n%s", seed, code, out, errs)
	}
}

// TestCrashtestAdversarial: `crashtest --adversarial` runs the adversarial
// operations (crash.SimOptions.Adversarial) and says how many.
func TestCrashtestAdversarial(t *testing.T) {
	const seed = 3
	code, out, errs := runCLI("crashtest", "--cycles", "1", "--ops", "80", "--seed", "3", "--sync-prob", "0.2", "--adversarial")
	if code != 0 {
		t.Fatalf("seed %d: exit %d\n%s\n%s", seed, code, out, errs)
	}
	want := crash.Simulate(crash.SimOptions{Seed: seed, Cycles: 1, Ops: 80, WriteProb: 0.05, SyncProb: 0.2, Adversarial: true})
	if want.AdversarialOps == 0 || !strings.Contains(out, fmt.Sprintf("adversarial operations: %d run", want.AdversarialOps)) || !strings.Contains(out, want.Trace) {
		t.Fatalf("seed %d: want %d adversarial operations, trace %s:\n%s\n%s", seed, want.AdversarialOps, want.Trace, out, errs)
	}
}
