package remote

import (
	"context"
	"fmt"
	"io"
	"sync"

	"github.com/hcache/hcache/chunk"
)

// Provider serves this store's segments that the remote tier holds (the
// object seam: chunk.ObjectProvider). Opening contacts nothing, so a store
// whose index names remote segments opens while the object store is down;
// reads then fail as on a miss, and local segments serve as before.
type Provider struct{ c *Client }

// Provider returns the segment provider of this client's store.
func (c *Client) Provider() *Provider { return &Provider{c: c} }

// Name is the location the index records: the bucket and prefix, so a
// store reopened against another bucket is refused rather than served
// misses.
func (p *Provider) Name() string { return LocationName(p.c.cfg) }

// LocationName is the location a store's index records for segments held
// in cfg's bucket.
func LocationName(cfg Config) string {
	n := "s3://" + cfg.Bucket + "/" + cfg.Prefix
	if len(n) > 255 {
		n = n[:255]
	}
	return n
}

// OpenForReading opens the object of segment seg.
func (p *Provider) OpenForReading(seg uint32) (chunk.ObjectReader, error) {
	return &segObject{c: p.c, key: p.c.segKey(p.c.cfg.StoreID, seg), size: -1}, nil
}

// segObject reads ranges of one segment object. Its size is learned on
// first use (one HEAD).
type segObject struct {
	c    *Client
	key  string
	mu   sync.Mutex
	size int64
}

// Stat returns the object's size (chunk.SizedObject).
func (o *segObject) Stat() (int64, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.size >= 0 {
		return o.size, nil
	}
	oi, err := o.c.stat(context.Background(), o.key)
	if err != nil {
		return 0, err
	}
	o.size = oi.Size
	return o.size, nil
}

// Size is the object's size, 0 while it cannot be learned.
func (o *segObject) Size() int64 {
	n, _ := o.Stat()
	return n
}

// ReadAt reads with ranged GETs (large reads split, several in flight).
// The bytes are checked by the store's read path like a local read.
func (o *segObject) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("remote: read %s at %d", o.key, off)
	}
	if len(p) == 0 {
		return 0, nil
	}
	if err := o.c.readRanges(context.Background(), o.key, p, off); err != nil {
		return 0, err
	}
	return len(p), nil
}

func (o *segObject) Close() error { return nil }

var _ io.ReaderAt = (*segObject)(nil)
var _ chunk.SizedObject = (*segObject)(nil)
