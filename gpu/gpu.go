// Package gpu is the restore backend interface: what rebuilds a layer's K
// and V into a paged KV cache (laid out as vLLM lays it out) from what the
// store saved for it, and what recomputes a plan's prefix from token ids.
//
// Backend is an asynchronous device interface: BeginRestore opens one
// context's restore into a Cache, and its Restore queues work (Recompute of
// the prefix, Hidden and KV layers as their reads complete), handing each
// host buffer back through its release function once the device has read
// it; Wait ends the restore. The CPU backend here is the reference and runs
// each call to completion before it returns; the CUDA backend (gpu/cuda:
// cuBLAS GEMMs and CUDA kernels, loaded at run time through purego) queues
// on streams and is checked against it. serve drives every restore through
// this interface and links no backend itself.
//
// The save side (save.go, issue 24) is AsyncCopier: CopyToHost orders
// device-to-host copies after the work queued on a caller's stream (an
// event recorded there, which the copier's own stream waits for) and
// returns at once with the Event that completes them; serve's DeviceSaver
// saves an engine's device-resident rows through it. CPUDevice is the CPU
// backend's device (host memory as device memory, goroutine streams), on
// which that saver runs and is tested with the code it runs on a GPU; gpu/cuda's
// Copier implements it with the driver API.
//
// Select builds a backend by name from a registry: the CPU backend is always
// there, and a device backend registers itself when its package is linked
// (gpu/cuda does in its init), so that the binaries choose what they link
// and gpu imports no backend (gpu/cuda imports gpu; a Select in gpu/cuda
// would tie every caller of Select to CUDA, and a Select here that imported
// gpu/cuda would be an import cycle).
package gpu

import (
	"fmt"
	"sync"

	"github.com/hcache/hcache/model"
)

// PagedKV is one layer's paged KV cache: K and V each laid out as
// [blocks, BlockTokens, KVHeads, HeadDim] in the model dtype, with a block
// table mapping a sequence's logical blocks to physical ones.
type PagedKV struct {
	BlockTokens int
	KVHeads     int
	HeadDim     int
	ElemBytes   int
	BlockTable  []int // logical block -> physical block
	K, V        []byte
}

// NewPagedKV allocates a cache of blocks physical blocks and an identity
// block table of the same length.
func NewPagedKV(c *model.Config, blockTokens, blocks int) (*PagedKV, error) {
	if blockTokens <= 0 || blocks <= 0 {
		return nil, fmt.Errorf("gpu: paged cache of %d blocks of %d tokens", blocks, blockTokens)
	}
	p := &PagedKV{BlockTokens: blockTokens, KVHeads: c.KVHeads, HeadDim: c.HeadDim, ElemBytes: c.ElemBytes()}
	n := blocks * p.blockBytes()
	p.K, p.V = make([]byte, n), make([]byte, n)
	p.BlockTable = make([]int, blocks)
	for i := range p.BlockTable {
		p.BlockTable[i] = i
	}
	return p, nil
}

func (p *PagedKV) blockBytes() int { return p.BlockTokens * p.tokenBytes() }
func (p *PagedKV) tokenBytes() int { return p.KVHeads * p.HeadDim * p.ElemBytes }

// slot returns the byte offset of a token position in K (and V).
func (p *PagedKV) slot(pos int) (int, error) {
	lb := pos / p.BlockTokens
	if pos < 0 || lb >= len(p.BlockTable) {
		return 0, fmt.Errorf("gpu: position %d outside the block table (%d blocks of %d tokens)", pos, len(p.BlockTable), p.BlockTokens)
	}
	pb := p.BlockTable[lb]
	off := pb*p.blockBytes() + (pos%p.BlockTokens)*p.tokenBytes()
	if pb < 0 || off+p.tokenBytes() > len(p.K) {
		return 0, fmt.Errorf("gpu: block table maps position %d to physical block %d, outside the cache", pos, pb)
	}
	return off, nil
}

// Token returns the stored K and V bytes of a position.
func (p *PagedKV) Token(pos int) (k, v []byte, err error) {
	off, err := p.slot(pos)
	if err != nil {
		return nil, nil, err
	}
	n := p.tokenBytes()
	return p.K[off : off+n], p.V[off : off+n], nil
}

// CPU is the reference backend: the forward pass's own arithmetic.
type CPU struct {
	cfg     *model.Config
	invFreq []float32
	layers  []model.LayerWeights

	mu sync.Mutex
	m  *model.Model // LoadRecompute's forward pass
}

// NewCPU builds the CPU backend; w needs only the WeightsKV set.
func NewCPU(c *model.Config, w *model.Weights) (*CPU, error) {
	if len(w.Layers) != c.Layers {
		return nil, fmt.Errorf("gpu: weights have %d layers, config %d", len(w.Layers), c.Layers)
	}
	for i, l := range w.Layers {
		if len(l.Wk) != c.KVDim()*c.HiddenSize || len(l.Wv) != c.KVDim()*c.HiddenSize {
			return nil, fmt.Errorf("gpu: layer %d K/V weights missing or misshapen", i)
		}
	}
	return &CPU{cfg: c, invFreq: c.InvFreq(), layers: w.Layers}, nil
}

// Name implements Backend.
func (b *CPU) Name() string { return "cpu" }

// Config implements Backend.
func (b *CPU) Config() *model.Config { return b.cfg }

// Close implements Backend.
func (b *CPU) Close() error { return nil }

// Project implements Backend.
func (b *CPU) Project(layer int, hidden []byte, positions []int, dst *PagedKV) error {
	c := b.cfg
	n := len(positions)
	if layer < 0 || layer >= c.Layers {
		return fmt.Errorf("gpu: layer %d out of range [0, %d)", layer, c.Layers)
	}
	if len(hidden) != n*c.HiddenRowBytes() {
		return fmt.Errorf("gpu: layer %d: %d hidden bytes for %d tokens, want %d", layer, len(hidden), n, n*c.HiddenRowBytes())
	}
	h := make([]float32, n*c.HiddenSize)
	c.DecodeRow(h, hidden)
	kvd := c.KVDim()
	k := make([]float32, n*kvd)
	v := make([]float32, n*kvd)
	model.ProjectKV(c, b.invFreq, &b.layers[layer], h, positions, k, v)
	return b.scatter(k, v, positions, dst)
}

// LoadKV implements Backend.
func (b *CPU) LoadKV(layer int, rows []byte, positions []int, dst *PagedKV) error {
	c := b.cfg
	n := len(positions)
	if len(rows) != n*c.KVRowBytes() {
		return fmt.Errorf("gpu: layer %d: %d KV bytes for %d tokens, want %d", layer, len(rows), n, n*c.KVRowBytes())
	}
	half := c.KVRowBytes() / 2
	for i, pos := range positions {
		off, err := dst.slot(pos)
		if err != nil {
			return err
		}
		copy(dst.K[off:off+half], rows[i*2*half:])
		copy(dst.V[off:off+half], rows[i*2*half+half:(i+1)*2*half])
	}
	return nil
}

func (b *CPU) scatter(k, v []float32, positions []int, dst *PagedKV) error {
	c := b.cfg
	kvd := c.KVDim()
	tb := kvd * c.ElemBytes()
	for i, pos := range positions {
		off, err := dst.slot(pos)
		if err != nil {
			return err
		}
		c.EncodeRow(dst.K[off:off+tb], k[i*kvd:(i+1)*kvd])
		c.EncodeRow(dst.V[off:off+tb], v[i*kvd:(i+1)*kvd])
	}
	return nil
}
