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
	"sync/atomic"
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
// (the Hugging Face Linear layout) and bias may be nil. It is register-
// blocked over four rows of x, so each row of w is read once per four
// tokens instead of once per token; every element is still summed exactly
// as Dot sums it, so the result does not depend on the blocking or on how
// rows are split across goroutines.
func MatMulT(out, x []float32, n, d int, w []float32, o int, bias []float32) {
	work := func(r0, r1 int) {
		i := r0
		for ; i+4 <= r1; i += 4 {
			x0, x1 := x[i*d:(i+1)*d], x[(i+1)*d:(i+2)*d]
			x2, x3 := x[(i+2)*d:(i+3)*d], x[(i+3)*d:(i+4)*d]
			for j := 0; j < o; j++ {
				v0, v1, v2, v3 := dot4(x0, x1, x2, x3, w[j*d:(j+1)*d])
				if bias != nil {
					v0, v1, v2, v3 = v0+bias[j], v1+bias[j], v2+bias[j], v3+bias[j]
				}
				out[i*o+j], out[(i+1)*o+j], out[(i+2)*o+j], out[(i+3)*o+j] = v0, v1, v2, v3
			}
		}
		for ; i < r1; i++ {
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

// dot4 returns Dot(a, w), Dot(b, w), Dot(c, w), Dot(e, w) with Dot's exact
// summation order, reading w once.
func dot4(a, b, c, e, w []float32) (float32, float32, float32, float32) {
	n := len(w)
	a, b, c, e = a[:n], b[:n], c[:n], e[:n]
	var a0, a1, a2, a3, a4, a5, a6, a7 float32
	var b0, b1, b2, b3, b4, b5, b6, b7 float32
	var c0, c1, c2, c3, c4, c5, c6, c7 float32
	var e0, e1, e2, e3, e4, e5, e6, e7 float32
	i := 0
	for ; i+8 <= n; i += 8 {
		w0, w1, w2, w3, w4, w5, w6, w7 := w[i], w[i+1], w[i+2], w[i+3], w[i+4], w[i+5], w[i+6], w[i+7]
		a0 += a[i] * w0
		a1 += a[i+1] * w1
		a2 += a[i+2] * w2
		a3 += a[i+3] * w3
		a4 += a[i+4] * w4
		a5 += a[i+5] * w5
		a6 += a[i+6] * w6
		a7 += a[i+7] * w7
		b0 += b[i] * w0
		b1 += b[i+1] * w1
		b2 += b[i+2] * w2
		b3 += b[i+3] * w3
		b4 += b[i+4] * w4
		b5 += b[i+5] * w5
		b6 += b[i+6] * w6
		b7 += b[i+7] * w7
		c0 += c[i] * w0
		c1 += c[i+1] * w1
		c2 += c[i+2] * w2
		c3 += c[i+3] * w3
		c4 += c[i+4] * w4
		c5 += c[i+5] * w5
		c6 += c[i+6] * w6
		c7 += c[i+7] * w7
		e0 += e[i] * w0
		e1 += e[i+1] * w1
		e2 += e[i+2] * w2
		e3 += e[i+3] * w3
		e4 += e[i+4] * w4
		e5 += e[i+5] * w5
		e6 += e[i+6] * w6
		e7 += e[i+7] * w7
	}
	for ; i < n; i++ {
		a0 += a[i] * w[i]
		b0 += b[i] * w[i]
		c0 += c[i] * w[i]
		e0 += e[i] * w[i]
	}
	return ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7)),
		((b0 + b1) + (b2 + b3)) + ((b4 + b5) + (b6 + b7)),
		((c0 + c1) + (c2 + c3)) + ((c4 + c5) + (c6 + c7)),
		((e0 + e1) + (e2 + e3)) + ((e4 + e5) + (e6 + e7))
}

// parallel runs fn over [0, n) on up to GOMAXPROCS goroutines when the work
// is big. Workers claim blocks of rows from a shared counter (eight blocks
// per worker), so a worker that loses its CPU for a while (to the I/O
// goroutines of a restore running beside a projection) delays the whole
// only by its share of that time, not by all of it as a fixed split would.
// The caller's goroutine is one of the workers.
func parallel(n, flops int, fn func(r0, r1 int)) {
	p := runtime.GOMAXPROCS(0)
	if p == 1 || n < 2 || flops < 1<<16 {
		fn(0, n)
		return
	}
	p = min(p, n)
	block := max(1, (n+8*p-1)/(8*p))
	block = (block + 3) &^ 3 // whole register blocks of MatMulT
	var next atomic.Int64
	work := func() {
		for {
			r0 := int(next.Add(int64(block))) - block
			if r0 >= n {
				return
			}
			fn(r0, min(n, r0+block))
		}
	}
	var wg sync.WaitGroup
	for w := 1; w < p; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			work()
		}()
	}
	work()
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
