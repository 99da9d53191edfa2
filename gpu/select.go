package gpu

import (
	"errors"
	"fmt"
	"slices"
	"sync"

	"github.com/hcache/hcache/model"
)

// Backend names Select accepts; a device backend registers its own name.
const (
	SelectAuto = "auto" // a registered device backend that can run here, else the CPU backend
	SelectCPU  = "cpu"
	SelectCUDA = "cuda" // registered by gpu/cuda
)

// ErrNoDevice wraps every reason a device backend cannot run here: no driver
// library, no device, no cuBLAS, or no device backend linked into the
// binary. Callers fall back to the CPU backend.
var ErrNoDevice = errors.New("no CUDA device")

// Opener builds a device backend for c from w (model.WeightsKV suffices);
// opts are the backend's own options (nil: its defaults). It returns a note
// naming what it opened.
type Opener func(c *model.Config, w *model.Weights, opts any) (b Backend, note string, err error)

var registry struct {
	mu    sync.Mutex
	names []string
	open  map[string]Opener
}

// Register adds a device backend under name; a package registers in its
// init. Registering a name twice, or "cpu" or "auto", panics.
func Register(name string, open Opener) {
	registry.mu.Lock()
	defer registry.mu.Unlock()
	if name == SelectCPU || name == SelectAuto || registry.open[name] != nil || open == nil {
		panic(fmt.Sprintf("gpu: Register(%q) twice, reserved or nil", name))
	}
	if registry.open == nil {
		registry.open = map[string]Opener{}
	}
	registry.names = append(registry.names, name)
	registry.open[name] = open
}

// Registered lists the device backends linked into this binary, in
// registration order.
func Registered() []string {
	registry.mu.Lock()
	defer registry.mu.Unlock()
	return slices.Clone(registry.names)
}

// Select builds the backend named: "cpu", a registered device backend ("cuda":
// an error wrapping ErrNoDevice when it cannot run here, or when no package
// registered it), or "auto" (the first registered device backend that opens,
// falling back to the CPU backend when none can run here). opts go to the
// device backend as they are. note says what was chosen and, on a fallback,
// why ("cpu backend (no CUDA device: <reason>)").
func Select(name string, c *model.Config, w *model.Weights, opts any) (b Backend, note string, err error) {
	registry.mu.Lock()
	names := slices.Clone(registry.names)
	open := registry.open[name]
	registry.mu.Unlock()
	switch {
	case name == SelectCPU:
		b, err := NewCPU(c, w)
		return b, "cpu backend (chosen)", err
	case name == SelectAuto:
		why := fmt.Errorf("%w: no device backend linked into this binary", ErrNoDevice)
		for _, n := range names {
			b, note, err := Select(n, c, w, opts)
			if err == nil {
				return b, note, nil
			}
			if !errors.Is(err, ErrNoDevice) {
				return nil, "", err
			}
			why = err
		}
		b, err := NewCPU(c, w)
		return b, fmt.Sprintf("cpu backend (%v)", why), err
	case open != nil:
		return open(c, w, opts)
	case name == SelectCUDA:
		return nil, "", fmt.Errorf("%w: the cuda backend is not linked into this binary (import github.com/hcache/hcache/gpu/cuda)", ErrNoDevice)
	}
	return nil, "", fmt.Errorf("gpu: unknown backend %q (want %s, %s or one of the registered %v)", name, SelectAuto, SelectCPU, names)
}
