package chunk

import (
	"sync"

	"github.com/hashicorp/golang-lru/v2/simplelru"
)

// sliceCache is the DRAM tier: verified raw slices of recently written or
// restored chunk groups, keyed by context generation, group and layer, and
// bounded in bytes (Options.CacheBytes). A hit serves bytes that passed their
// checksum when they entered the cache.
type sliceCache struct {
	mu    sync.Mutex
	limit int64
	bytes int64
	lru   *simplelru.LRU[sliceKey, []byte]
}

type sliceKey struct {
	gen    uint64
	gkey   ChainKey // a shared group's slices (gen 0: generations start at 1)
	at     uint64   // a shared group's record place (segment << 40 | offset / 4096)
	group  uint32
	layer  uint16
	tokens uint16
}

func newSliceCache(limit int64) *sliceCache {
	c := &sliceCache{limit: limit}
	// The entry count is bounded by bytes, not by the LRU's size.
	c.lru, _ = simplelru.NewLRU[sliceKey, []byte](1<<30, func(_ sliceKey, v []byte) { c.bytes -= int64(len(v)) })
	return c
}

func (c *sliceCache) get(k sliceKey) ([]byte, bool) {
	if c.limit == 0 {
		return nil, false
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.lru.Get(k)
}

// add stores a copy of v.
func (c *sliceCache) add(k sliceKey, v []byte) {
	if c.limit == 0 || int64(len(v)) > c.limit/4 {
		return
	}
	cp := append([]byte(nil), v...)
	c.mu.Lock()
	defer c.mu.Unlock()
	c.lru.Remove(k) // an older version of the slice; the callback uncounts it
	c.lru.Add(k, cp)
	c.bytes += int64(len(cp))
	for c.bytes > c.limit {
		c.lru.RemoveOldest()
	}
}

// dropGen removes every slice of a context generation.
func (c *sliceCache) dropGen(gen uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, k := range c.lru.Keys() {
		if k.gen == gen {
			c.lru.Remove(k)
		}
	}
}

func (c *sliceCache) size() int64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.bytes
}

// cacheGroup adds the slices of a committed group write. Call with s.mu held.
func (s *Store) cacheGroup(c *ctxState, j *writeJob) {
	for _, sl := range j.chunk.Slices {
		l := int(sl.Layer)
		rows := j.slab[j.layerOff[l] : j.layerOff[l]+int(sl.Raw)]
		s.cache.add(sliceKey{gen: c.rec.Gen, group: j.group, layer: sl.Layer, tokens: uint16(j.tokens)}, rows)
	}
}
