package peer

import (
	"encoding/binary"
	"fmt"
	"path/filepath"
	"strings"

	"github.com/cockroachdb/pebble/v2"
	"golang.org/x/sys/unix"
)

// PebbleBlob keeps KV chunks as values in Pebble, what a team reaching for
// an embedded KV store does: one key per (context, chunk, layer), the value
// that layer's rows of the ChunkTokens-token chunk; each save is one batch
// committed with Sync (durable, like hcache). Pebble's default options
// otherwise, with a small block cache.
type PebbleBlob struct {
	spec  Spec
	db    *pebble.DB
	cache *pebble.Cache
}

// NewPebbleBlob opens a fresh database in spec.Dir.
func NewPebbleBlob(spec Spec) (*PebbleBlob, error) {
	if err := spec.check(); err != nil {
		return nil, err
	}
	if spec.ChunkTokens <= 0 {
		spec.ChunkTokens = DefaultChunkTokens
	}
	cache := pebble.NewCache(8 << 20)
	db, err := pebble.Open(filepath.Join(spec.Dir, "db"), &pebble.Options{Cache: cache, Logger: quiet{}})
	if err != nil {
		cache.Unref()
		return nil, err
	}
	return &PebbleBlob{spec: spec, db: db, cache: cache}, nil
}

type quiet struct{}

func (quiet) Infof(string, ...any)  {}
func (quiet) Errorf(string, ...any) {}
func (quiet) Fatalf(f string, a ...any) {
	panic(fmt.Sprintf(f, a...))
}

// Name implements System.
func (p *PebbleBlob) Name() string { return "pebble-blob" }

// RowBytes implements System.
func (p *PebbleBlob) RowBytes() int { return p.spec.RowBytes }

func key(id string, c, l int) []byte {
	k := make([]byte, 0, len(id)+9)
	k = append(k, id...)
	k = append(k, 0)
	k = binary.BigEndian.AppendUint32(k, uint32(c))
	k = binary.BigEndian.AppendUint32(k, uint32(l))
	return k
}

// Save implements System.
func (p *PebbleBlob) Save(id string, from, to int, rows Rows) error {
	if strings.IndexByte(id, 0) >= 0 {
		return fmt.Errorf("peer pebble-blob: context id with a NUL byte")
	}
	ct := p.spec.ChunkTokens
	b := p.db.NewBatch()
	defer b.Close()
	for c := from / ct; c*ct < to; c++ {
		lo, hi := c*ct, min((c+1)*ct, to)
		for l := 0; l < p.spec.Layers; l++ {
			if err := b.Set(key(id, c, l), rows(l, lo, hi), nil); err != nil {
				return err
			}
		}
	}
	return b.Commit(pebble.Sync)
}

// DropCache implements ColdReader: the memtable is flushed (so values are
// read from files, as they are once it fills) and every file of the
// database dropped from the page cache.
func (p *PebbleBlob) DropCache(string) error {
	if err := p.db.Flush(); err != nil {
		return err
	}
	files, err := filesUnder(filepath.Join(p.spec.Dir, "db"))
	if err != nil {
		return err
	}
	for _, f := range files {
		fd, err := unix.Open(f, unix.O_RDONLY, 0)
		if err != nil {
			continue // removed by a compaction meanwhile
		}
		unix.Fadvise(fd, 0, 0, unix.FADV_DONTNEED)
		unix.Close(fd)
	}
	return nil
}

// Restore implements System.
func (p *PebbleBlob) Restore(id string, tokens int, fn Deliver) error {
	ct, row := p.spec.ChunkTokens, p.spec.RowBytes
	for c := 0; c*ct < tokens; c++ {
		n := min(ct, tokens-c*ct)
		for l := 0; l < p.spec.Layers; l++ {
			v, closer, err := p.db.Get(key(id, c, l))
			if err != nil {
				return fmt.Errorf("peer pebble-blob: %s chunk %d layer %d: %w", id, c, l, err)
			}
			if len(v) < n*row {
				closer.Close()
				return fmt.Errorf("peer pebble-blob: %s chunk %d layer %d holds %d bytes, want %d", id, c, l, len(v), n*row)
			}
			err = fn(l, c*ct, v[:n*row])
			closer.Close()
			if err != nil {
				return err
			}
		}
	}
	return nil
}

// BytesOnDisk implements System: every file of the database (WAL, tables).
func (p *PebbleBlob) BytesOnDisk() (int64, error) {
	if err := p.db.Flush(); err != nil {
		return 0, err
	}
	return dirBytes(filepath.Join(p.spec.Dir, "db"))
}

// Close implements System.
func (p *PebbleBlob) Close() error {
	err := p.db.Close()
	p.cache.Unref()
	return err
}
