package main

import (
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"

	"github.com/hcache/hcache/bench/profiler"
	"github.com/hcache/hcache/profiles"
)

func init() {
	register("profile", "measure a scheduler profile of this machine (store read, copy, recompute/projection/KV-load curves)", runProfile)
}

// parseInts parses a comma-separated list of positive integers.
func parseInts(flag, v string) ([]int, error) {
	var out []int
	for _, f := range strings.Split(v, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n <= 0 {
			return nil, fmt.Errorf("--%s: %q is not a positive integer", flag, f)
		}
		out = append(out, n)
	}
	return out, nil
}

func runProfile(args []string, stdout, stderr io.Writer) error {
	fs := newFlags("profile", stderr)
	dir := fs.String("dir", "", "data directory whose read bandwidth is measured (a store is created and removed under it)")
	mdl := fs.String("model", "demo-llama", "preset name or model directory")
	tokens := fs.String("tokens", "64,128,256", "token counts of the cost curves, increasing")
	rounds := fs.Int("rounds", 3, "repetitions of each measurement (medians are kept)")
	readBytes := sizeFlag(64 << 20)
	fs.Var(&readBytes, "read-bytes", "size of the context whose restore measures the read bandwidth")
	seed := fs.Int64("seed", 1, "seed of the synthetic weights of a preset")
	maxParams := fs.Int64("max-params", 50_000_000, "largest synthetic preset the CPU reference runs")
	backend := fs.String("backend", "auto", "backend: auto (CUDA when a device can be used, else cpu), cpu or cuda; with CUDA the curves time hcache's own device recompute, hidden and KV restores and the copy figure is the PCIe copy")
	copts := cudaFlags(fs)
	name := fs.String("name", "", "the profile's name (default measured-<host>); the GPU check names it "+measuredGPUProfile)
	out := fs.String("out", "", "also write the profile to this file (usable as --profile of simulate)")
	asJSON := fs.Bool("json", false, "print the profile as JSON")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if err := cudaOnlyFlags(fs, *backend); err != nil {
		return err
	}
	if *dir == "" {
		return fmt.Errorf("--dir is required (the data directory to measure)")
	}
	if *rounds <= 0 {
		return fmt.Errorf("--rounds %d must be positive", *rounds)
	}
	toks, err := parseInts("tokens", *tokens)
	if err != nil {
		return err
	}
	p, err := profiler.Measure(profiler.Options{Dir: *dir, Model: *mdl, Seed: *seed, MaxParams: *maxParams, Tokens: toks,
		ReadBytes: int64(readBytes), Rounds: *rounds, Backend: *backend, CUDA: copts(), Name: *name, Progress: stderr})
	if err != nil {
		return err
	}
	data, err := p.Marshal()
	if err != nil {
		return err
	}
	if *out != "" {
		if err := os.WriteFile(*out, data, 0o644); err != nil {
			return err
		}
	}
	if *asJSON {
		_, err := stdout.Write(data)
		return err
	}
	fmt.Fprintf(stdout, "%s (%s backend): store read %.2f GB/s, copy %.2f GB/s\n", p.Name, p.Backend, p.Tiers[0].ReadGBps.Value, p.H2DGBps.Value)
	var dec []string
	for _, cd := range profiles.DecodeCodecs {
		if f := p.Decode(cd); f != nil {
			dec = append(dec, fmt.Sprintf("%s %.2f GB/s", cd, f.Value))
		}
	}
	fmt.Fprintf(stdout, "host decode into the model dtype: %s\n", strings.Join(dec, ", "))
	for i, pt := range p.Recompute.Points {
		fmt.Fprintf(stdout, "%6d tokens: recompute %9.2f ms, projection %8.2f ms, kv load %7.2f ms (all %s layers)\n",
			pt.Tokens, pt.MS, p.Project.Points[i].MS, p.KVLoad.Points[i].MS, *mdl)
	}
	return nil
}
