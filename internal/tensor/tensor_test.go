package tensor

import (
	"math"
	"math/rand"
	"runtime"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hcache/hcache/internal/testseed"
)

func TestMatMulTAgainstNaive(t *testing.T) {
	seed := testseed.Seed(t)
	rng := rand.New(rand.NewSource(seed))
	cases := []struct{ n, d, o int }{{1, 1, 1}, {3, 7, 5}, {17, 64, 33}, {64, 256, 128}}
	for _, c := range cases {
		x := randVec(rng, c.n*c.d)
		w := randVec(rng, c.o*c.d)
		bias := randVec(rng, c.o)
		out := make([]float32, c.n*c.o)
		MatMulT(out, x, c.n, c.d, w, c.o, bias)
		for i := 0; i < c.n; i++ {
			for j := 0; j < c.o; j++ {
				var s float64
				for k := 0; k < c.d; k++ {
					s += float64(x[i*c.d+k]) * float64(w[j*c.d+k])
				}
				s += float64(bias[j])
				if math.Abs(s-float64(out[i*c.o+j])) > 1e-4*math.Sqrt(float64(c.d)) {
					t.Fatalf("%+v: out[%d,%d] = %v, want %v", c, i, j, out[i*c.o+j], s)
				}
			}
		}
		// Same bits whatever the parallel split: one row alone.
		one := make([]float32, c.o)
		MatMulT(one, x[(c.n-1)*c.d:], 1, c.d, w, c.o, bias)
		for j := range one {
			if math.Float32bits(one[j]) != math.Float32bits(out[(c.n-1)*c.o+j]) {
				t.Fatalf("%+v: row computed alone differs in bits", c)
			}
		}
	}
}

func TestRopeRotatesPairs(t *testing.T) {
	inv := []float32{1, 0.5}
	for _, interleaved := range []bool{false, true} {
		x := []float32{1, 2, 3, 4}
		Rope(x, 0, inv, interleaved)
		if x[0] != 1 || x[1] != 2 || x[2] != 3 || x[3] != 4 {
			t.Fatal("position 0 must not rotate")
		}
		x = []float32{1, 0, 0, 1}
		Rope(x, 3, inv, interleaved)
		// Norms of each rotated pair are preserved.
		a, b := 0, 2
		if interleaved {
			a, b = 0, 1
		}
		if n := x[a]*x[a] + x[b]*x[b]; math.Abs(float64(n)-1) > 1e-6 {
			t.Fatalf("interleaved=%v: pair norm %v", interleaved, n)
		}
	}
}

func randVec(rng *rand.Rand, n int) []float32 {
	v := make([]float32, n)
	for i := range v {
		v[i] = float32(rng.NormFloat64())
	}
	return v
}

// BenchmarkMatMulT is the CPU projection GEMM of one Llama2-7B layer's K
// for 64 tokens; it reports GFLOP/s.
func BenchmarkMatMulT(b *testing.B) {
	n, d, o := 64, 4096, 4096
	rng := rand.New(rand.NewSource(1))
	x, w := randVec(rng, n*d), randVec(rng, o*d)
	out := make([]float32, n*o)
	b.ResetTimer()
	start := time.Now()
	for i := 0; i < b.N; i++ {
		MatMulT(out, x, n, d, w, o, nil)
	}
	b.ReportMetric(2*float64(n*d*o)*float64(b.N)/time.Since(start).Seconds()/1e9, "GFLOP/s")
}

// TestParallelCoversEveryRowOnce: whatever the row count and the number of
// procs, the blocks workers claim cover [0, n) exactly once, and MatMulT
// gives the same bits with one proc as with several.
func TestParallelCoversEveryRowOnce(t *testing.T) {
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(0))
	for _, procs := range []int{1, 2, 3, 7} {
		runtime.GOMAXPROCS(procs)
		for _, n := range []int{1, 2, 3, 5, 31, 64, 65, 513, 4096} {
			hits := make([]atomic.Int32, n)
			parallel(n, 1<<20, func(r0, r1 int) {
				if r0 < 0 || r1 > n || r0 >= r1 {
					t.Errorf("procs %d, n %d: block [%d, %d)", procs, n, r0, r1)
					return
				}
				for i := r0; i < r1; i++ {
					hits[i].Add(1)
				}
			})
			for i := range hits {
				if h := hits[i].Load(); h != 1 {
					t.Fatalf("procs %d, n %d: row %d run %d times", procs, n, i, h)
				}
			}
		}
	}
	seed := testseed.Seed(t)
	rng := rand.New(rand.NewSource(seed))
	n, d, o := 97, 64, 48
	x, w := randVec(rng, n*d), randVec(rng, o*d)
	var ref []float32
	for _, procs := range []int{1, 2, 5} {
		runtime.GOMAXPROCS(procs)
		out := make([]float32, n*o)
		MatMulT(out, x, n, d, w, o, nil)
		if ref == nil {
			ref = out
			continue
		}
		for i := range out {
			if math.Float32bits(out[i]) != math.Float32bits(ref[i]) {
				t.Fatalf("procs %d: element %d differs in bits from one proc's", procs, i)
			}
		}
	}
}
