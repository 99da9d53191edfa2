package sched

import (
	"fmt"
	"math"

	"github.com/hcache/hcache/model"
	"github.com/hcache/hcache/state"
)

// Split is a plan in the scheduler's form: layers [0, Recompute) store
// nothing and are recomputed from the tokens; the next Hidden layers store
// hidden states; the last KV layers store plain K and V. Restore reads the
// stored layers in layer order, so hidden layers (compute-heavy) come first
// and KV layers (I/O-heavy, nearly free to load) last, the order Johnson's
// rule gives for a two-stage flow shop.
type Split struct {
	Recompute int `json:"recompute"`
	Hidden    int `json:"hidden"`
	KV        int `json:"kv"`
}

// Layers is the number of layers of the split.
func (s Split) Layers() int { return s.Recompute + s.Hidden + s.KV }

func (s Split) String() string {
	return fmt.Sprintf("recompute %d, hidden %d, kv %d", s.Recompute, s.Hidden, s.KV)
}

// Plan builds the per-layer store plan of a split for model c.
func (s Split) Plan(c *model.Config) []state.LayerPlan {
	return s.PlanCodec(c, state.CodecNone)
}

// PlanCodec builds the per-layer store plan of a split for model c with rows
// encoded by cd.
func (s Split) PlanCodec(c *model.Config, cd state.Codec) []state.LayerPlan {
	p := make([]state.LayerPlan, c.Layers)
	for l := range p {
		switch {
		case l < s.Recompute:
			p[l] = state.LayerPlan{Kind: state.LayerNone}
		case l < s.Recompute+s.Hidden:
			p[l] = LayerPlanOfCodec(c, state.LayerHidden, cd)
		default:
			p[l] = LayerPlanOfCodec(c, state.LayerKV, cd)
		}
	}
	return p
}

// SplitOf reads a plan back into a split; ok is false when the plan is not
// of the form none* hidden* kv*.
func SplitOf(plan []state.LayerPlan) (s Split, ok bool) {
	phase := 0
	for _, p := range plan {
		switch p.Kind {
		case state.LayerNone:
			if phase > 0 {
				return s, false
			}
			s.Recompute++
		case state.LayerHidden:
			if phase > 1 {
				return s, false
			}
			phase = 1
			s.Hidden++
		case state.LayerKV:
			phase = 2
			s.KV++
		default:
			return s, false
		}
	}
	return s, true
}

// Simulate is the pipeline model of a restore: the compute stream first
// recomputes r layers from the tokens (it needs no reads), then takes the
// stored layers in order, each once its read is done; the I/O stream reads
// the stored layers back to back from time zero (restore buffers the reads
// that arrive while compute is busy). order lists the stored layers' kinds
// in restore order. It returns the time the last layer is ready, in ms.
func Simulate(cs Costs, r int, order []state.LayerKind) float64 {
	io, comp := 0.0, float64(r)*cs.RecomputeMS
	for _, k := range order {
		if k == state.LayerHidden {
			io += cs.HiddenIOMS
			comp = max(comp, io) + cs.ProjectMS
		} else {
			io += cs.KVIOMS
			comp = max(comp, io) + cs.KVLoadMS
		}
	}
	return comp
}

// Predict is Simulate for a split (hidden layers first, then KV).
func Predict(cs Costs, s Split) float64 {
	return Simulate(cs, s.Recompute, s.order())
}

func (s Split) order() []state.LayerKind {
	o := make([]state.LayerKind, 0, s.Hidden+s.KV)
	for i := 0; i < s.Hidden; i++ {
		o = append(o, state.LayerHidden)
	}
	for i := 0; i < s.KV; i++ {
		o = append(o, state.LayerKV)
	}
	return o
}

// HiddenAllowed reports whether hidden states can ever pay: only when a
// hidden row is smaller than a K/V row (MHA models). For GQA and MLA models
// a hidden layer reads more bytes and computes more than a KV layer, so the
// scheduler never chooses it.
func HiddenAllowed(c *model.Config) bool { return c.HiddenRowBytes() < c.KVRowBytes() }

// Problem is what the optimiser minimises: the weighted sum of predicted
// restore times over one or more context lengths (one Costs each).
type Problem struct {
	Layers  int
	Costs   []Costs
	Weights []float64 // nil: equal weights
	// Hidden says whether hidden layers may be chosen (HiddenAllowed).
	Hidden bool
	// MaxRecompute bounds the recomputed prefix: Layers-1 when the context
	// must store something (the store refuses a plan that stores nothing),
	// Layers to allow "store nothing, recompute everything".
	MaxRecompute int
}

// Objective is the weighted predicted restore time of a split.
func (pr *Problem) Objective(s Split) float64 {
	t := 0.0
	for i, cs := range pr.Costs {
		w := 1.0
		if pr.Weights != nil {
			w = pr.Weights[i]
		}
		t += w * Predict(cs, s)
	}
	return t
}

// Optimise chooses the split. For each recomputed prefix r it solves the
// steady-state balance of the paper's formulation (the compute stream
// r T_rc + (s-k) T_hc + k T_kv against the I/O stream (s-k) T_hio + k T_kvio,
// s = L - r stored layers, k of them KV) for k in closed form, once per
// context length, and evaluates the integers around each solution and the
// ends with the exact pipeline model: O(L x lengths) evaluations, against
// the O(L^2) of a search over every split.
func Optimise(pr Problem) (Split, float64) {
	L := pr.Layers
	maxR := min(pr.MaxRecompute, L)
	best, bestT := Split{}, math.Inf(1)
	try := func(s Split) {
		if s.Recompute < 0 || s.Hidden < 0 || s.KV < 0 || s.Layers() != L {
			return
		}
		if !pr.Hidden && s.Hidden > 0 {
			return
		}
		if t := pr.Objective(s); t < bestT {
			best, bestT = s, t
		}
	}
	// A weighted sum over several lengths need not be minimised near any
	// one length's balance point: small problems scan every k exactly.
	exact := len(pr.Costs) > 1 && (L+1)*(L+1)*L*len(pr.Costs) <= 50_000_000
	for r := 0; r <= maxR; r++ {
		n := L - r
		if !pr.Hidden {
			try(Split{Recompute: r, KV: n})
			continue
		}
		if exact {
			for k := 0; k <= n; k++ {
				try(Split{Recompute: r, Hidden: n - k, KV: k})
			}
			continue
		}
		try(Split{Recompute: r, Hidden: n})
		try(Split{Recompute: r, KV: n})
		for _, cs := range pr.Costs {
			den := (cs.ProjectMS - cs.KVLoadMS) + (cs.KVIOMS - cs.HiddenIOMS)
			if den <= 0 {
				continue
			}
			k := (float64(r)*cs.RecomputeMS + float64(n)*(cs.ProjectMS-cs.HiddenIOMS)) / den
			k = math.Max(0, math.Min(float64(n), k))
			f := int(math.Floor(k))
			for kk := f - 1; kk <= f+2; kk++ {
				if kk >= 0 && kk <= n {
					try(Split{Recompute: r, Hidden: n - kk, KV: kk})
				}
			}
		}
	}
	return best, bestT
}
