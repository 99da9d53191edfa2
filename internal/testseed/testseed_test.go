package testseed

import (
	"fmt"
	"math/rand"
	"strings"
	"testing"
	"time"
)

func TestChoose(t *testing.T) {
	clock := func() time.Time { return time.Unix(0, 424242) }
	cases := []struct {
		name, flag, env string
		want            int64
		src, err        string
	}{
		{"clock when neither is set", "", "", 424242, "the clock", ""},
		{"environment", "", "77", 77, Env, ""},
		{"flag before environment", "-5", "77", -5, "-seed", ""},
		{"zero is a seed", "0", "", 0, "-seed", ""},
		{"spaces around the environment's value", "", " 12 ", 12, Env, ""},
		{"largest int64", "9223372036854775807", "", 9223372036854775807, "-seed", ""},
		{"bad environment fails, never the clock", "", "seven", 0, "", `HCACHE_SEED="seven" is not a decimal int64 seed`},
		{"bad flag fails even with a good environment", "0x10", "3", 0, "", `-seed="0x10" is not a decimal int64 seed`},
		{"overflow fails", "9223372036854775808", "", 0, "", "is not a decimal int64 seed"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got, src, err := choose(tc.flag, tc.env, clock)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("error %v, want one containing %q", err, tc.err)
				}
				return
			}
			if err != nil || got != tc.want || src != tc.src {
				t.Fatalf("got %d from %q (%v), want %d from %q", got, src, err, tc.want, tc.src)
			}
		})
	}
}

func TestReplay(t *testing.T) {
	for _, tc := range []struct {
		name, dir, want string
	}{
		{"TestX", "./chunk", "HCACHE_SEED=9 go test -count=1 -run '^TestX$' ./chunk"},
		{"TestX/sub_case", "./serve/sched", "HCACHE_SEED=9 go test -count=1 -run '^TestX$/^sub_case$' ./serve/sched"},
		{"TestX/a.b(c)", "", `HCACHE_SEED=9 go test -count=1 -run '^TestX$/^a\.b\(c\)$' .`},
	} {
		if got := Replay(tc.name, 9, tc.dir); got != tc.want {
			t.Errorf("Replay(%q) = %q, want %q", tc.name, got, tc.want)
		}
	}
}

// fakeTB records what Seed logs and whether it failed.
type fakeTB struct {
	testing.TB
	name  string
	logs  []string
	fatal string
}

func (f *fakeTB) Helper()      {}
func (f *fakeTB) Name() string { return f.name }
func (f *fakeTB) Logf(format string, args ...any) {
	f.logs = append(f.logs, fmt.Sprintf(format, args...))
}
func (f *fakeTB) Fatal(args ...any) { f.fatal = fmt.Sprint(args...) }

// TestSeedReplays: the seed a run prints, given back through HCACHE_SEED,
// gives the same seed and so the same random stream; the log names the
// command that does it; a malformed HCACHE_SEED fails the test.
func TestSeedReplays(t *testing.T) {
	if *seedFlag != "" {
		t.Skip("-seed given: this test sets the seed itself")
	}
	t.Setenv(Env, "")
	first := &fakeTB{name: "TestSomething/case_1"}
	s1 := Seed(first)
	if first.fatal != "" || len(first.logs) != 1 {
		t.Fatalf("first run: fatal %q, logs %q", first.fatal, first.logs)
	}
	want := fmt.Sprintf("seed %d from the clock (replay: HCACHE_SEED=%d go test -count=1 -run '^TestSomething$/^case_1$' ./internal/testseed)", s1, s1)
	if first.logs[0] != want {
		t.Fatalf("logged %q, want %q", first.logs[0], want)
	}
	t.Setenv(Env, fmt.Sprint(s1))
	again := &fakeTB{name: "TestSomething/case_1"}
	s2 := Seed(again)
	if s2 != s1 || again.fatal != "" {
		t.Fatalf("replay gave seed %d (fatal %q), want %d", s2, again.fatal, s1)
	}
	a, b := rand.New(rand.NewSource(s1)), rand.New(rand.NewSource(s2))
	for i := 0; i < 100; i++ {
		if a.Int63() != b.Int63() {
			t.Fatalf("draw %d differs between the run and its replay", i)
		}
	}
	t.Setenv(Env, "12x")
	bad := &fakeTB{name: "TestSomething"}
	Seed(bad)
	if !strings.Contains(bad.fatal, `HCACHE_SEED="12x"`) {
		t.Fatalf("a malformed HCACHE_SEED gave fatal %q, want it named", bad.fatal)
	}
}
