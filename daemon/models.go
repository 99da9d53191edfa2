package daemon

import (
	"bytes"
	"errors"
	"math"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/hcache/hcache/chunk"
	"github.com/hcache/hcache/gpu"
	"github.com/hcache/hcache/model"
	hcachev1 "github.com/hcache/hcache/proto/hcache/v1"
	"github.com/hcache/hcache/serve"
	"github.com/hcache/hcache/serve/chunksrc"
)

// Model is a model the daemon projects hidden states with (Restore with
// project set): its config, a backend holding its K/V weights, and the
// identity model bytes of states saved for it. Its restores go through
// serve's pipeline (serve.Restorer.Stream) on that backend, side by side
// as the backend allows.
type Model struct {
	Name        string
	Config      *model.Config
	Backend     gpu.Backend
	Note        string // which backend was chosen, and why
	Fingerprint []byte
}

// LoadModel reads a model directory (config.json + safetensors; only the
// norms and K/V projections) and builds the backend named (gpu.Select: "auto"
// is a device backend linked into the binary, CUDA when cmd/hcached links
// gpu/cuda, when one can be used here, else the CPU backend).
func LoadModel(name, dir, backend string) (*Model, error) {
	return LoadModelWith(name, dir, backend, nil)
}

// LoadModelWith is LoadModel with the backend's options (gpu.Select's opts:
// a cuda.Options for the CUDA backend, given by the binary that links it;
// nil: the defaults).
func LoadModelWith(name, dir, backend string, opts any) (*Model, error) {
	c, err := model.LoadConfig(dir)
	if err != nil {
		return nil, err
	}
	w, err := model.LoadWeights(dir, c, model.WeightsKV)
	if err != nil {
		return nil, err
	}
	b, note, err := gpu.Select(backend, c, w, opts)
	if err != nil {
		return nil, err
	}
	return &Model{Name: name, Config: c, Backend: b, Note: note, Fingerprint: serve.Identity(c, w, nil).Model}, nil
}

func (s *Server) modelInfos() []*hcachev1.ModelInfo {
	var out []*hcachev1.ModelInfo
	for _, m := range s.cfg.Models {
		out = append(out, &hcachev1.ModelInfo{Name: m.Name, Fingerprint: m.Fingerprint, Layers: uint32(m.Config.Layers),
			HiddenRowBytes: uint32(m.Config.HiddenRowBytes()), KvRowBytes: uint32(m.Config.KVRowBytes()), Backend: m.Backend.Name()})
	}
	return out
}

// restoreSettings: the daemon bounds restores itself (per caller and by
// --restore-timeout), so serve admits every one.
var restoreSettings = serve.Settings{MaxConcurrent: math.MaxInt32}

// newRestorers builds the pipeline of plain restores and one per model.
func (s *Server) newRestorers() {
	s.plain = serve.NewRestorer(chunksrc.New(s.store), nil, restoreSettings)
	s.projectors = map[*Model]*serve.Restorer{}
	for _, m := range s.cfg.Models {
		s.projectors[m] = serve.NewRestorer(chunksrc.New(s.store), m.Backend, restoreSettings)
	}
}

// restorerFor is the pipeline of a restore: the plain one, or with project
// set, that of the loaded model the identity was saved for.
func (s *Server) restorerFor(id *chunk.Identity, project bool) (*serve.Restorer, error) {
	if !project {
		return s.plain, nil
	}
	for _, m := range s.cfg.Models {
		if bytes.Equal(m.Fingerprint, id.Model) {
			return s.projectors[m], nil
		}
	}
	return nil, status.Error(codes.FailedPrecondition, "project: no model loaded for this identity (start hcached with --model NAME=DIR of the same weights)")
}

// restoreErr maps a pipeline's refusal of a plan to FAILED_PRECONDITION.
func restoreErr(err error) error {
	if errors.Is(err, serve.ErrPlan) {
		return status.Error(codes.FailedPrecondition, "project: "+err.Error())
	}
	return err
}
