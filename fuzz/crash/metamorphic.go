package crash

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"path/filepath"
	"strings"
)

// MemConfigs are the in-memory configurations Metamorphic runs by default:
// chunk sizes 3, 8, 16 and 64 tokens, lz4 on and off, the DRAM cache on and
// off, eager and lazy GC.
func MemConfigs() []Config {
	return []Config{
		{Name: "ct8"},
		{Name: "ct16-lz4", ChunkTokens: 16, LZ4: true},
		{Name: "ct64-nocache-eagergc", ChunkTokens: 64, NoCache: true, GCLiveRatio: 0.95},
		{Name: "ct3-lz4-nocache-lazygc", ChunkTokens: 3, LZ4: true, NoCache: true, GCLiveRatio: 0.1},
	}
}

// RealConfigs are configurations on real files under dir (no crash
// points): io_uring (or the fallback where the kernel refuses it) with
// O_DIRECT and the DRAM cache, the fallback engine with O_DIRECT and no
// cache, and the fallback engine through the page cache with the DRAM
// cache. O_DIRECT silently becomes buffered I/O on a file system that
// refuses it (tmpfs). The first one found that DRAM-tier hits were
// overwritten by O_DIRECT reads rounded up to whole blocks (seed 457033,
// TestSimulatedDirectCache; chunk's TestCacheHitsNotOverwrittenByDirectReads).
func RealConfigs(dir string) []Config {
	return []Config{
		{Name: "real-auto-direct-cache", ChunkTokens: 16, RealDir: filepath.Join(dir, "auto-direct"), Engine: "auto"},
		{Name: "real-fallback-direct-lz4", ChunkTokens: 8, LZ4: true, NoCache: true, RealDir: filepath.Join(dir, "fallback-direct"), Engine: "fallback"},
		{Name: "real-fallback-buffered", ChunkTokens: 64, RealDir: filepath.Join(dir, "fallback-buffered"), Engine: "fallback", NoDirect: true},
	}
}

// Metamorphic runs the same seeded workload (without injected torn writes,
// whose place depends on the configuration) on every configuration, checks
// each as Simulate does, and then requires every configuration to end each
// cycle with the same contexts restoring the same bytes. The report sums
// the configurations' reports; Mismatches counts cycles whose final states
// differ.
func Metamorphic(o SimOptions, configs []Config) *Report {
	o.NoFaults = true
	total := &Report{Seed: o.Seed}
	var first *Report
	var firstName string
	trace := sha256.New()
	for _, cfg := range configs {
		o.Config = cfg
		rep := Simulate(o)
		fmt.Fprintf(trace, "%s %s\n", cfg.label(), rep.Trace)
		total.Cycles += rep.Cycles
		total.CrashPoints += rep.CrashPoints
		total.AckedContexts += rep.AckedContexts
		total.LostAcked += rep.LostAcked
		total.TornServed += rep.TornServed
		total.FsckErrors += rep.FsckErrors
		total.LiveRecounted += rep.LiveRecounted
		total.RepairChecks += rep.RepairChecks
		total.TokContexts += rep.TokContexts
		total.Forks += rep.Forks
		total.TokensShared += rep.TokensShared
		total.AdversarialOps += rep.AdversarialOps
		for _, f := range rep.Failures {
			total.fail("%s: %s", cfg.label(), f)
		}
		if first == nil {
			first, firstName = rep, cfg.label()
			continue
		}
		for c := range max(len(first.finals), len(rep.finals)) {
			var a, b []string
			if c < len(first.finals) {
				a = first.finals[c]
			}
			if c < len(rep.finals) {
				b = rep.finals[c]
			}
			if d := diffLines(a, b); d != "" {
				total.Mismatches++
				total.fail("seed %d cycle %d: %s and %s restore different states: %s", o.Seed, c, firstName, cfg.label(), d)
			}
		}
	}
	total.Trace = hex.EncodeToString(trace.Sum(nil))[:16]
	return total
}

// diffLines describes how two sorted final states differ ("" if they do
// not).
func diffLines(a, b []string) string {
	in := func(s []string) map[string]bool {
		m := map[string]bool{}
		for _, x := range s {
			m[x] = true
		}
		return m
	}
	ma, mb := in(a), in(b)
	var only []string
	for _, x := range a {
		if !mb[x] {
			only = append(only, "only first: "+x)
		}
	}
	for _, x := range b {
		if !ma[x] {
			only = append(only, "only second: "+x)
		}
	}
	if len(only) > 4 {
		only = append(only[:4], fmt.Sprintf("and %d more", len(only)-4))
	}
	return strings.Join(only, "; ")
}
