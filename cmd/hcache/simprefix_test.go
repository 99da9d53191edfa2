package main

import (
	"encoding/json"
	"strings"
	"testing"
)

// TestSimulatePrefixJSON: every workload prints its rows and counts; the
// token store restores at least what the conversation store does, in no
// more space, and the command refuses bad flags by name.
func TestSimulatePrefixJSON(t *testing.T) {
	for _, wl := range []string{"chat", "docqa", "agent"} {
		code, out, errs := runCLI("simulate", "prefix", "--profile", "h200-nvme", "--model", "llama3-8b", "--workload", wl, "--scale", "0.25", "--json")
		if code != 0 {
			t.Fatalf("%s: exit %d: %s", wl, code, errs)
		}
		var res struct {
			Group    int `json:"group_tokens"`
			Requests int `json:"requests"`
			Rows     []struct {
				Sharing string   `json:"sharing"`
				Method  string   `json:"method"`
				Mean    *float64 `json:"ttft_ms_mean"`
				P99     *float64 `json:"ttft_ms_p99"`
				Hit     float64  `json:"hit_rate"`
				Storage float64  `json:"storage_bytes"`
			} `json:"rows"`
			Counts struct {
				Unique  int64 `json:"unique_groups"`
				Logical int64 `json:"logical_groups"`
			} `json:"counts"`
			Workload struct {
				Name string `json:"name"`
			} `json:"workload"`
		}
		if err := json.Unmarshal([]byte(out), &res); err != nil {
			t.Fatalf("%s: %v\n%s", wl, err, out)
		}
		if res.Group != 64 || res.Requests == 0 || res.Workload.Name != wl || res.Counts.Unique == 0 || res.Counts.Unique > res.Counts.Logical {
			t.Fatalf("%s: header %+v", wl, res)
		}
		var names []string
		rows := map[string]int{}
		for i, r := range res.Rows {
			names = append(names, r.Sharing+"/"+r.Method)
			rows[r.Sharing+"/"+r.Method] = i
			if r.Mean == nil || r.P99 == nil || *r.Mean <= 0 || *r.P99 < *r.Mean*0.999 {
				t.Fatalf("%s: row %+v lacks or misorders its figures", wl, r)
			}
		}
		if got := strings.Join(names, ","); got != "none/recompute,session/kv,session/hidden,session/scheduled,prefix/kv,prefix/hidden,prefix/scheduled" {
			t.Fatalf("%s: rows %s", wl, got)
		}
		s, p := res.Rows[rows["session/kv"]], res.Rows[rows["prefix/kv"]]
		if p.Hit < s.Hit || p.Storage > s.Storage {
			t.Errorf("%s: prefix kv hit %.3f storage %.0f against session %.3f %.0f", wl, p.Hit, p.Storage, s.Hit, s.Storage)
		}
	}
	cases := []struct {
		args []string
		want string
	}{
		{[]string{"simulate", "prefix", "--workload", "long"}, "want one of [agent chat docqa]"},
		{[]string{"simulate", "prefix", "--scale", "0"}, "--scale 0"},
		{[]string{"simulate", "prefix", "--group", "0"}, "group of 0"},
		{[]string{"simulate", "prefix", "--profile", "tpu-v9"}, "h200-nvme"},
	}
	for _, c := range cases {
		code, _, errs := runCLI(c.args...)
		if code == 0 || !strings.Contains(errs, c.want) {
			t.Errorf("%v: exit %d, stderr %q; want an error naming %q", c.args, code, errs, c.want)
		}
	}
}

// TestBenchPrefixJSON: a small run prints the build, the command and one
// row per system; bad flags are refused by name.
func TestBenchPrefixJSON(t *testing.T) {
	code, out, errs := runCLI("bench", "prefix", "--dir", t.TempDir(), "--workload", "agent", "--scale", "0.05", "--layers", "1", "--row-bytes", "64",
		"--systems", "file-per-chunk-hash", "--lookup-groups", "1000", "--lookup-tokens", "2048", "--json")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, errs)
	}
	var res struct {
		Build   string `json:"build"`
		Command string `json:"command"`
		Systems []struct {
			System         string  `json:"system"`
			DiskOverUnique float64 `json:"disk_over_unique"`
			HitRate        float64 `json:"hit_rate"`
			Lookup         *struct {
				P99 float64 `json:"p99_us"`
			} `json:"lookup_at_scale"`
		} `json:"systems"`
	}
	if err := json.Unmarshal([]byte(out), &res); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	if !strings.HasPrefix(res.Build, "hcache") || !strings.Contains(res.Command, "--workload agent") || len(res.Systems) != 1 ||
		res.Systems[0].System != "file-per-chunk-hash" || res.Systems[0].DiskOverUnique != 1 || res.Systems[0].HitRate <= 0 || res.Systems[0].Lookup == nil {
		t.Fatalf("output %s", out)
	}
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"bench", "prefix", "--workload", "long"}, "want one of [agent chat docqa]"},
		{[]string{"bench", "prefix", "--systems", "redis"}, "unknown system \"redis\""},
		{[]string{"bench", "prefix", "--verify-every", "0"}, "--verify-every 0"},
	} {
		code, _, errs := runCLI(c.args...)
		if code == 0 || !strings.Contains(errs, c.want) {
			t.Errorf("%v: exit %d, stderr %q; want an error naming %q", c.args, code, errs, c.want)
		}
	}
}
