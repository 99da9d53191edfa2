package cuda

import (
	"bytes"
	"fmt"
	"math"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"unsafe"

	"github.com/ebitengine/purego"

	"github.com/hcache/hcache/gpu"
	"github.com/hcache/hcache/internal/half"
	"github.com/hcache/hcache/internal/tensor"
	"github.com/hcache/hcache/internal/testseed"
	"github.com/hcache/hcache/model"
)

// The kernels' arithmetic, checked on the host: kernels/hcache.cu is built
// as a shared library (the same source, HCACHE_HOST defined) and run against
// the Go CPU backend, which must agree to the bit. A GPU should be the last
// place a wrong index is found.

type hostKernels struct {
	project, kv uintptr
	kvLaunch    uintptr // hc_host_launch_kv_scatter
	f16, bf16   func(float32) uint16

	// The forward-pass kernels (forward_host_test.go).
	launch   [numFwdKernels]uintptr // hc_host_launch_<name>
	layout   map[string]uintptr     // hc_host_layout_<name>
	fields   map[string]uintptr     // hc_host_fields_<name>
	silu     func(float32) float32
	geluTanh func(float32) float32
	exp      func(float64) float64
	widen    func(uint16, int32) uint32
}

var (
	hostOnce sync.Once
	hostLib  *hostKernels
	hostErr  error
	hostDir  string // the temporary directory of the built library; TestMain removes it
)

// clangPath finds clang-19 (CI installs it; the GPU kernels are built with
// it too).
func clangPath() (string, error) {
	for _, n := range []string{"clang-19", "clang"} {
		if p, err := exec.LookPath(n); err == nil {
			return p, nil
		}
	}
	return "", fmt.Errorf("clang-19 not found")
}

func loadHostKernels(t *testing.T) *hostKernels {
	t.Helper()
	hostOnce.Do(func() {
		clang, err := clangPath()
		if err != nil {
			hostErr = err
			return
		}
		dir, err := os.MkdirTemp("", "hcache-kernels")
		if err != nil {
			hostErr = err
			return
		}
		hostDir = dir
		lib := filepath.Join(dir, "libhckernels.so")
		out, err := exec.Command(clang, "-x", "c++", "-DHCACHE_HOST", "-O2", "-ffp-contract=off", "-fno-math-errno", "-shared", "-fPIC",
			"-o", lib, "kernels/hcache.cu").CombinedOutput()
		if err != nil {
			hostErr = fmt.Errorf("building the host kernels: %v\n%s", err, out)
			return
		}
		h, err := purego.Dlopen(lib, purego.RTLD_NOW|purego.RTLD_LOCAL)
		if err != nil {
			hostErr = err
			return
		}
		k := &hostKernels{}
		if k.project, err = purego.Dlsym(h, "hc_host_project_scatter"); err != nil {
			hostErr = err
			return
		}
		if k.kv, err = purego.Dlsym(h, "hc_host_kv_scatter"); err != nil {
			hostErr = err
			return
		}
		if k.kvLaunch, err = purego.Dlsym(h, "hc_host_launch_kv_scatter"); err != nil {
			hostErr = err
			return
		}
		purego.RegisterLibFunc(&k.f16, h, "hc_host_f16")
		purego.RegisterLibFunc(&k.bf16, h, "hc_host_bf16")
		for i, name := range fwdKernelNames {
			if k.launch[i], err = purego.Dlsym(h, "hc_host_launch_"+name); err != nil {
				hostErr = err
				return
			}
		}
		k.layout, k.fields = map[string]uintptr{}, map[string]uintptr{}
		for _, name := range fwdKernelNames[:kProject] {
			if k.layout[name], err = purego.Dlsym(h, "hc_host_layout_"+name); err != nil {
				hostErr = err
				return
			}
			if k.fields[name], err = purego.Dlsym(h, "hc_host_fields_"+name); err != nil {
				hostErr = err
				return
			}
		}
		purego.RegisterLibFunc(&k.silu, h, "hc_host_silu")
		purego.RegisterLibFunc(&k.geluTanh, h, "hc_host_gelu_tanh")
		purego.RegisterLibFunc(&k.exp, h, "hc_host_exp")
		purego.RegisterLibFunc(&k.widen, h, "hc_host_widen")
		hostLib = k
	})
	if hostErr != nil {
		if os.Getenv("CI") != "" || os.Getenv("HCACHE_REQUIRE_CLANG") != "" {
			t.Fatalf("host kernels: %v", hostErr)
		}
		t.Skipf("host kernels unavailable (%v); CI installs clang-19 and runs this", hostErr)
	}
	return hostLib
}

func p32(v []float32) uintptr {
	if len(v) == 0 {
		return 0
	}
	return uintptr(unsafe.Pointer(&v[0]))
}

func pi32(v []int32) uintptr { return uintptr(unsafe.Pointer(&v[0])) }

// TestHostConversions: the kernels' fp16/bf16 rounding equals the Go
// reference on edge cases and random bit patterns.
func TestHostConversions(t *testing.T) {
	k := loadHostKernels(t)
	seed := testseed.Seed(t)
	rng := rand.New(rand.NewSource(seed))
	vals := []float32{0, float32(math.Copysign(0, -1)), 1, -1, 65504, 65520, 65519.99, 1e-8, 5.96e-8, 2.98e-8, 6.1e-5,
		float32(math.Inf(1)), float32(math.Inf(-1)), float32(math.NaN()), 3.14159, -2.5e-6, 1e30, -1e-30}
	for i := 0; i < 200000; i++ {
		vals = append(vals, math.Float32frombits(rng.Uint32()))
	}
	for _, v := range vals {
		if got, want := k.f16(v), half.FromFloat32(v); got != want {
			t.Fatalf("fp16(%g = %08x): kernel %04x, Go %04x", v, math.Float32bits(v), got, want)
		}
		if got, want := k.bf16(v), half.BF16FromFloat32(v); got != want {
			t.Fatalf("bf16(%g = %08x): kernel %04x, Go %04x", v, math.Float32bits(v), got, want)
		}
	}
}

// TestHostKernelsMatchCPU: for every model family, hidden rows projected by
// the CPU backend and by GEMM + the host-built fused kernel (bias, RoPE,
// rounding, paged scatter through a shuffled block table) give the same
// bytes; KV rows scattered by the kernel equal the CPU backend's LoadKV.
func TestHostKernelsMatchCPU(t *testing.T) {
	k := loadHostKernels(t)
	seed := testseed.Seed(t)
	cases := []struct {
		preset      string
		what        string
		blockTokens int
		tokens      int
		start       int
		threads     int
	}{
		{"tiny-llama", "fp16, neox RoPE", 16, 37, 0, 32},
		{"tiny-gqa", "bf16, GQA, llama3 scaling", 8, 50, 3, 7},
		{"tiny-qwen2", "fp16, q/k/v biases", 16, 33, 100, 64},
		{"tiny-opt", "fp16, OPT: no RoPE, biases", 4, 21, 5, 1},
		{"tiny-linear-rope", "fp32, interleaved RoPE, linear scaling", 16, 40, 900, 32},
		{"demo-llama", "fp16, 8 heads", 16, 64, 0, 256},
	}
	for i, tc := range cases {
		t.Run(tc.preset, func(t *testing.T) {
			rng := rand.New(rand.NewSource(seed + int64(i)))
			c, err := model.Preset(tc.preset)
			if err != nil {
				t.Fatal(err)
			}
			w := model.Synthesize(c, seed+int64(i))
			cpu, err := gpu.NewCPU(c, w)
			if err != nil {
				t.Fatal(err)
			}
			n, d, kvd := tc.tokens, c.HiddenSize, c.KVDim()
			positions := make([]int, n)
			maxPos := 0
			for j := range positions {
				positions[j] = tc.start + j
				maxPos = max(maxPos, positions[j])
			}
			blocks := maxPos/tc.blockTokens + 1
			// A shuffled block table over twice as many physical blocks.
			table := rng.Perm(2 * blocks)[:blocks]
			table32 := make([]int32, len(table))
			for j, b := range table {
				table32[j] = int32(b)
			}
			pos32 := make([]int32, n)
			for j, p := range positions {
				pos32[j] = int32(p)
			}
			hidden := make([]float32, n*d)
			for j := range hidden {
				hidden[j] = float32(rng.NormFloat64())
			}
			rows := make([]byte, n*c.HiddenRowBytes())
			c.EncodeRow(rows, hidden)
			for layer := 0; layer < c.Layers; layer++ {
				want, _ := gpu.NewPagedKV(c, tc.blockTokens, 2*blocks)
				want.BlockTable = table
				if err := cpu.Project(layer, rows, positions, want); err != nil {
					t.Fatal(err)
				}
				// The GEMM the GPU does with cuBLAS, in Go: rows (decoded)
				// by [Wk; Wv], no bias.
				h := make([]float32, n*d)
				c.DecodeRow(h, rows)
				lw := &w.Layers[layer]
				wkv := append(append([]float32(nil), lw.Wk...), lw.Wv...)
				g := make([]float32, n*2*kvd)
				tensor.MatMulT(g, h, n, d, wkv, 2*kvd, nil)
				var bias []float32
				if lw.Bk != nil || lw.Bv != nil {
					bias = make([]float32, 2*kvd)
					copy(bias, lw.Bk)
					copy(bias[kvd:], lw.Bv)
				}
				var rope []float32
				if c.UsesRope() {
					rope = RopeTable(c.InvFreq(), maxPos+1)
				}
				got, _ := gpu.NewPagedKV(c, tc.blockTokens, 2*blocks)
				poison(got.K)
				poison(got.V)
				il := 0
				if c.RotaryInterleaved {
					il = 1
				}
				dt := map[string]int{"float16": hcF16, "bfloat16": hcBF16, "float32": hcF32}[c.DType]
				purego.SyscallN(k.project, p32(g), p32(bias), p32(rope), pi32(pos32), pi32(table32), uintptr(n),
					uintptr(blocks), uintptr(tc.blockTokens), uintptr(c.KVHeads), uintptr(c.HeadDim), uintptr(il),
					uintptr(dt), bptr(got.K), bptr(got.V), uintptr(tc.threads))
				comparePaged(t, fmt.Sprintf("%s layer %d hidden", tc.what, layer), c, want, got, positions)
				noStrayWrites(t, fmt.Sprintf("%s layer %d hidden", tc.what, layer), got, positions)

				// KV rows through the KV kernel.
				kvRows := make([]byte, n*c.KVRowBytes())
				rng.Read(kvRows)
				wantKV, _ := gpu.NewPagedKV(c, tc.blockTokens, 2*blocks)
				wantKV.BlockTable = table
				if err := cpu.LoadKV(layer, kvRows, positions, wantKV); err != nil {
					t.Fatal(err)
				}
				gotKV, _ := gpu.NewPagedKV(c, tc.blockTokens, 2*blocks)
				poison(gotKV.K)
				poison(gotKV.V)
				purego.SyscallN(k.kv, bptr(kvRows), pi32(pos32), pi32(table32), uintptr(n), uintptr(blocks),
					uintptr(tc.blockTokens), uintptr(kvd*c.ElemBytes()/4), bptr(gotKV.K), bptr(gotKV.V), uintptr(tc.threads))
				comparePaged(t, fmt.Sprintf("%s layer %d kv", tc.what, layer), c, wantKV, gotKV, positions)
				noStrayWrites(t, fmt.Sprintf("%s layer %d kv", tc.what, layer), gotKV, positions)
			}
		})
	}
}

func poison(b []byte) {
	for i := range b {
		b[i] = 0xff
	}
}

// comparePaged checks every position's K and V bytes.
func comparePaged(t *testing.T, what string, c *model.Config, want, got *gpu.PagedKV, positions []int) {
	t.Helper()
	got.BlockTable = want.BlockTable
	for _, p := range positions {
		wk, wv, err := want.Token(p)
		if err != nil {
			t.Fatal(err)
		}
		gk, gv, err := got.Token(p)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(wk, gk) || !bytes.Equal(wv, gv) {
			t.Fatalf("%s: position %d differs from the CPU backend (K equal %v, V equal %v)", what, p, bytes.Equal(wk, gk), bytes.Equal(wv, gv))
		}
	}
}

// noStrayWrites checks that every byte of the cache outside the positions'
// slots still holds the poison the kernel started from.
func noStrayWrites(t *testing.T, what string, p *gpu.PagedKV, positions []int) {
	t.Helper()
	tb := p.KVHeads * p.HeadDim * p.ElemBytes
	mine := map[int]bool{}
	for _, pos := range positions {
		k, _, err := p.Token(pos)
		if err != nil {
			t.Fatal(err)
		}
		off := int(uintptr(unsafe.Pointer(&k[0])) - uintptr(unsafe.Pointer(&p.K[0])))
		mine[off/tb] = true
	}
	for slot := 0; slot < len(p.K)/tb; slot++ {
		if mine[slot] {
			continue
		}
		for _, buf := range [][]byte{p.K, p.V} {
			for _, b := range buf[slot*tb : (slot+1)*tb] {
				if b != 0xff {
					t.Fatalf("%s: slot %d, which no position maps to, was written", what, slot)
				}
			}
		}
	}
}
