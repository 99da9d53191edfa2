package peer

import (
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/hcache/hcache/state"
)

// PrefixSystem keeps state addressed by its tokens: each full group of
// GroupTokens tokens is keyed by its chain key and stored once, whichever
// request saved it first. ctx names the conversation a request continues:
// a system that keeps named contexts (hcache) lets it replace that
// conversation's previous state and adds its partial tail to lookups;
// others ignore it.
type PrefixSystem interface {
	Name() string
	// GroupTokens is the tokens per stored group (chunk).
	GroupTokens() int
	// SaveTokens stores the groups of tokens that are not stored yet (rows
	// gives any layer's rows of tokens [from, to) of this list, and may be
	// called from several goroutines at once) and reports how many groups
	// it wrote.
	SaveTokens(ctx string, tokens []uint32, rows Rows) (written int, err error)
	// Lookup is the number of leading tokens of tokens whose state is
	// stored.
	Lookup(ctx string, tokens []uint32) (int, error)
	// RestoreTokens hands every row of the first n tokens (n from Lookup)
	// to fn, each (layer, token) once.
	RestoreTokens(ctx string, tokens []uint32, n int, fn Deliver) error
	BytesOnDisk() (int64, error)
	Close() error
}

// ChainFiles is LMCache's local-disk backend (lmcache/v1/storage_backend/
// local_disk_backend.py) over chain keys: one file per chunk of
// ChunkTokens tokens (256, LMCache's chunk_size; save_unfull_chunk is off
// by default, so a partial last chunk is not saved), named by its chain key
// in one flat directory, holding every layer's rows (layer-major). Its index
// is an in-memory map from key to file, as LMCache's `self.dict`: nothing
// but the files survives a restart. A chunk whose key is in the map is not
// written again (dedup by hash). A lookup walks the request's keys in order
// and stops at the first missing one (batched_async_contains). Writes run
// on 4 workers (LocalDiskWorker's pool of max_workers=4), with O_DIRECT
// when a chunk is a multiple of the file system's block size (the backend's
// best setting, extra_config use_odirect: true) and buffered otherwise, as
// the backend falls back; no fsync. A restore reads the chunks one after
// another into block-aligned buffers (batched_async_load_bytes_from_disk).
type ChainFiles struct {
	spec  Spec
	chain state.Chain
	bs    int // file system block size

	mu     sync.Mutex
	hasher state.ChainHasher        // lookups' keys (under mu)
	index  map[state.ChainKey]int64 // key -> file bytes
	puts   map[state.ChainKey]bool  // keys being written (LMCache's put_tasks)
	direct bool                     // O_DIRECT still works here (EINVAL turns it off)

	bufs sync.Pool
}

// ChainFilesWorkers is LocalDiskWorker's pool size.
const ChainFilesWorkers = 4

// NewChainFiles uses spec.Dir; chain keys are computed under chain.
func NewChainFiles(spec Spec, chain state.Chain) (*ChainFiles, error) {
	if err := spec.check(); err != nil {
		return nil, err
	}
	if spec.ChunkTokens <= 0 {
		spec.ChunkTokens = DefaultChunkTokens
	}
	var st unix.Statfs_t
	if err := unix.Statfs(spec.Dir, &st); err != nil {
		return nil, fmt.Errorf("peer file-per-chunk-hash: statfs %s: %w", spec.Dir, err)
	}
	return &ChainFiles{spec: spec, chain: chain, bs: int(st.Bsize), index: map[state.ChainKey]int64{},
		puts: map[state.ChainKey]bool{}, direct: true}, nil
}

// Name implements PrefixSystem.
func (f *ChainFiles) Name() string { return "file-per-chunk-hash" }

// GroupTokens implements PrefixSystem.
func (f *ChainFiles) GroupTokens() int { return f.spec.ChunkTokens }

// DirectIO reports whether chunks go through O_DIRECT (the chunk size is
// block-aligned and the file system accepted it).
func (f *ChainFiles) DirectIO() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.direct && f.chunkBytes()%f.bs == 0
}

func (f *ChainFiles) chunkBytes() int { return f.spec.Layers * f.spec.ChunkTokens * f.spec.RowBytes }

func (f *ChainFiles) path(k state.ChainKey) string {
	return filepath.Join(f.spec.Dir, hex.EncodeToString(k[:])+".kv")
}

// buf is a chunk buffer aligned to the block size (O_DIRECT needs it).
func (f *ChainFiles) buf() []byte {
	if b, ok := f.bufs.Get().([]byte); ok {
		return b
	}
	n := f.chunkBytes()
	raw := make([]byte, n+f.bs)
	off := 0
	if r := int(uintptr(unsafe.Pointer(&raw[0])) % uintptr(f.bs)); r != 0 {
		off = f.bs - r
	}
	return raw[off : off+n : off+n]
}

// SaveTokens implements PrefixSystem.
func (f *ChainFiles) SaveTokens(_ string, tokens []uint32, rows Rows) (int, error) {
	ct := f.spec.ChunkTokens
	keys, err := f.chain.Keys(tokens, ct)
	if err != nil {
		return 0, err
	}
	var todo []int
	f.mu.Lock()
	for c, k := range keys {
		if _, ok := f.index[k]; !ok && !f.puts[k] {
			f.puts[k] = true // a repeated save skips it, as submit_put_task does
			todo = append(todo, c)
		}
	}
	f.mu.Unlock()
	jobs := make(chan int)
	errs := make(chan error, ChainFilesWorkers)
	var wg sync.WaitGroup
	for w := 0; w < min(ChainFilesWorkers, len(todo)); w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var first error
			for c := range jobs {
				if first == nil {
					first = f.writeChunk(keys[c], c, rows)
				} else {
					f.mu.Lock()
					delete(f.puts, keys[c]) // not written after an error
					f.mu.Unlock()
				}
			}
			errs <- first
		}()
	}
	for _, c := range todo {
		jobs <- c
	}
	close(jobs)
	wg.Wait()
	close(errs)
	for e := range errs {
		if e != nil {
			return 0, e
		}
	}
	return len(todo), nil
}

func (f *ChainFiles) writeChunk(k state.ChainKey, c int, rows Rows) (err error) {
	ct, row := f.spec.ChunkTokens, f.spec.RowBytes
	b := f.buf()
	defer f.bufs.Put(b)
	defer func() {
		f.mu.Lock()
		delete(f.puts, k)
		if err == nil {
			f.index[k] = int64(len(b))
		}
		f.mu.Unlock()
	}()
	for l := 0; l < f.spec.Layers; l++ {
		r := rows(l, c*ct, (c+1)*ct)
		if len(r) != ct*row {
			return fmt.Errorf("peer %s: layer %d of chunk %d has %d bytes of rows, want %d", f.Name(), l, c, len(r), ct*row)
		}
		copy(b[l*ct*row:], r)
	}
	p := f.path(k)
	if err := f.writeFile(p, b); err != nil {
		return fmt.Errorf("peer %s: write %s: %w", f.Name(), p, err)
	}
	return nil
}

// writeFile writes b with O_DIRECT when it can, as the backend's
// write_file does, else buffered.
func (f *ChainFiles) writeFile(p string, b []byte) error {
	if f.DirectIO() {
		fd, err := unix.Open(p, unix.O_CREAT|unix.O_WRONLY|unix.O_TRUNC|unix.O_DIRECT|unix.O_CLOEXEC, 0o644)
		if err == nil {
			var n int
			n, err = unix.Write(fd, b)
			unix.Close(fd)
			if err == nil && n != len(b) {
				err = fmt.Errorf("short write of %d of %d bytes", n, len(b))
			}
			if err == nil {
				return nil
			}
		}
		if !errors.Is(err, unix.EINVAL) {
			return err
		}
		f.mu.Lock()
		f.direct = false // the file system refuses O_DIRECT: buffered from now on
		f.mu.Unlock()
	}
	return os.WriteFile(p, b, 0o644)
}

// Lookup implements PrefixSystem.
func (f *ChainFiles) Lookup(_ string, tokens []uint32) (int, error) {
	ct := f.spec.ChunkTokens
	var parent state.ChainKey
	f.mu.Lock()
	defer f.mu.Unlock()
	n := 0
	for (n+1)*ct <= len(tokens) {
		parent = f.hasher.Next(f.chain, parent, tokens[n*ct:(n+1)*ct])
		if _, ok := f.index[parent]; !ok {
			break
		}
		n++
	}
	return n * ct, nil
}

// RestoreTokens implements PrefixSystem.
func (f *ChainFiles) RestoreTokens(_ string, tokens []uint32, n int, fn Deliver) error {
	ct, row := f.spec.ChunkTokens, f.spec.RowBytes
	if n%ct != 0 || n > len(tokens) {
		return fmt.Errorf("peer %s: restore of %d tokens of %d (want whole chunks of %d)", f.Name(), n, len(tokens), ct)
	}
	keys, err := f.chain.Keys(tokens[:n], ct)
	if err != nil {
		return err
	}
	b := f.buf()
	defer f.bufs.Put(b)
	for c, k := range keys {
		f.mu.Lock()
		size, ok := f.index[k]
		f.mu.Unlock()
		if !ok || size != int64(len(b)) {
			return fmt.Errorf("peer %s: chunk %d (%s) is not stored", f.Name(), c, k)
		}
		if err := f.readFile(f.path(k), b); err != nil {
			return fmt.Errorf("peer %s: chunk %d: %w", f.Name(), c, err)
		}
		for l := 0; l < f.spec.Layers; l++ {
			if err := fn(l, c*ct, b[l*ct*row:(l+1)*ct*row]); err != nil {
				return err
			}
		}
	}
	return nil
}

func (f *ChainFiles) readFile(p string, b []byte) error {
	flags := unix.O_RDONLY | unix.O_CLOEXEC
	if f.DirectIO() {
		flags |= unix.O_DIRECT
	}
	fd, err := unix.Open(p, flags, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	for off := 0; off < len(b); {
		m, err := unix.Pread(fd, b[off:], int64(off))
		if err != nil {
			return err
		}
		if m == 0 {
			return fmt.Errorf("%s: %d of %d bytes", p, off, len(b))
		}
		off += m
	}
	return nil
}

// DropCache writes the chunk files back and drops them from the page cache
// (it matters only when the file system refused O_DIRECT).
func (f *ChainFiles) DropCache() error {
	files, err := filesUnder(f.spec.Dir)
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
			return fmt.Errorf("peer %s: drop %s: %w", f.Name(), p, err)
		}
	}
	return nil
}

// Chunks is the number of chunks stored.
func (f *ChainFiles) Chunks() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.index)
}

// BytesOnDisk implements PrefixSystem.
func (f *ChainFiles) BytesOnDisk() (int64, error) { return dirBytes(f.spec.Dir) }

// Close implements PrefixSystem.
func (f *ChainFiles) Close() error { return nil }

// FillIndex puts the keys of tokens' full chunks into the in-memory index
// without writing any file (an index-only fill, for timing lookups against
// a large index); restoring them fails. It returns the chunks added.
func (f *ChainFiles) FillIndex(tokens []uint32) (int, error) {
	keys, err := f.chain.Keys(tokens, f.spec.ChunkTokens)
	if err != nil {
		return 0, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	n := 0
	for _, k := range keys {
		if _, ok := f.index[k]; !ok {
			f.index[k] = -1 // no file: RestoreTokens refuses it
			n++
		}
	}
	return n, nil
}
