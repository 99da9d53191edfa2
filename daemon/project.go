package daemon

import (
	"bytes"
	"fmt"
	"sync"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/hcache/hcache/chunk"
	"github.com/hcache/hcache/gpu"
	"github.com/hcache/hcache/gpu/cuda"
	"github.com/hcache/hcache/model"
	hcachev1 "github.com/hcache/hcache/proto/hcache/v1"
	"github.com/hcache/hcache/serve"
)

// Model is a model the daemon projects hidden states with (Restore with
// project set): its config, a backend holding its K/V weights, and the
// identity model bytes of states saved for it.
type Model struct {
	Name        string
	Config      *model.Config
	Backend     gpu.Backend
	Note        string // which backend was chosen, and why
	Fingerprint []byte
	mu          sync.Mutex // restores take turns on the backend
}

// LoadModel reads a model directory (config.json + safetensors; only the
// norms and K/V projections) and builds the backend named (cuda.Select:
// "auto" is CUDA when a device can be used, else the CPU backend).
func LoadModel(name, dir, backend string) (*Model, error) {
	c, err := model.LoadConfig(dir)
	if err != nil {
		return nil, err
	}
	w, err := model.LoadWeights(dir, c, model.WeightsKV)
	if err != nil {
		return nil, err
	}
	b, note, err := cuda.Select(backend, c, w, cuda.Options{})
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

// projector turns a restored layer's stored rows into the rows sent back.
type projector struct {
	m      *Model
	plan   []chunk.LayerPlan
	pos    []int
	paged  *gpu.PagedKV
	out    []byte
	tokens int
}

// newProjector finds the loaded model an identity was saved for and checks
// that the plan's rows are that model's.
func (s *Server) newProjector(id *chunk.Identity) (*projector, error) {
	var m *Model
	for _, x := range s.cfg.Models {
		if bytes.Equal(x.Fingerprint, id.Model) {
			m = x
		}
	}
	if m == nil {
		return nil, status.Error(codes.FailedPrecondition, "project: no model loaded for this identity (start hcached with --model NAME=DIR of the same weights)")
	}
	c := m.Config
	if len(id.Plan) != c.Layers {
		return nil, status.Errorf(codes.FailedPrecondition, "project: plan of %d layers, model %s has %d", len(id.Plan), m.Name, c.Layers)
	}
	for l, p := range id.Plan {
		want := uint32(0)
		switch p.Kind {
		case chunk.LayerHidden:
			want = uint32(c.HiddenRowBytes())
		case chunk.LayerKV:
			want = uint32(c.KVRowBytes())
		}
		if p.RowBytes != want {
			return nil, status.Errorf(codes.FailedPrecondition, "project: layer %d (%s) rows of %d bytes, model %s has %d", l, p.Kind, p.RowBytes, m.Name, want)
		}
	}
	return &projector{m: m, plan: id.Plan}, nil
}

// layer returns the K|V rows of a layer ([tokens x 2 x kv_dim] in the model
// dtype): projected for hidden layers, as stored for KV layers.
func (p *projector) layer(l int, rows []byte) ([]byte, error) {
	c := p.m.Config
	if p.plan[l].Kind == chunk.LayerKV {
		return rows, nil
	}
	n := len(rows) / c.HiddenRowBytes()
	if n == 0 {
		return nil, nil
	}
	if p.paged == nil || p.tokens != n {
		var err error
		if p.paged, err = gpu.NewPagedKV(c, n, 1); err != nil {
			return nil, err
		}
		p.pos = make([]int, n)
		for i := range p.pos {
			p.pos[i] = i
		}
		p.out = make([]byte, n*c.KVRowBytes())
		p.tokens = n
	}
	p.m.mu.Lock()
	err := p.m.Backend.Project(l, rows, p.pos, p.paged)
	p.m.mu.Unlock()
	if err != nil {
		return nil, fmt.Errorf("project layer %d: %w", l, err)
	}
	half := c.KVRowBytes() / 2
	for i := 0; i < n; i++ {
		copy(p.out[i*2*half:], p.paged.K[i*half:(i+1)*half])
		copy(p.out[i*2*half+half:], p.paged.V[i*half:(i+1)*half])
	}
	return p.out, nil
}
