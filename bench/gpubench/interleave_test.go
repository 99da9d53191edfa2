package gpubench

import (
	"errors"
	"fmt"
	"math"
	"strings"
	"testing"
	"time"
)

var kinds3 = []string{"copy", "hidden", "kv"}

// TestInterleaveOrder: every round times each kind once, the order rotated
// by one per round; the warm-up rounds run but are not kept.
func TestInterleaveOrder(t *testing.T) {
	cases := []struct {
		warm, reps int
		want       string // call order, rounds separated by |
	}{
		{0, 1, "copy hidden kv"},
		{1, 3, "copy hidden kv|hidden kv copy|kv copy hidden|copy hidden kv"},
		{2, 2, "copy hidden kv|hidden kv copy|kv copy hidden|copy hidden kv"},
	}
	for _, tc := range cases {
		t.Run(fmt.Sprintf("warm%d-reps%d", tc.warm, tc.reps), func(t *testing.T) {
			var calls []string
			n := 0
			rounds, err := interleave(kinds3, tc.warm, tc.reps, func(k string) (sample, error) {
				calls = append(calls, k)
				n++
				return sample{wall: time.Duration(n)}, nil
			})
			if err != nil {
				t.Fatal(err)
			}
			var got []string
			for i := 0; i < len(calls); i += 3 {
				got = append(got, strings.Join(calls[i:i+3], " "))
			}
			if g := strings.Join(got, "|"); g != tc.want {
				t.Fatalf("call order %q, want %q", g, tc.want)
			}
			if len(rounds) != tc.reps {
				t.Fatalf("%d rounds kept, want %d", len(rounds), tc.reps)
			}
			// The kept samples are the calls after the warm-up, each in
			// its own round.
			for r, m := range rounds {
				for _, k := range kinds3 {
					call := int(m[k].wall)
					if round := (call - 1) / 3; round != tc.warm+r {
						t.Fatalf("round %d's %s sample came from call %d (round %d)", r, k, call, round)
					}
				}
			}
		})
	}
}

// TestInterleaveCancelsDrift: on a machine that slows steadily, copy and
// hidden restores that take the same time must come out at a ratio near
// 1. Timing them in separate batches (what bench gpu did) reports the
// drift as the hidden path's cost; the same check fails for that schedule.
func TestInterleaveCancelsDrift(t *testing.T) {
	drifting := func() func(string) (sample, error) {
		n := 0
		return func(string) (sample, error) {
			n++
			return sample{wall: time.Duration(100+10*n) * time.Millisecond}, nil
		}
	}
	batched := func(kinds []string, warm, reps int, run func(string) (sample, error)) ([]map[string]sample, error) {
		out := make([]map[string]sample, reps)
		for i := range out {
			out[i] = map[string]sample{}
		}
		for _, k := range kinds {
			for r := 0; r < warm+reps; r++ {
				s, _ := run(k)
				if r >= warm {
					out[r-warm][k] = s
				}
			}
		}
		return out, nil
	}
	for _, tc := range []struct {
		name   string
		sched  func([]string, int, int, func(string) (sample, error)) ([]map[string]sample, error)
		within bool
	}{
		{"interleaved", interleave, true},
		{"batched (the old schedule)", batched, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rounds, err := tc.sched(kinds3, 1, 9, drifting())
			if err != nil {
				t.Fatal(err)
			}
			var res Result
			summarize(&res, rounds)
			off := math.Abs(res.HiddenVsCopy - 1)
			if (off < 0.05) != tc.within {
				t.Fatalf("hidden/copy %.3f [%.3f-%.3f] for equal costs under drift (within 5%%: %v, want %v)",
					res.HiddenVsCopy, res.HiddenVsCopyS.Min, res.HiddenVsCopyS.Max, off < 0.05, tc.within)
			}
		})
	}
}

func TestInterleaveErrors(t *testing.T) {
	boom := errors.New("boom")
	calls := 0
	_, err := interleave(kinds3, 1, 3, func(k string) (sample, error) {
		calls++
		if calls == 5 {
			return sample{}, boom
		}
		return sample{wall: 1}, nil
	})
	if !errors.Is(err, boom) || calls != 5 {
		t.Fatalf("error %v after %d calls, want boom after 5 (stop at the first failure)", err, calls)
	}
	for _, tc := range []struct {
		kinds      []string
		warm, reps int
	}{{nil, 1, 3}, {kinds3, 1, 0}, {kinds3, -1, 3}} {
		if _, err := interleave(tc.kinds, tc.warm, tc.reps, func(string) (sample, error) { return sample{}, nil }); err == nil {
			t.Errorf("interleave(%v, %d, %d) accepted", tc.kinds, tc.warm, tc.reps)
		}
	}
}

func TestSpreadOf(t *testing.T) {
	for _, tc := range []struct {
		v    []float64
		want Spread
	}{
		{nil, Spread{}},
		{[]float64{3}, Spread{3, 3, 3, 1}},
		{[]float64{5, 1, 3}, Spread{3, 1, 5, 3}},
		{[]float64{4, 1, 3, 2}, Spread{2.5, 1, 4, 4}},
	} {
		in := append([]float64(nil), tc.v...)
		if got := spreadOf(tc.v); got != tc.want {
			t.Errorf("spreadOf(%v) = %+v, want %+v", tc.v, got, tc.want)
		}
		if fmt.Sprint(in) != fmt.Sprint(tc.v) {
			t.Errorf("spreadOf reordered its input: %v, was %v", tc.v, in)
		}
	}
}

// TestSummarizeRatiosPerRound: the ratios are taken within each round and
// then summarized, not divided from the separate medians.
func TestSummarizeRatiosPerRound(t *testing.T) {
	msd := func(v float64) time.Duration { return time.Duration(v * float64(time.Millisecond)) }
	// (copy, hidden, kv) per round, ms.
	rows := [][3]float64{{10, 11, 20}, {20, 20, 40}, {30, 36, 60}}
	var rounds []map[string]sample
	for _, r := range rows {
		rounds = append(rounds, map[string]sample{
			"copy": {wall: msd(r[0]), gpu: msd(r[0] / 2)}, "hidden": {wall: msd(r[1]), gpu: msd(r[1])}, "kv": {wall: msd(r[2])}})
	}
	res := Result{HiddenBytes: 1e9}
	summarize(&res, rounds)
	near := func(what string, got, want float64) {
		t.Helper()
		if math.Abs(got-want) > 1e-9 {
			t.Errorf("%s = %v, want %v", what, got, want)
		}
	}
	near("copy_only_ms", res.CopyOnlyMs, 20)
	near("hidden_ms", res.HiddenMs, 20)
	near("kv_ms", res.KVMs, 40)
	// Ratios 1.1, 1.0, 1.2: median 1.1, whereas the medians' ratio is 1.0.
	near("hidden_over_copy", res.HiddenVsCopy, 1.1)
	near("hidden_over_copy min", res.HiddenVsCopyS.Min, 1.0)
	near("hidden_over_copy max", res.HiddenVsCopyS.Max, 1.2)
	near("hidden_over_kv", res.HiddenVsKV, 0.55)
	near("h2d_gbps", res.H2DGBps, 1e9/0.010/1e9) // 1 GB in the median copy's GPU time, 10 ms
	if res.Rounds != 3 || res.HiddenVsCopyS.N != 3 {
		t.Errorf("rounds %d, ratio count %d, want 3", res.Rounds, res.HiddenVsCopyS.N)
	}
}
