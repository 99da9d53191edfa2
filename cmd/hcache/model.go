package main

import (
	"fmt"
	"io"
	"os"

	"github.com/hcache/hcache/model"
)

func init() {
	register("model synth", "write a seeded synthetic model (config.json + model.safetensors)", modelSynth)
}

// resolveConfig takes a preset name, a config.json path or a model directory.
func resolveConfig(spec string) (*model.Config, error) {
	if c, err := model.Preset(spec); err == nil {
		return c, nil
	}
	st, err := os.Stat(spec)
	if err != nil {
		return nil, fmt.Errorf("%q is neither a preset (%v) nor a file: %w", spec, model.PresetNames(), err)
	}
	if st.IsDir() {
		return model.LoadConfig(spec)
	}
	data, err := os.ReadFile(spec)
	if err != nil {
		return nil, err
	}
	return model.ParseHFConfig(data)
}

func modelSynth(args []string, stdout, stderr io.Writer) error {
	fs := newFlags("model synth", stderr)
	cfg := fs.String("config", "demo-llama", "preset name or config.json path")
	seed := fs.Int64("seed", 1, "random seed")
	out := fs.String("out", "", "output directory (required)")
	maxParams := fs.Int64("max-params", 200_000_000, "refuse models larger than this many parameters")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if *out == "" {
		fs.Usage()
		return errUsage
	}
	c, err := resolveConfig(*cfg)
	if err != nil {
		return err
	}
	if n := c.ParamCount(); n > *maxParams {
		return fmt.Errorf("%s has %d parameters (%.1f GB in %s); raise --max-params to write it anyway", *cfg, n, float64(n*int64(c.ElemBytes()))/1e9, c.DType)
	}
	if err := model.WriteModel(*out, c, model.Synthesize(c, *seed)); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "wrote %s: %s, %d layers, hidden %d, %d parameters, seed %d\n", *out, c.Arch, c.Layers, c.HiddenSize, c.ParamCount(), *seed)
	return nil
}
