package main

import (
	"io"

	"github.com/hcache/hcache/cmd/hcache/demo"
)

func init() {
	register("demo", "multi-turn conversation saved, evicted and restored four ways (scheduled plan, hidden, KV, recompute); checks losslessness", runDemo)
}

func runDemo(args []string, stdout, stderr io.Writer) error {
	fs := newFlags("demo", stderr)
	mdl := fs.String("model", "demo-llama", "preset name or model directory (config.json + safetensors)")
	dir := fs.String("dir", "", "store directory (default: a temporary one)")
	turns := fs.Int("turns", 3, "conversation turns")
	prompt := fs.Int("prompt", 96, "user tokens per turn")
	gen := fs.Int("gen", 32, "generated tokens per turn")
	seed := fs.Int64("seed", 1, "seed of the synthetic model and the prompts")
	maxParams := fs.Int64("max-params", 50_000_000, "largest synthetic preset the CPU reference runs")
	comp := fs.String("compression", "none", "store compression: none or lz4 (reports the ratio on this model's states)")
	prof := fs.String("profile", "a100-pm9a3x4", "platform profile the scheduler plans the demo's context with (shipped name or path)")
	asJSON := fs.Bool("json", false, "also print the turns as JSON")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	res, err := demo.Run(demo.Options{Model: *mdl, Dir: *dir, Turns: *turns, Prompt: *prompt, Gen: *gen, Seed: *seed, MaxParams: *maxParams, Compression: *comp, Profile: *prof, Out: stdout})
	if err != nil {
		return err
	}
	if *asJSON {
		return printJSON(stdout, res)
	}
	return nil
}
