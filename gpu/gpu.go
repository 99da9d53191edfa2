// Package gpu holds the projection backends that rebuild a layer's K and V
// from its saved hidden states during restore, writing them into a paged KV
// cache laid out as vLLM lays it out. The CPU backend here is the reference;
// a CUDA backend (cuBLAS GEMM plus a RoPE kernel, loaded at run time through
// purego) implements the same interface and is checked against it.
package gpu

import (
	"fmt"

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

// Backend rebuilds KV from hidden states.
type Backend interface {
	Name() string
	// Project computes the K and V of one layer for tokens at positions
	// from their hidden rows ([len(positions) x hidden] in the model
	// dtype) and writes them into dst.
	Project(layer int, hidden []byte, positions []int, dst *PagedKV) error
	// LoadKV writes stored K||V rows ([len(positions) x 2 x kv_dim] in the
	// model dtype: a layer saved as KV) into dst.
	LoadKV(layer int, rows []byte, positions []int, dst *PagedKV) error
	Close() error
}

// CPU is the reference backend: the forward pass's own arithmetic.
type CPU struct {
	cfg     *model.Config
	invFreq []float32
	layers  []model.LayerWeights
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
