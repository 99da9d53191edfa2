// Package faultfs wraps a vfs.FS (normally Pebble's crashable MemFS) to
// inject the storage faults the store must survive, deterministically from a
// seed: EIO on read or write, ENOSPC, short writes, bit flips on read, and a
// torn write (only a prefix of whole 512-byte sectors reaches the file, then
// the "machine" stops: every later write and sync fails). It also reports
// every sync and write to hooks, which is where the crash harness takes its
// CrashClone snapshots. Files it returns have no OS descriptor, so the store
// uses the vfs path for them (never bypassing the seam with O_DIRECT).
package faultfs

import (
	"errors"
	"fmt"
	"io"
	"math/rand"
	"strings"
	"sync"
	"syscall"

	"github.com/cockroachdb/pebble/v2/vfs"
)

// Fault is a kind of injected failure.
type Fault int

// Faults.
const (
	EIOWrite   Fault = iota + 1 // a write fails with EIO, nothing written
	EIORead                     // a read fails with EIO
	ENOSPC                      // a write fails with ENOSPC, nothing written
	ShortWrite                  // a prefix is written, then io.ErrShortWrite
	BitFlip                     // a read returns data with one bit flipped
	TornWrite                   // a sector-aligned prefix is written, then the machine stops
)

var faultNames = map[Fault]string{EIOWrite: "eio-write", EIORead: "eio-read", ENOSPC: "enospc", ShortWrite: "short-write", BitFlip: "bit-flip", TornWrite: "torn-write"}

func (f Fault) String() string { return faultNames[f] }

// Rule injects Fault into operations on files whose name contains Match
// ("" matches every file): on the Nth matching operation (1-based) when Nth
// > 0, else with probability Prob.
type Rule struct {
	Fault Fault
	Match string
	Nth   int
	Prob  float64
}

// ErrStopped is returned by every write and sync of a stopped file after a
// torn write.
var ErrStopped = errors.New("faultfs: machine stopped after a torn write")

// FS is the fault-injecting wrapper.
type FS struct {
	vfs.FS
	mu      sync.Mutex
	rng     *rand.Rand
	rules   []Rule
	counts  []int
	stopped string // after a torn write: the name part whose files stopped
	isStop  bool
	// OnTorn is called right after a torn write (where a harness takes its
	// crash snapshot).
	OnTorn func(name string)
	// OnSync is called before every file or directory sync; OnWrite after
	// every successful write.
	OnSync  func(name string)
	OnWrite func(name string)
	// Injected counts the faults injected so far.
	Injected map[Fault]int
}

// New wraps fs with rules, seeded.
func New(fs vfs.FS, seed int64, rules ...Rule) *FS {
	return &FS{FS: fs, rng: rand.New(rand.NewSource(seed)), rules: rules, counts: make([]int, len(rules)), Injected: map[Fault]int{}}
}

// SetRules replaces the rules (counters restart).
func (f *FS) SetRules(rules ...Rule) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.rules, f.counts = rules, make([]int, len(rules))
}

// Stopped reports whether a torn write stopped writes to name. Only files
// matching the torn rule stop (so Pebble's own files keep working and the
// store can report the failure instead of the index aborting).
func (f *FS) Stopped(name string) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.isStop && strings.Contains(name, f.stopped)
}

func (f *FS) ruleMatch(fault Fault) string {
	for _, r := range f.rules {
		if r.Fault == fault {
			return r.Match
		}
	}
	return ""
}

// pick returns the fault to inject into an operation of the given kinds on
// name, or 0.
func (f *FS) pick(name string, kinds ...Fault) Fault {
	f.mu.Lock()
	defer f.mu.Unlock()
	for i, r := range f.rules {
		if !containsFault(kinds, r.Fault) || !strings.Contains(name, r.Match) {
			continue
		}
		f.counts[i]++
		if (r.Nth > 0 && f.counts[i] == r.Nth) || (r.Nth == 0 && r.Prob > 0 && f.rng.Float64() < r.Prob) {
			f.Injected[r.Fault]++
			return r.Fault
		}
	}
	return 0
}

func containsFault(l []Fault, x Fault) bool {
	for _, y := range l {
		if x == y {
			return true
		}
	}
	return false
}

func (f *FS) intn(n int) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.rng.Intn(n)
}

func (f *FS) wrap(name string, file vfs.File, err error) (vfs.File, error) {
	if err != nil {
		return nil, err
	}
	return &File{File: file, fs: f, name: name}, nil
}

// Create implements vfs.FS.
func (f *FS) Create(name string, c vfs.DiskWriteCategory) (vfs.File, error) {
	if f.Stopped(name) {
		return nil, ErrStopped
	}
	file, err := f.FS.Create(name, c)
	return f.wrap(name, file, err)
}

// Open implements vfs.FS.
func (f *FS) Open(name string, opts ...vfs.OpenOption) (vfs.File, error) {
	file, err := f.FS.Open(name, opts...)
	return f.wrap(name, file, err)
}

// OpenReadWrite implements vfs.FS.
func (f *FS) OpenReadWrite(name string, c vfs.DiskWriteCategory, opts ...vfs.OpenOption) (vfs.File, error) {
	if f.Stopped(name) {
		return nil, ErrStopped
	}
	file, err := f.FS.OpenReadWrite(name, c, opts...)
	return f.wrap(name, file, err)
}

// ReuseForWrite implements vfs.FS.
func (f *FS) ReuseForWrite(oldname, newname string, c vfs.DiskWriteCategory) (vfs.File, error) {
	if f.Stopped(newname) {
		return nil, ErrStopped
	}
	file, err := f.FS.ReuseForWrite(oldname, newname, c)
	return f.wrap(newname, file, err)
}

// OpenDir implements vfs.FS.
func (f *FS) OpenDir(name string) (vfs.File, error) {
	file, err := f.FS.OpenDir(name)
	return f.wrap(name, file, err)
}

// Unwrap implements vfs.FS.
func (f *FS) Unwrap() vfs.FS { return f.FS }

// File is a wrapped file.
type File struct {
	vfs.File
	fs   *FS
	name string
}

// Fd implements vfs.File: no descriptor, so the store stays on this seam.
func (w *File) Fd() uintptr { return vfs.InvalidFd }

func (w *File) write(p []byte, do func([]byte) (int, error)) (int, error) {
	if w.fs.Stopped(w.name) {
		return 0, ErrStopped
	}
	switch w.fs.pick(w.name, EIOWrite, ENOSPC, ShortWrite, TornWrite) {
	case EIOWrite:
		return 0, &iofsErr{"write", w.name, syscall.EIO}
	case ENOSPC:
		return 0, &iofsErr{"write", w.name, syscall.ENOSPC}
	case ShortWrite:
		n := w.fs.intn(len(p) + 1)
		m, err := do(p[:n])
		if err != nil {
			return m, err
		}
		return m, io.ErrShortWrite
	case TornWrite:
		sectors := len(p) / 512
		n := 0
		if sectors > 0 {
			n = w.fs.intn(sectors) * 512
		}
		m, _ := do(p[:n])
		w.fs.mu.Lock()
		w.fs.isStop, w.fs.stopped = true, w.fs.ruleMatch(TornWrite)
		w.fs.mu.Unlock()
		if w.fs.OnTorn != nil {
			w.fs.OnTorn(w.name)
		}
		return m, ErrStopped
	}
	n, err := do(p)
	if err == nil && w.fs.OnWrite != nil {
		w.fs.OnWrite(w.name)
	}
	return n, err
}

// Write implements vfs.File.
func (w *File) Write(p []byte) (int, error) { return w.write(p, w.File.Write) }

// WriteAt implements vfs.File.
func (w *File) WriteAt(p []byte, off int64) (int, error) {
	return w.write(p, func(b []byte) (int, error) { return w.File.WriteAt(b, off) })
}

// ReadAt implements vfs.File.
func (w *File) ReadAt(p []byte, off int64) (int, error) {
	switch w.fs.pick(w.name, EIORead, BitFlip) {
	case EIORead:
		return 0, &iofsErr{"read", w.name, syscall.EIO}
	case BitFlip:
		n, err := w.File.ReadAt(p, off)
		if n > 0 {
			i := w.fs.intn(n)
			p[i] ^= 1 << uint(w.fs.intn(8))
		}
		return n, err
	}
	return w.File.ReadAt(p, off)
}

// Read implements vfs.File.
func (w *File) Read(p []byte) (int, error) {
	if w.fs.pick(w.name, EIORead) == EIORead {
		return 0, &iofsErr{"read", w.name, syscall.EIO}
	}
	return w.File.Read(p)
}

func (w *File) sync(do func() error) error {
	if w.fs.Stopped(w.name) {
		return ErrStopped
	}
	if w.fs.OnSync != nil {
		w.fs.OnSync(w.name)
	}
	return do()
}

// Sync implements vfs.File.
func (w *File) Sync() error { return w.sync(w.File.Sync) }

// SyncData implements vfs.File.
func (w *File) SyncData() error { return w.sync(w.File.SyncData) }

// SyncTo implements vfs.File.
func (w *File) SyncTo(length int64) (bool, error) {
	var full bool
	err := w.sync(func() error {
		var err error
		full, err = w.File.SyncTo(length)
		return err
	})
	return full, err
}

type iofsErr struct {
	op, name string
	errno    syscall.Errno
}

func (e *iofsErr) Error() string { return fmt.Sprintf("faultfs: %s %s: %v", e.op, e.name, e.errno) }
func (e *iofsErr) Unwrap() error { return e.errno }
