package sched

import (
	"math"
	"math/rand"
	"testing"

	"github.com/hcache/hcache/internal/testseed"
	"github.com/hcache/hcache/model"
	"github.com/hcache/hcache/profiles"
	"github.com/hcache/hcache/state"
)

// bruteForce searches every split (every recomputed prefix r and every
// number k of KV layers), with hidden layers allowed or not. The plans a
// split can be (Split.Plan, SplitOf) store hidden layers before KV ones, and
// restore takes the stored layers in layer order, so that is the only
// placement the optimiser may choose; kvFirstToo also tries the KV layers
// before the hidden ones, a plan the store could hold but the scheduler
// never emits (for checking that the fixed order costs nothing on real
// platforms).
func bruteForce(pr Problem, allowHidden, kvFirstToo bool) float64 {
	best := math.Inf(1)
	L := pr.Layers
	for r := 0; r <= min(pr.MaxRecompute, L); r++ {
		for k := 0; k <= L-r; k++ {
			h := L - r - k
			if h > 0 && !allowHidden {
				continue
			}
			orders := []bool{false}
			if kvFirstToo {
				orders = append(orders, true)
			}
			for _, kvFirst := range orders {
				var order []state.LayerKind
				for i := 0; i < h+k; i++ {
					kind := state.LayerHidden
					if (kvFirst && i < k) || (!kvFirst && i >= h) {
						kind = state.LayerKV
					}
					order = append(order, kind)
				}
				t := 0.0
				for i, cs := range pr.Costs {
					w := 1.0
					if pr.Weights != nil {
						w = pr.Weights[i]
					}
					t += w * Simulate(cs, r, order)
				}
				best = min(best, t)
			}
		}
	}
	return best
}

func shapes(t *testing.T) map[string]*model.Config {
	out := map[string]*model.Config{}
	for _, n := range model.PresetNames() {
		c, _ := model.Preset(n)
		out[n] = c
	}
	// Two more shapes: a deep MHA model and an MLA-like extreme GQA one.
	mha := *out["llama2-7b"]
	mha.Layers = 80
	out["mha-80"] = &mha
	gqa := *out["llama3-8b"]
	gqa.KVHeads = 1
	gqa.Layers = 61
	out["gqa-1kv-61"] = &gqa
	return out
}

func loadProfiles(t *testing.T) []*profiles.Profile {
	var ps []*profiles.Profile
	for _, n := range profiles.Names() {
		p, err := profiles.Load(n)
		if err != nil {
			t.Fatal(err)
		}
		ps = append(ps, p)
	}
	// A compute-poor variant (a tenth of the GEMM rate and memory
	// bandwidth) so that the grid holds compute-bound platforms too.
	slow := *ps[0]
	slow.Name = ps[0].Name + "-slow-compute"
	slow.GemmTFLOPs.Value /= 10
	slow.MemGBps.Value /= 10
	ps = append(ps, &slow)
	return ps
}

// TestOptimiserMatchesBruteForce: on a grid of profiles (every tier),
// token counts and model shapes (every preset, MHA and GQA), the chosen
// split's predicted restore time is within 2% of the best split found by
// searching every one.
func TestOptimiserMatchesBruteForce(t *testing.T) {
	cases := 0
	for _, p := range loadProfiles(t) {
		for _, tier := range p.Tiers {
			pl, err := NewPlatform(p, tier.Name)
			if err != nil {
				t.Fatal(err)
			}
			for name, c := range shapes(t) {
				for _, n := range []int{64, 512, 1024, 4096, 16384, 32768} {
					d, err := pl.Choose(c, n)
					if err != nil {
						t.Fatal(err)
					}
					pr := Problem{Layers: c.Layers, Costs: []Costs{d.Costs}, Hidden: HiddenAllowed(c), MaxRecompute: c.Layers - 1}
					bf := bruteForce(pr, HiddenAllowed(c), false)
					// Hidden layers first (the plan's fixed order) costs
					// nothing on a real platform: KV layers before them
					// would not restore faster.
					if anyOrder := bruteForce(pr, HiddenAllowed(c), true); anyOrder < bf*(1-1e-9) {
						t.Errorf("%s/%s %s n=%d: KV layers before hidden ones would restore faster (%.4f < %.4f ms)", p.Name, tier.Name, name, n, anyOrder, bf)
					}
					if d.PredictedMS > bf*1.02 {
						t.Errorf("%s/%s %s n=%d: chose %v predicted %.3f ms, brute force %.3f ms", p.Name, tier.Name, name, n, d.Split, d.PredictedMS, bf)
					}
					if got := Predict(d.Costs, d.Split); got != d.PredictedMS {
						t.Errorf("%s: decision's prediction %v != Predict %v", name, d.PredictedMS, got)
					}
					if !HiddenAllowed(c) {
						if d.Split.Hidden != 0 {
							t.Errorf("%s/%s %s n=%d: GQA model chose %d hidden layers", p.Name, tier.Name, name, n, d.Split.Hidden)
						}
						// The rule costs nothing: allowing hidden layers
						// would not find a faster split.
						if free := bruteForce(pr, true, true); free < bf*(1-1e-9) {
							t.Errorf("%s/%s %s n=%d: hidden layers would have helped a GQA model (%.3f < %.3f)", p.Name, tier.Name, name, n, free, bf)
						}
					}
					if d.Split.Layers() != c.Layers || d.Split.Recompute == c.Layers {
						t.Errorf("%s: split %v does not cover %d layers with one stored", name, d.Split, c.Layers)
					}
					cases++
				}
			}
		}
	}
	t.Logf("%d cases", cases)
}

// TestOptimiserRandomCosts: random per-layer costs (seeded) and weighted
// mixtures of lengths, against brute force.
func TestOptimiserRandomCosts(t *testing.T) {
	seed := testseed.Seed(t)
	rng := rand.New(rand.NewSource(seed))
	f := func() float64 { return math.Exp(rng.Float64()*6 - 3) }
	for i := 0; i < 300; i++ {
		L := 1 + rng.Intn(48)
		pr := Problem{Layers: L, Hidden: rng.Intn(4) != 0, MaxRecompute: L - rng.Intn(2)}
		for j := 0; j < 1+rng.Intn(3); j++ {
			hio := f()
			pr.Costs = append(pr.Costs, Costs{RecomputeMS: f() * 4, ProjectMS: f(), KVLoadMS: f() / 20, HiddenIOMS: hio, KVIOMS: hio * (1 + f())})
			pr.Weights = append(pr.Weights, rng.Float64()+0.1)
		}
		s, got := Optimise(pr)
		// The reference searches the splits a plan can be: hidden layers
		// before KV ones. These costs are random, not a platform's: here a
		// KV layer may cost more to load than to read and a hidden one
		// less to project than to read, so that KV first would be faster
		// (Johnson's rule), a plan the scheduler never emits.
		bf := bruteForce(pr, pr.Hidden, false)
		if got > bf*1.02 {
			t.Fatalf("case %d (%+v): chose %v = %.4f, brute force %.4f", i, pr, s, got, bf)
		}
	}
}

// TestPlanShape: the decisions the paper describes come out.
func TestPlanShape(t *testing.T) {
	llama2, _ := model.Preset("llama2-7b")
	llama3, _ := model.Preset("llama3-8b")
	h200, _ := profiles.Load("h200-nvme")
	a100, _ := profiles.Load("a100-pm9a3x4")
	slow := *h200 // compute-bound: a tenth of the GEMM rate, DRAM tier
	slow.GemmTFLOPs.Value /= 10
	cases := []struct {
		name    string
		p       *profiles.Profile
		tier    string
		c       *model.Config
		n       int
		check   func(Split) bool
		explain string
	}{
		{"I/O-bound MHA recomputes a prefix", h200, "nvme", llama2, 4096, func(s Split) bool { return s.Recompute > 0 && s.Hidden > 0 }, "recompute > 0 and hidden > 0"},
		{"paper platform MHA recomputes a prefix", a100, "ssd-per-gpu", llama2, 4096, func(s Split) bool { return s.Recompute > 0 && s.Hidden > 0 }, "recompute > 0 and hidden > 0"},
		{"GQA stores KV, never hidden", h200, "nvme", llama3, 4096, func(s Split) bool { return s.Hidden == 0 && s.KV > 0 }, "hidden 0 and kv > 0"},
		{"compute-bound MHA keeps some KV", &slow, "dram", llama2, 16384, func(s Split) bool { return s.KV > 0 && s.Hidden > 0 }, "kv > 0 and hidden > 0"},
	}
	for _, cs := range cases {
		pl, err := NewPlatform(cs.p, cs.tier)
		if err != nil {
			t.Fatal(err)
		}
		d, err := pl.Choose(cs.c, cs.n)
		if err != nil {
			t.Fatal(err)
		}
		if !cs.check(d.Split) {
			t.Errorf("%s: split %v, want %s (costs %+v)", cs.name, d.Split, cs.explain, d.Costs)
		}
		all := Predict(d.Costs, Split{Hidden: cs.c.Layers})
		if !HiddenAllowed(cs.c) {
			all = Predict(d.Costs, Split{KV: cs.c.Layers})
		}
		if d.PredictedMS > all {
			t.Errorf("%s: scheduled %.2f ms is slower than a single kind (%.2f ms)", cs.name, d.PredictedMS, all)
		}
	}
}

func TestSplitPlanRoundTrip(t *testing.T) {
	c, _ := model.Preset("tiny-llama")
	for _, s := range []Split{{1, 2, 1}, {0, 4, 0}, {3, 0, 1}, {0, 0, 4}} {
		p := s.Plan(c)
		got, ok := SplitOf(p)
		if !ok || got != s {
			t.Errorf("split %v -> plan -> %v (%v)", s, got, ok)
		}
		id := state.Identity{Model: []byte{1}, Plan: p}
		if err := id.Validate(); err != nil {
			t.Errorf("split %v: plan refused by the store: %v", s, err)
		}
	}
	bad := []state.LayerPlan{LayerPlanOf(c, state.LayerKV), LayerPlanOf(c, state.LayerHidden)}
	if _, ok := SplitOf(bad); ok {
		t.Error("kv before hidden read as a split")
	}
}

// TestCostsFromProfile: a curve measured on a model gives back its own
// points for that model, scales up for a bigger one, and I/O is bytes over
// the slower of the tier and the host-to-device copy.
func TestCostsFromProfile(t *testing.T) {
	h200, _ := profiles.Load("h200-nvme")
	pl, _ := NewPlatform(h200, "nvme")
	l7, _ := model.Preset("llama2-7b")
	l13, _ := model.Preset("llama2-13b")
	for _, pt := range h200.Recompute.Points {
		cs, err := pl.Costs(l7, pt.Tokens)
		if err != nil {
			t.Fatal(err)
		}
		if got := cs.RecomputeMS * float64(l7.Layers); math.Abs(got-pt.MS) > 1e-9*pt.MS {
			t.Errorf("llama2-7b recompute at %d: %v ms, the curve says %v", pt.Tokens, got, pt.MS)
		}
		big, _ := pl.Costs(l13, pt.Tokens)
		if big.RecomputeMS*float64(l13.Layers) <= pt.MS*1.5 {
			t.Errorf("llama2-13b recompute at %d: %v ms, want well above the 7B's %v", pt.Tokens, big.RecomputeMS*float64(l13.Layers), pt.MS)
		}
		wantIO := float64(pt.Tokens*l7.HiddenRowBytes()) / 1.9e9 * 1e3
		if math.Abs(cs.HiddenIOMS-wantIO) > 1e-9*wantIO || math.Abs(cs.KVIOMS-2*wantIO) > 1e-9*wantIO {
			t.Errorf("I/O at %d tokens: hidden %v kv %v, want %v and twice that", pt.Tokens, cs.HiddenIOMS, cs.KVIOMS, wantIO)
		}
	}
	dram, _ := NewPlatform(h200, "dram")
	if dram.IOGBps() != 55 {
		t.Errorf("dram tier moves at %v GB/s, want the 55 GB/s H2D bound", dram.IOGBps())
	}
	// Without a curve: FLOPs at the GEMM rate times the efficiency.
	a100, _ := profiles.Load("a100-pm9a3x4")
	pa, _ := NewPlatform(a100, "")
	cs, _ := pa.Costs(l7, 4096)
	want := recomputeFlops(ShapeOf(l7), 4096)/(265e12*0.53)*1e3 + 0.02
	if math.Abs(cs.RecomputeMS-want) > 1e-9*want {
		t.Errorf("a100 recompute per layer %v ms, want %v", cs.RecomputeMS, want)
	}
}
