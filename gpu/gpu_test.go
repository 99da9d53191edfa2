package gpu

import (
	"bytes"
	"math/rand"
	"testing"

	"github.com/hcache/hcache/internal/testseed"
	"github.com/hcache/hcache/model"
)

// loadTiny synthesises a preset, writes it as an HF directory and loads it
// back through the same code a real model goes through.
func loadTiny(t *testing.T, preset string, seed int64) (*model.Config, *model.Model, *model.Weights) {
	t.Helper()
	c, err := model.Preset(preset)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	if err := model.WriteModel(dir, c, model.Synthesize(c, seed)); err != nil {
		t.Fatal(err)
	}
	c, err = model.LoadConfig(dir)
	if err != nil {
		t.Fatal(err)
	}
	all, err := model.LoadWeights(dir, c, model.WeightsAll)
	if err != nil {
		t.Fatal(err)
	}
	m, err := model.New(c, all)
	if err != nil {
		t.Fatal(err)
	}
	kv, err := model.LoadWeights(dir, c, model.WeightsKV)
	if err != nil {
		t.Fatal(err)
	}
	return c, m, kv
}

// TestProjectionIsLossless runs the reference forward pass, keeps only the
// hidden states, rebuilds K/V with the CPU backend into a paged cache, and
// compares with the K/V the forward pass computed. The same arithmetic runs
// in both, so the result must be bit-exact for every architecture.
func TestProjectionIsLossless(t *testing.T) {
	cases := []struct {
		preset string
		what   string
	}{
		{"tiny-llama", "Llama MHA, rotate-half rope, fp16"},
		{"tiny-gqa", "Llama GQA 4:1, llama3 rope scaling, bf16"},
		{"tiny-qwen2", "Qwen2 with q/k/v biases, GQA 3:1"},
		{"tiny-opt", "OPT with biases, learned positions, no rope"},
		{"tiny-linear-rope", "linear rope scaling, interleaved rotary, fp32"},
	}
	seed := testseed.Seed(t)
	for _, cs := range cases {
		t.Run(cs.preset, func(t *testing.T) {
			rng := rand.New(rand.NewSource(seed))
			c, m, kvw := loadTiny(t, cs.preset, seed)
			backend, err := NewCPU(c, kvw)
			if err != nil {
				t.Fatal(err)
			}
			prompt := make([]int, 37)
			for i := range prompt {
				prompt[i] = rng.Intn(c.Vocab)
			}
			hidden := make([][]byte, c.Layers)
			cache := model.NewKVCache(c)
			trace := func(l int, h, _, _ []float32) {
				b := make([]byte, len(h)*c.ElemBytes())
				c.EncodeRow(b, h)
				hidden[l] = append(hidden[l], b...)
			}
			// Prefill, then a few decode steps, as a server would.
			toks, err := m.Generate(cache, prompt, 5, trace)
			if err != nil {
				t.Fatal(err)
			}
			n := cache.Tokens
			if n != len(prompt)+len(toks)-1 {
				t.Fatalf("cache holds %d tokens", n)
			}
			positions := make([]int, n)
			for i := range positions {
				positions[i] = i
			}
			paged, _ := NewPagedKV(c, 16, (n+15)/16)
			// A shuffled block table, as a paged allocator hands out.
			rng.Shuffle(len(paged.BlockTable), func(i, j int) { paged.BlockTable[i], paged.BlockTable[j] = paged.BlockTable[j], paged.BlockTable[i] })
			kvd := c.KVDim()
			row := make([]byte, kvd*c.ElemBytes())
			for l := 0; l < c.Layers; l++ {
				if err := backend.Project(l, hidden[l], positions, paged); err != nil {
					t.Fatal(err)
				}
				for p := 0; p < n; p++ {
					k, v, err := paged.Token(p)
					if err != nil {
						t.Fatal(err)
					}
					c.EncodeRow(row, cache.K[l][p*kvd:(p+1)*kvd])
					if !bytes.Equal(k, row) {
						t.Fatalf("%s: layer %d position %d: rebuilt K differs from the forward pass's", cs.what, l, p)
					}
					c.EncodeRow(row, cache.V[l][p*kvd:(p+1)*kvd])
					if !bytes.Equal(v, row) {
						t.Fatalf("%s: layer %d position %d: rebuilt V differs", cs.what, l, p)
					}
				}
			}
			t.Logf("%s: %d layers x %d tokens rebuilt bit-exact", cs.what, c.Layers, n)
		})
	}
}

func TestBackendInputErrors(t *testing.T) {
	c, _, kvw := loadTiny(t, "tiny-llama", 1)
	b, _ := NewCPU(c, kvw)
	paged, _ := NewPagedKV(c, 16, 1)
	cases := []struct {
		name string
		err  error
	}{
		{"layer out of range", b.Project(99, make([]byte, c.HiddenRowBytes()), []int{0}, paged)},
		{"short hidden", b.Project(0, make([]byte, c.HiddenRowBytes()-2), []int{0}, paged)},
		{"position past table", b.Project(0, make([]byte, c.HiddenRowBytes()), []int{16}, paged)},
		{"kv rows size", b.LoadKV(0, make([]byte, 3), []int{0}, paged)},
	}
	for _, cs := range cases {
		if cs.err == nil {
			t.Errorf("%s: accepted", cs.name)
		}
	}
}
