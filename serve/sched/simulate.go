package sched

import (
	"fmt"
	"math"
	"sort"

	"github.com/hcache/hcache/model"
)

// Row is one method's figures over a workload.
type Row struct {
	Method               string  `json:"method"`
	TTFTMean             float64 `json:"ttft_ms_mean"`
	TTFTP99              float64 `json:"ttft_ms_p99"`
	StorageBytesPerToken float64 `json:"storage_bytes_per_token"`
	Split                *Split  `json:"split,omitempty"`
}

// SimResult is the output of a simulation.
type SimResult struct {
	Profile  string         `json:"profile"`
	Tier     string         `json:"tier"`
	Model    string         `json:"model"`
	Workload WorkloadParams `json:"workload"`
	Seed     int64          `json:"seed"`
	Restores int            `json:"restores"`
	MeanCtx  float64        `json:"mean_context_tokens"`
	Rows     []Row          `json:"rows"`
}

// Simulate prices every restore of a workload under four methods with the
// pipeline model: "recompute" (nothing stored; prefill everything),
// "kv" (every layer KV), "hidden" (every layer hidden) and "scheduled"
// (one split chosen by the scheduler for the workload's length
// distribution, fixed before any context is saved). The time to first
// token is the restore plus the prefill of the new prompt on top of the
// context, R(ctx+prompt) - R(ctx) with R the full recomputation; for
// "recompute" it is R(ctx+prompt). Requests are served one at a time (no
// queueing).
func (pl *Platform) Simulate(c *model.Config, name string, reqs []Request) (*SimResult, error) {
	res := &SimResult{Profile: pl.Profile.Name, Tier: pl.Tier.Name, Model: name, Restores: len(reqs)}
	lengths := make([]int, len(reqs))
	for i, r := range reqs {
		lengths[i] = r.Context
		res.MeanCtx += float64(r.Context)
	}
	res.MeanCtx /= float64(len(reqs))
	// The scheduler plans for the distribution: a sample of 64 quantiles.
	sorted := append([]int(nil), lengths...)
	sort.Ints(sorted)
	var sample []int
	for q := 0; q < 64; q++ {
		sample = append(sample, sorted[(2*q+1)*len(sorted)/128])
	}
	split, err := pl.ChooseFor(c, sample, true)
	if err != nil {
		return nil, err
	}
	L := c.Layers
	methods := []struct {
		name  string
		split Split
	}{
		{"recompute", Split{Recompute: L}},
		{"kv", Split{KV: L}},
		{"hidden", Split{Hidden: L}},
		{"scheduled", split},
	}
	recompute := func(n int) (float64, error) {
		cs, err := pl.Costs(c, n)
		return float64(L) * cs.RecomputeMS, err
	}
	for _, m := range methods {
		var ttft []float64
		for _, r := range reqs {
			cs, err := pl.Costs(c, r.Context)
			if err != nil {
				return nil, err
			}
			restore := Predict(cs, m.split)
			full, err := recompute(r.Context + r.Prompt)
			if err != nil {
				return nil, err
			}
			ttft = append(ttft, restore+full-float64(L)*cs.RecomputeMS)
		}
		row := Row{Method: m.name, TTFTMean: mean(ttft), TTFTP99: quantile(ttft, 0.99),
			StorageBytesPerToken: float64(m.split.Hidden*c.HiddenRowBytes() + m.split.KV*c.KVRowBytes())}
		if m.name == "scheduled" {
			s := m.split
			row.Split = &s
		}
		res.Rows = append(res.Rows, row)
	}
	return res, nil
}

func mean(v []float64) float64 {
	t := 0.0
	for _, x := range v {
		t += x
	}
	return t / float64(len(v))
}

// quantile is the nearest-rank quantile.
func quantile(v []float64, q float64) float64 {
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	i := int(math.Ceil(q*float64(len(s)))) - 1
	return s[max(0, min(len(s)-1, i))]
}

// Row returns the row of a method.
func (r *SimResult) Row(method string) (Row, error) {
	for _, row := range r.Rows {
		if row.Method == method {
			return row, nil
		}
	}
	return Row{}, fmt.Errorf("no row %q", method)
}
