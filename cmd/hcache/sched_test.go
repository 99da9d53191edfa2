package main

import (
	"encoding/json"
	"path/filepath"
	"strings"
	"testing"

	"github.com/hcache/hcache/profiles"
)

type simOut struct {
	Rows []struct {
		Method string   `json:"method"`
		Mean   *float64 `json:"ttft_ms_mean"`
		P99    *float64 `json:"ttft_ms_p99"`
		Bytes  *float64 `json:"storage_bytes_per_token"`
		Split  any      `json:"split"`
	} `json:"rows"`
}

func TestSimulateJSON(t *testing.T) {
	for _, wl := range []string{"chat", "long"} {
		code, out, errs := runCLI("simulate", "--profile", "a100-pm9a3x4", "--model", "llama2-7b", "--workload", wl, "--json")
		if code != 0 {
			t.Fatalf("exit %d: %s", code, errs)
		}
		var res simOut
		if err := json.Unmarshal([]byte(out), &res); err != nil {
			t.Fatalf("%v\n%s", err, out)
		}
		var methods []string
		for _, r := range res.Rows {
			methods = append(methods, r.Method)
			if r.Mean == nil || r.P99 == nil || r.Bytes == nil || *r.Mean <= 0 || *r.P99 < *r.Mean {
				t.Fatalf("%s row %+v lacks or misorders its figures", wl, r)
			}
		}
		if strings.Join(methods, ",") != "recompute,kv,hidden,scheduled" {
			t.Fatalf("methods %v", methods)
		}
		if s := *res.Rows[3].Mean; s > *res.Rows[0].Mean || s > *res.Rows[1].Mean || s > *res.Rows[2].Mean {
			t.Errorf("%s: scheduled mean %.2f is not the best of %s", wl, s, out)
		}
	}
	cases := []struct {
		args []string
		want string
	}{
		{[]string{"simulate", "--workload", "bursty"}, "chat or long"},
		{[]string{"simulate", "--profile", "tpu-v9"}, "h200-nvme"},
		{[]string{"simulate", "--model", "gpt-5"}, "neither a preset"},
		{[]string{"simulate", "--tier", "tape"}, "no tier"},
	}
	for _, c := range cases {
		code, _, errs := runCLI(c.args...)
		if code == 0 || !strings.Contains(errs, c.want) {
			t.Errorf("%v: exit %d, stderr %q; want an error naming %q", c.args, code, errs, c.want)
		}
	}
}

// TestProfileThenSimulate: a measured profile is a valid profile the
// simulator accepts.
func TestProfileThenSimulate(t *testing.T) {
	dir := t.TempDir()
	out := filepath.Join(dir, "p.json")
	code, _, errs := runCLI("profile", "--dir", dir, "--model", "tiny-llama", "--tokens", "16,32", "--rounds", "1", "--read-bytes", "1M", "--out", out, "--json")
	if code != 0 {
		t.Fatalf("profile: exit %d: %s", code, errs)
	}
	p, err := profiles.Load(out)
	if err != nil {
		t.Fatal(err)
	}
	if p.Backend != "cpu" || p.Tiers[0].ReadGBps.Value <= 0 || len(p.Recompute.Points) != 2 || p.Recompute.Shape == nil {
		t.Fatalf("measured profile %+v", p)
	}
	for _, name := range profiles.DecodeCodecs {
		if f := p.Decode(name); f == nil || f.Value <= 0 || !strings.Contains(f.Source, " "+name+" hidden rows") {
			t.Fatalf("measured profile: %s decode %+v, want its own measured rate", name, f)
		}
	}
	if code, _, errs := runCLI("simulate", "--profile", out, "--model", "tiny-llama", "--workload", "chat"); code != 0 {
		t.Fatalf("simulate on the measured profile: exit %d: %s", code, errs)
	}
	if code, _, errs := runCLI("profile", "--dir", dir, "--model", "tiny-llama", "--backend", "tpu"); code == 0 || !strings.Contains(errs, "tpu") {
		t.Fatalf("profile --backend tpu: exit %d %s", code, errs)
	}
	if code, _, errs := runCLI("profile", "--model", "tiny-llama"); code == 0 || !strings.Contains(errs, "--dir") {
		t.Fatalf("profile without --dir: exit %d %s", code, errs)
	}
	if code, _, errs := runCLI("profile", "--dir", dir, "--tokens", "32,16"); code == 0 || !strings.Contains(errs, "increasing") {
		t.Fatalf("profile with decreasing tokens: exit %d %s", code, errs)
	}
}

func TestBenchPipelineJSON(t *testing.T) {
	code, out, errs := runCLI("bench", "pipeline", "--dir", t.TempDir(), "--model", "tiny-llama", "--tokens", "48", "--rounds", "1", "--plan", "1,2,1", "--json")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, errs)
	}
	var res struct {
		Ratio    float64 `json:"ratio"`
		IO       float64 `json:"io_alone_ms"`
		Compute  float64 `json:"compute_alone_ms"`
		Lossless bool    `json:"lossless"`
		Split    struct{ Recompute, Hidden, KV int }
	}
	if err := json.Unmarshal([]byte(out), &res); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	if !res.Lossless || res.Ratio <= 0 || res.IO <= 0 || res.Compute <= 0 || res.Split.Recompute != 1 || res.Split.Hidden != 2 {
		t.Fatalf("bench pipeline result %s", out)
	}
	if code, _, errs := runCLI("bench", "pipeline", "--model", "tiny-llama", "--plan", "1,1"); code == 0 || !strings.Contains(errs, "--plan") {
		t.Fatalf("bad --plan: exit %d %s", code, errs)
	}
}

func TestPlanCommand(t *testing.T) {
	code, out, errs := runCLI("plan", "--profile", "h200-nvme", "--model", "llama3-8b", "--tokens", "8192", "--json")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, errs)
	}
	var res struct {
		Split     struct{ Recompute, Hidden, KV int } `json:"split"`
		Predicted float64                             `json:"predicted_ms"`
		AllKV     float64                             `json:"all_kv_ms"`
	}
	if err := json.Unmarshal([]byte(out), &res); err != nil {
		t.Fatal(err)
	}
	if res.Split.Hidden != 0 || res.Split.Recompute+res.Split.KV != 32 || res.Predicted <= 0 || res.Predicted > res.AllKV {
		t.Fatalf("plan for a GQA model on an I/O-bound profile: %s", out)
	}
	if code, _, errs := runCLI("plan", "--tokens", "0"); code == 0 || !strings.Contains(errs, "positive") {
		t.Fatalf("--tokens 0: exit %d %s", code, errs)
	}
}
