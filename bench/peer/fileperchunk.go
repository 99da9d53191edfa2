package peer

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"sync"

	"golang.org/x/sys/unix"
)

// FilePerChunk is what LMCache's local-disk backend does: one file per
// ChunkTokens-token chunk of a context holding every layer's K/V (laid out
// layer-major here so each layer's rows are contiguous), written with
// buffered writes and no fsync, no index file: the file name is the key. A
// chunk that a later turn extends is rewritten whole.
type FilePerChunk struct {
	spec Spec
	bufs sync.Pool
}

// NewFilePerChunk uses spec.Dir.
func NewFilePerChunk(spec Spec) (*FilePerChunk, error) {
	if err := spec.check(); err != nil {
		return nil, err
	}
	if spec.ChunkTokens <= 0 {
		spec.ChunkTokens = DefaultChunkTokens
	}
	return &FilePerChunk{spec: spec}, nil
}

// Name implements System.
func (f *FilePerChunk) Name() string { return "file-per-chunk" }

// RowBytes implements System.
func (f *FilePerChunk) RowBytes() int { return f.spec.RowBytes }

func (f *FilePerChunk) path(id string, c int) string {
	return filepath.Join(f.spec.Dir, id, strconv.Itoa(c)+".kv")
}

func (f *FilePerChunk) buf(n int) []byte {
	if b, ok := f.bufs.Get().([]byte); ok && cap(b) >= n {
		return b[:n]
	}
	return make([]byte, n)
}

// Save implements System.
func (f *FilePerChunk) Save(id string, from, to int, rows Rows) error {
	ct, row := f.spec.ChunkTokens, f.spec.RowBytes
	if err := os.MkdirAll(filepath.Join(f.spec.Dir, id), 0o755); err != nil {
		return err
	}
	for c := from / ct; c*ct < to; c++ {
		lo, hi := c*ct, min((c+1)*ct, to)
		n := hi - lo
		b := f.buf(f.spec.Layers * n * row)
		for l := 0; l < f.spec.Layers; l++ {
			copy(b[l*n*row:], rows(l, lo, hi))
		}
		err := os.WriteFile(f.path(id, c), b, 0o644)
		f.bufs.Put(b[:0])
		if err != nil {
			return err
		}
	}
	return nil
}

// DropCache implements ColdReader: the context's chunk files are written
// back and dropped from the page cache (posix_fadvise DONTNEED), as the
// benchmark's cold reads need.
func (f *FilePerChunk) DropCache(id string) error {
	files, err := filesUnder(filepath.Join(f.spec.Dir, id))
	if err != nil {
		return err
	}
	for _, p := range files {
		fd, err := unix.Open(p, unix.O_RDONLY, 0)
		if err != nil {
			return err
		}
		err = unix.Fdatasync(fd)
		if err == nil {
			err = unix.Fadvise(fd, 0, 0, unix.FADV_DONTNEED)
		}
		unix.Close(fd)
		if err != nil {
			return fmt.Errorf("peer file-per-chunk: drop %s: %w", p, err)
		}
	}
	return nil
}

// Restore implements System: each chunk file is read whole with buffered
// reads, then each layer's rows are handed over.
func (f *FilePerChunk) Restore(id string, tokens int, fn Deliver) error {
	ct, row := f.spec.ChunkTokens, f.spec.RowBytes
	for c := 0; c*ct < tokens; c++ {
		lo := c * ct
		fh, err := os.Open(f.path(id, c))
		if err != nil {
			return err
		}
		fi, err := fh.Stat()
		if err != nil {
			fh.Close()
			return err
		}
		stored := int(fi.Size()) / (f.spec.Layers * row)
		n := min(ct, tokens-lo)
		if stored < n || int(fi.Size()) != stored*f.spec.Layers*row {
			fh.Close()
			return fmt.Errorf("peer file-per-chunk: %s holds %d bytes, not %d tokens", f.path(id, c), fi.Size(), n)
		}
		b := f.buf(int(fi.Size()))
		_, err = readFull(fh, b)
		fh.Close()
		if err == nil {
			for l := 0; l < f.spec.Layers && err == nil; l++ {
				err = fn(l, lo, b[l*stored*row:(l*stored+n)*row])
			}
		}
		f.bufs.Put(b[:0])
		if err != nil {
			return err
		}
	}
	return nil
}

func readFull(f *os.File, b []byte) (int, error) {
	n := 0
	for n < len(b) {
		m, err := f.Read(b[n:])
		n += m
		if err != nil {
			return n, err
		}
	}
	return n, nil
}

// BytesOnDisk implements System.
func (f *FilePerChunk) BytesOnDisk() (int64, error) { return dirBytes(f.spec.Dir) }

// Close implements System.
func (f *FilePerChunk) Close() error { return nil }
