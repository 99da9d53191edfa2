package gpubench

import (
	"errors"
	"math"
	"math/rand"
	"testing"

	"github.com/hcache/hcache/gpu/cuda"
	"github.com/hcache/hcache/model"
)

func TestErrStats(t *testing.T) {
	cases := []struct {
		name      string
		got, want []float64
		rel, abs  float64
	}{
		{"equal", []float64{1, -2, 3}, []float64{1, -2, 3}, 0, 0},
		{"relative where values are ordinary", []float64{1.01, 2}, []float64{1, 2}, 0.01, 0.01},
		// rms(want) = 1 (two values of 1 and one 0... ): the floor is 0.01*rms.
		{"near zero against the floor", []float64{1, 1, 0.001}, []float64{1, 1, 0}, 0.001 / (0.01 * math.Sqrt(2.0/3)), 0.001},
		{"NaN is infinite error", []float64{math.NaN(), 1}, []float64{1, 1}, math.Inf(1), math.Inf(1)},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var e errStats
			for i := range tc.got {
				e.add(tc.got[i], tc.want[i])
			}
			rel, abs := e.result()
			if math.Abs(rel-tc.rel) > 1e-9 && !(math.IsInf(rel, 1) && math.IsInf(tc.rel, 1)) {
				t.Errorf("max_rel_err %g, want %g", rel, tc.rel)
			}
			if math.Abs(abs-tc.abs) > 1e-9 && !(math.IsInf(abs, 1) && math.IsInf(tc.abs, 1)) {
				t.Errorf("max_abs_err %g, want %g", abs, tc.abs)
			}
		})
	}
}

func TestSamplePositions(t *testing.T) {
	for _, tc := range []struct{ tokens, n int }{{5, 10}, {1000, 24}, {2, 2}} {
		s := samplePositions(tc.tokens, tc.n, rand.New(rand.NewSource(1)))
		if want := min(tc.tokens, tc.n); len(s) != want {
			t.Fatalf("%d of %d: %d positions, want %d", tc.n, tc.tokens, len(s), want)
		}
		if s[0] != 0 || s[len(s)-1] != tc.tokens-1 {
			t.Fatalf("%d of %d: first and last not included: %v", tc.n, tc.tokens, s)
		}
		for i := 1; i < len(s); i++ {
			if s[i] <= s[i-1] {
				t.Fatalf("not strictly increasing: %v", s)
			}
		}
	}
}

// Without a GPU, the benchmark and the check fail at once with the
// selector's "no CUDA device" error, before building any weights.
func TestNoDeviceFailsFast(t *testing.T) {
	if _, _, err := cuda.Probe(""); err == nil {
		t.Skip("a CUDA device is present; scripts/gpu-check.sh covers this machine")
	}
	_, err := Run(Options{Model: "llama2-7b", Tokens: []int{16}})
	if !errors.Is(err, cuda.ErrNoDevice) {
		t.Fatalf("Run: %v, want ErrNoDevice", err)
	}
	if _, err := Check(cuda.Options{}, 8, 1, nil); !errors.Is(err, cuda.ErrNoDevice) {
		t.Fatalf("Check: %v, want ErrNoDevice", err)
	}
	if _, err := CheckMixed(cuda.Options{}, t.TempDir(), 8, 1, nil); !errors.Is(err, cuda.ErrNoDevice) {
		t.Fatalf("CheckMixed: %v, want ErrNoDevice", err)
	}
	if _, err := Run(Options{Model: "no-such-model", Tokens: []int{16}}); err == nil {
		t.Fatal("unknown model: no error")
	}
}

func TestSynthKVRounded(t *testing.T) {
	c, _ := model.Preset("tiny-qwen2")
	w := SynthKV(c, 3)
	w2 := SynthKV(c, 3)
	for l := range w.Layers {
		for i, v := range w.Layers[l].Wk {
			buf := make([]byte, c.ElemBytes())
			out := make([]float32, 1)
			c.EncodeRow(buf, []float32{v})
			c.DecodeRow(out, buf)
			if out[0] != v {
				t.Fatalf("layer %d Wk[%d] = %g is not an %s value", l, i, v, c.DType)
			}
			if w2.Layers[l].Wk[i] != v {
				t.Fatal("same seed, different weights")
			}
		}
		if w.Layers[l].Bk == nil {
			t.Fatal("qwen2 has K/V biases; none synthesized")
		}
	}
}
