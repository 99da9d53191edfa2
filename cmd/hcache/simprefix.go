package main

import (
	"fmt"
	"io"

	"github.com/hcache/hcache/bench/prefixwl"
	"github.com/hcache/hcache/chunk"
	"github.com/hcache/hcache/serve/sched"
)

func init() {
	register("simulate prefix", "TTFT with a shared-prefix workload's hits (token lookup) against restores by conversation id, on a profile", runSimulatePrefix)
	examples["simulate prefix"] = "hcache simulate prefix --profile h200-nvme --model llama3-8b --workload docqa --json"
}

// simPrefixOut is what `hcache simulate prefix --json` prints: the
// simulation and the workload's own counts.
type simPrefixOut struct {
	*sched.PrefixSimResult
	Counts prefixwl.Counts `json:"counts"`
}

func runSimulatePrefix(args []string, stdout, stderr io.Writer) error {
	fs := newFlags("simulate prefix", stderr)
	pf := platformFlagsOf(fs)
	wl := fs.String("workload", "chat", "shared-prefix workload: chat, docqa or agent (bench/prefixwl)")
	seed := fs.Int64("seed", 1, "seed of the workload")
	group := fs.Int("group", chunk.DefaultChunkTokens, "tokens per stored group (the store's chunk size)")
	scale := fs.Float64("scale", 1, "multiply the workload's sessions (conversations, documents, traces)")
	pl, c, err := pf.parse(args)
	if err != nil {
		return err
	}
	params, ok := prefixwl.Defaults[*wl]
	if !ok {
		return fmt.Errorf("--workload %q: want one of %v", *wl, prefixwl.Names())
	}
	if *scale <= 0 {
		return fmt.Errorf("--scale %g: want > 0", *scale)
	}
	w, err := params.Scaled(*scale).Generate(*seed)
	if err != nil {
		return err
	}
	counts, hits, err := w.Count(*group)
	if err != nil {
		return err
	}
	reqs := make([]sched.PrefixRequest, len(w.Requests))
	for i, r := range w.Requests {
		reqs[i] = sched.PrefixRequest{Prompt: r.Prompt, SessionHit: hits[i].Session, SharedHit: hits[i].Shared}
	}
	res, err := pl.SimulatePrefix(c, pf.model, reqs, sched.PrefixStorage{
		SessionTokens: counts.PerSession, UniqueTokens: counts.UniqueGroups*int64(*group) + counts.Tails})
	if err != nil {
		return err
	}
	res.Workload, res.Seed, res.Group = w.Params, *seed, *group
	if pf.asJSON {
		return printJSON(stdout, simPrefixOut{res, counts})
	}
	fmt.Fprintf(stdout, "%s (%s) %s, %s workload seed %d: %d requests, mean prompt %.0f tokens, groups of %d: %d unique of %d logical\n",
		res.Profile, res.Tier, res.Model, *wl, *seed, res.Requests, res.PromptMean, *group, counts.UniqueGroups, counts.LogicalGroups)
	fmt.Fprintf(stdout, "%-8s %-10s %10s %12s %12s %12s %14s\n", "sharing", "method", "hit_rate", "ttft_mean", "ttft_p50", "ttft_p99", "storage")
	for _, r := range res.Rows {
		extra := ""
		if r.Split != nil {
			extra = " (" + r.Split.String() + ")"
		}
		fmt.Fprintf(stdout, "%-8s %-10s %10.3f %10.2fms %10.2fms %10.2fms %12.2fGB%s\n", r.Sharing, r.Method, r.HitRate, r.TTFTMean, r.TTFTP50, r.TTFTP99, r.StorageBytes/1e9, extra)
	}
	fmt.Fprintf(stdout, "prefix over session (scheduled, mean TTFT): %.3f\n", res.PrefixOverSession)
	return nil
}
