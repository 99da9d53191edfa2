package cuda

import (
	"bytes"
	"encoding/binary"
	"math"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"unsafe"

	"github.com/ebitengine/purego"

	"github.com/hcache/hcache/internal/testseed"
	"github.com/hcache/hcache/state"
	"github.com/hcache/hcache/state/codec"
)

var (
	codecOnce sync.Once
	codecFn   func(src, dst unsafe.Pointer, nseg, segs, vals, block, segBytes, rowBytes, dtype int32, bad unsafe.Pointer, nthreads int32)
	codecErr  error
	// codecLaunch is hc_host_launch_fp8_dequant: the kernel's parameters
	// as cuLaunchKernel takes them, over the grid.
	codecLaunch uintptr
)

// loadCodecKernel builds kernels/codec.cu for the host (HCACHE_HOST) and
// returns its dequantize entry point.
func loadCodecKernel(t *testing.T) func(src, dst unsafe.Pointer, nseg, segs, vals, block, segBytes, rowBytes, dtype int32, bad unsafe.Pointer, nthreads int32) {
	t.Helper()
	codecOnce.Do(func() {
		clang, err := clangPath()
		if err != nil {
			codecErr = err
			return
		}
		dir := t.TempDir()
		lib := filepath.Join(dir, "libhccodec.so")
		if out, err := exec.Command(clang, "-x", "c++", "-DHCACHE_HOST", "-O2", "-ffp-contract=off", "-fno-math-errno", "-shared", "-fPIC",
			"-o", lib, "kernels/codec.cu").CombinedOutput(); err != nil {
			codecErr = err
			t.Logf("%s", out)
			return
		}
		h, err := purego.Dlopen(lib, purego.RTLD_NOW|purego.RTLD_LOCAL)
		if err != nil {
			codecErr = err
			return
		}
		purego.RegisterLibFunc(&codecFn, h, "hc_host_fp8_dequant")
		if codecLaunch, err = purego.Dlsym(h, "hc_host_launch_fp8_dequant"); err != nil {
			codecErr = err
		}
	})
	if codecErr != nil {
		if os.Getenv("CI") != "" || os.Getenv("HCACHE_REQUIRE_CLANG") != "" {
			t.Fatalf("codec kernel: %v", codecErr)
		}
		t.Skipf("codec kernel unavailable (%v)", codecErr)
	}
	return codecFn
}

// TestCodecKernelMatchesTranscode: the device dequantize kernel, built for
// the host, decodes fp8 rows (both codecs, every dtype, hidden-like and
// KV-like segment shapes, segments that do and do not fill a block, 1 to
// 256 threads) into exactly the bytes state/codec.TranscodeRows gives, and
// flags a NaN code or a bad scale.
func TestCodecKernelMatchesTranscode(t *testing.T) {
	fn := loadCodecKernel(t)
	seed := testseed.Seed(t)
	rng := rand.New(rand.NewSource(seed))
	dtypes := map[string]int32{"float16": hcF16, "bfloat16": hcBF16, "float32": hcF32}
	for _, cd := range []state.Codec{state.CodecFP8Token, state.CodecFP8Block} {
		for dt, code := range dtypes {
			for _, shape := range []struct{ rows, segs, vals int }{{7, 1, 4096}, {5, 2, 200}, {9, 2, 32}, {3, 1, 128}} {
				for _, threads := range []int32{1, 33, 256} {
					n := shape.rows * shape.segs
					sb := codec.SegmentBytes(cd, dt, shape.vals)
					rb := codec.RowBytes(cd, dt, shape.segs, shape.vals)
					src := make([]byte, shape.rows*rb)
					for r := 0; r < shape.rows; r++ {
						segs := make([][]float32, shape.segs)
						for j := range segs {
							x := make([]float32, shape.vals)
							amp := math.Exp(rng.NormFloat64() * 3)
							for i := range x {
								x[i] = float32(rng.NormFloat64() * amp)
							}
							if r == 1 && j == 0 {
								clear(x) // a zero segment: scale 0
							}
							segs[j] = x
						}
						if err := codec.EncodeRow(cd, dt, src[r*rb:(r+1)*rb], segs...); err != nil {
							t.Fatal(err)
						}
					}
					eb := map[string]int{"float16": 2, "bfloat16": 2, "float32": 4}[dt]
					want := make([]byte, n*shape.vals*eb)
					if err := codec.TranscodeRows(cd, dt, want, src, shape.segs, shape.vals); err != nil {
						t.Fatal(err)
					}
					got := bytes.Repeat([]byte{0xa5}, len(want))
					block := shape.vals
					if cd == state.CodecFP8Block {
						block = codec.BlockSize
					}
					var bad int32
					fn(unsafe.Pointer(&src[0]), unsafe.Pointer(&got[0]), int32(n), int32(shape.segs), int32(shape.vals), int32(block), int32(sb), int32(rb), code, unsafe.Pointer(&bad), threads)
					if bad != 0 {
						t.Fatalf("%s/%s/%+v: the kernel flagged valid rows", cd, dt, shape)
					}
					if !bytes.Equal(got, want) {
						for i := range got {
							if got[i] != want[i] {
								t.Fatalf("%s/%s/%+v/%d threads: byte %d = 0x%02x, TranscodeRows 0x%02x (seed %d)", cd, dt, shape, threads, i, got[i], want[i], seed)
							}
						}
					}
				}
			}
		}
	}
	// Bytes that are not an encoding are flagged.
	sb := codec.SegmentBytes(state.CodecFP8Token, "float16", 8)
	for _, c := range []struct {
		name  string
		patch func([]byte)
	}{
		{"NaN code", func(b []byte) { b[3] = 0xff }},
		{"negative scale", func(b []byte) { binary.LittleEndian.PutUint32(b[8:], math.Float32bits(-1)) }},
		{"infinite scale", func(b []byte) { binary.LittleEndian.PutUint32(b[8:], math.Float32bits(float32(math.Inf(1)))) }},
		{"NaN scale", func(b []byte) { binary.LittleEndian.PutUint32(b[8:], 0x7fc00000) }},
	} {
		src := make([]byte, sb)
		if err := codec.Encode(state.CodecFP8Token, "float16", src, []float32{1, 2, 3, 4, 5, 6, 7, 8}); err != nil {
			t.Fatal(err)
		}
		c.patch(src)
		out := make([]byte, 16)
		var bad int32
		fn(unsafe.Pointer(&src[0]), unsafe.Pointer(&out[0]), 1, 1, 8, 8, int32(sb), int32(sb), hcF16, unsafe.Pointer(&bad), 4)
		if bad == 0 {
			t.Errorf("%s: not flagged", c.name)
		}
	}
}

// TestCodecPTXIsCurrent: the committed PTX is what clang-19 makes of
// kernels/codec.cu today (a stale PTX would run other arithmetic on the
// device than the host test checked).
func TestCodecPTXIsCurrent(t *testing.T) {
	if _, err := exec.LookPath("clang-19"); err != nil {
		t.Skip("clang-19 not installed")
	}
	out := filepath.Join(t.TempDir(), "codec.ptx")
	if b, err := exec.Command("clang-19", "-x", "cuda", "--cuda-device-only", "--cuda-gpu-arch=sm_80", "-nocudainc", "-nocudalib", "-O3",
		"-ffp-contract=off", "-S", "-o", out, "kernels/codec.cu").CombinedOutput(); err != nil {
		t.Fatalf("clang-19: %v\n%s", err, b)
	}
	fresh, _ := os.ReadFile(out)
	if !bytes.Equal(fresh, codecPTX) {
		t.Fatal("kernels/codec.ptx is stale: run go generate ./gpu/cuda")
	}
}
