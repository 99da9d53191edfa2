package main

import (
	"flag"
	"fmt"
	"io"
	"strings"

	"github.com/hcache/hcache/model"
	"github.com/hcache/hcache/profiles"
	"github.com/hcache/hcache/serve/sched"
	"github.com/hcache/hcache/state"
)

func init() {
	register("plan", "the scheduler's per-layer plan for a model and context length on a profile, with its costs", runPlan)
}

func runPlan(args []string, stdout, stderr io.Writer) error {
	fs := newFlags("plan", stderr)
	pf := platformFlagsOf(fs)
	tokens := fs.Int("tokens", 4096, "expected context length")
	codecList := fs.String("codec", "none", "comma-separated codecs the plan may use (none, fp8, fp8-block, int8): a lossy codec is opted into; the fastest predicted wins")
	pl, c, err := pf.parse(args)
	if err != nil {
		return err
	}
	var codecs []state.Codec
	for _, s := range strings.Split(*codecList, ",") {
		cd, err := state.ParseCodec(s)
		if err != nil {
			return fmt.Errorf("--codec: %w", err)
		}
		codecs = append(codecs, cd)
	}
	d, all, err := pl.ChooseCodec(c, *tokens, codecs)
	if err != nil {
		return err
	}
	single := map[string]float64{
		"kv":     sched.Predict(d.Costs, sched.Split{KV: c.Layers}),
		"hidden": sched.Predict(d.Costs, sched.Split{Hidden: c.Layers}),
	}
	if pf.asJSON {
		return printJSON(stdout, map[string]any{"profile": pl.Profile.Name, "tier": pl.Tier.Name, "model": pf.model, "tokens": *tokens,
			"split": d.Split, "predicted_ms": d.PredictedMS, "costs_per_layer": d.Costs, "all_kv_ms": single["kv"], "all_hidden_ms": single["hidden"],
			"hidden_allowed": sched.HiddenAllowed(c), "codec": d.CodecName, "bytes_per_token": d.BytesPerToken, "codecs": all})
	}
	fmt.Fprintf(stdout, "%s (%s), %s, %d tokens: %v, codec %s, %d bytes/token\n", pl.Profile.Name, pl.Tier.Name, pf.model, *tokens, d.Split, d.CodecName, d.BytesPerToken)
	if len(all) > 1 {
		for _, o := range all {
			fmt.Fprintf(stdout, "  codec %-9s %v: predicted %.2f ms, %d bytes/token\n", o.CodecName, o.Split, o.PredictedMS, o.BytesPerToken)
		}
	}
	fmt.Fprintf(stdout, "predicted restore %.2f ms (all KV %.2f ms, all hidden %.2f ms)\n", d.PredictedMS, single["kv"], single["hidden"])
	cs := d.Costs
	fmt.Fprintf(stdout, "per layer: recompute %.3f ms, projection %.3f ms, kv load %.3f ms, hidden read %.3f ms, kv read %.3f ms\n",
		cs.RecomputeMS, cs.ProjectMS, cs.KVLoadMS, cs.HiddenIOMS, cs.KVIOMS)
	return nil
}

// platformFlags are the flags plan and simulate share: a profile (a shipped
// name or a path), its storage tier, a model whose config is read, and --json.
type platformFlags struct {
	fs                   *flag.FlagSet
	profile, tier, model string
	asJSON               bool
}

func platformFlagsOf(fs *flag.FlagSet) *platformFlags {
	p := platformFlags{fs: fs}
	fs.StringVar(&p.profile, "profile", "a100-pm9a3x4", "shipped profile name or path to a profile JSON")
	fs.StringVar(&p.tier, "tier", "", "storage tier of the profile (default: its first)")
	fs.StringVar(&p.model, "model", "llama2-7b", "preset name or model directory (only its config is read)")
	fs.BoolVar(&p.asJSON, "json", false, "print one JSON object")
	return &p
}

// parse parses args (the command's own flags too) and loads the platform
// and the model.
func (f *platformFlags) parse(args []string) (*sched.Platform, *model.Config, error) {
	if err := parseFlags(f.fs, args); err != nil {
		return nil, nil, err
	}
	return f.load()
}

// load loads the profile at the tier and the model's config (resolveConfig:
// a preset, a config.json or a model directory).
func (f *platformFlags) load() (*sched.Platform, *model.Config, error) {
	p, err := profiles.Load(f.profile)
	if err != nil {
		return nil, nil, err
	}
	pl, err := sched.NewPlatform(p, f.tier)
	if err != nil {
		return nil, nil, err
	}
	c, err := resolveConfig(f.model)
	if err != nil {
		return nil, nil, fmt.Errorf("--model: %w", err)
	}
	return pl, c, nil
}
