package cuda

import (
	"errors"
	"fmt"
	"math/bits"
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

// CacheLayers implements gpu.Cache.
func (c *Cache) CacheLayers() int { return c.Layers }

// LayerBytes is the size of one layer's K (or V) in bytes.
func (c *Cache) LayerBytes() int {
	return c.Blocks * c.BlockTokens * c.b.cfg.KVDim() * c.b.cfg.ElemBytes()
}

// cacheBytes is layers x 2 x blocks x blockTokens token rows, refused when
// it overflows or exceeds the device's memory.
func (b *Backend) cacheBytes(layers, blocks, blockTokens int) (layerBytes int, err error) {
	if layers <= 0 || blocks <= 0 || blockTokens <= 0 {
		return 0, fmt.Errorf("cuda: cache of %d layers x %d blocks x %d tokens", layers, blocks, blockTokens)
	}
	row := uint64(b.cfg.KVDim() * b.cfg.ElemBytes())
	limit := uint64(1) << 62
	if b.memory > 0 {
		limit = uint64(b.memory)
	}
	lb := uint64(blocks)
	for _, f := range []uint64{uint64(blockTokens), row} {
		hi, lo := bits.Mul64(lb, f)
		if hi != 0 || lo > limit {
			return 0, fmt.Errorf("cuda: a layer of %d blocks x %d tokens x %d bytes exceeds the device's %d bytes", blocks, blockTokens, row, limit)
		}
		lb = lo
	}
	if hi, total := bits.Mul64(lb, 2*uint64(layers)); hi != 0 || total > limit {
		return 0, fmt.Errorf("cuda: %d layers of %d bytes (K and V) exceed the device's %d bytes", layers, lb, limit)
	}
	return int(lb), nil
}

// NewCache allocates a cache of layers x blocks x blockTokens tokens with an
// identity block table.
func (b *Backend) NewCache(layers, blocks, blockTokens int) (*Cache, error) {
	lb, err := b.cacheBytes(layers, blocks, blockTokens)
	if err != nil {
		return nil, err
	}
	c := &Cache{b: b, Layers: layers, Blocks: blocks, BlockTokens: blockTokens}
	err = b.with(func() error {
		b.mu.Lock()
		defer b.mu.Unlock()
		if err := b.live(); err != nil {
			return err
		}
		p, err := b.alloc(2 * layers * lb)
		if err != nil {
			return err
		}
		c.owned = p
		for l := 0; l < layers; l++ {
			c.K = append(c.K, p+uintptr(2*l*lb))
			c.V = append(c.V, p+uintptr((2*l+1)*lb))
		}
		b.track(c)
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
	lb, err := b.cacheBytes(len(k), blocks, blockTokens)
	if err != nil {
		return nil, err
	}
	// Every layer's K and V must lie inside one device allocation of this
	// context and be aligned for the kernels' 32-bit stores.
	err = b.with(func() error {
		for l := range k {
			for _, p := range []uintptr{k[l], v[l]} {
				if p == 0 || p%4 != 0 {
					return fmt.Errorf("cuda: WrapCache: layer %d pointer %#x is nil or not 4-byte aligned", l, p)
				}
				base, size := new(uintptr), new(uintptr)
				if err := b.d.check(fmt.Sprintf("WrapCache: layer %d pointer %#x is not device memory of this context: cuMemGetAddressRange", l, p),
					b.d.call("cuMemGetAddressRange_v2", ptr(base), ptr(size), p)); err != nil {
					return err
				}
				if p+uintptr(lb) > *base+*size {
					return fmt.Errorf("cuda: WrapCache: layer %d: %d bytes from %#x run past the end of its allocation (%#x + %d)", l, lb, p, *base, *size)
				}
			}
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	c := &Cache{b: b, Layers: len(k), Blocks: blocks, BlockTokens: blockTokens, K: k, V: v}
	b.mu.Lock()
	if err := b.live(); err != nil {
		b.mu.Unlock()
		return nil, err
	}
	b.track(c)
	b.mu.Unlock()
	if err := c.SetBlockTable(blockTable); err != nil {
		c.Free()
		return nil, err
	}
	return c, nil
}

// track records a live cache. Call with b.mu held.
func (b *Backend) track(c *Cache) {
	if b.caches == nil {
		b.caches = map[*Cache]bool{}
	}
	b.caches[c] = true
}

// op runs fn for a cache method: on a locked thread with the context
// current, refused once the cache or its backend is gone.
func (c *Cache) op(fn func() error) error {
	return c.b.with(func() error {
		c.b.mu.Lock()
		defer c.b.mu.Unlock()
		if err := c.b.live(); err != nil {
			return err
		}
		if c.K == nil {
			return errors.New("cuda: cache freed")
		}
		if err := fn(); err != nil {
			return err
		}
		return c.b.sync()
	})
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
	return c.op(func() error {
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
	return c.op(func() error {
		for l := range c.K {
			for _, p := range []uintptr{c.K[l], c.V[l]} {
				if err := c.b.ops.memset(p, v, c.LayerBytes()); err != nil {
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
	return c.op(func() error {
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
	return c.op(func() error {
		if err := c.b.sync(); err != nil {
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
// wrapped cache; the mapping too, for one opened by IPC). After the
// backend's Close it does nothing: Close freed it.
func (c *Cache) Free() {
	if c == nil || c.b == nil {
		return
	}
	c.b.with(func() error {
		c.b.mu.Lock()
		defer c.b.mu.Unlock()
		if c.b.closed || !c.b.caches[c] {
			return nil
		}
		c.b.sync()
		c.release()
		delete(c.b.caches, c)
		return nil
	})
}

// release frees the cache's device resources. Call on a locked thread with
// the context current and b.mu held.
func (c *Cache) release() {
	c.b.free(c.owned)
	c.b.free(c.table)
	if c.ipcBase != 0 {
		c.b.d.call("cuIpcCloseMemHandle", c.ipcBase)
	}
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
