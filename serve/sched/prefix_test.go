package sched

import (
	"math"
	"strings"
	"testing"

	"github.com/hcache/hcache/model"
	"github.com/hcache/hcache/profiles"
)

func prefixPlatform(t *testing.T, name string) (*Platform, *model.Config) {
	t.Helper()
	p, err := profiles.Load("a100-pm9a3x4")
	if err != nil {
		t.Fatal(err)
	}
	pl, err := NewPlatform(p, "")
	if err != nil {
		t.Fatal(err)
	}
	c, err := model.Preset(name)
	if err != nil {
		t.Fatal(err)
	}
	return pl, c
}

// TestSimulatePrefixByHand: a request's TTFT is the restore of its hit plus
// the prefill of the rest, R(prompt) - R(hit), a hit never covers the whole
// prompt, and storage is bytes per token times the tokens each store keeps.
func TestSimulatePrefixByHand(t *testing.T) {
	pl, c := prefixPlatform(t, "llama2-7b")
	L := c.Layers
	R := func(n int) float64 {
		cs, err := pl.Costs(c, n)
		if err != nil {
			t.Fatal(err)
		}
		return float64(L) * cs.RecomputeMS
	}
	restore := func(n int, s Split) float64 {
		cs, _ := pl.Costs(c, n)
		return Predict(cs, s)
	}
	kv := Split{KV: L}
	cases := []struct {
		name    string
		req     PrefixRequest
		sharing string
		want    float64
	}{
		{"no hit: prefill everything", PrefixRequest{Prompt: 3000}, "prefix", R(3000)},
		{"session hit only", PrefixRequest{Prompt: 3000, SessionHit: 2000}, "session", restore(2000, kv) + R(3000) - R(2000)},
		{"shared hit, no session", PrefixRequest{Prompt: 3000, SharedHit: 2048}, "prefix", restore(2048, kv) + R(3000) - R(2048)},
		{"shared hit unused by the session store", PrefixRequest{Prompt: 3000, SharedHit: 2048}, "session", R(3000)},
		{"the longer of the two", PrefixRequest{Prompt: 3000, SessionHit: 2100, SharedHit: 2048}, "prefix", restore(2100, kv) + R(3000) - R(2100)},
		{"a whole-prompt hit prefills its last token", PrefixRequest{Prompt: 4096, SharedHit: 4096}, "prefix", restore(4095, kv) + R(4096) - R(4095)},
	}
	for _, tc := range cases {
		res, err := pl.SimulatePrefix(c, "llama2-7b", []PrefixRequest{tc.req}, PrefixStorage{SessionTokens: 100, UniqueTokens: 10})
		if err != nil {
			t.Fatal(err)
		}
		row, err := res.Row(tc.sharing, "kv")
		if err != nil {
			t.Fatal(err)
		}
		if math.Abs(row.TTFTMean-tc.want) > 1e-9*tc.want || row.TTFTP50 != row.TTFTMean || row.TTFTP99 != row.TTFTMean {
			t.Errorf("%s: ttft %.6f (p50 %.6f p99 %.6f) ms, want %.6f", tc.name, row.TTFTMean, row.TTFTP50, row.TTFTP99, tc.want)
		}
		rc, _ := res.Row("none", "recompute")
		if rc.TTFTMean != R(tc.req.Prompt) || rc.HitRate != 0 || rc.StorageBytes != 0 {
			t.Errorf("%s: recompute row %+v, want R(prompt) %.3f and nothing stored", tc.name, rc, R(tc.req.Prompt))
		}
		tokens := map[string]float64{"session": 100, "prefix": 10}[tc.sharing]
		if want := tokens * float64(L*c.KVRowBytes()); row.StorageBytes != want {
			t.Errorf("%s: storage %.0f bytes, want %.0f", tc.name, row.StorageBytes, want)
		}
	}
}

// TestSimulatePrefixShape: on a workload whose prompts share prefixes, the
// token store restores more and is faster than the conversation store;
// every storing method beats recomputation; the scheduled split is never
// worse than a single method on the mean.
func TestSimulatePrefixShape(t *testing.T) {
	for _, name := range []string{"llama2-7b", "llama3-8b"} {
		pl, c := prefixPlatform(t, name)
		var reqs []PrefixRequest
		for i := 0; i < 200; i++ {
			doc := 4096 + 512*(i%8)
			reqs = append(reqs, PrefixRequest{Prompt: doc + 40, SharedHit: doc / 64 * 64})
			if i%3 == 0 {
				reqs = append(reqs, PrefixRequest{Prompt: doc + 700, SessionHit: doc + 300, SharedHit: doc / 64 * 64})
			}
		}
		res, err := pl.SimulatePrefix(c, name, reqs, PrefixStorage{SessionTokens: 1 << 20, UniqueTokens: 1 << 16})
		if err != nil {
			t.Fatal(err)
		}
		rec, _ := res.Row("none", "recompute")
		for _, sharing := range []string{"session", "prefix"} {
			sched, _ := res.Row(sharing, "scheduled")
			for _, m := range []string{"kv", "hidden"} {
				r, _ := res.Row(sharing, m)
				if r.TTFTMean >= rec.TTFTMean {
					t.Errorf("%s %s/%s: %.1f ms not faster than recompute %.1f ms", name, sharing, m, r.TTFTMean, rec.TTFTMean)
				}
				if sched.TTFTMean > r.TTFTMean*(1+1e-9) {
					t.Errorf("%s %s: scheduled %.2f ms worse than %s %.2f ms", name, sharing, sched.TTFTMean, m, r.TTFTMean)
				}
			}
		}
		s, _ := res.Row("session", "scheduled")
		p, _ := res.Row("prefix", "scheduled")
		if p.HitRate <= s.HitRate || p.TTFTMean >= s.TTFTMean || res.PrefixOverSession >= 1 || p.StorageBytes >= s.StorageBytes {
			t.Errorf("%s: prefix %+v vs session %+v (ratio %.3f): sharing should restore more, faster, in less space", name, p, s, res.PrefixOverSession)
		}
	}
}

// TestSimulatePrefixRejects: requests that cannot be are errors naming them.
func TestSimulatePrefixRejects(t *testing.T) {
	pl, c := prefixPlatform(t, "llama2-7b")
	cases := []struct {
		reqs []PrefixRequest
		want string
	}{
		{nil, "no requests"},
		{[]PrefixRequest{{Prompt: 0}}, "request 0: prompt 0"},
		{[]PrefixRequest{{Prompt: 10}, {Prompt: 10, SharedHit: 11}}, "request 1: prompt 10, hits 0 and 11"},
		{[]PrefixRequest{{Prompt: 10, SessionHit: -1}}, "hits -1 and 0"},
	}
	for _, tc := range cases {
		if _, err := pl.SimulatePrefix(c, "llama2-7b", tc.reqs, PrefixStorage{}); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%+v: err %v, want one naming %q", tc.reqs, err, tc.want)
		}
	}
}
