package sched

import (
	"fmt"
	"sort"

	"github.com/hcache/hcache/model"
)

// Shared prefixes in the simulation.
//
// SimulatePrefix prices a shared-prefix workload's requests (see
// bench/prefixwl): each request has a prompt and two hits, the tokens a
// store keyed by conversation restores (its session's previous context)
// and the tokens a token-addressed store restores (the longest stored
// prefix, whichever request saved it, or the session's own context when
// that is longer: the caller names its context). TTFT = predicted restore
// of the hit + prefill of the rest on top of it, R(prompt) - R(hit), R the
// full recomputation; a request with no hit is R(prompt). A hit is capped at
// prompt - 1 tokens: the engine computes at least the last prompt token to
// get its logits (vLLM does the same). Storage is bytes per token times the
// tokens each store keeps: every session's last context for the
// conversation store, the unique groups for the token store. Requests are
// served one at a time, as in Simulate.

// PrefixRequest is one request of a shared-prefix workload.
type PrefixRequest struct {
	Prompt     int // prompt tokens
	SessionHit int // tokens a restore by conversation id covers
	SharedHit  int // tokens a token lookup covers (group-aligned)
}

// PrefixStorage is the tokens each way of keying keeps.
type PrefixStorage struct {
	SessionTokens int64 `json:"session_tokens"` // every session's last saved context, once
	UniqueTokens  int64 `json:"unique_tokens"`  // unique groups x group tokens, plus the sessions' tails
}

// PrefixRow is one (sharing, method) pair's figures over a workload.
type PrefixRow struct {
	Sharing      string  `json:"sharing"` // "session" (conversation id) or "prefix" (tokens)
	Method       string  `json:"method"`
	TTFTMean     float64 `json:"ttft_ms_mean"`
	TTFTP50      float64 `json:"ttft_ms_p50"`
	TTFTP99      float64 `json:"ttft_ms_p99"`
	HitRate      float64 `json:"hit_rate"` // restored over prompt tokens
	StorageBytes float64 `json:"storage_bytes"`
	Split        *Split  `json:"split,omitempty"`
}

// PrefixSimResult is the output of SimulatePrefix.
type PrefixSimResult struct {
	Profile    string      `json:"profile"`
	Tier       string      `json:"tier"`
	Model      string      `json:"model"`
	Workload   any         `json:"workload"`
	Seed       int64       `json:"seed"`
	Group      int         `json:"group_tokens"`
	Requests   int         `json:"requests"`
	PromptMean float64     `json:"prompt_mean_tokens"`
	Rows       []PrefixRow `json:"rows"`
	// Stored is the tokens each keying keeps (a row's storage_bytes is
	// this times its split's bytes per token).
	Stored PrefixStorage `json:"stored_tokens"`
	// PrefixOverSession is the token store's mean TTFT under its scheduled
	// split over the conversation store's (below 1: sharing is faster).
	PrefixOverSession float64 `json:"prefix_over_session_ttft_mean"`
}

// SimulatePrefix prices the requests under "recompute" (nothing stored),
// and "kv", "hidden" and "scheduled" (one split for the distribution of
// restored lengths) for each of the two ways of keying.
func (pl *Platform) SimulatePrefix(c *model.Config, name string, reqs []PrefixRequest, st PrefixStorage) (*PrefixSimResult, error) {
	if len(reqs) == 0 {
		return nil, fmt.Errorf("sched: no requests to simulate")
	}
	res := &PrefixSimResult{Profile: pl.Profile.Name, Tier: pl.Tier.Name, Model: name, Requests: len(reqs), Stored: st}
	var prompt int64
	for i, r := range reqs {
		if r.Prompt <= 0 || r.SessionHit < 0 || r.SharedHit < 0 || r.SessionHit > r.Prompt || r.SharedHit > r.Prompt {
			return nil, fmt.Errorf("sched: request %d: prompt %d, hits %d and %d (want 0 <= hit <= prompt, prompt > 0)", i, r.Prompt, r.SessionHit, r.SharedHit)
		}
		prompt += int64(r.Prompt)
	}
	res.PromptMean = float64(prompt) / float64(len(reqs))
	L := c.Layers
	rc := map[int]float64{} // R(n), memoised: many requests share lengths
	costs := map[int]Costs{}
	costsAt := func(n int) (Costs, error) {
		if cs, ok := costs[n]; ok {
			return cs, nil
		}
		cs, err := pl.Costs(c, n)
		costs[n] = cs
		return cs, err
	}
	recompute := func(n int) (float64, error) {
		if n == 0 {
			return 0, nil
		}
		if v, ok := rc[n]; ok {
			return v, nil
		}
		cs, err := costsAt(n)
		rc[n] = float64(L) * cs.RecomputeMS
		return rc[n], err
	}
	row := func(sharing, method string, split Split, hit func(PrefixRequest) int, stored int64) (PrefixRow, error) {
		ttft := make([]float64, 0, len(reqs))
		var restored int64
		for _, r := range reqs {
			h := min(hit(r), r.Prompt-1)
			full, err := recompute(r.Prompt)
			if err != nil {
				return PrefixRow{}, err
			}
			if h <= 0 {
				ttft = append(ttft, full)
				continue
			}
			cs, err := costsAt(h)
			if err != nil {
				return PrefixRow{}, err
			}
			rh, _ := recompute(h)
			ttft = append(ttft, Predict(cs, split)+full-rh)
			restored += int64(h)
		}
		out := PrefixRow{Sharing: sharing, Method: method, TTFTMean: mean(ttft), TTFTP50: quantile(ttft, 0.5), TTFTP99: quantile(ttft, 0.99),
			HitRate: float64(restored) / float64(prompt), StorageBytes: float64(stored) * float64(split.Hidden*c.HiddenRowBytes()+split.KV*c.KVRowBytes())}
		if method == "scheduled" {
			s := split
			out.Split = &s
		}
		return out, nil
	}
	none := func(PrefixRequest) int { return 0 }
	r0, err := row("none", "recompute", Split{Recompute: L}, none, 0)
	if err != nil {
		return nil, err
	}
	res.Rows = append(res.Rows, r0)
	means := map[string]float64{}
	for _, k := range []struct {
		sharing string
		hit     func(PrefixRequest) int
		stored  int64
	}{
		{"session", func(r PrefixRequest) int { return r.SessionHit }, st.SessionTokens},
		{"prefix", func(r PrefixRequest) int { return max(r.SharedHit, r.SessionHit) }, st.UniqueTokens},
	} {
		var lengths []int
		for _, r := range reqs {
			if h := min(k.hit(r), r.Prompt-1); h > 0 {
				lengths = append(lengths, h)
			}
		}
		split := Split{KV: L}
		if len(lengths) > 0 {
			sort.Ints(lengths)
			var sample []int
			for q := 0; q < 64; q++ {
				sample = append(sample, lengths[(2*q+1)*len(lengths)/128])
			}
			if split, err = pl.ChooseFor(c, sample, true); err != nil {
				return nil, err
			}
		}
		for _, m := range []struct {
			name  string
			split Split
		}{{"kv", Split{KV: L}}, {"hidden", Split{Hidden: L}}, {"scheduled", split}} {
			r, err := row(k.sharing, m.name, m.split, k.hit, k.stored)
			if err != nil {
				return nil, err
			}
			res.Rows = append(res.Rows, r)
			if m.name == "scheduled" {
				means[k.sharing] = r.TTFTMean
			}
		}
	}
	res.PrefixOverSession = means["prefix"] / means["session"]
	return res, nil
}

// Row returns the row of a sharing and method.
func (r *PrefixSimResult) Row(sharing, method string) (PrefixRow, error) {
	for _, row := range r.Rows {
		if row.Sharing == sharing && row.Method == method {
			return row, nil
		}
	}
	return PrefixRow{}, fmt.Errorf("no row %s/%s", sharing, method)
}
