package main

import (
	"fmt"
	"io"

	"github.com/hcache/hcache/model"
	"github.com/hcache/hcache/profiles"
	"github.com/hcache/hcache/serve/sched"
)

func init() {
	register("plan", "the scheduler's per-layer plan for a model and context length on a profile, with its costs", runPlan)
}

func runPlan(args []string, stdout, stderr io.Writer) error {
	fs := newFlags("plan", stderr)
	prof := fs.String("profile", "a100-pm9a3x4", "shipped profile name or path to a profile JSON")
	tier := fs.String("tier", "", "storage tier of the profile (default: its first)")
	mdl := fs.String("model", "llama2-7b", "preset name or model directory (only its config is read)")
	tokens := fs.Int("tokens", 4096, "expected context length")
	asJSON := fs.Bool("json", false, "print one JSON object")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	pl, c, err := platformModel(*prof, *tier, *mdl)
	if err != nil {
		return err
	}
	d, err := pl.Choose(c, *tokens)
	if err != nil {
		return err
	}
	single := map[string]float64{
		"kv":     sched.Predict(d.Costs, sched.Split{KV: c.Layers}),
		"hidden": sched.Predict(d.Costs, sched.Split{Hidden: c.Layers}),
	}
	if *asJSON {
		return printJSON(stdout, map[string]any{"profile": pl.Profile.Name, "tier": pl.Tier.Name, "model": *mdl, "tokens": *tokens,
			"split": d.Split, "predicted_ms": d.PredictedMS, "costs_per_layer": d.Costs, "all_kv_ms": single["kv"], "all_hidden_ms": single["hidden"],
			"hidden_allowed": sched.HiddenAllowed(c)})
	}
	fmt.Fprintf(stdout, "%s (%s), %s, %d tokens: %v\n", pl.Profile.Name, pl.Tier.Name, *mdl, *tokens, d.Split)
	fmt.Fprintf(stdout, "predicted restore %.2f ms (all KV %.2f ms, all hidden %.2f ms)\n", d.PredictedMS, single["kv"], single["hidden"])
	cs := d.Costs
	fmt.Fprintf(stdout, "per layer: recompute %.3f ms, projection %.3f ms, kv load %.3f ms, hidden read %.3f ms, kv read %.3f ms\n",
		cs.RecomputeMS, cs.ProjectMS, cs.KVLoadMS, cs.HiddenIOMS, cs.KVIOMS)
	return nil
}

// platformModel loads a profile (a shipped name or a path) at a tier and a
// model's config (resolveConfig: a preset, a config.json or a model
// directory), as plan and simulate take them.
func platformModel(prof, tier, mdl string) (*sched.Platform, *model.Config, error) {
	p, err := profiles.Load(prof)
	if err != nil {
		return nil, nil, err
	}
	pl, err := sched.NewPlatform(p, tier)
	if err != nil {
		return nil, nil, err
	}
	c, err := resolveConfig(mdl)
	if err != nil {
		return nil, nil, fmt.Errorf("--model: %w", err)
	}
	return pl, c, nil
}
