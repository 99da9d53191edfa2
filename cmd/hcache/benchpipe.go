package main

import (
	"fmt"
	"io"
	"os"

	"github.com/hcache/hcache/bench/benchpipe"
	"github.com/hcache/hcache/serve/sched"
)

func init() {
	register("bench pipeline", "mixed-plan restore time against the larger of its I/O alone and compute alone (ratio)", benchPipeline)
}

func benchPipeline(args []string, stdout, stderr io.Writer) error {
	fs := newFlags("bench pipeline", stderr)
	dir := fs.String("dir", os.TempDir(), "directory for the store (on the device to measure)")
	mdl := fs.String("model", "demo-llama", "preset name or model directory (small: the CPU forward pass runs it)")
	tokens := fs.Int("tokens", 512, "context length")
	rounds := fs.Int("rounds", 15, "rounds of io-only, compute-only and pipelined back to back (order rotated); medians")
	seed := fs.Int64("seed", 1, "seed of the synthetic weights and the tokens")
	plan := fs.String("plan", "", "recompute,hidden,kv layer counts (default: the scheduler's best mixed plan on a profile measured now)")
	asJSON := fs.Bool("json", false, "print one JSON object")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	o := benchpipe.Options{Dir: *dir, Model: *mdl, Tokens: *tokens, Rounds: *rounds, Seed: *seed, Progress: stderr}
	if *plan != "" {
		var s sched.Split
		if n, err := fmt.Sscanf(*plan, "%d,%d,%d", &s.Recompute, &s.Hidden, &s.KV); n != 3 || err != nil || s.Recompute < 0 || s.Hidden < 0 || s.KV < 0 {
			return fmt.Errorf("--plan %q: want three non-negative counts recompute,hidden,kv", *plan)
		}
		o.Split = &s
	}
	res, err := benchpipe.Run(o)
	if err != nil {
		return err
	}
	if *asJSON {
		return printJSON(stdout, res)
	}
	fmt.Fprintf(stdout, "%s %d tokens, plan %v: io %.2f ms, compute %.2f ms, pipelined %.2f ms: ratio %.3f (%s-bound)\n",
		res.Model, res.Tokens, res.Split, res.IOMS, res.ComputeMS, res.PipelinedMS, res.Ratio, res.Bound)
	return nil
}
