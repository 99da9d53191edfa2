package main

import (
	"fmt"
	"io"

	"github.com/hcache/hcache/serve/sched"
)

func init() {
	register("simulate", "TTFT and storage of recompute / kv / hidden / scheduled over a seeded workload on a profile", runSimulate)
}

func runSimulate(args []string, stdout, stderr io.Writer) error {
	fs := newFlags("simulate", stderr)
	pf := platformFlagsOf(fs)
	wl := fs.String("workload", "chat", "workload: chat (ShareGPT-like) or long (L-Eval-like)")
	seed := fs.Int64("seed", 1, "seed of the workload")
	pl, c, err := pf.parse(args)
	if err != nil {
		return err
	}
	params, ok := sched.Workloads[*wl]
	if !ok {
		return fmt.Errorf("--workload %q: want chat or long", *wl)
	}
	reqs, err := params.Generate(*seed)
	if err != nil {
		return err
	}
	res, err := pl.Simulate(c, pf.model, reqs)
	if err != nil {
		return err
	}
	res.Workload, res.Seed = params, *seed
	if pf.asJSON {
		return printJSON(stdout, res)
	}
	fmt.Fprintf(stdout, "%s (%s) %s, %s workload seed %d: %d restores, mean context %.0f tokens\n", res.Profile, res.Tier, res.Model, *wl, *seed, res.Restores, res.MeanCtx)
	fmt.Fprintf(stdout, "%-10s %12s %12s %14s\n", "method", "ttft_mean", "ttft_p99", "bytes/token")
	for _, r := range res.Rows {
		extra := ""
		if r.Split != nil {
			extra = " (" + r.Split.String() + ")"
		}
		fmt.Fprintf(stdout, "%-10s %10.2fms %10.2fms %14.0f%s\n", r.Method, r.TTFTMean, r.TTFTP99, r.StorageBytesPerToken, extra)
	}
	return nil
}
