package lsm

import (
	"errors"
	"fmt"

	"github.com/cockroachdb/pebble/v2"
	"github.com/cockroachdb/pebble/v2/vfs"
)

// DB is the index: a Pebble database opened on a vfs.FS, so tests can run
// it on a crashable in-memory file system together with the segments.
type DB struct {
	db *pebble.DB
}

// ErrNotFound is returned by Get for a missing key.
var ErrNotFound = errors.New("lsm: not found")

type quietLogger struct{}

// fatalError is what Pebble's Fatalf raises: Pebble cannot continue after
// it (a failed WAL write or sync, as with fsyncgate). The operation that hit
// it returns ErrFatal instead of the process exiting, and the index refuses
// every later write.
type fatalError struct{ msg string }

// ErrFatal is wrapped by the error of an operation during which Pebble hit a
// fatal error; the index is unusable afterwards and must be reopened.
var ErrFatal = errors.New("lsm: the index hit a fatal error")

func (quietLogger) Infof(string, ...any)  {}
func (quietLogger) Errorf(string, ...any) {}
func (quietLogger) Fatalf(format string, args ...any) {
	panic(fatalError{fmt.Sprintf("pebble: "+format, args...)})
}

// catchFatal turns a Pebble fatal error raised in this goroutine into err.
func catchFatal(err *error) {
	if r := recover(); r != nil {
		fe, ok := r.(fatalError)
		if !ok {
			panic(r)
		}
		*err = fmt.Errorf("%w: %s", ErrFatal, fe.msg)
	}
}

// Open opens (or creates) the index in dir on fs.
func Open(fs vfs.FS, dir string) (*DB, error) {
	opts := &pebble.Options{FS: fs, Logger: quietLogger{}}
	db, err := pebble.Open(dir, opts)
	if err != nil {
		return nil, fmt.Errorf("lsm: open pebble at %s: %w", dir, err)
	}
	return &DB{db: db}, nil
}

// Close closes the index.
func (d *DB) Close() (err error) {
	defer catchFatal(&err)
	return d.db.Close()
}

// Get returns a copy of the value of key, or ErrNotFound.
func (d *DB) Get(key []byte) ([]byte, error) {
	v, closer, err := d.db.Get(key)
	if errors.Is(err, pebble.ErrNotFound) {
		return nil, ErrNotFound
	}
	if err != nil {
		return nil, err
	}
	out := append([]byte(nil), v...)
	closer.Close()
	return out, nil
}

// Scan calls fn for every key in [lo, hi) in order; fn gets copies.
func (d *DB) Scan(lo, hi []byte, fn func(k, v []byte) error) error {
	it, err := d.db.NewIter(&pebble.IterOptions{LowerBound: lo, UpperBound: hi})
	if err != nil {
		return err
	}
	for it.First(); it.Valid(); it.Next() {
		v, err := it.ValueAndErr()
		if err != nil {
			it.Close()
			return err
		}
		if err := fn(append([]byte(nil), it.Key()...), append([]byte(nil), v...)); err != nil {
			it.Close()
			return err
		}
	}
	return it.Close()
}

// Batch is an atomic set of index mutations.
type Batch struct {
	b *pebble.Batch
}

// NewBatch starts a batch.
func (d *DB) NewBatch() *Batch { return &Batch{b: d.db.NewBatch()} }

// Set records key = value.
func (b *Batch) Set(key, value []byte) { _ = b.b.Set(key, value, nil) }

// Delete removes key.
func (b *Batch) Delete(key []byte) { _ = b.b.Delete(key, nil) }

// DeleteRange removes [lo, hi).
func (b *Batch) DeleteRange(lo, hi []byte) { _ = b.b.DeleteRange(lo, hi, nil) }

// Empty reports whether the batch holds no mutation.
func (b *Batch) Empty() bool { return b.b.Empty() }

// Commit applies the batch atomically; with sync it returns once the batch is
// durable in Pebble's WAL.
func (b *Batch) Commit(sync bool) (err error) {
	defer catchFatal(&err)
	opts := pebble.NoSync
	if sync {
		opts = pebble.Sync
	}
	err = b.b.Commit(opts)
	b.b.Close()
	return err
}

// Discard drops an uncommitted batch.
func (b *Batch) Discard() { b.b.Close() }
