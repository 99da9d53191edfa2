// Package peer holds the systems `hcache bench compare` measures hcache
// against, each a small honest implementation behind one interface: save a
// context's rows, restore them, report the bytes they take. They live under
// bench/ and are never part of the product.
package peer

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"syscall"
)

// Rows returns the rows of tokens [from, to) of one layer, prepared by the
// caller before the timed call (valid during the call only).
type Rows func(layer, from, to int) []byte

// Deliver receives restored rows: layer, the position of the first token,
// and whole rows (valid during the call only).
type Deliver func(layer, first int, rows []byte) error

// System is one way of keeping LLM context state between turns.
type System interface {
	Name() string
	// RowBytes is the bytes of one token's row in one layer, as this
	// system stores it (hidden state or K||V).
	RowBytes() int
	// Save stores tokens [from, to) of context id; tokens [0, from) were
	// saved by earlier calls.
	Save(id string, from, to int, rows Rows) error
	// Restore hands every stored row of the first tokens tokens of id to
	// fn, each token of each layer exactly once.
	Restore(id string, tokens int, fn Deliver) error
	// BytesOnDisk is what the system's files take now (0 for memory-only).
	BytesOnDisk() (int64, error)
	Close() error
}

// ColdReader is implemented by systems that read through the page cache:
// DropCache makes the next restore of id read from the disk (called before
// the timed restore, not timed).
type ColdReader interface {
	DropCache(id string) error
}

// MemoryUser is implemented by systems that keep state in DRAM.
type MemoryUser interface {
	BytesInMemory() (int64, error)
}

// Spec is what every system is built from.
type Spec struct {
	Dir         string // a directory of its own, created if missing
	Layers      int
	RowBytes    int // hidden or KV row, whichever the system stores
	ChunkTokens int // tokens per chunk for the chunked peers (256 as LMCache)
}

func (s Spec) check() error {
	if s.Layers <= 0 || s.RowBytes <= 0 {
		return fmt.Errorf("peer: %d layers of %d-byte rows", s.Layers, s.RowBytes)
	}
	return os.MkdirAll(s.Dir, 0o755)
}

// DefaultChunkTokens is LMCache's chunk size.
const DefaultChunkTokens = 256

// lstat is os.Lstat; a test seam to remove a file between the directory
// read and the stat, as a compaction does.
var lstat = os.Lstat

// dirBytes sums the allocated bytes (st_blocks * 512, so a sparse or
// preallocated file counts what it takes on the disk) of the regular files
// under dir. Files and directories that vanish during the walk (Pebble's
// compactions delete tables while a benchmark measures) are skipped: they
// take no space any more.
func dirBytes(dir string) (int64, error) {
	var n int64
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil // vanished; for a directory, WalkDir skips it
			}
			return err
		}
		if !d.Type().IsRegular() {
			return nil
		}
		fi, err := lstat(p)
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		if err != nil {
			return err
		}
		n += allocated(fi)
		return nil
	})
	return n, err
}

// allocated is the bytes fi's file takes on the disk.
func allocated(fi fs.FileInfo) int64 {
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return st.Blocks * 512
	}
	return fi.Size()
}

// filesUnder lists the regular files under dir, sorted.
func filesUnder(dir string) ([]string, error) {
	var out []string
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.Type().IsRegular() {
			out = append(out, p)
		}
		return nil
	})
	sort.Strings(out)
	return out, err
}
