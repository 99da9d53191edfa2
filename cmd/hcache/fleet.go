package main

import (
	"fmt"
	"io"
	"os"

	"github.com/hcache/hcache/bench/benchfleet"
	"github.com/hcache/hcache/internal/buildinfo"
)

func init() {
	register("bench fleet", "hcached processes sharing one bucket (SeaweedFS on loopback): hit rate and restore times of seeded conversations routed to random nodes, with and without the shared tier; remote read GB/s against the store's parallel GETs", benchFleet)
	examples["bench fleet"] = "hcache bench fleet --nodes 3 --workload chat --json   # needs bin/hcached next to hcache and scripts/seaweedfs.sh's weed"
}

func benchFleet(args []string, stdout, stderr io.Writer) error {
	fs := newFlags("bench fleet", stderr)
	var o benchfleet.Options
	fs.IntVar(&o.Nodes, "nodes", 3, "hcached processes")
	fs.StringVar(&o.Workload, "workload", "chat", "chat: conversations growing turn by turn, restored by name; prefix: a bench/prefixwl stream (--prefix-workload) restored and saved by tokens")
	fs.StringVar(&o.PrefixWorkload, "prefix-workload", "chat", "with --workload prefix: the prefixwl workload (chat, docqa, agent)")
	fs.Float64Var(&o.PrefixScale, "prefix-scale", 0.05, "with --workload prefix: scale of the workload's sessions")
	fs.IntVar(&o.Requests, "requests", 120, "with --workload prefix: at most this many requests")
	fs.IntVar(&o.Conversations, "conversations", 16, "conversations")
	fs.IntVar(&o.Turns, "turns", 5, "turns per conversation (the first creates it)")
	fs.IntVar(&o.FirstTokens, "first-tokens", 256, "tokens of a conversation's first turn")
	fs.IntVar(&o.TurnTokens, "turn-tokens", 64, "tokens each later turn adds")
	fs.IntVar(&o.Layers, "layers", 4, "layers of the fleet's model shape")
	fs.IntVar(&o.RowBytes, "row-bytes", 4096, "bytes per token per layer")
	fs.Int64Var(&o.Seed, "seed", 1, "seed of the conversations and the routing")
	fs.IntVar(&o.ThroughputTokens, "throughput-tokens", 1024, "tokens of the Llama2-7B-shaped context of the remote read measurement (0: skip)")
	fs.IntVar(&o.Parallel, "parallel", 8, "a quarter of the ranged GETs a remote read keeps in flight")
	fs.IntVar(&o.FetchAhead, "fetch-ahead", 4, "a remote read holds twice this many layers; its GETs in flight are 4 x --parallel")
	fs.Int64Var(&o.RangeBytes, "range-bytes", 8<<20, "bytes per ranged GET")
	fs.StringVar(&o.Hcached, "hcached", "", "hcached binary (default: next to this hcache)")
	fs.StringVar(&o.Weed, "weed", "", "SeaweedFS weed binary (default: $HCACHE_WEED, PATH, scripts/seaweedfs.sh's cache)")
	fs.StringVar(&o.Dir, "dir", os.TempDir(), "directory for the nodes' stores and the object store's data")
	asJSON := fs.Bool("json", false, "print one JSON object")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	o.Log = stderr
	res, err := benchfleet.Run(o)
	if err != nil {
		return err
	}
	if *asJSON {
		return printJSON(stdout, struct {
			Build string `json:"build"`
			*benchfleet.Result
		}{buildinfo.String("hcache"), res})
	}
	for _, m := range res.Modes {
		fmt.Fprintf(stdout, "shared tier %-5v: hit rate %.3f of %d restorable turns; local hits %d (p50 %.2f ms), remote hits %d (p50 %.2f ms, %.2f GB/s), misses %d; wrong bytes %d\n",
			m.SharedTier, m.HitRate, m.RestorableTurns, m.LocalHit.Count, m.LocalHit.P50MS, m.RemoteHit.Count, m.RemoteHit.P50MS, m.RemoteHit.GBps, m.Miss.Count, m.WrongBytes)
	}
	for _, m := range res.Prefix {
		fmt.Fprintf(stdout, "shared tier %-5v: %d requests, hit rate %.3f of %d restorable (tokens %.3f); local hits %d (p50 %.2f ms), remote hits %d (p50 %.2f ms), misses %d (p50 %.2f ms); wrong bytes %d\n",
			m.SharedTier, m.Requests, m.HitRate, m.Restorable, m.TokenHitRate, m.LocalHit.Count, m.LocalHit.P50MS, m.RemoteHit.Count, m.RemoteHit.P50MS, m.Miss.Count, m.Miss.P50MS, m.WrongBytes)
	}
	if t := res.Throughput; t != nil {
		fmt.Fprintf(stdout, "remote read of %d %s tokens (%d MiB): fetch %.2f GB/s, raw parallel GETs %.2f GB/s, ratio %.2f; import (fetch + local write) %.2f GB/s\n",
			t.Tokens, t.Model, t.ObjectBytes>>20, t.FetchGBps, t.RawGETGBps, t.Ratio, t.ImportGBps)
	}
	return nil
}
