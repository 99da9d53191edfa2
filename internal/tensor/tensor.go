// Package tensor holds the float32 kernels that the reference forward pass
// (package model) and the CPU projection backend (package gpu) share. Every
// output element is computed in one fixed order, whatever the number of
// goroutines, so the same inputs give the same bits everywhere: that is what
// makes the restore path provably lossless on CPU.
package tensor

import (
	"math"
	"runtime"
	"sync"
)

// Dot returns sum(a[i]*b[i]) with eight float32 partial sums in a fixed order.
func Dot(a, b []float32) float32 {
	n := len(a)
	b = b[:n]
	var s0, s1, s2, s3, s4, s5, s6, s7 float32
	i := 0
	for ; i+8 <= n; i += 8 {
		s0 += a[i] * b[i]
		s1 += a[i+1] * b[i+1]
		s2 += a[i+2] * b[i+2]
		s3 += a[i+3] * b[i+3]
		s4 += a[i+4] * b[i+4]
		s5 += a[i+5] * b[i+5]
		s6 += a[i+6] * b[i+6]
		s7 += a[i+7] * b[i+7]
	}
	for ; i < n; i++ {
		s0 += a[i] * b[i]
	}
	return ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))
}

// MatMulT computes out[n x o] = x[n x d] * w^T + bias, where w is [o x d]
// (the Hugging Face Linear layout) and bias may be nil. Rows of out are split
// across goroutines; each element is one Dot.
func MatMulT(out, x []float32, n, d int, w []float32, o int, bias []float32) {
	work := func(r0, r1 int) {
		for i := r0; i < r1; i++ {
			xi := x[i*d : (i+1)*d]
			oi := out[i*o : (i+1)*o]
			for j := 0; j < o; j++ {
				v := Dot(xi, w[j*d:(j+1)*d])
				if bias != nil {
					v += bias[j]
				}
				oi[j] = v
			}
		}
	}
	parallel(n, n*o*d, work)
}

// parallel splits [0, n) across GOMAXPROCS goroutines when the work is big.
func parallel(n, flops int, fn func(r0, r1 int)) {
	p := runtime.GOMAXPROCS(0)
	if p == 1 || n < 2 || flops < 1<<16 {
		fn(0, n)
		return
	}
	p = min(p, n)
	var wg sync.WaitGroup
	step := (n + p - 1) / p
	for r := 0; r < n; r += step {
		wg.Add(1)
		go func(r0, r1 int) {
			defer wg.Done()
			fn(r0, r1)
		}(r, min(n, r+step))
	}
	wg.Wait()
}

// RMSNorm writes x / rms(x) * w into out (one row).
func RMSNorm(out, x, w []float32, eps float32) {
	var ss float32
	for _, v := range x {
		ss += v * v
	}
	inv := float32(1 / math.Sqrt(float64(ss/float32(len(x))+eps)))
	for i, v := range x {
		out[i] = v * inv * w[i]
	}
}

// LayerNorm writes (x - mean) / std * w + b into out (one row).
func LayerNorm(out, x, w, b []float32, eps float32) {
	var mean float32
	for _, v := range x {
		mean += v
	}
	mean /= float32(len(x))
	var vs float32
	for _, v := range x {
		d := v - mean
		vs += d * d
	}
	inv := float32(1 / math.Sqrt(float64(vs/float32(len(x))+eps)))
	for i, v := range x {
		out[i] = (v-mean)*inv*w[i] + b[i]
	}
}

// SiLU returns x * sigmoid(x).
func SiLU(x float32) float32 { return x / (1 + float32(math.Exp(float64(-x)))) }

// Softmax normalises x in place.
func Softmax(x []float32) {
	m := float32(math.Inf(-1))
	for _, v := range x {
		m = max(m, v)
	}
	var s float32
	for i, v := range x {
		e := float32(math.Exp(float64(v - m)))
		x[i] = e
		s += e
	}
	for i := range x {
		x[i] /= s
	}
}

// Rope rotates one head vector x (len = head dim) at position pos, with the
// given inverse frequencies (len = head dim / 2). Interleaved pairs are
// (2i, 2i+1) (GPT-J layout); otherwise (i, i + dim/2) (rotate-half, Llama).
func Rope(x []float32, pos int, invFreq []float32, interleaved bool) {
	half := len(invFreq)
	for i := 0; i < half; i++ {
		// The angle in float32, as Hugging Face computes it.
		ang := float32(pos) * invFreq[i]
		c := float32(math.Cos(float64(ang)))
		s := float32(math.Sin(float64(ang)))
		a, b := i, i+half
		if interleaved {
			a, b = 2*i, 2*i+1
		}
		x1, x2 := x[a], x[b]
		x[a] = x1*c - x2*s
		x[b] = x2*c + x1*s
	}
}
