package main

import (
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"time"

	"github.com/hcache/hcache/fuzz/crash"
)

func init() {
	register("crashtest", "crash-consistency harness: simulated power cuts and SIGKILLed writers", crashtest)
	register("stress", "writer process of the SIGKILL loop (prints each acknowledgement)", stress)
}

func crashtest(args []string, stdout, stderr io.Writer) error {
	fs := newFlags("crashtest", stderr)
	cycles := fs.Int("cycles", 10, "simulated workloads (each crashed at every sync point)")
	ops := fs.Int("ops", 200, "operations per simulated workload")
	seed := fs.Int64("seed", time.Now().UnixNano()%1000000, "seed (printed; replays the simulated run exactly, not the timing of SIGKILL cycles)")
	writeProb := fs.Float64("write-crash-prob", 0.05, "chance of an extra crash point at a write between syncs")
	syncProb := fs.Float64("sync-prob", 0, "chance that a sync is a crash point (0: every sync)")
	kill := fs.Int("kill", 0, "SIGKILL cycles against a real writer process")
	dir := fs.String("dir", "", "directory of the SIGKILL loop's store (default: a temporary one)")
	asJSON := fs.Bool("json", false, "print the report as JSON")
	metamorphic := fs.Bool("metamorphic", false, "run the simulated workloads on several store configurations (chunk tokens, lz4, DRAM cache, GC eagerness; real files with io_uring/fallback, O_DIRECT/buffered) and require the same final restored state from all")
	prefix := fs.Bool("prefix", false, "add token-addressed contexts to the simulated workloads (namespace tok): saves by tokens whose prompts share prefixes, forks, deletes of one sharer, restores by name and by tokens, all checked at every crash point and after repair (not the SIGKILL cycles)")
	adversarial := fs.Bool("adversarial", false, "add operations a client may do that the workload otherwise never does: writers abandoned and reopened by name or (with --prefix) by tokens, deletes and GC during a restore, forks of forks, of zero tokens, and forks the store must refuse; each with an exact prediction")
	traceFile := fs.String("trace", "", "write the simulated run's trace (every crash point and what it found) to this file")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	var with []string
	if *prefix {
		with = append(with, "token-addressed contexts (--prefix)")
	}
	if *adversarial {
		with = append(with, "adversarial operations (--adversarial)")
	}
	if len(with) > 0 {
		fmt.Fprintf(stderr, "crashtest seed %d, with %s\n", *seed, strings.Join(with, " and "))
	} else {
		fmt.Fprintf(stderr, "crashtest seed %d\n", *seed)
	}
	so := crash.SimOptions{Seed: *seed, Cycles: *cycles, Ops: *ops, WriteProb: *writeProb, SyncProb: *syncProb, Progress: stderr, Prefix: *prefix, Adversarial: *adversarial}
	if *traceFile != "" {
		f, err := os.Create(*traceFile)
		if err != nil {
			return err
		}
		defer f.Close()
		so.Trace = f
	}
	var rep *crash.Report
	if *metamorphic {
		tmp, err := os.MkdirTemp("", "hcache-metamorphic-")
		if err != nil {
			return err
		}
		defer os.RemoveAll(tmp)
		rep = crash.Metamorphic(so, append(crash.MemConfigs(), crash.RealConfigs(tmp)...))
	} else {
		rep = crash.Simulate(so)
	}
	if *kill > 0 {
		d := *dir
		if d == "" {
			tmp, err := os.MkdirTemp("", "hcache-crashtest-")
			if err != nil {
				return err
			}
			defer os.RemoveAll(tmp)
			d = tmp
		}
		self, err := os.Executable()
		if err != nil {
			return err
		}
		err = crash.KillLoop(crash.KillOptions{Dir: d, Cycles: *kill, Seed: *seed, Progress: stderr,
			Command: func(s int64) *exec.Cmd {
				return exec.Command(self, "stress", "--dir", d, "--seed", fmt.Sprint(s))
			}}, rep)
		if err != nil {
			return err
		}
	}
	if *asJSON {
		if err := printJSON(stdout, rep); err != nil {
			return err
		}
	} else {
		fmt.Fprintf(stdout, "seed %d: %d cycles, %d crash points, %d SIGKILL cycles, %d acknowledged contexts: lost %d, torn %d, fsck errors %d, metamorphic mismatches %d (trace %s)\n",
			rep.Seed, rep.Cycles, rep.CrashPoints, rep.KillCycles, rep.AckedContexts, rep.LostAcked, rep.TornServed, rep.FsckErrors, rep.Mismatches, rep.Trace)
		if *prefix {
			fmt.Fprintf(stdout, "token-addressed contexts: %d saved (%d by fork), %d tokens found already stored (shared prefixes); every context checked by name and by tokens at each crash point, %d of them also after index loss and repair\n",
				rep.TokContexts, rep.Forks, rep.TokensShared, rep.RepairChecks)
		}
		if *adversarial {
			fmt.Fprintf(stdout, "adversarial operations: %d run, each prediction checked on the running store (--trace lists them)\n", rep.AdversarialOps)
		}
	}
	if !rep.OK() {
		for _, f := range rep.Failures {
			fmt.Fprintln(stderr, "failure:", f)
		}
		return &exitError{1, fmt.Sprintf("seed %d: acknowledged data lost or torn data served", rep.Seed)}
	}
	return nil
}

func stress(args []string, stdout, stderr io.Writer) error {
	fs := newFlags("stress", stderr)
	dir := fs.String("dir", "", "store directory (required)")
	seed := fs.Int64("seed", 1, "seed")
	ops := fs.Int("ops", 0, "operations (0: until killed)")
	ct := fs.Int("chunk-tokens", crash.StressChunkTokens, "tokens per chunk group of a new store (0: the existing store's)")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if *dir == "" {
		fs.Usage()
		return errUsage
	}
	return crash.Stress(*dir, *seed, *ops, *ct, stdout)
}
