package lsm

import (
	"errors"
	"fmt"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"github.com/cockroachdb/pebble/v2"
	"github.com/cockroachdb/pebble/v2/vfs"
)

// DB is the index: a Pebble database opened on a vfs.FS, so tests can run
// it on a crashable in-memory file system together with the segments.
//
// Pebble ends the process on what it considers fatal (Logger.Fatalf) and, by
// default, on any corruption it finds in an sstable, even on a background
// goroutine. Here neither escapes: a corruption report is recorded and every
// later operation fails with it (ErrFatal, carrying Pebble's message), and
// Fatalf raises a sentinel panic that the operation running it turns into the
// same error. A damaged index therefore fails closed, and other stores in the
// process keep working.
type DB struct {
	db  *pebble.DB
	log *fatalLogger
}

// ErrNotFound is returned by Get for a missing key.
var ErrNotFound = errors.New("lsm: not found")

// ErrLocked is wrapped by Open's error when another opener holds the index.
var ErrLocked = errors.New("lsm: the index is in use")

// ErrFatal is wrapped by the error of every operation on an index that hit a
// fatal error or found corruption; the index is unusable afterwards.
var ErrFatal = errors.New("lsm: the index hit a fatal error")

// fatalError is what Fatalf raises.
type fatalError struct{ msg string }

// fatalLogger is a DB's Pebble logger: quiet, except that it remembers the
// first fatal error or corruption report.
type fatalLogger struct {
	mu    sync.Mutex
	err   error
	fatal bool // Fatalf ran: Pebble's state is unknown
}

func (l *fatalLogger) Infof(string, ...any)  {}
func (l *fatalLogger) Errorf(string, ...any) {}
func (l *fatalLogger) Fatalf(format string, args ...any) {
	msg := fmt.Sprintf("pebble: "+format, args...)
	l.record(msg)
	l.mu.Lock()
	l.fatal = true
	l.mu.Unlock()
	if inOperation() {
		panic(fatalError{msg}) // recovered by the operation (catchFatal)
	}
	// One of Pebble's own goroutines (a flush, a compaction): nothing
	// there would recover a panic, and it would end the process. The
	// goroutine ends instead; every later operation fails with the
	// recorded error and Close abandons the index.
	runtime.Goexit()
}

// inOperation reports whether the current goroutine runs a DB operation
// (Open or a method of DB or Batch), which recovers a Fatalf panic. Only
// Fatalf asks, so the hot paths pay nothing.
func inOperation() bool {
	buf := make([]byte, 64<<10)
	st := string(buf[:runtime.Stack(buf, false)])
	if i := strings.Index(st, "\ncreated by "); i >= 0 {
		st = st[:i] // the goroutine's creator is not on its stack
	}
	return strings.Contains(st, "hcache/lsm.(*DB).") || strings.Contains(st, "hcache/lsm.(*Batch).") || strings.Contains(st, "hcache/lsm.Open(")
}

func (l *fatalLogger) record(msg string) {
	l.mu.Lock()
	if l.err == nil {
		l.err = fmt.Errorf("%w: %s", ErrFatal, msg)
	}
	l.mu.Unlock()
}

func (l *fatalLogger) failed() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.err
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

// Options configure Open.
type Options struct {
	// ReadOnly opens without writing anything: no lock, no WAL replayed to
	// disk, no obsolete file removed, nothing created.
	ReadOnly bool
	// MustExist refuses to create an index that is not there.
	MustExist bool
}

// Open opens (or creates) the index in dir on fs.
//
// New indexes use Pebble's newest format, whose WAL carries "synced up to"
// offsets: on replay, a lost or corrupt record followed by records that were
// synced after it is reported as corruption (ErrCorrupt) instead of ending
// the replay silently at the damage. Existing indexes are upgraded on their
// first read-write open.
func Open(fs vfs.FS, dir string, o Options) (d *DB, err error) {
	log := &fatalLogger{}
	el := pebble.EventListener{
		DataCorruption: func(info pebble.DataCorruptionInfo) {
			log.record(fmt.Sprintf("on-disk corruption in %s: %s", info.Path, info.Details.Error()))
		},
	}
	opts := &pebble.Options{FS: fs, Logger: log, EventListener: &el, ReadOnly: o.ReadOnly, ErrorIfNotExists: o.MustExist || o.ReadOnly}
	if !o.ReadOnly {
		opts.FormatMajorVersion = pebble.FormatNewest
	}
	defer func() {
		if r := recover(); r != nil {
			fe, ok := r.(fatalError)
			if !ok {
				panic(r)
			}
			err = fmt.Errorf("lsm: open pebble at %s: %w: %s", dir, ErrFatal, fe.msg)
		}
	}()
	// A WAL keeps the format it was created with, and Pebble creates the
	// first WAL of a new (or older-format) index before raising the format:
	// reopen once so the WAL in use carries synced offsets.
	reopen := !o.ReadOnly && walFormatBefore(fs, dir) < pebble.FormatWALSyncChunks
	db, err := pebble.Open(dir, opts)
	if err == nil && reopen {
		if err = db.Close(); err == nil {
			opts.ErrorIfNotExists = true
			db, err = pebble.Open(dir, opts)
		}
	}
	if err != nil {
		if strings.Contains(err.Error(), "lock held by current process") || errors.Is(err, syscall.EAGAIN) || errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, fmt.Errorf("lsm: open pebble at %s: %w: %v", dir, ErrLocked, err)
		}
		if errors.Is(err, pebble.ErrCorruption) {
			return nil, fmt.Errorf("lsm: open pebble at %s: %w: %v", dir, ErrCorrupt, err)
		}
		return nil, fmt.Errorf("lsm: open pebble at %s: %w", dir, err)
	}
	return &DB{db: db, log: log}, nil
}

// walFormatBefore reads the format major version an index directory records
// (0 if none).
func walFormatBefore(fs vfs.FS, dir string) pebble.FormatMajorVersion {
	names, err := fs.List(dir)
	if err != nil {
		return 0
	}
	v := 0
	for _, n := range names {
		if rest, ok := strings.CutPrefix(n, "marker.format-version."); ok {
			if i := strings.LastIndexByte(rest, '.'); i >= 0 {
				if x, err := strconv.Atoi(rest[i+1:]); err == nil {
					v = max(v, x)
				}
			}
		}
	}
	return pebble.FormatMajorVersion(v)
}

// Err returns the fatal error or corruption the index has hit, if any.
func (d *DB) Err() error { return d.log.failed() }

// wrap adds to err the index's recorded fatal error, if any.
func (d *DB) wrap(err error) error {
	if err == nil {
		return nil
	}
	if ferr := d.log.failed(); ferr != nil && !errors.Is(err, ErrFatal) {
		return fmt.Errorf("%w (%v)", ferr, err)
	}
	if errors.Is(err, pebble.ErrCorruption) && !errors.Is(err, ErrCorrupt) {
		return fmt.Errorf("%w: %v", ErrCorrupt, err)
	}
	return err
}

// Close closes the index. An index on which Pebble's Fatalf ran is
// abandoned rather than closed (Pebble's state is unknown): its goroutines
// and file lock may linger until the process exits.
func (d *DB) Close() (err error) {
	d.log.mu.Lock()
	fatal := d.log.fatal
	d.log.mu.Unlock()
	if fatal {
		return nil
	}
	defer catchFatal(&err)
	return d.db.Close()
}

// Flush writes the memtable to an sstable (tests use it to put keys in
// sstables).
func (d *DB) Flush() (err error) {
	if ferr := d.log.failed(); ferr != nil {
		return ferr
	}
	defer catchFatal(&err)
	return d.wrap(d.db.Flush())
}

// get returns a copy of the value of key, or ErrNotFound.
func (d *DB) get(key []byte) (out []byte, err error) {
	if ferr := d.log.failed(); ferr != nil {
		return nil, ferr
	}
	defer catchFatal(&err)
	v, closer, err := d.db.Get(key)
	if errors.Is(err, pebble.ErrNotFound) {
		return nil, ErrNotFound
	}
	if err != nil {
		return nil, d.wrap(err)
	}
	out = append([]byte(nil), v...)
	closer.Close()
	return out, nil
}

// scan calls fn for every key in [lo, hi) in order; fn gets copies.
func (d *DB) scan(lo, hi []byte, fn func(k, v []byte) error) (err error) {
	if ferr := d.log.failed(); ferr != nil {
		return ferr
	}
	defer catchFatal(&err)
	it, err := d.db.NewIter(&pebble.IterOptions{LowerBound: lo, UpperBound: hi})
	if err != nil {
		return d.wrap(err)
	}
	for it.First(); it.Valid(); it.Next() {
		v, err := it.ValueAndErr()
		if err != nil {
			it.Close()
			return d.wrap(err)
		}
		if err := fn(append([]byte(nil), it.Key()...), append([]byte(nil), v...)); err != nil {
			it.Close()
			return err
		}
	}
	if err := it.Close(); err != nil {
		return d.wrap(err)
	}
	return d.log.failed()
}

// Batch is an atomic set of index mutations.
type Batch struct {
	d *DB
	b *pebble.Batch
}

// NewBatch starts a batch.
func (d *DB) NewBatch() *Batch { return &Batch{d: d, b: d.db.NewBatch()} }

// set records key = value.
func (b *Batch) set(key, value []byte) { _ = b.b.Set(key, value, nil) }

// del removes key.
func (b *Batch) del(key []byte) { _ = b.b.Delete(key, nil) }

// deleteRange removes [lo, hi).
func (b *Batch) deleteRange(lo, hi []byte) { _ = b.b.DeleteRange(lo, hi, nil) }

// Empty reports whether the batch holds no mutation.
func (b *Batch) Empty() bool { return b.b.Empty() }

// Commit applies the batch atomically; with sync it returns once the batch is
// durable in Pebble's WAL.
func (b *Batch) Commit(sync bool) (err error) {
	if ferr := b.d.log.failed(); ferr != nil {
		b.b.Close()
		return ferr
	}
	defer catchFatal(&err)
	opts := pebble.NoSync
	if sync {
		opts = pebble.Sync
	}
	err = b.b.Commit(opts)
	b.b.Close()
	return b.d.wrap(err)
}

// Discard drops an uncommitted batch.
func (b *Batch) Discard() { b.b.Close() }
