package prefixwl

import (
	"fmt"
	"slices"

	"github.com/hcache/hcache/state"
)

// countChain is the chain the counts are computed under: any fixed
// namespace and identity gives the same counts (keys of one chain differ
// exactly when their token prefixes differ, barring SHA-256 collisions).
func countChain() state.Chain {
	c, err := state.NewChain("prefixwl", nil, &state.Identity{Model: []byte("prefixwl count"),
		Plan: []state.LayerPlan{{Kind: state.LayerKV, RowBytes: 2}}})
	if err != nil {
		panic(err) // a fixed, valid identity
	}
	return c
}

// Counts are a workload's figures for one group size.
type Counts struct {
	GroupTokens int   `json:"group_tokens"`
	Requests    int   `json:"requests"`
	Sessions    int   `json:"sessions"`
	Prompt      int64 `json:"prompt_tokens"`
	// Saved is the tokens all requests save (every request's Tokens).
	Saved int64 `json:"saved_tokens"`
	// PerSession is the tokens a store keyed by conversation keeps: each
	// session's last saved list, once.
	PerSession int64 `json:"per_session_tokens"`
	// Tails is the tokens past the last full group of each session's last
	// saved list: a token store keeps them beside the groups, for the
	// session that names them.
	Tails int64 `json:"tail_tokens"`
	// LogicalGroups is the full groups all requests hand over.
	LogicalGroups int64 `json:"logical_groups"`
	// UniqueGroups is the distinct chain keys among them: what a store that
	// keeps each prefix group once holds.
	UniqueGroups int64 `json:"unique_groups"`
	// SharedHit is the prompt tokens that earlier requests' groups cover
	// (group-aligned longest prefix); SessionHit the tokens a restore by
	// conversation id covers; BestHit the larger of the two per request.
	SharedHit  int64 `json:"shared_hit_tokens"`
	SessionHit int64 `json:"session_hit_tokens"`
	BestHit    int64 `json:"best_hit_tokens"`
}

// HitRate is SharedHit over the prompt tokens.
func (c Counts) HitRate() float64 { return float64(c.SharedHit) / float64(c.Prompt) }

// Hit is one request's hits (see Counts).
type Hit struct {
	Shared  int `json:"shared"`
	Session int `json:"session"`
}

// Best is the longer of the two hits.
func (h Hit) Best() int { return max(h.Shared, h.Session) }

// Count replays the workload in order with groups of group tokens: the
// counts and each request's hits.
func (w *Workload) Count(group int) (Counts, []Hit, error) {
	if group <= 0 {
		return Counts{}, nil, fmt.Errorf("%w: group of %d tokens", ErrParams, group)
	}
	c := countChain()
	seen := make(map[state.ChainKey]struct{})
	last := make(map[int][]uint32) // session -> its last saved tokens
	out := Counts{GroupTokens: group, Requests: len(w.Requests), Sessions: w.Sessions}
	hits := make([]Hit, len(w.Requests))
	for i, r := range w.Requests {
		if r.Prompt <= 0 || r.Prompt > len(r.Tokens) {
			return Counts{}, nil, fmt.Errorf("prefixwl: request %d has a prompt of %d of %d tokens", i, r.Prompt, len(r.Tokens))
		}
		keys, err := c.Keys(r.Tokens, group)
		if err != nil {
			return Counts{}, nil, err
		}
		var h Hit
		for h.Shared/group < r.Prompt/group {
			if _, ok := seen[keys[h.Shared/group]]; !ok {
				break
			}
			h.Shared += group
		}
		if prev, ok := last[r.Session]; ok {
			if len(prev) > r.Prompt || !slices.Equal(prev, r.Tokens[:len(prev)]) {
				return Counts{}, nil, fmt.Errorf("prefixwl: request %d does not extend its session %d's saved tokens", i, r.Session)
			}
			h.Session = len(prev)
		}
		hits[i] = h
		for _, k := range keys {
			seen[k] = struct{}{}
		}
		last[r.Session] = r.Tokens
		out.Prompt += int64(r.Prompt)
		out.Saved += int64(len(r.Tokens))
		out.LogicalGroups += int64(len(keys))
		out.SharedHit += int64(h.Shared)
		out.SessionHit += int64(h.Session)
		out.BestHit += int64(h.Best())
	}
	out.UniqueGroups = int64(len(seen))
	for _, t := range last {
		out.PerSession += int64(len(t))
		out.Tails += int64(len(t) % group)
	}
	return out, hits, nil
}
