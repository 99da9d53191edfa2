package compare

import (
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
)

// Write draws the plots and writes the Markdown report into dir as
// <date>-<model>-<workload>.md and .png files beside it; cmdline is the
// command that produced r.
func Write(r *Result, dir, cmdline string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	base := fmt.Sprintf("%s-%s-%s", r.Date, r.Model, r.Workload)
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
	return os.WriteFile(r.Report, []byte(Markdown(r, cmdline)), 0o644)
}

// Markdown renders the report.
func Markdown(r *Result, cmdline string) string {
	var b strings.Builder
	f := func(format string, a ...any) { fmt.Fprintf(&b, format, a...) }
	f("# bench compare: %s, %s workload\n\n", r.Model, r.Workload)
	f("- date: %s\n- commit: %s\n- machine: %s\n- command: `%s`\n- elapsed: %.0f s\n", r.Date, r.Commit, r.Machine, cmdline, r.ElapsedS)
	f("- load average (1 min) at start / end: %.1f / %.1f (the machine is shared; above its core count every system slows, unevenly)\n", r.LoadAvg[0], r.LoadAvg[1])
	f("- **scaled down**: %s. Contexts stored: %d tokens in all.\n", r.Scale, r.TokensStored)
	f("- hcache's plan: %s per layer (`sched.DefaultPlan`)\n", r.Plan)
	if s := r.FioSweep; s != nil {
		f("- disk limit (fio sweep, same run, %s per point, %d MiB file): %s\n", s.Runtime, s.SizeBytes>>20, s)
	}
	f("- memory copy (one core): %.1f GB/s\n\n", r.MemcpyGBps)
	f("Workload:\n\n")
	for _, p := range r.Params {
		f("- %s\n", p)
	}
	f("\nRestore times are per request, from the call to the last layer handed over in host memory (state ready to copy to a GPU; hcache's K/V projection from hidden states is not included: on a GPU it overlaps the next layer's read, see DESIGN.md). Cold reads: hcache uses O_DIRECT; peers that read through the page cache have it dropped for the context before each restore (untimed). `burst` restores every context once, c at a time. `save_gbps` is each system's own bytes (hidden states for hcache) over the time in save calls.\n\n")
	f("| system | c | restores | restore ms median | p99 | restore GB/s | burst tokens/s | save ms median | save GB/s | bytes on disk | bytes in memory | bytes/token |\n")
	f("|---|---|---|---|---|---|---|---|---|---|---|---|\n")
	for _, row := range r.Rows {
		f("| %s | %d | %d | %.2f | %.2f | %.2f | %.0f | %.2f | %.2f | %d | %d | %.0f |\n", row.System, row.Concurrency, row.Restores,
			row.RestoreMSMedian, row.RestoreMSP99, row.RestoreGBps, row.BurstTokPerS, row.SaveMSMedian, row.SaveGBps, row.BytesOnDisk, row.BytesInMemory, row.BytesPerToken)
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
		f("\nTargets:\n\n| target | want | got | met |\n|---|---|---|---|\n")
		for _, t := range r.Targets {
			met := "yes"
			if !t.Met {
				met = "**no**"
			}
			f("| %s | %s | %.3f | %s |\n", t.Name, t.Want, t.Got, met)
		}
	}
	f("\nRatios:\n\n| ratio | value |\n|---|---|\n")
	var ks []string
	for k := range r.Ratios {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	for _, k := range ks {
		f("| %s | %.3f |\n", k, r.Ratios[k])
	}
	if len(r.Plots) > 0 {
		f("\n")
		for _, p := range r.Plots {
			f("![%s](%s)\n", filepath.Base(p), filepath.Base(p))
		}
	}
	return b.String()
}
