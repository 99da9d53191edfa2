package model

import (
	"math"
	"math/rand"
	"testing"
	"time"
)

// TestPrefillMatchesForward: the K and V of the first r layers computed by
// Prefill equal, bit for bit, those of a full forward pass, for every r and
// every model family.
func TestPrefillMatchesForward(t *testing.T) {
	seed := time.Now().UnixNano()
	t.Logf("seed %d", seed)
	rng := rand.New(rand.NewSource(seed))
	for _, name := range []string{"tiny-llama", "tiny-gqa", "tiny-qwen2", "tiny-opt", "tiny-linear-rope"} {
		c, _ := Preset(name)
		m, err := New(c, Synthesize(c, seed))
		if err != nil {
			t.Fatal(err)
		}
		tokens := make([]int, 20+rng.Intn(30))
		for i := range tokens {
			tokens[i] = rng.Intn(c.Vocab)
		}
		ref := NewKVCache(c)
		if _, err := m.Forward(tokens, ref, nil); err != nil {
			t.Fatal(err)
		}
		for r := 0; r <= c.Layers; r++ {
			seen := 0
			err := m.Prefill(tokens, r, func(l int, h, k, v []float32) {
				if l != seen {
					t.Fatalf("%s r=%d: trace of layer %d, want %d", name, r, l, seen)
				}
				seen++
				for i := range k {
					if math.Float32bits(k[i]) != math.Float32bits(ref.K[l][i]) || math.Float32bits(v[i]) != math.Float32bits(ref.V[l][i]) {
						t.Fatalf("%s r=%d layer %d element %d: prefill K/V differ from the forward pass", name, r, l, i)
					}
				}
			})
			if err != nil {
				t.Fatal(err)
			}
			if seen != r {
				t.Fatalf("%s: prefill of %d layers traced %d", name, r, seen)
			}
		}
		if err := m.Prefill(tokens, c.Layers+1, nil); err == nil {
			t.Fatalf("%s: prefill of more layers than the model has was accepted", name)
		}
	}
}
