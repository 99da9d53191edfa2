package main

import (
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestBenchCompareTiny runs the comparison on a tiny model and workload
// (every system, two concurrency levels, a two-point fio sweep) and checks
// the JSON, the plots and the report: well formed, every system present,
// every row plausible, ratios consistent with the rows. No timing is
// asserted.
func TestBenchCompareTiny(t *testing.T) {
	for _, tool := range []string{"fio", "redis-server"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s is required (.ci/run installs it)", tool)
		}
	}
	for _, wl := range []string{"chat", "long"} {
		t.Run(wl, func(t *testing.T) {
			out := filepath.Join(t.TempDir(), "results")
			args := []string{"bench", "compare", "--model", "tiny-llama", "--workload", wl, "--json", "--dir", t.TempDir(), "--out", out,
				"--layers", "3", "--conversations", "3", "--docs", "2", "--questions", "2", "--min-doc", "300", "--max-doc", "700",
				"--concurrency", "1,2", "--recompute-max", "2", "--seed", "5",
				"--sweep-size", "8M", "--sweep-bs", "256K", "--sweep-qd", "1,2", "--sweep-runtime", "150ms"}
			code, stdout, stderr := runCLI(args...)
			if code != 0 {
				t.Fatalf("exit %d\n%s", code, stderr)
			}
			var res struct {
				Layers int `json:"layers"`
				Rows   []struct {
					System          string   `json:"system"`
					Concurrency     int      `json:"concurrency"`
					Restores        int      `json:"restores"`
					RestoreMSMedian *float64 `json:"restore_ms_median"`
					RestoreMSP99    *float64 `json:"restore_ms_p99"`
					SaveGBps        *float64 `json:"save_gbps"`
					BytesOnDisk     *int64   `json:"bytes_on_disk"`
					BytesInMemory   int64    `json:"bytes_in_memory"`
				} `json:"rows"`
				Ratios  map[string]float64 `json:"ratios"`
				Targets []struct {
					Name string  `json:"name"`
					Got  float64 `json:"got"`
				} `json:"targets"`
				Plots  []string `json:"plots"`
				Report string   `json:"report"`
				RunID  string   `json:"run_id"`
			}
			if err := json.Unmarshal([]byte(stdout), &res); err != nil {
				t.Fatalf("output is not JSON: %v\n%s", err, stdout)
			}
			if res.Layers != 3 {
				t.Errorf("layers %d, want the 3 asked", res.Layers)
			}
			seen := map[string]int{}
			disk := map[string]int64{}
			for _, r := range res.Rows {
				if r.RestoreMSMedian == nil || r.RestoreMSP99 == nil || r.SaveGBps == nil || r.BytesOnDisk == nil {
					t.Fatalf("row %s c=%d lacks a required field", r.System, r.Concurrency)
				}
				seen[r.System]++
				if r.Restores == 0 || *r.RestoreMSMedian <= 0 || *r.RestoreMSP99 < *r.RestoreMSMedian {
					t.Errorf("%s c=%d: %d restores, median %v, p99 %v", r.System, r.Concurrency, r.Restores, *r.RestoreMSMedian, *r.RestoreMSP99)
				}
				switch r.System {
				case "redis", "hcache-dram":
					if r.BytesInMemory <= 0 {
						t.Errorf("%s: no bytes in memory", r.System)
					}
				case "recompute", "limit-dram":
				default:
					if *r.BytesOnDisk <= 0 {
						t.Errorf("%s: no bytes on disk", r.System)
					}
				}
				if r.Concurrency == 1 {
					disk[r.System] = *r.BytesOnDisk
				}
			}
			want := map[string]int{"hcache": 2, "hcache-kv": 2, "hcache-dram": 2, "file-per-chunk": 2, "pebble-blob": 2, "redis": 2,
				"recompute": 1, "limit-disk": 1, "limit-dram": 1}
			for s, n := range want {
				if seen[s] != n {
					t.Errorf("system %s has %d rows, want %d", s, seen[s], n)
				}
			}
			// hidden rows are half the K||V rows for this MHA shape; bytes
			// on disk are allocated bytes, and each store's index holds a
			// preallocated Pebble WAL (about 4 MiB) that dwarfs this tiny
			// run's rows, so only the direction is checked here (full runs
			// report about 0.5).
			if got, ok := res.Ratios["bytes_on_disk_hcache_over_hcache_kv"]; !ok || got != float64(disk["hcache"])/float64(disk["hcache-kv"]) || got >= 0.95 {
				t.Errorf("bytes ratio %v (present %v), disk hcache %d, hcache-kv %d", got, ok, disk["hcache"], disk["hcache-kv"])
			}
			if len(res.Targets) != 5 {
				t.Errorf("%d targets, want the 5 of an MHA model", len(res.Targets))
			}
			if len(res.Plots) != 3 {
				t.Fatalf("plots %v, want restore at c=1 and c=2 and bytes", res.Plots)
			}
			for _, p := range res.Plots {
				b, err := os.ReadFile(p)
				if err != nil || !bytes.HasPrefix(b, []byte("\x89PNG\r\n\x1a\n")) || len(b) < 2000 {
					t.Errorf("plot %s: not a PNG (%d bytes, %v)", p, len(b), err)
				}
			}
			md, err := os.ReadFile(res.Report)
			if err != nil {
				t.Fatal(err)
			}
			for _, s := range []string{"## Verdict", "fastest is", "| hcache | 1 |", "| redis | 2 |", "machine:", "commit:", "scaled down", "## Design targets"} {
				if !bytes.Contains(md, []byte(s)) {
					t.Errorf("report lacks %q", s)
				}
			}
			// Every file is named with the run id, so that no run
			// overwrites another.
			if res.RunID == "" || filepath.Dir(res.Report) != out || !strings.HasSuffix(res.Report, "-tiny-llama-"+wl+"-"+res.RunID+".md") {
				t.Errorf("report at %s (run id %q)", res.Report, res.RunID)
			}
			files, _ := os.ReadDir(out)
			for _, f := range files {
				if !strings.Contains(f.Name(), res.RunID) {
					t.Errorf("%s lacks the run id %s", f.Name(), res.RunID)
				}
			}
		})
	}
	if code, _, errs := runCLI("bench", "compare", "--workload", "nope", "--sweep=false", "--out", ""); code == 0 || !strings.Contains(errs, "chat or long") {
		t.Errorf("a bad workload: exit %d, %q", code, errs)
	}
	if code, _, errs := runCLI("bench", "compare", "--systems", "hcache,memcached", "--sweep=false", "--out", ""); code == 0 || !strings.Contains(errs, "memcached") {
		t.Errorf("an unknown system: exit %d, %q", code, errs)
	}
}
