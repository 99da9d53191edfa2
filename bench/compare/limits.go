package compare

import (
	"bufio"
	"fmt"
	"os"
	"runtime"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// MemcpyGBps is the best of five single-goroutine copies of n bytes between
// two buffers already touched: the DRAM tiers' limit.
func MemcpyGBps(n int) float64 {
	a, b := make([]byte, n), make([]byte, n)
	for i := range a {
		a[i] = byte(i)
	}
	copy(b, a)
	best := 0.0
	for i := 0; i < 5; i++ {
		t := time.Now()
		copy(b, a)
		best = max(best, float64(n)/time.Since(t).Seconds()/1e9)
	}
	return best
}

// addLimits adds the rows of the limits: every restore request of the
// workload at the fio best-of read bandwidth (limit-disk) and at memory copy
// bandwidth (limit-dram), for hcache's own bytes (bytesPerToken).
func (r *Result) addLimits(w *Workload, bytesPerToken int) {
	var reqs []int
	for _, ph := range w.Phases {
		for _, s := range ph.Streams {
			for _, q := range s {
				if q.Restore > 0 {
					reqs = append(reqs, q.Restore)
				}
			}
		}
	}
	raw := r.TokensStored * int64(bytesPerToken)
	add := func(name string, gbps, saveGBps float64, note string, disk bool) {
		var ms []float64
		for _, n := range reqs {
			v := float64(n) * float64(bytesPerToken) / (gbps * 1e9) * 1e3
			ms = append(ms, v)
			r.Points = append(r.Points, Point{System: name, Concurrency: 1, Tokens: n, MS: v})
		}
		row := Row{System: name, Concurrency: 1, Restores: len(ms), RestoreMSMedian: quantile(ms, 0.5), RestoreMSP99: quantile(ms, 0.99),
			RestoreGBps: gbps, SaveGBps: saveGBps, BytesPerToken: float64(bytesPerToken), Note: note}
		if disk {
			row.BytesOnDisk = raw
		} else {
			row.BytesInMemory = raw
		}
		r.Rows = append(r.Rows, row)
	}
	if s := r.FioSweep; s != nil {
		add("limit-disk", s.BestRead.GBps, s.BestWrite.GBps, fmt.Sprintf("hcache's bytes at the fio best-of: read %.2f GB/s (bs %d, QD %d, %s), write %.2f GB/s (bs %d, QD %d)",
			s.BestRead.GBps, s.BestRead.BS, s.BestRead.QD, s.BestRead.Mem, s.BestWrite.GBps, s.BestWrite.BS, s.BestWrite.QD), true)
	}
	add("limit-dram", r.MemcpyGBps, r.MemcpyGBps, fmt.Sprintf("hcache's bytes at one core's memory copy bandwidth (%.1f GB/s)", r.MemcpyGBps), false)
}

// ratios fills Ratios and Targets.
func (r *Result) ratios() {
	med := func(s string, c int) float64 {
		if row := r.Row(s, c); row != nil {
			return row.RestoreMSMedian
		}
		return 0
	}
	put := func(k string, a, b float64) float64 {
		if a > 0 && b > 0 {
			r.Ratios[k] = a / b
			return a / b
		}
		return 0
	}
	conc := map[int]bool{}
	for _, row := range r.Rows {
		if row.System != "limit-disk" && row.System != "limit-dram" {
			conc[row.Concurrency] = true
		}
	}
	maxC := 0
	for c := range conc {
		maxC = max(maxC, c)
	}
	peers := []string{"hcache-kv", "file-per-chunk", "pebble-blob", "redis"}
	for c := range conc {
		for _, p := range peers {
			put(fmt.Sprintf("restore_median_hcache_over_%s_c%d", key(p), c), med("hcache", c), med(p, c))
			put(fmt.Sprintf("restore_median_hcache_dram_over_%s_c%d", key(p), c), med("hcache-dram", c), med(p, c))
			if a, b := r.Row("hcache-dram", c), r.Row(p, c); a != nil && b != nil {
				put(fmt.Sprintf("burst_throughput_hcache_dram_over_%s_c%d", key(p), c), a.BurstTokPerS, b.BurstTokPerS)
			}
			if a, b := r.Row("hcache", c), r.Row(p, c); a != nil && b != nil {
				put(fmt.Sprintf("burst_throughput_hcache_over_%s_c%d", key(p), c), a.BurstTokPerS, b.BurstTokPerS)
			}
		}
	}
	if h := r.Row("hcache", 1); h != nil {
		for _, p := range []string{"hcache-kv", "file-per-chunk", "pebble-blob"} {
			if b := r.Row(p, 1); b != nil {
				put("bytes_on_disk_hcache_over_"+key(p), float64(h.BytesOnDisk), float64(b.BytesOnDisk))
			}
		}
		if l := r.Row("limit-disk", 1); l != nil && h.RestoreGBps > 0 {
			// Time to restore hcache's bytes against the same bytes at
			// the fio best-of read bandwidth.
			put("restore_time_hcache_over_fio_best_c1", l.RestoreGBps, h.RestoreGBps)
			// The same by medians: the limit row's median is the
			// median of the same restores' bytes at that bandwidth.
			put("restore_median_hcache_over_fio_best_c1", h.RestoreMSMedian, l.RestoreMSMedian)
		}
	}
	// Restores with saves in the mix against restores alone (the long
	// workload's two question phases), and against file-per-chunk's with
	// saves in the mix (issue 20).
	phaseMed := func(sys string, c int, phase string) float64 {
		if row := r.Row(sys, c); row != nil {
			if p := row.Phase(phase); p != nil && p.Restores > 0 {
				return p.RestoreMSMedian
			}
		}
		return 0
	}
	for c := range conc {
		put(fmt.Sprintf("restore_median_with_saves_over_alone_hcache_c%d", c), phaseMed("hcache", c, PhaseMixed), phaseMed("hcache", c, PhaseAgain))
		put(fmt.Sprintf("restore_median_with_saves_hcache_over_file_per_chunk_c%d", c), phaseMed("hcache", c, PhaseMixed), phaseMed("file-per-chunk", c, PhaseMixed))
		put(fmt.Sprintf("restore_median_with_saves_over_alone_hcache_noprio_c%d", c), phaseMed("hcache-noprio", c, PhaseMixed), phaseMed("hcache-noprio", c, PhaseAgain))
		put(fmt.Sprintf("restore_median_alone_hcache_over_hcache_noprio_c%d", c), phaseMed("hcache", c, PhaseQuestions), phaseMed("hcache-noprio", c, PhaseQuestions))
		put(fmt.Sprintf("restore_median_alone_hcache_over_file_per_chunk_c%d", c), phaseMed("hcache", c, PhaseQuestions), phaseMed("file-per-chunk", c, PhaseQuestions))
		put(fmt.Sprintf("restore_median_with_saves_hcache_over_hcache_noprio_c%d", c), phaseMed("hcache", c, PhaseMixed), phaseMed("hcache-noprio", c, PhaseMixed))
	}
	if conc[16] {
		r.target("hcache restore median with saves in the mix <= 1.3 x its own restores alone, buffers equally warm (c=16)", "<= 1.3", "restore_median_with_saves_over_alone_hcache_c16", func(v float64) bool { return v <= 1.3 })
		r.target("hcache restore median with saves in the mix <= 0.8 x file-per-chunk's (c=16)", "<= 0.8", "restore_median_with_saves_hcache_over_file_per_chunk_c16", func(v float64) bool { return v <= 0.8 })
	}
	if r.Plan == "hidden" {
		r.target("hcache restore median <= 0.55 x hcache-kv (c=1)", "<= 0.55", "restore_median_hcache_over_hcache_kv_c1", func(v float64) bool { return v <= 0.55 })
		r.target("hcache restore median <= 0.5 x file-per-chunk (c=1)", "<= 0.5", "restore_median_hcache_over_file_per_chunk_c1", func(v float64) bool { return v <= 0.5 })
		r.target("hcache bytes on disk <= 0.52 x hcache-kv", "<= 0.52", "bytes_on_disk_hcache_over_hcache_kv", func(v float64) bool { return v <= 0.52 })
		r.target("hcache restore within 1.15 x its bytes at the fio best-of read bandwidth (c=1)", "<= 1.15", "restore_time_hcache_over_fio_best_c1", func(v float64) bool { return v <= 1.15 })
		r.target(fmt.Sprintf("hcache DRAM-tier restore throughput >= 2 x redis (c=%d)", maxC), ">= 2",
			fmt.Sprintf("burst_throughput_hcache_dram_over_redis_c%d", maxC), func(v float64) bool { return v >= 2 })
	} else {
		for c := range conc {
			best, bestName := 0.0, ""
			for _, p := range []string{"file-per-chunk", "pebble-blob", "redis"} {
				if m := med(p, c); m > 0 && (best == 0 || m < best) {
					best, bestName = m, p
				}
			}
			if h := med("hcache", c); h > 0 && best > 0 {
				k := fmt.Sprintf("restore_median_hcache_over_best_peer_c%d", c)
				r.Ratios[k] = h / best
				r.target(fmt.Sprintf("hcache (plan %s) restore median never slower than the best peer (%s, c=%d)", r.Plan, bestName, c), "<= 1", k, func(v float64) bool { return v <= 1 })
			}
		}
	}
}

func (r *Result) target(name, want, k string, ok func(float64) bool) {
	v, have := r.Ratios[k]
	if !have {
		return
	}
	r.Targets = append(r.Targets, Target{Name: name, Want: want, Got: v, Met: ok(v)})
}

func key(s string) string { return strings.ReplaceAll(s, "-", "_") }

// LoadAvg is the 1-minute load average (0 if unknown).
func LoadAvg() float64 {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return 0
	}
	var v float64
	fmt.Sscan(string(b), &v)
	return v
}

// Machine describes the machine: CPU, cores, memory, kernel, and the file
// system and device under dir.
func Machine(dir string) string {
	cpu := "unknown CPU"
	if f, err := os.Open("/proc/cpuinfo"); err == nil {
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			if v, ok := strings.CutPrefix(sc.Text(), "model name"); ok {
				cpu = strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(v), ":"))
				break
			}
		}
		f.Close()
	}
	mem := ""
	var si unix.Sysinfo_t
	if unix.Sysinfo(&si) == nil {
		mem = fmt.Sprintf(", %.0f GiB RAM", float64(si.Totalram)*float64(si.Unit)/(1<<30))
	}
	kernel := ""
	var u unix.Utsname
	if unix.Uname(&u) == nil {
		kernel = ", Linux " + unix.ByteSliceToString(u.Release[:])
	}
	fs := ""
	if f, err := os.Open("/proc/mounts"); err == nil {
		best := ""
		sc := bufio.NewScanner(f)
		abs := dir
		for sc.Scan() {
			m := strings.Fields(sc.Text())
			if len(m) >= 3 && strings.HasPrefix(abs, m[1]) && len(m[1]) > len(best) {
				best, fs = m[1], fmt.Sprintf(", %s on %s (%s)", m[2], m[0], m[1])
			}
		}
		f.Close()
	}
	return fmt.Sprintf("%s, %d cores%s%s%s", cpu, runtime.NumCPU(), mem, kernel, fs)
}
