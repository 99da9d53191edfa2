package model

import (
	"slices"
	"testing"
)

// SynthesizeParallel has Synthesize's tensors at their lengths, rounded to
// the dtype, accepted by the forward pass, and the same for a seed.
func TestSynthesizeParallel(t *testing.T) {
	for _, name := range []string{"tiny-llama", "tiny-gqa", "tiny-qwen2", "tiny-opt", "tiny-linear-rope", "demo-llama"} {
		t.Run(name, func(t *testing.T) {
			c, err := Preset(name)
			if err != nil {
				t.Fatal(err)
			}
			got, want := SynthesizeParallel(c, 3), Synthesize(c, 3)
			if _, err := New(c, got); err != nil {
				t.Fatalf("the forward pass refuses the weights: %v", err)
			}
			lens := func(w *Weights) []int {
				out := []int{len(w.Embed), len(w.PosEmbed), len(w.FinalNormW), len(w.FinalNormB), len(w.LMHead)}
				for _, l := range w.Layers {
					out = append(out, len(l.AttnNormW), len(l.AttnNormB), len(l.Wq), len(l.Wk), len(l.Wv), len(l.Wo),
						len(l.Bq), len(l.Bk), len(l.Bv), len(l.Bo), len(l.MLPNormW), len(l.MLPNormB), len(l.Wgate), len(l.Wup), len(l.Wdown),
						len(l.Fc1), len(l.Fc1B), len(l.Fc2), len(l.Fc2B))
				}
				return out
			}
			if g, w := lens(got), lens(want); !slices.Equal(g, w) {
				t.Fatalf("tensor lengths %v, Synthesize's %v", g, w)
			}
			again := SynthesizeParallel(c, 3)
			if !slices.Equal(again.Layers[c.Layers-1].Wk, got.Layers[c.Layers-1].Wk) || !slices.Equal(again.Embed, got.Embed) {
				t.Fatal("two syntheses of one seed differ")
			}
			if other := SynthesizeParallel(c, 4); slices.Equal(other.Layers[0].Wq, got.Layers[0].Wq) {
				t.Fatal("two seeds give the same weights")
			}
			wq := slices.Clone(got.Layers[0].Wq)
			roundToDtype(c, wq)
			if !slices.Equal(wq, got.Layers[0].Wq) {
				t.Fatal("weights are not rounded to the dtype")
			}
		})
	}
}
