package cuda

import (
	"errors"
	"strings"
	"testing"

	"github.com/hcache/hcache/gpu"
	"github.com/hcache/hcache/model"
)

// On a machine without a GPU (CI, the development machines) every way into
// the backend fails with ErrNoDevice and a reason, and "auto" falls back to
// the CPU backend; linking this package registered "cuda" with gpu.Select
// (the reason is the driver's, not "not linked"). Where a GPU is present, scripts/gpu-check.sh is the test.
func TestSelectWithoutDevice(t *testing.T) {
	if n, lib, err := Probe(""); err == nil {
		t.Skipf("%d CUDA device(s) and %s present: covered by scripts/gpu-check.sh", n, lib)
	}
	c, _ := model.Preset("tiny-llama")
	w := model.Synthesize(c, 1)
	cases := []struct {
		name     string
		wantErr  string // substring; "" = no error
		wantNote string
		wantName string
	}{
		{gpu.SelectCPU, "", "cpu backend", "cpu"},
		{gpu.SelectAuto, "", "no CUDA device: ", "cpu"},
		{gpu.SelectCUDA, "no CUDA device: ", "", ""},
		{"tpu", "unknown backend", "", ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			b, note, err := gpu.Select(tc.name, c, w, Options{})
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err = %v, want one containing %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if b.Name() != tc.wantName || !strings.Contains(note, tc.wantNote) {
				t.Fatalf("backend %s (%s), want %s with a note containing %q", b.Name(), note, tc.wantName, tc.wantNote)
			}
		})
	}
	if _, _, err := gpu.Select(gpu.SelectCUDA, c, w, nil); err == nil || strings.Contains(err.Error(), "not linked") {
		t.Fatalf("Select(cuda) with this package linked: %v, want the driver's reason", err)
	}
	if _, _, err := gpu.Select(gpu.SelectCUDA, c, w, 42); err == nil || !strings.Contains(err.Error(), "options of type int") {
		t.Fatalf("Select(cuda) with options of another backend: %v", err)
	}
	_, err := Open(c, w, Options{})
	if !errors.Is(err, ErrNoDevice) || !strings.HasPrefix(err.Error(), "no CUDA device: ") {
		t.Fatalf("Open: %v, want an error starting with %q", err, "no CUDA device: ")
	}
}

// Bad options and arguments are refused before CUDA is touched.
func TestOpenRefusesBadOptions(t *testing.T) {
	c, _ := model.Preset("tiny-llama")
	w := model.Synthesize(c, 1)
	short := &model.Weights{Layers: w.Layers[:1]}
	bad := *c
	bad.DType = "int8"
	cases := []struct {
		name string
		c    *model.Config
		w    *model.Weights
		o    Options
		want string
	}{
		{"nil config", nil, w, Options{}, "needs a config"},
		{"nil weights", c, nil, Options{}, "needs a config and weights"},
		{"one slot", c, w, Options{Slots: 1}, "Slots 1"},
		{"threads not a warp multiple", c, w, Options{Threads: 100}, "Threads 100"},
		{"too many threads", c, w, Options{Threads: 2048}, "Threads 2048"},
		{"missing layers", c, short, Options{}, "weights have 1 layers"},
		{"dtype", &bad, w, Options{}, "dtype \"int8\""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Open(tc.c, tc.w, tc.o)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want one containing %q", err, tc.want)
			}
		})
	}
}
