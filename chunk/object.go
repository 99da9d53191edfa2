package chunk

import (
	"errors"
	"fmt"
)

// The object seam under the segments, modelled on Pebble's objstorage: a
// sealed segment is an object that a provider opens for ranged reads, and
// the index records where each segment lives (lsm.Segment.Location). The
// local provider is the store's own segment files (segFile: a vfs.File, and
// an O_DIRECT descriptor read through io_uring), location "". Another
// provider (a remote tier) plugs in through Options.Providers: the writer
// only ever appends to local segments, and restores, GC's reads and fsck
// read a segment through whichever provider holds it, without knowing which.

// ObjectProvider holds sealed segments as objects.
type ObjectProvider interface {
	// Name is the location the index records for the segments it holds
	// (1..255 bytes).
	Name() string
	// OpenForReading opens the object of a sealed segment.
	OpenForReading(seg uint32) (ObjectReader, error)
}

// ObjectReader reads ranges of one segment object. ReadAt may be called
// from several goroutines at once.
type ObjectReader interface {
	// ReadAt fills p with the object's bytes at off (io.ReaderAt's
	// contract: a short read is an error, io.EOF past the end).
	ReadAt(p []byte, off int64) (int, error)
	// Size is the object's length in bytes.
	Size() int64
	Close() error
}

// SizedObject is an ObjectReader whose size takes a request to learn (a
// remote object): Stat reports the failure that Size cannot; fsck and
// MoveSegment use it.
type SizedObject interface {
	Stat() (int64, error)
}

// errNotLocal is returned by the operations a segment held by another
// provider does not support (it is sealed: nothing appends to it).
var errNotLocal = errors.New("chunk: the segment is held by an object provider, not a local file")

// provider returns the configured provider of a location.
func (s *Store) provider(loc string) (ObjectProvider, error) {
	for _, p := range s.opts.Providers {
		if p.Name() == loc {
			return p, nil
		}
	}
	return nil, fmt.Errorf("chunk: a segment lives in %q, which no configured provider (Options.Providers) serves", loc)
}

// openObjectSeg opens a sealed segment held by a provider.
func (s *Store) openObjectSeg(id uint32, loc string) (*segFile, error) {
	p, err := s.provider(loc)
	if err != nil {
		return nil, err
	}
	r, err := p.OpenForReading(id)
	if err != nil {
		return nil, fmt.Errorf("chunk: open segment %d in %s: %w", id, loc, err)
	}
	return &segFile{id: id, name: loc + ":" + segName(id), fd: -1, obj: r}, nil
}
