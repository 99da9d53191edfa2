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

// The CUDA backend's lane flags: parsed into cuda.Options, bad values
// refused when parsed with a message naming the flag and what it wants,
// and refused with a backend that would ignore them.
func TestCUDALaneFlags(t *testing.T) {
	for _, c := range []struct {
		args     []string
		restores int
		memory   int64
		msg      string // "" = parses
	}{
		{nil, 0, 0, ""},
		{[]string{"--restores", "8"}, 8, 0, ""},
		{[]string{"--restores", "1", "--restore-memory", "6G"}, 1, 6 << 30, ""},
		{[]string{"--restore-memory", "1536M"}, 0, 1536 << 20, ""},
		{[]string{"--restores", "64"}, 64, 0, ""},
		{[]string{"--restores", "0"}, 0, 0, `invalid value "0" for flag -restores: "0": want how many restores run on the device at once, 1 to 64`},
		{[]string{"--restores", "65"}, 0, 0, "1 to 64"},
		{[]string{"--restores", "four"}, 0, 0, `invalid value "four" for flag -restores`},
		{[]string{"--restore-memory", "0"}, 0, 0, "want a size of device memory"},
		{[]string{"--restore-memory", "-1G"}, 0, 0, `bad size "-1G"`},
		{[]string{"--restore-memory", "lots"}, 0, 0, `invalid value "lots" for flag -restore-memory`},
	} {
		var stderr strings.Builder
		fs := newFlags("gpu check", &stderr)
		opts := cudaFlags(fs)
		err := parseFlags(fs, c.args)
		if c.msg == "" {
			if err != nil {
				t.Errorf("%v: %v", c.args, err)
				continue
			}
			if o := opts(); o.Restores != c.restores || o.RestoreMemory != c.memory {
				t.Errorf("%v: Restores %d RestoreMemory %d, want %d %d", c.args, o.Restores, o.RestoreMemory, c.restores, c.memory)
			}
			continue
		}
		if err == nil || !strings.Contains(err.Error()+stderr.String(), c.msg) {
			t.Errorf("%v: error %v, output %q: want %q", c.args, err, stderr.String(), c.msg)
		}
	}
	for _, c := range []struct {
		args []string
		msg  string
	}{
		{[]string{"bench", "gpu", "--model", "tiny-llama", "--backend", "cpu", "--plan", "kv", "--from-store", "/tmp", "--tokens", "16", "--restores", "2"},
			"--restores is an option of the CUDA backend, not of --backend cpu"},
		{[]string{"profile", "--backend", "cpu", "--dir", "/tmp", "--model", "tiny-llama", "--restore-memory", "1G"},
			"--restore-memory is an option of the CUDA backend, not of --backend cpu"},
		{[]string{"gpu", "mixed", "--restores", "0"}, "1 to 64"},
		{[]string{"bench", "gpu", "--model", "tiny-llama", "--backend", "cpu", "--tokens", "16"}, "--backend applies with --plan only"},
		{[]string{"bench", "gpu", "--model", "tiny-llama", "--torch", "scripts/torch_prefill.py", "--tokens", "16"}, "--torch applies with --plan only"},
		{[]string{"bench", "gpu", "--model", "tiny-llama", "--profile", "h200-nvme", "--tokens", "16"}, "--profile applies with --plan only"},
	} {
		code, out, errs := runCLI(c.args...)
		if code == 0 || !strings.Contains(out+errs, c.msg) {
			t.Errorf("%v: exit %d, output %q lacks %q", c.args, code, out+errs, c.msg)
		}
	}
}

// `gpu lanes` on the CPU backend: JSON with both codecs and both
// concurrency levels passing; its flag errors.
func TestGPULanesCPU(t *testing.T) {
	code, out, errs := runCLI("gpu", "lanes", "--backend", "cpu", "--tokens", "24", "--reps", "1", "--dir", t.TempDir(), "--json")
	if code != 0 {
		t.Fatalf("exit %d\n%s", code, errs)
	}
	var res gpubench.LanesResult
	if err := json.Unmarshal([]byte(out), &res); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	if res.Failed != 0 || len(res.Codecs) != 2 || res.Codecs[1].Codec != "fp8-block" || len(res.Concurrency) != 2 || res.Concurrency[1].N != 2*res.Lanes {
		t.Fatalf("%+v", res)
	}
	for _, c := range []struct {
		args []string
		msg  string
	}{
		{[]string{"--backend", "cpu", "--restores", "2"}, "--restores is an option of the CUDA backend"},
		{[]string{"--backend", "cpu", "--tokens", "0"}, "--tokens 0"},
		{[]string{"--backend", "cpu", "--model", "nosuch"}, "nosuch"},
	} {
		code, out, errs := runCLI(append([]string{"gpu", "lanes", "--dir", t.TempDir()}, c.args...)...)
		if code == 0 || !strings.Contains(out+errs, c.msg) {
			t.Errorf("%v: exit %d, output %q lacks %q", c.args, code, out+errs, c.msg)
		}
	}
}
