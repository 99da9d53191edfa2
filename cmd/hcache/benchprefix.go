package main

import (
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/hcache/hcache/bench/benchprefix"
	"github.com/hcache/hcache/bench/prefixwl"
	"github.com/hcache/hcache/internal/buildinfo"
)

func init() {
	register("bench prefix", "a shared-prefix workload through hcache and the file-per-chunk-hash peer: dedup, lookup, restore, hit rate", benchPrefix)
	examples["bench prefix"] = "hcache bench prefix --dir /mnt/nvme/tmp --workload docqa --json"
}

// benchPrefixOut is the JSON output: the build and the command with the run.
type benchPrefixOut struct {
	Build   string `json:"build"`
	Command string `json:"command"`
	*benchprefix.Result
}

func benchPrefix(args []string, stdout, stderr io.Writer) error {
	fs := newFlags("bench prefix", stderr)
	dir := fs.String("dir", os.TempDir(), "directory for the stores (on the device to measure)")
	wl := fs.String("workload", "chat", "shared-prefix workload: chat, docqa or agent (bench/prefixwl)")
	seed := fs.Int64("seed", 1, "seed of the workload and the rows")
	scale := fs.Float64("scale", 1, "multiply the workload's sessions (conversations, documents, traces)")
	layers := fs.Int("layers", benchprefix.DefaultLayers, "stored layers per token")
	rowBytes := fs.Int("row-bytes", benchprefix.DefaultRowBytes, "bytes of one token's row in one layer")
	systems := fs.String("systems", "", "comma-separated systems (default: all this build has)")
	lookupGroups := fs.Int("lookup-groups", benchprefix.DefaultLookupGroups, "index size of the lookup-at-scale measure (0: skip)")
	lookupTokens := fs.Int("lookup-tokens", benchprefix.DefaultLookupPrompt, "prompt tokens of the lookup-at-scale measure")
	verify := fs.Int("verify-every", 8, "compare the restored rows of every k-th restore byte for byte (untimed)")
	asJSON := fs.Bool("json", false, "print one JSON object")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if _, ok := prefixwl.Defaults[*wl]; !ok {
		return fmt.Errorf("--workload %q: want one of %v", *wl, prefixwl.Names())
	}
	if *scale <= 0 || *verify <= 0 {
		return fmt.Errorf("--scale %g and --verify-every %d: want > 0", *scale, *verify)
	}
	o := benchprefix.Options{Dir: *dir, Workload: *wl, Seed: *seed, Scale: *scale, Layers: *layers, RowBytes: *rowBytes,
		LookupGroups: *lookupGroups, LookupPromptTokens: *lookupTokens, VerifyEvery: *verify, Progress: stderr}
	if *systems != "" {
		o.Systems = strings.Split(*systems, ",")
	}
	res, err := benchprefix.Run(o)
	if err != nil {
		return err
	}
	if *asJSON {
		return printJSON(stdout, benchPrefixOut{Build: buildinfo.String("hcache"), Command: "hcache bench prefix " + strings.Join(args, " "), Result: res})
	}
	fmt.Fprintf(stdout, "%s workload seed %d (x%g): %d requests, %d sessions, %d prompt tokens, %d bytes per token\n",
		*wl, *seed, *scale, res.Requests, res.Sessions, res.PromptTokens, res.BytesPerToken)
	for _, s := range res.Systems {
		fmt.Fprintf(stdout, "%-20s G=%-4d logical %8.1f MB, on disk %8.1f MB, unique groups %8.1f MB: disk/unique %.3f (with tails %.3f), dedup %.2fx\n",
			s.System, s.GroupTokens, float64(s.LogicalBytes)/1e6, float64(s.BytesOnDisk)/1e6, float64(s.UniqueBytes)/1e6, s.DiskOverUnique, s.DiskOverKept, s.DedupRatio)
		fmt.Fprintf(stdout, "%-20s hit rate %.3f; lookup p50 %.1f us p99 %.1f us; restore (%d, mean %.0f tokens) median %.2f ms p99 %.2f ms\n",
			"", s.HitRate, s.LookupP50US, s.LookupP99US, s.Restores, s.RestoreMeanTok, s.RestoreMedianMS, s.RestoreP99MS)
		if l := s.LookupAtScale; l != nil {
			fmt.Fprintf(stdout, "%-20s lookup of %d tokens against %d groups: p50 %.1f us p99 %.1f us, its chain keys alone p50 %.1f us (%s)\n",
				"", l.PromptTokens, l.IndexGroups, l.P50US, l.P99US, l.KeysP50US, l.How)
		}
	}
	return nil
}
