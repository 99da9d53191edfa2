package main

import (
	"fmt"
	"io"
	"math/rand"
	"strings"
	"text/tabwriter"

	"github.com/hcache/hcache/model"
	"github.com/hcache/hcache/serve"
	"github.com/hcache/hcache/state"
)

func init() {
	register("model codec-error", "measure a codec's error after a restore: K/V and attention per layer, greedy agreement", modelCodecError)
	examples["model codec-error"] = "hcache model codec-error --model small-llama2,small-gqa,tiny-opt --codec none,fp8,fp8-block --tokens 128 --steps 64 --json"
}

// codecShapes are small synthetic shapes of the families the codecs are
// measured on, with the real models' head_dim (128) so that an fp8 block is
// one head: Llama2-7B-shaped (MHA, fp16), Llama3-8B-shaped (GQA 4:1, bf16,
// llama3 rope) and Qwen2.5-7B-shaped (GQA 7:1, q/k/v biases, bf16). They
// are not presets (the device checks run every preset).
var codecShapes = map[string]model.Config{
	"small-llama2": {Arch: model.ArchLlama, HiddenSize: 1024, Layers: 4, Heads: 8, KVHeads: 8, HeadDim: 128, Intermediate: 2752, Vocab: 4096, MaxPositions: 4096, RopeTheta: 10000, Norm: "rms", NormEps: 1e-5, DType: "float16"},
	"small-gqa": {Arch: model.ArchLlama, HiddenSize: 1024, Layers: 4, Heads: 8, KVHeads: 2, HeadDim: 128, Intermediate: 3584, Vocab: 4096, MaxPositions: 8192, RopeTheta: 500000, Norm: "rms", NormEps: 1e-5, DType: "bfloat16",
		RopeScaling: model.RopeScaling{Type: "llama3", Factor: 8, LowFreqFactor: 1, HighFreqFactor: 4, OriginalMaxPositions: 1024}},
	"small-qwen2": {Arch: model.ArchQwen2, HiddenSize: 896, Layers: 4, Heads: 7, KVHeads: 1, HeadDim: 128, Intermediate: 4864, Vocab: 4096, MaxPositions: 4096, RopeTheta: 1000000, Norm: "rms", NormEps: 1e-6, DType: "bfloat16", QKVBias: true},
}

// codecConfig resolves a codec-error model: one of codecShapes, else a
// preset or config path.
func codecConfig(spec string) (*model.Config, error) {
	if c, ok := codecShapes[spec]; ok {
		return &c, nil
	}
	return resolveConfig(spec)
}

func modelCodecError(args []string, stdout, stderr io.Writer) error {
	fs := newFlags("model codec-error", stderr)
	models := fs.String("model", "small-llama2,small-gqa,small-qwen2,tiny-llama,tiny-gqa,tiny-qwen2,tiny-opt,tiny-linear-rope", "comma-separated presets, config paths or small shapes (small-llama2, small-gqa, small-qwen2)")
	codecs := fs.String("codec", "none,fp8,fp8-block", "comma-separated codecs")
	kinds := fs.String("kind", "hidden,kv", "comma-separated kinds of layer to store (every layer the same)")
	tokens := fs.Int("tokens", 128, "prompt tokens saved and restored")
	steps := fs.Int("steps", 64, "greedy steps decoded after the restore")
	seed := fs.Int64("seed", 1, "seed of the synthetic weights and the prompt")
	maxParams := fs.Int64("max-params", 200_000_000, "refuse models larger than this many parameters (the forward pass is float32 on the CPU)")
	asJSON := fs.Bool("json", false, "print JSON")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	var reps []*serve.CodecReport
	for _, ms := range strings.Split(*models, ",") {
		c, err := codecConfig(ms)
		if err != nil {
			return err
		}
		if n := c.ParamCount(); n > *maxParams {
			return fmt.Errorf("%s has %d parameters; raise --max-params to measure it anyway", ms, n)
		}
		w := model.Synthesize(c, *seed)
		rng := rand.New(rand.NewSource(*seed))
		prompt := make([]int, *tokens)
		for i := range prompt {
			prompt[i] = rng.Intn(c.Vocab)
		}
		for _, cs := range strings.Split(*codecs, ",") {
			cd, err := state.ParseCodec(cs)
			if err != nil {
				return err
			}
			for _, ks := range strings.Split(*kinds, ",") {
				kind := map[string]state.LayerKind{"hidden": state.LayerHidden, "kv": state.LayerKV}[ks]
				if kind == state.LayerNone {
					return fmt.Errorf("--kind %q: want hidden or kv", ks)
				}
				r, err := serve.MeasureCodec(c, w, cd, kind, prompt, *steps)
				if err != nil {
					return fmt.Errorf("%s %s %s: %w", ms, cs, ks, err)
				}
				r.Model = ms
				reps = append(reps, r)
			}
		}
	}
	if *asJSON {
		return printJSON(stdout, map[string]any{"seed": *seed, "tokens": *tokens, "steps": *steps, "reports": reps,
			"note": "synthetic models (seeded random weights), not trained ones: the errors show the codecs' arithmetic on these states, not accuracy on a real model"})
	}
	tw := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "model\tcodec\tkind\tB/token\tvs dtype\tK max\tK rms\tV max\tV rms\tattn max\tattn rms\tlogits rms\tagree\tcontrol\t")
	for _, r := range reps {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%.3fx\t%.4f\t%.4f\t%.4f\t%.4f\t%.4f\t%.4f\t%.4f\t%d/%d\t%d/%d\t\n", r.Model, r.Codec, r.Kind, r.BytesPerToken,
			float64(r.BytesPerToken)/float64(r.ModelBytesPerToken), r.KMaxRel, r.KRMSRel, r.VMaxRel, r.VRMSRel, r.AttnMaxRel, r.AttnRMSRel, r.LogitRel, r.Agree, r.Steps, r.ControlAgree, r.Steps)
	}
	tw.Flush()
	fmt.Fprintln(stdout, "relative errors: max|x'-x|/max|x| and ||x'-x||/||x|| per layer, worst layer shown; fp8 E4M3 rounding bound 0.0625; control: greedy agreement with every K/V value moved by 2^-8 of itself; synthetic weights, not a trained model")
	return nil
}
