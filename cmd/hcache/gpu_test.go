package main

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/hcache/hcache/bench/gpubench"
	"github.com/hcache/hcache/profiles"
)

// `bench gpu --plan` on the CPU backend: JSON rows, one per (tokens, plan),
// the scheduled plan's profile named; and its flag errors.
func TestBenchGPUPlansCPU(t *testing.T) {
	code, out, errs := runCLI("bench", "gpu", "--model", "tiny-llama", "--backend", "cpu", "--plan", "kv,scheduled,recompute",
		"--from-store", t.TempDir(), "--tokens", "16,40", "--reps", "1", "--profile", "h200-nvme", "--json")
	if code != 0 {
		t.Fatalf("exit %d\n%s", code, errs)
	}
	var rows []gpubench.PlanRow
	if err := json.Unmarshal([]byte(out), &rows); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	if len(rows) != 6 {
		t.Fatalf("%d rows", len(rows))
	}
	for i, r := range rows {
		want := []string{"kv", "scheduled", "recompute"}[i%3]
		if r.Plan != want || r.Tokens != []int{16, 40}[i/3] || r.Profile != "h200-nvme" || r.Unwritten != 0 || !(r.RestoreMS > 0) {
			t.Errorf("row %d: %+v", i, r)
		}
	}
	code, out, errs = runCLI("bench", "gpu", "--model", "tiny-llama", "--backend", "cpu", "--plan", "all",
		"--from-store", t.TempDir(), "--tokens", "16", "--reps", "1")
	if code != 0 || !strings.Contains(out, "best other") || strings.Count(out, "tiny-llama") != 4 {
		t.Fatalf("table: exit %d\n%s\n%s", code, out, errs)
	}
	for _, c := range []struct {
		args []string
		msg  string
	}{
		{[]string{"--plan", "fastest", "--from-store", "/tmp"}, `unknown plan "fastest"`},
		{[]string{"--plan", "kv"}, "--from-store"},
		{[]string{"--plan", "kv", "--from-store", "/tmp", "--codec", "fp8"}, "separate benchmarks"},
		{[]string{"--plan", "kv", "--from-store", "/tmp", "--profile", "nosuch"}, "nosuch"},
		{[]string{"--plan", "kv", "--from-store", "/tmp", "--backend", "tpu"}, `backend "tpu"`},
	} {
		args := append([]string{"bench", "gpu", "--model", "tiny-llama", "--tokens", "16"}, c.args...)
		code, out, errs := runCLI(args...)
		if code == 0 || !strings.Contains(out+errs, c.msg) {
			t.Errorf("%v: exit %d, output %q lacks %q", c.args, code, out+errs, c.msg)
		}
	}
}

func TestDefaultGPUProfile(t *testing.T) {
	// The measured GPU profile once committed, else the shipped h200-nvme.
	want := fallbackGPUProfile
	if _, err := profiles.Load(measuredGPUProfile); err == nil {
		want = measuredGPUProfile
	}
	if got := defaultGPUProfile(); got != want {
		t.Fatalf("default profile %q, want %q", got, want)
	}
}
