package chunk

import (
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	iofs "io/fs"
	"strings"

	"github.com/cockroachdb/pebble/v2/vfs"
	"github.com/hcache/hcache/chunk/format"
)

// ballastFile is the ballast (Options.BallastBytes): a preallocated file
// released when the disk is full, so that deletes, their tombstones and GC
// have room. Its name on disk predates the word ballast and stays, so that
// existing stores open unchanged.
const ballastFile = "hcache.reserve"

// takeBallast makes sure the ballast file holds BallastBytes of allocated
// space (fallocate; on file systems without it, nothing is held).
func (s *Store) takeBallast() error {
	if s.opts.BallastBytes <= 0 {
		return nil
	}
	path := s.fs.PathJoin(s.dir, ballastFile)
	f, err := s.fs.OpenReadWrite(path, vfs.WriteCategoryUnspecified)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := f.Preallocate(0, s.opts.BallastBytes); err != nil {
		return err
	}
	return f.Sync()
}

// releaseBallast removes the ballast file and reports whether it existed.
func (s *Store) releaseBallast() bool {
	path := s.fs.PathJoin(s.dir, ballastFile)
	if _, err := s.fs.Stat(path); err != nil {
		return false
	}
	if err := s.fs.Remove(path); err != nil {
		s.opts.Logf("chunk: release the ballast %s: %v", path, err)
		return false
	}
	return true
}

// createdMarker is written (and synced) once a new store's index holds its
// meta record. Its absence tells Open that creation was interrupted.
const createdMarker = "hcache.created"

// writeMarker writes the marker atomically: a temporary file, synced, then
// renamed over the marker (the caller syncs the directory).
func writeMarker(fs vfs.FS, path string) error {
	tmp := path + ".tmp"
	f, err := fs.Create(tmp, vfs.WriteCategoryUnspecified)
	if err != nil {
		return err
	}
	body := fmt.Sprintf("hcache store\nversion %d\n", StoreVersion)
	if _, err := f.Write([]byte(fmt.Sprintf("%scrc32c %08x\n", body, crc32.Checksum([]byte(body), format.Castagnoli)))); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return fs.Rename(tmp, path)
}

// readMarker reports whether the creation marker exists, and an error if it
// exists but is not a marker this build wrote.
func readMarker(fs vfs.FS, path string) (bool, error) {
	f, err := fs.Open(path)
	if err != nil {
		if errors.Is(err, iofs.ErrNotExist) {
			return false, nil
		}
		return false, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, 4096))
	if err != nil {
		return true, err
	}
	text := string(b)
	i := strings.LastIndex(text, "crc32c ")
	if !strings.HasPrefix(text, "hcache store\n") || i < 0 {
		return true, errors.New("not an hcache creation marker")
	}
	var sum uint32
	if _, err := fmt.Sscanf(text[i:], "crc32c %08x\n", &sum); err != nil || crc32.Checksum([]byte(text[:i]), format.Castagnoli) != sum {
		return true, errors.New("creation marker checksum mismatch")
	}
	var v int
	if _, err := fmt.Sscanf(text[len("hcache store\n"):i], "version %d\n", &v); err != nil || v != StoreVersion {
		return true, fmt.Errorf("creation marker version %d, this build reads %d", v, StoreVersion)
	}
	return true, nil
}
