package chunk

import (
	"errors"
	"fmt"
)

// Errors callers can test with errors.Is.
var (
	ErrNotFound         = errors.New("chunk: context not found")
	ErrExists           = errors.New("chunk: context exists")
	ErrIdentityMismatch = errors.New("chunk: identity does not match the stored context")
	ErrDamaged          = errors.New("chunk: context is damaged")
	ErrClosed           = errors.New("chunk: store closed")
	ErrBusy             = errors.New("chunk: context has an open writer")
	ErrStagingFull      = errors.New("chunk: staging memory limit reached")
	ErrRowSize          = errors.New("chunk: wrong row size")
)

// ErrIndexDamaged is wrapped by Open's error when the index disagrees with
// the creation marker: missing, empty, unreadable, or its WAL replay found a
// lost record followed by later ones. Open then changes nothing; the
// segments still hold the data and Repair rebuilds the index from them.
var ErrIndexDamaged = errors.New("chunk: the index is damaged")

// ErrNotStore is wrapped by Open's error for a path that is not a store
// (read-only opens never create one).
var ErrNotStore = errors.New("chunk: not an hcache store")

// ErrReadOnly is returned by every write to a store opened ReadOnly.
var ErrReadOnly = errors.New("chunk: store opened read-only")

func indexDamaged(dir string, format string, args ...any) error {
	return fmt.Errorf("%w: %s: %s; nothing was changed: run `hcache repair --dir %s` to rebuild the index from the segments", ErrIndexDamaged, dir, fmt.Sprintf(format, args...), dir)
}
