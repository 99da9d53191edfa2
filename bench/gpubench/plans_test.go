package gpubench

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/hcache/hcache/internal/torchtest"
	"github.com/hcache/hcache/model"
	"github.com/hcache/hcache/profiles"
	"github.com/hcache/hcache/serve/sched"
)

func h200(t *testing.T) *profiles.Profile {
	p, err := profiles.Load("h200-nvme")
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// The plan benchmark on the CPU backend: one row per (tokens, plan) with
// the plan's layer counts (the scheduled one as the scheduler chose it),
// positive times over the rounds asked, the disk's read speed, and every
// checked layer written (a plan whose recompute or reads skipped a layer
// would leave it poisoned).
func TestRunPlansCPU(t *testing.T) {
	prof := h200(t)
	tokens := []int{24, 70}
	const reps = 2
	rows, err := RunPlans(PlanOptions{Model: "demo-llama", Tokens: tokens, Reps: reps, Dir: t.TempDir(), Backend: "cpu",
		Profile: prof, ProfileName: "h200-nvme", Seed: 1})
	if err != nil {
		t.Fatal(err)
	}
	if len(rows) != len(tokens)*len(PlanKinds) {
		t.Fatalf("%d rows, want %d", len(rows), len(tokens)*len(PlanKinds))
	}
	c, _ := model.Preset("demo-llama")
	pl, _ := sched.NewPlatform(prof, "")
	for i, r := range rows {
		n, kind := tokens[i/len(PlanKinds)], PlanKinds[i%len(PlanKinds)]
		if r.Tokens != n || r.Plan != kind {
			t.Fatalf("row %d is (%d, %s), want (%d, %s)", i, r.Tokens, r.Plan, n, kind)
		}
		want, _ := planSplit(kind, c, pl, n)
		if kind == PlanScheduled {
			d, err := pl.Choose(c, n)
			if err != nil {
				t.Fatal(err)
			}
			want = d.Split
		}
		if (sched.Split{Recompute: r.Recomputed, Hidden: r.Hidden, KV: r.KV}) != want {
			t.Errorf("%d %s: layers %d/%d/%d, want %v", n, kind, r.Recomputed, r.Hidden, r.KV, want)
		}
		if r.Rounds != reps || r.RestoreSpread.N != reps || !(r.RestoreMS > 0) || r.RestoreSpread.Min > r.RestoreMS || r.RestoreMS > r.RestoreSpread.Max {
			t.Errorf("%d %s: restore %v ms over %d rounds", n, kind, r.RestoreSpread, r.Rounds)
		}
		if !(r.DiskGBps > 0) || r.DiskSpread.N != reps || !(r.PredictedMS > 0) {
			t.Errorf("%d %s: disk %v GB/s, predicted %v ms", n, kind, r.DiskGBps, r.PredictedMS)
		}
		if r.Unwritten != 0 || len(r.CheckedLayers) == 0 {
			t.Errorf("%d %s: %d elements unwritten in layers %v", n, kind, r.Unwritten, r.CheckedLayers)
		}
		wantBytes := int64(n) * int64(want.Hidden*c.HiddenRowBytes()+want.KV*c.KVRowBytes())
		if r.ReadBytes != wantBytes {
			t.Errorf("%d %s: reads %d bytes, want %d", n, kind, r.ReadBytes, wantBytes)
		}
		if kind == PlanScheduled && (r.OverBest == nil || r.OverBest.N != reps || r.OverBestTarget != ScheduledTarget) {
			t.Errorf("%d scheduled: over_best %+v", n, r.OverBest)
		}
		t.Logf("%d %-9s %d/%d/%d restore %.2f ms predicted %.3f ms disk %.2f GB/s unwritten %d in %v", n, kind, r.Recomputed, r.Hidden, r.KV, r.RestoreMS, r.PredictedMS, r.DiskGBps, r.Unwritten, r.CheckedLayers)
		if r.Backend != "cpu" || r.Model != "demo-llama" || r.Profile != "h200-nvme" {
			t.Errorf("row %d names %q %q %q", i, r.Backend, r.Model, r.Profile)
		}
	}
	if entries, _ := os.ReadDir(filepath.Dir(t.TempDir())); len(entries) == 0 {
		t.Log("temporary directories removed")
	}
}

func TestRunPlansRefuses(t *testing.T) {
	prof := h200(t)
	base := PlanOptions{Model: "tiny-llama", Tokens: []int{16}, Dir: t.TempDir(), Backend: "cpu", Profile: prof}
	for _, tc := range []struct {
		name string
		edit func(*PlanOptions)
	}{
		{"unknown plan", func(o *PlanOptions) { o.Plans = []string{"fastest"} }},
		{"plan twice", func(o *PlanOptions) { o.Plans = []string{"kv", "kv"} }},
		{"no tokens", func(o *PlanOptions) { o.Tokens = nil }},
		{"zero tokens", func(o *PlanOptions) { o.Tokens = []int{0} }},
		{"no store directory", func(o *PlanOptions) { o.Dir = "" }},
		{"no profile", func(o *PlanOptions) { o.Profile = nil }},
		{"unknown backend", func(o *PlanOptions) { o.Backend = "tpu" }},
		{"too big for the cpu", func(o *PlanOptions) { o.Model = "llama2-7b" }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o := base
			tc.edit(&o)
			if _, err := RunPlans(o); err == nil {
				t.Fatal("accepted")
			} else {
				t.Log(err)
			}
		})
	}
}

// The PyTorch baseline runs (on the CPU, a tiny shape), its JSON parses,
// and the recompute rows carry it beside hcache's own recompute.
func TestTorchBaselineCPU(t *testing.T) {
	py := torchtest.Python(t)
	c, _ := model.Preset("tiny-gqa")
	script, err := filepath.Abs("../../scripts/torch_prefill.py")
	if err != nil {
		t.Fatal(err)
	}
	o := TorchOptions{Python: py, Script: script, Device: "cpu", Reps: 3}
	tokens := []int{16, 40}
	res, err := RunTorch(o, c, c.Layers, tokens)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("torch %s on %s (%s, %s)", res.Torch, res.Device, res.Attention, res.Timer)
	for _, n := range tokens {
		s, ok := res.At(n)
		if !ok || s.N != 3 || !(s.Median > 0) {
			t.Fatalf("%d tokens: %+v %v", n, s, ok)
		}
	}
	for _, r := range res.Rows {
		if !r.Finite {
			t.Errorf("%d tokens: the prefill's output is not finite", r.Tokens)
		}
	}
	if res.DType != "fp32" || res.Shape["kv_heads"] != float64(c.KVHeads) || res.Shape["layers"] != float64(c.Layers) {
		t.Fatalf("dtype %s shape %v", res.DType, res.Shape)
	}
	rows, err := RunPlans(PlanOptions{Model: "tiny-gqa", Tokens: tokens, Plans: []string{PlanRecompute, PlanKV}, Reps: 1,
		Dir: t.TempDir(), Backend: "cpu", Profile: h200(t), Torch: &o})
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range rows {
		if r.Plan != PlanRecompute {
			if r.TorchMS != 0 {
				t.Errorf("%s row carries the torch baseline", r.Plan)
			}
			continue
		}
		if r.TorchError != "" || !(r.TorchMS > 0) || r.TorchSpread == nil || r.OverTorch != r.RestoreMS/r.TorchMS || r.TorchTarget != TorchTarget {
			t.Errorf("%d tokens: torch %v ms (%s), over %v", r.Tokens, r.TorchMS, r.TorchError, r.OverTorch)
		}
	}
}

func TestParseTorchRefuses(t *testing.T) {
	ok := `{"rows": [{"tokens": 8, "layers": 2, "ms": {"median": 2, "min": 1, "max": 3, "n": 3}}]}`
	if _, err := ParseTorch([]byte(ok), 2, []int{8}); err != nil {
		t.Fatal(err)
	}
	for name, data := range map[string]string{
		"not json":     "Traceback (most recent call last)",
		"missing row":  `{"rows": []}`,
		"wrong layers": `{"rows": [{"tokens": 8, "layers": 3, "ms": {"median": 2, "min": 1, "max": 3, "n": 3}}]}`,
		"zero time":    `{"rows": [{"tokens": 8, "layers": 2, "ms": {"median": 0, "min": 0, "max": 0, "n": 3}}]}`,
		"no samples":   `{"rows": [{"tokens": 8, "layers": 2, "ms": {"median": 2, "min": 1, "max": 3, "n": 0}}]}`,
		"bad range":    `{"rows": [{"tokens": 8, "layers": 2, "ms": {"median": 2, "min": 2.5, "max": 3, "n": 3}}]}`,
	} {
		if _, err := ParseTorch([]byte(data), 2, []int{8}); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

// A failing baseline is reported in the recompute rows; the benchmark goes on.
func TestRunPlansTorchFails(t *testing.T) {
	rows, err := RunPlans(PlanOptions{Model: "tiny-llama", Tokens: []int{16}, Plans: []string{PlanRecompute}, Reps: 1,
		Dir: t.TempDir(), Backend: "cpu", Profile: h200(t), Torch: &TorchOptions{Python: "/bin/false", Script: "torch_prefill.py"}})
	if err != nil {
		t.Fatal(err)
	}
	if len(rows) != 1 || rows[0].TorchError == "" || rows[0].TorchMS != 0 || !(rows[0].RestoreMS > 0) {
		t.Fatalf("%+v", rows)
	}
	t.Log(rows[0].TorchError)
}
