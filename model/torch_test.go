package model

import (
	"fmt"
	"math"
	"math/rand"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/hcache/hcache/internal/testseed"
	"github.com/hcache/hcache/internal/torchtest"
)

// maxRelErr is max |a-b| / max(|b|, floor).
func maxRelErr(a, b []float32, floor float64) float64 {
	worst := 0.0
	for i := range a {
		d := math.Abs(float64(a[i]) - float64(b[i]))
		worst = max(worst, d/max(math.Abs(float64(b[i])), floor))
	}
	return worst
}

// TestForwardMatchesTorch checks the Go reference forward pass against an
// independent PyTorch implementation on the same synthetic weights.
// Tolerances: logits come from fp32 arithmetic in a different order, with
// dtype rounding on the way (see logitTol); K/V are rounded to the dtype, so
// an fp32 difference can flip a rounding of the hidden state or of K/V; the
// error is measured against the largest |K| or |V| of the layer and allowed
// four ulps of the dtype at that scale (fp16 2^-11, bf16 2^-8 per ulp).
func TestForwardMatchesTorch(t *testing.T) {
	py := torchtest.Python(t)
	seed := testseed.Seed(t)
	for _, preset := range []string{"tiny-llama", "tiny-gqa", "tiny-qwen2", "tiny-opt", "tiny-linear-rope"} {
		t.Run(preset, func(t *testing.T) {
			c, _ := Preset(preset)
			dir := t.TempDir()
			if err := WriteModel(dir, c, Synthesize(c, seed)); err != nil {
				t.Fatal(err)
			}
			w, err := LoadWeights(dir, c, WeightsAll)
			if err != nil {
				t.Fatal(err)
			}
			m, err := New(c, w)
			if err != nil {
				t.Fatal(err)
			}
			rng := rand.New(rand.NewSource(seed))
			toks := make([]int, 23)
			strs := make([]string, len(toks))
			for i := range toks {
				toks[i] = rng.Intn(c.Vocab)
				strs[i] = fmt.Sprint(toks[i])
			}
			ks, vs := make([][]float32, c.Layers), make([][]float32, c.Layers)
			logits, err := m.Forward(toks, NewKVCache(c), func(l int, _, k, v []float32) {
				ks[l] = append([]float32(nil), k...)
				vs[l] = append([]float32(nil), v...)
			})
			if err != nil {
				t.Fatal(err)
			}
			out := t.TempDir()
			cmd := exec.Command(py, filepath.Join("testdata", "torch_ref.py"), dir, strings.Join(strs, ","), out)
			if b, err := cmd.CombinedOutput(); err != nil {
				t.Fatalf("torch reference: %v\n%s", err, b)
			}
			ref := torchtest.ReadF32(t, filepath.Join(out, "logits.bin"))
			scale := 0.0
			for _, v := range ref {
				scale = max(scale, math.Abs(float64(v)))
			}
			// Rounding the hidden state and K/V to the dtype turns tiny fp32
			// differences into whole-ulp flips that reach the logits: allow
			// about two ulps of the dtype at the logit scale.
			logitTol := map[string]float64{"float32": 1e-4, "float16": 2e-3, "bfloat16": 8e-3}[c.DType]
			if e := maxRelErr(logits, ref, scale); e > logitTol {
				t.Fatalf("logits differ from torch: max error %.2e of the logit scale %.2f (tolerance %.0e)", e, scale, logitTol)
			}
			kvTol := 4.0 / 2048
			if c.DType == "bfloat16" {
				kvTol = 4.0 / 256
			} else if c.DType == "float32" {
				kvTol = 1e-4
			}
			worst := 0.0
			for l := 0; l < c.Layers; l++ {
				for _, p := range []struct {
					got  []float32
					file string
				}{{ks[l], fmt.Sprintf("k%d.bin", l)}, {vs[l], fmt.Sprintf("v%d.bin", l)}} {
					ref := torchtest.ReadF32(t, filepath.Join(out, p.file))
					s := 0.0
					for _, v := range ref {
						s = max(s, math.Abs(float64(v)))
					}
					worst = max(worst, maxRelErr(p.got, ref, s))
				}
			}
			if worst > kvTol {
				t.Fatalf("K/V differ from torch: max relative error %.2e > %.2e", worst, kvTol)
			}
			t.Logf("%s: logits within %.1e, K/V within %.1e of torch", preset, maxRelErr(logits, ref, scale), worst)
		})
	}
}
