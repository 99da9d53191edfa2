package model

import (
	"errors"
	"math"
	"math/rand"
	"testing"

	"github.com/hcache/hcache/internal/testseed"
)

// TestPrefillMatchesForward: the K and V of the first r layers computed by
// Prefill equal, bit for bit, those of a full forward pass, for every r and
// every model family.
func TestPrefillMatchesForward(t *testing.T) {
	seed := testseed.Seed(t)
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

func TestPrefillStop(t *testing.T) {
	c, _ := Preset("tiny-llama")
	m, _ := New(c, Synthesize(c, 1))
	stop := make(chan struct{})
	seen := 0
	err := m.PrefillStop([]int{1, 2, 3}, c.Layers, func(l int, _, _, _ []float32) {
		seen++
		if l == 1 {
			close(stop)
		}
	}, stop)
	if !errors.Is(err, ErrStopped) || seen != 2 {
		t.Fatalf("stopped after layer 1: %v, %d layers traced", err, seen)
	}
	if err := m.PrefillStop([]int{1, 2, 3}, c.Layers, nil, make(chan struct{})); err != nil {
		t.Fatalf("an open stop channel: %v", err)
	}
}
