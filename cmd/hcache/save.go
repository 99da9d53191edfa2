package main

import (
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/hcache/hcache/bench/benchsave"
	"github.com/hcache/hcache/internal/buildinfo"
)

func init() {
	register("bench save", "decode-step save cost (append, device saver) against a plain copy while another context's prefill is flushed (CPU path)", benchSave)
	examples["bench save"] = "hcache bench save --dir /mnt/nvme/tmp --rounds 15 --json"
}

// benchSaveOut is the JSON output: the build and the command with the run.
type benchSaveOut struct {
	Build   string `json:"build"`
	Command string `json:"command"`
	*benchsave.Result
}

func benchSave(args []string, stdout, stderr io.Writer) error {
	fs := newFlags("bench save", stderr)
	dir := fs.String("dir", os.TempDir(), "directory for the store (on the device to measure)")
	mdl := fs.String("model", benchsave.DefaultModel, "preset whose shape (stored layers, row bytes) is saved")
	rounds := fs.Int("rounds", benchsave.DefaultRounds, "rounds of copy, append and device save, order rotated; medians and spread over rounds")
	tokens := fs.Int("tokens", benchsave.DefaultTokens, "decode tokens per side per round")
	prefill := fs.Int("prefill", benchsave.DefaultPrefill, "tokens of the background context's prefill, saved, flushed and deleted in a loop")
	seed := fs.Int64("seed", 1, "seed of the rows")
	asJSON := fs.Bool("json", false, "print one JSON object")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	res, err := benchsave.Run(benchsave.Options{Dir: *dir, Model: *mdl, Rounds: *rounds, Tokens: *tokens, Prefill: *prefill, Seed: *seed, Progress: stderr})
	if err != nil {
		return err
	}
	if *asJSON {
		return printJSON(stdout, benchSaveOut{Build: buildinfo.String("hcache"), Command: "hcache bench save " + strings.Join(args, " "), Result: res})
	}
	fmt.Fprintf(stdout, "%s, %d stored layers, %d bytes per token, %d rounds of %d tokens, background prefill %d tokens (%d flushes)\n",
		res.Model, res.Layers, res.TokenBytes, res.Rounds, res.TokensPerRound, res.PrefillTokens, res.BackgroundFlushes)
	fmt.Fprintf(stdout, "per token, median [min, max] ns: copy %.0f [%.0f, %.0f], append %.0f [%.0f, %.0f], save call %.0f [%.0f, %.0f], save done %.0f [%.0f, %.0f]\n",
		res.CopyNS.Median, res.CopyNS.Min, res.CopyNS.Max, res.AppendNS.Median, res.AppendNS.Min, res.AppendNS.Max,
		res.SaveCallNS.Median, res.SaveCallNS.Min, res.SaveCallNS.Max, res.SaveDoneNS.Median, res.SaveDoneNS.Min, res.SaveDoneNS.Max)
	fmt.Fprintf(stdout, "over copy (same round), median [min, max]: append %.2f [%.2f, %.2f] (target <= %.1f: %v), save call %.3f, save done %.2f\n",
		res.AppendRatio.Median, res.AppendRatio.Min, res.AppendRatio.Max, res.Target, res.Pass, res.SaveCallRatio.Median, res.SaveDoneRatio.Median)
	return nil
}
