package compare

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
)

// BaseName is the name every file of a run starts with:
// <date>-<model>-<workload>-<run id>, so that no run overwrites another.
func (r *Result) BaseName() string {
	return fmt.Sprintf("%s-%s-%s-%s", r.Date, r.Model, r.Workload, r.RunID)
}

// Write draws the plots, writes the Markdown report and the raw JSON (the
// result and every timed request) into dir, each named BaseName() plus a
// suffix; cmdline is the command that produced r.
func Write(r *Result, dir, cmdline string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	base := r.BaseName()
	r.Plots = nil
	conc := map[int]bool{}
	for _, row := range r.Rows {
		conc[row.Concurrency] = true
	}
	var cs []int
	for c := range conc {
		cs = append(cs, c)
	}
	sort.Ints(cs)
	for _, c := range cs {
		path := filepath.Join(dir, fmt.Sprintf("%s-restore-c%d.png", base, c))
		if err := PlotRestore(r, c, path); err != nil {
			return err
		}
		r.Plots = append(r.Plots, path)
	}
	path := filepath.Join(dir, base+"-bytes.png")
	if err := PlotBytes(r, path); err != nil {
		return err
	}
	r.Plots = append(r.Plots, path)
	r.Report = filepath.Join(dir, base+".md")
	r.Raw = filepath.Join(dir, base+".json")
	raw, err := json.MarshalIndent(struct {
		*Result
		Samples []Point `json:"samples"`
	}{r, r.Points}, "", "  ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(r.Raw, append(raw, '\n'), 0o644); err != nil {
		return err
	}
	return os.WriteFile(r.Report, []byte(Markdown(r, cmdline)), 0o644)
}

// stores are the systems that keep the state somewhere and read it back
// (not the computed limits, not recomputation of another model).
var stores = []string{"hcache", "hcache-kv", "hcache-dram", "file-per-chunk", "pebble-blob", "redis"}

// Verdict is the report's opening: which system restores fastest at each
// concurrency and by how much, what hcache stores against KV, how close it
// comes to the disk, and when hcache is the wrong choice.
func Verdict(r *Result) []string {
	var out []string
	var cs []int
	seen := map[int]bool{}
	for _, row := range r.Rows {
		if !seen[row.Concurrency] && row.System != "limit-disk" && row.System != "limit-dram" && row.System != "recompute" {
			seen[row.Concurrency] = true
			cs = append(cs, row.Concurrency)
		}
	}
	sort.Ints(cs)
	for _, c := range cs {
		type entry struct {
			name string
			ms   float64
		}
		var es []entry
		for _, s := range stores {
			if row := r.Row(s, c); row != nil && row.RestoreMSMedian > 0 {
				es = append(es, entry{s, row.RestoreMSMedian})
			}
		}
		if len(es) == 0 {
			continue
		}
		sort.Slice(es, func(i, j int) bool { return es[i].ms < es[j].ms })
		line := fmt.Sprintf("Restore, concurrency %d: fastest is **%s** (median %.1f ms a request)", c, es[0].name, es[0].ms)
		if len(es) > 1 {
			line += fmt.Sprintf(", %.2fx faster than the next, %s (%.1f ms)", es[1].ms/es[0].ms, es[1].name, es[1].ms)
		}
		// hcache from disk against the best system that also reads a disk.
		if h := r.Row("hcache", c); h != nil && es[0].name != "hcache" {
			best, bestName := 0.0, ""
			for _, e := range es {
				if e.name != "hcache" && e.name != "hcache-dram" && e.name != "redis" {
					best, bestName = e.ms, e.name
					break
				}
			}
			if best > 0 {
				if h.RestoreMSMedian <= best {
					line += fmt.Sprintf("; from disk, hcache (%.1f ms) is %.2fx faster than the fastest disk peer, %s", h.RestoreMSMedian, best/h.RestoreMSMedian, bestName)
				} else {
					line += fmt.Sprintf("; from disk, hcache (%.1f ms) is %.2fx slower than %s", h.RestoreMSMedian, h.RestoreMSMedian/best, bestName)
				}
			}
		}
		out = append(out, line+".")
	}
	if v, ok := r.Ratios["bytes_on_disk_hcache_over_hcache_kv"]; ok {
		if r.Plan == "hidden" {
			out = append(out, fmt.Sprintf("Space: hcache stores hidden states, %.2fx the bytes of the same contexts kept as K and V (hcache-kv).", v))
		} else {
			out = append(out, fmt.Sprintf("Space: for %s a layer's K and V are smaller than its hidden state (grouped-query attention), so hcache's plan stores %s and takes %.2fx hcache-kv's bytes: the hidden-state saving does not apply.", r.Model, r.Plan, v))
		}
	}
	if v, ok := r.Ratios["restore_time_hcache_over_fio_best_c1"]; ok {
		out = append(out, fmt.Sprintf("Against the disk: an hcache restore takes %.2fx the time fio's best read of the same bytes takes (1.00 = the disk's limit).", v))
		if m, ok := r.Ratios["restore_median_hcache_over_fio_best_c1"]; ok {
			first := ""
			if h := r.Row("hcache", 1); h != nil && h.RestoreMSFirst > 0 {
				first = fmt.Sprintf("; the first restore, its buffers mapped cold, took %.0f ms", h.RestoreMSFirst)
			}
			out = append(out, fmt.Sprintf("By medians (a cold start weighs one restore, not its seconds): %.2fx%s.", m, first))
		}
	}
	wrong := "When hcache is the wrong choice: "
	var why []string
	if r.Plan != "hidden" {
		why = append(why, fmt.Sprintf("with a GQA model such as %s, storing hidden states would cost more bytes than K and V, so hcache is a KV store here and wins only by its I/O path", r.Model))
	} else {
		why = append(why, "with a GQA model (e.g. llama3-8b), where hidden states are larger than K and V")
	}
	if d, h := r.Row("redis", 1), r.Row("hcache", 1); d != nil && h != nil && d.RestoreMSMedian < h.RestoreMSMedian {
		why = append(why, fmt.Sprintf("when the working set fits in DRAM: redis restores %.2fx faster than hcache from disk at c=1 (hcache's own DRAM tier, hcache-dram, is in the table)", h.RestoreMSMedian/d.RestoreMSMedian))
	} else {
		why = append(why, "when the working set fits in DRAM, a memory store avoids the disk altogether")
	}
	why = append(why, "without a GPU: the times above end with the rows in host memory; rebuilding K and V from hidden states costs one GEMM per layer, which on a GPU overlaps the next layer's read but on a CPU dominates")
	out = append(out, wrong+strings.Join(why, "; ")+".")
	return out
}

// Summary is what `bench compare` prints without --json: the verdict and
// where the report, the plots and the raw JSON are.
func Summary(r *Result) string {
	var b strings.Builder
	fmt.Fprintf(&b, "bench compare %s, %s workload (%s), run %s\n\n", r.Model, r.Workload, r.Scale, r.RunID)
	for _, v := range Verdict(r) {
		fmt.Fprintf(&b, "- %s\n", strings.ReplaceAll(v, "**", ""))
	}
	if r.Report != "" {
		fmt.Fprintf(&b, "\nreport: %s\nraw JSON (every row and request): %s\n", r.Report, r.Raw)
		for _, p := range r.Plots {
			fmt.Fprintf(&b, "plot: %s\n", p)
		}
	}
	return b.String()
}

// Markdown renders the report: the verdict first, then how to read the
// figures, the setup, the table, and the raw ratios last.
func Markdown(r *Result, cmdline string) string {
	var b strings.Builder
	f := func(format string, a ...any) { fmt.Fprintf(&b, format, a...) }
	f("# bench compare: %s, %s workload (run %s)\n\n", r.Model, r.Workload, r.RunID)
	f("## Verdict\n\n")
	for _, v := range Verdict(r) {
		f("- %s\n", v)
	}
	f("\nThe model is **scaled down**: %s. Restore times are per request, cold (see below), on the machine described below; a different disk or a loaded machine moves every number.\n\n", r.Scale)
	if len(r.Plots) > 0 {
		f("## Figures\n\n")
		f("- `*-restore-cN.png`: restore time of each request (faint points) against its context length at concurrency N, and the median of each length bin (line), one colour and marker per system, log scale. The limits (dashed) are hcache's bytes at fio's best read bandwidth (limit-disk) and at memory copy speed (limit-dram). Recomputation is left out: it runs a different, tiny model on the CPU (its row is in the table).\n")
		f("- `*-bytes.png`: bytes each system keeps per token (on disk; in memory for redis, hcache-dram and limit-dram).\n")
		if r.Raw != "" {
			f("- raw output: `%s` (this result and every timed request, `samples`).\n", filepath.Base(r.Raw))
		}
		f("\n")
		for _, p := range r.Plots {
			f("![%s](%s)\n", filepath.Base(p), filepath.Base(p))
		}
		f("\n")
	}
	f("## Setup\n\n")
	f("- date: %s\n- commit: %s\n- machine: %s\n- command: `%s`\n- elapsed: %.0f s\n", r.Date, r.Commit, r.Machine, cmdline, r.ElapsedS)
	f("- load average (1 min) at start / end: %.1f / %.1f (the machine is shared; above its core count every system slows, unevenly)\n", r.LoadAvg[0], r.LoadAvg[1])
	f("- contexts stored: %d tokens in all\n", r.TokensStored)
	f("- hcache's plan: %s per layer (`sched.DefaultPlan`)\n", r.Plan)
	if s := r.FioSweep; s != nil {
		f("- disk limit (fio sweep, same run, %s per point, %d MiB file): %s\n", s.Runtime, s.SizeBytes>>20, s)
	}
	f("- memory copy (one core): %.1f GB/s\n\n", r.MemcpyGBps)
	f("Workload:\n\n")
	for _, p := range r.Params {
		f("- %s\n", p)
	}
	f("\n## Results\n\n")
	f("Restore times are per request, from the call to the last layer handed over in host memory (state ready to copy to a GPU; hcache's K/V projection from hidden states is not included: on a GPU it overlaps the next layer's read, see DESIGN.md). Cold reads: hcache uses O_DIRECT; peers that read through the page cache have it dropped for the context before each restore (untimed). `burst` restores every context once, c at a time. `save_gbps` is each system's own bytes (hidden states for hcache) over the time in save calls. Bytes on disk are allocated bytes (st_blocks), index included.\n\n")
	f("| system | c | restores | restore ms median | p99 | first | restore GB/s | burst tokens/s | save ms median | save GB/s | bytes on disk | bytes in memory | bytes/token | codec |\n")
	f("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
	for _, row := range r.Rows {
		codec := row.Codec
		if codec == "" {
			codec = "-"
		}
		f("| %s | %d | %d | %.2f | %.2f | %.2f | %.2f | %.0f | %.2f | %.2f | %d | %d | %.0f | %s |\n", row.System, row.Concurrency, row.Restores,
			row.RestoreMSMedian, row.RestoreMSP99, row.RestoreMSFirst, row.RestoreGBps, row.BurstTokPerS, row.SaveMSMedian, row.SaveGBps, row.BytesOnDisk, row.BytesInMemory, row.BytesPerToken, codec)
	}
	phased := false
	for _, row := range r.Rows {
		phased = phased || len(row.Phases) > 1
	}
	if phased {
		f("\nRestores by phase (restores alone, and with saves in the mix); for hcache, where a restore's time went, in ms per restore (admission queue, buffers, submission, reads summed over layers, checksums; chunk.Store.RestoreStages):\n\n")
		f("| system | c | phase | restores | restore ms median | p99 | saves | save ms median | queued | buffer | submit | read | verify |\n")
		f("|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
		for _, row := range r.Rows {
			for _, p := range row.Phases {
				if p.Restores == 0 {
					continue
				}
				st := "| | | | | "
				if g := p.Stages; g != nil {
					st = fmt.Sprintf("| %.1f | %.1f | %.1f | %.1f | %.1f ", g.Queued, g.Buffer, g.Submit, g.Read, g.Verify)
				}
				f("| %s | %d | %s | %d | %.2f | %.2f | %d | %.2f %s|\n", row.System, row.Concurrency, p.Name, p.Restores, p.RestoreMSMedian, p.RestoreMSP99, p.Saves, p.SaveMSMedian, st)
			}
		}
	}
	f("\nNotes per system:\n\n")
	seen := map[string]bool{}
	for _, row := range r.Rows {
		if !seen[row.System] && row.Note != "" {
			seen[row.System] = true
			f("- %s: %s\n", row.System, row.Note)
		}
	}
	if len(r.Targets) > 0 {
		f("\n## Design targets\n\nWhat hcache is built to reach on this comparison (DESIGN.md, benchmarks, says why a missed one was missed):\n\n| target | want | got | met |\n|---|---|---|---|\n")
		for _, t := range r.Targets {
			met := "yes"
			if !t.Met {
				met = "**no**"
			}
			f("| %s | %s | %.3f | %s |\n", t.Name, t.Want, t.Got, met)
		}
	}
	f("\n<details><summary>Every ratio (also in the raw JSON)</summary>\n\n| ratio | value |\n|---|---|\n")
	var ks []string
	for k := range r.Ratios {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	for _, k := range ks {
		f("| %s | %.3f |\n", k, r.Ratios[k])
	}
	f("\n</details>\n")
	return b.String()
}
