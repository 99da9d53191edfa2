package profiler

import (
	"fmt"
	"math"
	"math/rand"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/hcache/hcache/model"
	"github.com/hcache/hcache/profiles"
	"github.com/hcache/hcache/serve/sched"
	"github.com/hcache/hcache/state"
)

// fakeRestore records what the curves queue.
type fakeRestore struct {
	calls []string
	err   error
}

func (f *fakeRestore) Recompute(tokens []int, layers int, _ func(int)) error {
	f.calls = append(f.calls, fmt.Sprintf("recompute %d tokens %d layers", len(tokens), layers))
	return f.err
}
func (f *fakeRestore) Hidden(l int, rows []byte, _ func()) error {
	f.calls = append(f.calls, fmt.Sprintf("hidden %d %d", l, len(rows)))
	return f.err
}
func (f *fakeRestore) KV(l int, rows []byte, _ func()) error {
	f.calls = append(f.calls, fmt.Sprintf("kv %d %d", l, len(rows)))
	return f.err
}
func (f *fakeRestore) Copy(rows []byte, _ func()) error {
	f.calls = append(f.calls, fmt.Sprintf("copy %d", len(rows)))
	return f.err
}

// fakeTimer answers each run with the next of a fixed sequence of times
// (per kind of work: the first call's kind), and keeps every restore's calls.
type fakeTimer struct {
	seq   []time.Duration
	i     int
	runs  [][]string
	byRun []int
	err   error
}

func (t *fakeTimer) run(n int, fn func(r devRestore) error) (time.Duration, time.Duration, error) {
	r := &fakeRestore{err: t.err}
	if err := fn(r); err != nil {
		return 0, 0, err
	}
	t.runs = append(t.runs, r.calls)
	t.byRun = append(t.byRun, n)
	d := t.seq[t.i%len(t.seq)] * time.Duration(n)
	t.i++
	return d, d / 2, nil
}

// The device curves: per token count, a warm-up then rounds of each of
// recompute (every layer, the token ids), hidden, KV and copy restores of
// every layer with the rows of that count; the median of the rounds kept
// (the warm-up dropped), the copy's device time giving the bandwidth.
func TestMeasureDeviceCurves(t *testing.T) {
	c, _ := model.Preset("tiny-llama")
	const rounds = 3
	// Per run of n tokens: warm-up 100 us x n, then 3, 1, 2 us x n: the
	// median is 2 us x n whatever the warm-up.
	ft := &fakeTimer{seq: []time.Duration{100 * time.Microsecond, 3 * time.Microsecond, 1 * time.Microsecond, 2 * time.Microsecond}}
	tokens := []int{16, 48}
	maxN := 48
	hid := make([]byte, maxN*c.HiddenRowBytes())
	kv := make([]byte, maxN*c.KVRowBytes())
	dc, err := measureDevice(ft, c, tokens, rounds, hid, kv, rand.New(rand.NewSource(1)), func(string) {})
	if err != nil {
		t.Fatal(err)
	}
	if len(ft.runs) != len(tokens)*4*(rounds+1) {
		t.Fatalf("%d runs, want %d", len(ft.runs), len(tokens)*4*(rounds+1))
	}
	for i, n := range tokens {
		for k, curve := range [][]profiles.Point{dc.Recompute, dc.Project, dc.KVLoad, dc.Copy} {
			if curve[i].Tokens != n || curve[i].MS != float64(2*n)/1000 {
				t.Errorf("curve %d at %d tokens: %+v, want %v ms", k, n, curve[i], float64(2*n)/1000)
			}
		}
		base := i * 4 * (rounds + 1)
		for k, want := range []func(l int) string{
			func(int) string { return fmt.Sprintf("recompute %d tokens %d layers", n, c.Layers) },
			func(l int) string { return fmt.Sprintf("hidden %d %d", l, n*c.HiddenRowBytes()) },
			func(l int) string { return fmt.Sprintf("kv %d %d", l, n*c.KVRowBytes()) },
			func(int) string { return fmt.Sprintf("copy %d", n*c.HiddenRowBytes()) },
		} {
			for r := 0; r <= rounds; r++ {
				run := ft.runs[base+k*(rounds+1)+r]
				var exp []string
				if k == 0 {
					exp = []string{want(0)}
				} else {
					for l := 0; l < c.Layers; l++ {
						exp = append(exp, want(l))
					}
				}
				if !slices.Equal(run, exp) || ft.byRun[base+k*(rounds+1)+r] != n {
					t.Fatalf("%d tokens, kind %d, round %d: %v, want %v", n, k, r, run, exp)
				}
			}
		}
	}
	// The copy of the last count: L x n x hidden row bytes over its device
	// time (half the wall time here).
	want := float64(c.Layers*48*c.HiddenRowBytes()) / (float64(2*48) / 2 * 1e-6) / 1e9
	if d := dc.H2DGBps - want; d > 1e-9 || d < -1e-9 {
		t.Errorf("h2d %v GB/s, want %v", dc.H2DGBps, want)
	}
	if !(dc.EffTFLOPs > 0) {
		t.Errorf("effective TFLOP/s %v", dc.EffTFLOPs)
	}
	// Errors name the work and the count.
	ft = &fakeTimer{seq: []time.Duration{time.Microsecond}, err: fmt.Errorf("launch failed")}
	if _, err := measureDevice(ft, c, tokens, rounds, hid, kv, rand.New(rand.NewSource(1)), func(string) {}); err == nil {
		t.Fatal("a failing restore measured")
	} else {
		t.Log(err)
	}
	if _, err := measureDevice(&fakeTimer{seq: []time.Duration{1}}, c, []int{c.MaxPositions + 1}, 1, hid, kv, rand.New(rand.NewSource(1)), func(string) {}); err == nil {
		t.Fatal("more tokens than positions measured")
	}
}

// A device measurement makes a valid cuda profile that `hcache plan`
// (sched) reads back from its JSON and plans with, its curves the
// device's.
func TestDeviceProfilePlans(t *testing.T) {
	base, _ := model.Preset("llama2-7b")
	c := *base
	c.MaxPositions = 16384
	// The shipped H200 figures as if measured: 48.7/127.1/615.7 ms recompute.
	dc := DeviceCurves{
		Curves: Curves{
			Recompute: []profiles.Point{{Tokens: 1024, MS: 48.7}, {Tokens: 4096, MS: 127.1}, {Tokens: 16384, MS: 615.7}},
			Project:   []profiles.Point{{Tokens: 1024, MS: 8}, {Tokens: 4096, MS: 25}, {Tokens: 16384, MS: 90}},
			KVLoad:    []profiles.Point{{Tokens: 1024, MS: 10}, {Tokens: 4096, MS: 40}, {Tokens: 16384, MS: 160}},
		},
		H2DGBps: 54, EffTFLOPs: 400,
	}
	o := Options{Model: "llama2-7b", Dir: "/data", Rounds: 3, Name: "h200-measured"}
	rates := map[state.Codec]float64{state.CodecFP8Token: 0.8, state.CodecFP8Block: 0.6, state.CodecInt8Channel: 0.3}
	p, err := deviceProfile(o, &c, "gpu1", "cuda backend on NVIDIA H200", "io_uring", 1.9, rates, 10, dc, time.Unix(0, 0))
	if err != nil {
		t.Fatal(err)
	}
	data, err := p.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	back, err := profiles.Parse(data)
	if err != nil {
		t.Fatalf("the profile does not parse back: %v\n%s", err, data)
	}
	if back.Name != "h200-measured" || back.Backend != "cuda" || back.H2DGBps.Value != 54 || math.Abs(back.Recompute.At(4096)-127.1) > 1e-9 {
		t.Fatalf("read back %+v", back)
	}
	pl, err := sched.NewPlatform(back, "")
	if err != nil {
		t.Fatal(err)
	}
	// Each codec's measured rate is read back as its own.
	for cd, want := range rates {
		if g, src := pl.DecodeGBps(base, cd); g != want || !strings.Contains(src, cd.String()+" measured") {
			t.Fatalf("%s decodes at %v (%s), measured %v", cd, g, src, want)
		}
	}
	d, err := pl.Choose(base, 4096)
	if err != nil {
		t.Fatal(err)
	}
	cs, _ := pl.Costs(base, 4096)
	if d.Split.Layers() != base.Layers || d.Split.Recompute == 0 || math.Abs(cs.RecomputeMS-127.1/32) > 1e-9 {
		t.Fatalf("plan %v, costs %+v", d.Split, cs)
	}
	t.Logf("plan at 4096 tokens: %v, predicted %.2f ms", d.Split, d.PredictedMS)
	if _, err := deviceProfile(o, &c, "gpu1", "", "", 1.9, rates, 10, DeviceCurves{}, time.Unix(0, 0)); err == nil {
		t.Fatal("a profile without curves")
	}
}
