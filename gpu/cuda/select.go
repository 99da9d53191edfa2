package cuda

import (
	"errors"
	"fmt"

	"github.com/hcache/hcache/gpu"
	"github.com/hcache/hcache/model"
)

// Backend names Select accepts.
const (
	SelectAuto = "auto" // CUDA when a device can be used, else the CPU backend
	SelectCPU  = "cpu"
	SelectCUDA = "cuda"
)

// Select builds the projection backend named: "cpu", "cuda" (an error
// wrapping ErrNoDevice when CUDA cannot run here) or "auto" (CUDA, falling
// back to the CPU backend). note says what was chosen and, on a fallback,
// why ("no CUDA device: <reason>").
func Select(name string, c *model.Config, w *model.Weights, o Options) (b gpu.Backend, note string, err error) {
	switch name {
	case SelectCPU:
		b, err := gpu.NewCPU(c, w)
		return b, "cpu backend (chosen)", err
	case SelectCUDA, SelectAuto:
		cb, err := Open(c, w, o)
		if err == nil {
			return cb, fmt.Sprintf("cuda backend on %s (cuBLAS %s)", cb.Device(), cb.CublasPath()), nil
		}
		if name == SelectCUDA || !errors.Is(err, ErrNoDevice) {
			return nil, "", err
		}
		b, cerr := gpu.NewCPU(c, w)
		return b, fmt.Sprintf("cpu backend (%v)", err), cerr
	}
	return nil, "", fmt.Errorf("cuda: unknown backend %q (want %s, %s or %s)", name, SelectAuto, SelectCPU, SelectCUDA)
}
