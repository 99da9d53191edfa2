package cuda

import (
	"errors"
	"fmt"
)

// Cache is a paged KV cache in device memory: for each layer, K and V laid
// out as [blocks, block_tokens, kv_heads, head_dim] in the model dtype, and
// one block table (logical block -> physical block) shared by the layers,
// as vLLM lays out a sequence's cache.
type Cache struct {
	b           *Backend
	Layers      int
	Blocks      int
	BlockTokens int
	K, V        []uintptr // device pointers, one per layer
	table       uintptr   // device int32 [tableLen]
	tableLen    int
	hostTable   []int
	owned       uintptr // the allocation NewCache made; 0 for wrapped memory
	ipcBase     uintptr // the mapping OpenIPCCache opened; 0 otherwise
}

// LayerBytes is the size of one layer's K (or V) in bytes.
func (c *Cache) LayerBytes() int {
	return c.Blocks * c.BlockTokens * c.b.cfg.KVDim() * c.b.cfg.ElemBytes()
}

// NewCache allocates a cache of layers x blocks x blockTokens tokens with an
// identity block table.
func (b *Backend) NewCache(layers, blocks, blockTokens int) (*Cache, error) {
	if layers <= 0 || blocks <= 0 || blockTokens <= 0 {
		return nil, fmt.Errorf("cuda: cache of %d layers x %d blocks x %d tokens", layers, blocks, blockTokens)
	}
	c := &Cache{b: b, Layers: layers, Blocks: blocks, BlockTokens: blockTokens}
	lb := c.LayerBytes()
	err := b.with(func() error {
		p, err := b.alloc(2 * layers * lb)
		if err != nil {
			return err
		}
		c.owned = p
		for l := 0; l < layers; l++ {
			c.K = append(c.K, p+uintptr(2*l*lb))
			c.V = append(c.V, p+uintptr((2*l+1)*lb))
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	t := make([]int, blocks)
	for i := range t {
		t[i] = i
	}
	if err := c.SetBlockTable(t); err != nil {
		c.Free()
		return nil, err
	}
	return c, nil
}

// WrapCache describes device memory the caller owns (a serving engine's own
// KV cache): k[l] and v[l] each hold blocks x blockTokens token rows of the
// model. Free releases only the block table.
func (b *Backend) WrapCache(k, v []uintptr, blocks, blockTokens int, blockTable []int) (*Cache, error) {
	if len(k) == 0 || len(k) != len(v) || blocks <= 0 || blockTokens <= 0 {
		return nil, fmt.Errorf("cuda: WrapCache needs as many K as V pointers (%d, %d) and positive sizes", len(k), len(v))
	}
	for l := range k {
		if k[l] == 0 || v[l] == 0 {
			return nil, fmt.Errorf("cuda: WrapCache: layer %d has a nil device pointer", l)
		}
	}
	c := &Cache{b: b, Layers: len(k), Blocks: blocks, BlockTokens: blockTokens, K: k, V: v}
	if err := c.SetBlockTable(blockTable); err != nil {
		return nil, err
	}
	return c, nil
}

// SetBlockTable uploads a block table; every entry must name a block of the
// cache.
func (c *Cache) SetBlockTable(t []int) error {
	if len(t) == 0 {
		return errors.New("cuda: empty block table")
	}
	host := make([]int32, len(t))
	for i, pb := range t {
		if pb < 0 || pb >= c.Blocks {
			return fmt.Errorf("cuda: block table entry %d maps to block %d, outside the cache's %d", i, pb, c.Blocks)
		}
		host[i] = int32(pb)
	}
	return c.b.with(func() error {
		if len(t) > c.tableLen {
			p, err := c.b.alloc(4 * len(t))
			if err != nil {
				return err
			}
			c.b.free(c.table)
			c.table, c.tableLen = p, len(t)
		}
		c.hostTable = append(c.hostTable[:0], t...)
		return c.b.htod(c.table, i32bytes(host))
	})
}

// BlockTable returns a copy of the block table in use.
func (c *Cache) BlockTable() []int { return append([]int(nil), c.hostTable...) }

// Poison fills every layer's K and V with the byte v (0xff makes NaNs of
// every dtype), so a check can see which elements a restore wrote.
func (c *Cache) Poison(v byte) error {
	return c.b.with(func() error {
		for l := range c.K {
			for _, p := range []uintptr{c.K[l], c.V[l]} {
				if err := c.b.d.check("cuMemsetD8", c.b.d.call("cuMemsetD8_v2", p, uintptr(v), uintptr(c.LayerBytes()))); err != nil {
					return err
				}
			}
		}
		return nil
	})
}

// Upload copies host K and V (LayerBytes each) into a layer.
func (c *Cache) Upload(layer int, k, v []byte) error {
	if err := c.checkLayer(layer, k, v); err != nil {
		return err
	}
	return c.b.with(func() error {
		if err := c.b.htod(c.K[layer], k); err != nil {
			return err
		}
		return c.b.htod(c.V[layer], v)
	})
}

// Download copies a layer's K and V into host memory (LayerBytes each).
func (c *Cache) Download(layer int, k, v []byte) error {
	if err := c.checkLayer(layer, k, v); err != nil {
		return err
	}
	return c.b.with(func() error {
		if err := c.b.d.check("cuCtxSynchronize", c.b.d.call("cuCtxSynchronize")); err != nil {
			return err
		}
		if err := c.b.dtoh(k, c.K[layer]); err != nil {
			return err
		}
		return c.b.dtoh(v, c.V[layer])
	})
}

func (c *Cache) checkLayer(layer int, k, v []byte) error {
	if layer < 0 || layer >= c.Layers {
		return fmt.Errorf("cuda: layer %d outside the cache's %d", layer, c.Layers)
	}
	if len(k) != c.LayerBytes() || len(v) != c.LayerBytes() {
		return fmt.Errorf("cuda: %d/%d host bytes for a %d-byte layer", len(k), len(v), c.LayerBytes())
	}
	return nil
}

// Free releases the cache's device memory (the block table only, for a
// wrapped cache).
func (c *Cache) Free() {
	if c == nil {
		return
	}
	c.b.with(func() error {
		c.b.free(c.owned)
		c.b.free(c.table)
		if c.ipcBase != 0 {
			c.b.d.call("cuIpcCloseMemHandle", c.ipcBase)
		}
		return nil
	})
	c.owned, c.table, c.ipcBase, c.K, c.V = 0, 0, 0, nil, nil
}

func i32bytes(v []int32) []byte {
	if len(v) == 0 {
		return nil
	}
	b := make([]byte, 4*len(v))
	for i, x := range v {
		b[4*i], b[4*i+1], b[4*i+2], b[4*i+3] = byte(x), byte(x>>8), byte(x>>16), byte(x>>24)
	}
	return b
}
