// Package torchtest is the tests' handle on the independent PyTorch
// reference (model/testdata/torch_ref.py): finding a python3 with torch, and
// reading the float32 files the reference writes.
package torchtest

import (
	"encoding/binary"
	"math"
	"os"
	"os/exec"
	"testing"
)

// Python finds a python3 with PyTorch and numpy (Debian's python3-torch and
// python3-numpy, which .ci/run installs): $HCACHE_TORCH_PYTHON, then
// /usr/bin/python3, then python3 on PATH. Without one the test is skipped,
// unless HCACHE_REQUIRE_TORCH=1 (set by .ci/run) makes that a failure.
func Python(t testing.TB) string {
	t.Helper()
	for _, p := range []string{os.Getenv("HCACHE_TORCH_PYTHON"), "/usr/bin/python3", "python3"} {
		if p == "" {
			continue
		}
		if err := exec.Command(p, "-c", "import torch, numpy").Run(); err == nil {
			return p
		}
	}
	if os.Getenv("HCACHE_REQUIRE_TORCH") == "1" {
		t.Fatal("no python3 with torch and numpy (apt-get install python3-torch python3-numpy)")
	}
	t.Skip("no python3 with torch; set HCACHE_REQUIRE_TORCH=1 to make this a failure")
	return ""
}

// ReadF32 reads a file of little-endian float32 values.
func ReadF32(t testing.TB, path string) []float32 {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	out := make([]float32, len(b)/4)
	for i := range out {
		out[i] = math.Float32frombits(binary.LittleEndian.Uint32(b[4*i:]))
	}
	return out
}
