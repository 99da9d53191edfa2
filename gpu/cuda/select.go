package cuda

import (
	"fmt"

	"github.com/hcache/hcache/gpu"
	"github.com/hcache/hcache/model"
)

// Linking this package registers the CUDA backend with gpu.Select under
// gpu.SelectCUDA ("cuda"; "auto" tries it first). Its options are an
// Options value (nil: the defaults).
func init() { gpu.Register(gpu.SelectCUDA, open) }

func open(c *model.Config, w *model.Weights, opts any) (gpu.Backend, string, error) {
	var o Options
	switch v := opts.(type) {
	case nil:
	case Options:
		o = v
	case *Options:
		if v != nil {
			o = *v
		}
	default:
		return nil, "", fmt.Errorf("cuda: backend options of type %T, want cuda.Options", opts)
	}
	b, err := Open(c, w, o)
	if err != nil {
		return nil, "", err
	}
	return b, fmt.Sprintf("cuda backend on %s (cuBLAS %s)", b.Device(), b.CublasPath()), nil
}
