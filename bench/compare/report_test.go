package compare

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// fakeResult is a result as Run makes it, without running anything: hcache
// restores faster than every disk peer, redis (DRAM) fastest of all.
func fakeResult(plan string) *Result {
	r := &Result{Model: "llama2-7b", Workload: "chat", Layers: 4, ModelLayers: 32, Scale: "4 of 32 layers", Plan: plan,
		Date: "2026-12-03", RunID: "081500-abcd", Ratios: map[string]float64{}}
	ms := map[string]float64{"hcache": 10, "hcache-kv": 19, "hcache-dram": 3, "file-per-chunk": 25, "pebble-blob": 40, "redis": 2, "recompute": 900}
	for _, c := range []int{1, 16} {
		for _, s := range []string{"hcache", "hcache-kv", "hcache-dram", "file-per-chunk", "pebble-blob", "redis", "recompute"} {
			if s == "recompute" && c != 1 {
				continue
			}
			m := ms[s] * float64(c)
			r.Rows = append(r.Rows, Row{System: s, Concurrency: c, Restores: 8, RestoreMSMedian: m, RestoreMSP99: 2 * m, BytesOnDisk: 1 << 20, BytesPerToken: 100})
			for i := 1; i <= 8; i++ {
				r.Points = append(r.Points, Point{System: s, Concurrency: c, Tokens: 100 * i, MS: m * float64(i) / 4})
			}
		}
	}
	r.Ratios["bytes_on_disk_hcache_over_hcache_kv"] = 0.5
	r.Ratios["restore_time_hcache_over_fio_best_c1"] = 1.1
	return r
}

// TestReport: the report opens with a verdict (who wins at each
// concurrency, by how much, when hcache is the wrong choice) before any
// table; it never speaks of "the issue"; every file Write makes carries the
// run id; the restore plots leave out the recompute row (another model).
func TestReport(t *testing.T) {
	cases := []struct {
		plan string
		want []string
	}{
		{"hidden", []string{"concurrency 1: fastest is **redis** (median 2.0 ms a request), 1.50x faster than the next, hcache-dram",
			"from disk, hcache (10.0 ms) is 1.90x faster than the fastest disk peer, hcache-kv",
			"0.50x the bytes", "When hcache is the wrong choice", "GQA"}},
		{"kv", []string{"the hidden-state saving does not apply", "When hcache is the wrong choice: with a GQA model such as llama2-7b"}},
	}
	for _, c := range cases {
		t.Run(c.plan, func(t *testing.T) {
			r := fakeResult(c.plan)
			dir := t.TempDir()
			if err := Write(r, dir, "hcache bench compare"); err != nil {
				t.Fatal(err)
			}
			md, err := os.ReadFile(r.Report)
			if err != nil {
				t.Fatal(err)
			}
			text := string(md)
			verdict, table := strings.Index(text, "## Verdict"), strings.Index(text, "| system |")
			if verdict < 0 || table < 0 || verdict > table {
				t.Fatalf("the verdict (at %d) must come before the table (at %d):\n%s", verdict, table, text)
			}
			for _, w := range c.want {
				if !strings.Contains(text[:table], w) {
					t.Errorf("the verdict lacks %q:\n%s", w, text[:table])
				}
			}
			if strings.Contains(strings.ToLower(text), "the issue") {
				t.Errorf("the report speaks of the issue")
			}
			files, _ := os.ReadDir(dir)
			if len(files) != 5 { // report, raw JSON, restore c=1 and c=16, bytes
				t.Errorf("%d files, want 5", len(files))
			}
			for _, f := range files {
				if !strings.Contains(f.Name(), r.RunID) {
					t.Errorf("%s lacks the run id %s", f.Name(), r.RunID)
				}
			}
			raw, err := os.ReadFile(filepath.Join(dir, r.BaseName()+".json"))
			if err != nil || !bytes.Contains(raw, []byte(`"samples"`)) || !bytes.Contains(raw, []byte(`"run_id": "081500-abcd"`)) {
				t.Errorf("raw JSON: %v\n%.300s", err, raw)
			}
			if s := Summary(r); !strings.Contains(s, "fastest is redis") || !strings.Contains(s, r.Report) || strings.Contains(s, "| system |") {
				t.Errorf("summary:\n%s", s)
			}
			names, _ := restoreSeries(r, 1)
			for _, n := range names {
				if n == "recompute" {
					t.Errorf("the restore plot draws recompute (a different model) beside %s", r.Model)
				}
			}
			if len(names) != 6 {
				t.Errorf("restore plot systems %v, want the 6 stores", names)
			}
		})
	}
	// No two systems look alike: each has its own colour and marker.
	colors, glyphs := map[any]string{}, map[any]string{}
	for name, st := range styles {
		if o, ok := colors[st.color]; ok {
			t.Errorf("%s and %s share a colour", name, o)
		}
		colors[st.color] = name
		if o, ok := glyphs[st.glyph]; ok && st.dashes == nil && styles[o].dashes == nil {
			t.Errorf("%s and %s share a marker", name, o)
		}
		glyphs[st.glyph] = name
	}
}
