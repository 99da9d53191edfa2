package serve

import (
	"errors"
	"fmt"
	"math"
	"math/rand"
	"testing"

	"github.com/hcache/hcache/chunk"
	"github.com/hcache/hcache/gpu"
	"github.com/hcache/hcache/internal/testseed"
	"github.com/hcache/hcache/model"
	"github.com/hcache/hcache/serve/sched"
)

// TestLosslessGenerationAfterRestore: prefill + 32 greedy decode steps while
// saving per-layer states to a real store; evict the KV cache; restore it from
// the store through the CPU projection backend; decode 32 more steps. The
// tokens must equal those of a run that never evicted, and the restored cache
// must equal the evicted one bit for bit.
func TestLosslessGenerationAfterRestore(t *testing.T) {
	seed := testseed.Seed(t)
	cases := []struct {
		preset string
		plan   string // hidden, kv, mixed
	}{
		{"tiny-llama", "hidden"},
		{"tiny-gqa", "hidden"},
		{"tiny-gqa", "mixed"},
		{"tiny-qwen2", "kv"},
		{"tiny-opt", "hidden"},
	}
	st, err := chunk.Open(chunk.Options{Dir: t.TempDir(), ChunkTokens: 16, SegmentBytes: 8 << 20, Logf: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	for _, cs := range cases {
		t.Run(cs.preset+"/"+cs.plan, func(t *testing.T) {
			c, _ := model.Preset(cs.preset)
			w := model.Synthesize(c, seed)
			m, err := model.New(c, w)
			if err != nil {
				t.Fatal(err)
			}
			var plan []chunk.LayerPlan
			switch cs.plan {
			case "hidden":
				plan = sched.PlanOf(c, chunk.LayerHidden)
			case "kv":
				plan = sched.PlanOf(c, chunk.LayerKV)
			case "mixed":
				plan = sched.PlanOf(c, chunk.LayerHidden)
				kv := sched.PlanOf(c, chunk.LayerKV)
				for l := 1; l < len(plan); l += 2 {
					plan[l] = kv[l]
				}
			}
			rng := rand.New(rand.NewSource(seed))
			prompt := make([]int, 45)
			for i := range prompt {
				prompt[i] = rng.Intn(c.Vocab)
			}
			// The run that never evicts.
			ref := model.NewKVCache(c)
			first, err := m.Generate(ref, prompt, 32, nil)
			if err != nil {
				t.Fatal(err)
			}
			second, err := m.Generate(ref, first[31:], 32, nil)
			if err != nil {
				t.Fatal(err)
			}
			// The run that saves, evicts and restores.
			ident := Identity(c, w, plan)
			id := fmt.Sprint(cs.preset, "-", cs.plan)
			wr, err := st.Create("test", id, ident, chunk.CreateOptions{})
			if err != nil {
				t.Fatal(err)
			}
			saver := NewSaver(c, plan, wr)
			live := model.NewKVCache(c)
			got1, err := m.Generate(live, prompt, 32, saver.Trace)
			if err != nil || saver.Err() != nil {
				t.Fatal(err, saver.Err())
			}
			if err := wr.Close(); err != nil {
				t.Fatal(err)
			}
			if fmt.Sprint(got1) != fmt.Sprint(first) {
				t.Fatal("saving changed the generated tokens")
			}
			tokens := live.Tokens
			// Evict, then restore.
			paged := make([]*gpu.PagedKV, c.Layers)
			for l := range paged {
				paged[l], _ = gpu.NewPagedKV(c, 16, (tokens+15)/16)
			}
			kvw := &model.Weights{Layers: w.Layers}
			backend, err := gpu.NewCPU(c, kvw)
			if err != nil {
				t.Fatal(err)
			}
			rs, err := Restore(st, "test", id, ident, backend, paged)
			if err != nil {
				t.Fatal(err)
			}
			if rs.Tokens != tokens {
				t.Fatalf("restored %d tokens, want %d", rs.Tokens, tokens)
			}
			restored, err := PagedToCache(c, paged, tokens)
			if err != nil {
				t.Fatal(err)
			}
			for l := 0; l < c.Layers; l++ {
				for i := range live.K[l] {
					if math.Float32bits(live.K[l][i]) != math.Float32bits(restored.K[l][i]) || math.Float32bits(live.V[l][i]) != math.Float32bits(restored.V[l][i]) {
						t.Fatalf("layer %d element %d: restored KV differs from the evicted cache", l, i)
					}
				}
			}
			got2, err := m.Generate(restored, got1[31:], 32, nil)
			if err != nil {
				t.Fatal(err)
			}
			if fmt.Sprint(got2) != fmt.Sprint(second) {
				t.Fatalf("tokens after restore differ:\n got  %v\n want %v", got2, second)
			}
		})
	}
}

// TestIdentityCoversModelAndLayout: states saved for one model are refused
// for another weights revision, another dtype or rope setting, and another
// plan; the consumer never sees a row.
func TestIdentityCoversModelAndLayout(t *testing.T) {
	st, err := chunk.Open(chunk.Options{Dir: t.TempDir(), ChunkTokens: 16, SegmentBytes: 8 << 20, Logf: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	c, _ := model.Preset("tiny-llama")
	w := model.Synthesize(c, 1)
	plan := sched.PlanOf(c, chunk.LayerHidden)
	ident := Identity(c, w, plan)
	wr, _ := st.Create("ns", "ctx", ident, chunk.CreateOptions{})
	wr.AppendLayer(0, make([]byte, 3*c.HiddenRowBytes()))
	for l := 1; l < c.Layers; l++ {
		wr.AppendLayer(l, make([]byte, 3*c.HiddenRowBytes()))
	}
	if err := wr.Close(); err != nil {
		t.Fatal(err)
	}
	bf16 := *c
	bf16.DType = "bfloat16"
	rope := *c
	rope.RopeTheta = 500000
	cases := []struct {
		name  string
		ident *chunk.Identity
	}{
		{"other weights revision", Identity(c, model.Synthesize(c, 2), plan)},
		{"other dtype", Identity(&bf16, w, plan)},
		{"other rope theta", Identity(&rope, w, plan)},
		{"other plan", Identity(c, w, sched.PlanOf(c, chunk.LayerKV))},
	}
	for _, cs := range cases {
		_, err := st.Restore("ns", "ctx", cs.ident, func(int, []byte) error {
			t.Fatalf("%s: a row was served", cs.name)
			return nil
		})
		if !errors.Is(err, chunk.ErrIdentityMismatch) {
			t.Fatalf("%s: %v, want ErrIdentityMismatch", cs.name, err)
		}
	}
	if n, err := st.Restore("ns", "ctx", Identity(c, w, plan), func(int, []byte) error { return nil }); err != nil || n != 3 {
		t.Fatalf("the same identity: %d tokens, %v", n, err)
	}
}
