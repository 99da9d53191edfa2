// Package chunk is hcache's storage engine: a log-structured store of
// per-layer rows (hidden states or K/V) of LLM contexts.
//
// A context (namespace + id) has an Identity (model fingerprint and per-layer
// plan). Its rows are grouped by ChunkTokens tokens into chunk groups; each
// group is written once, as one record laid out layer-major, into the active
// segment file, and located through the Pebble index (package lsm).
//
// Writes are two-phase. Phase 1 (Writer.AppendLayer for prefill,
// Writer.AppendToken for decode) copies rows into DRAM staging slabs and
// returns. Phase 2 runs in the store's flusher goroutine: full groups (and the
// partial tail on Flush) are written with large aligned writes through the
// io_uring engine, made durable with one fdatasync per touched segment, and
// then indexed with one Pebble batch. Flush waits for that commit; concurrent
// flushes share it (group commit).
//
// Restore streams a context layer by layer: the reads of layer l+1 are in
// flight while the consumer handles layer l, and every slice is verified
// against its checksum before it is handed over.
//
// Every file goes through a vfs.FS: vfs.Default in production (segments then
// use O_DIRECT descriptors and io_uring), a crashable in-memory FS in tests.
package chunk

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	iofs "io/fs"
	"log"
	"math"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/cockroachdb/pebble/v2/vfs"

	"github.com/hcache/hcache/iouring"
	"github.com/hcache/hcache/lsm"
)

// StoreVersion is the version of the store layout (directory, meta record).
const StoreVersion = 1

// Defaults and limits of Options.
const (
	DefaultChunkTokens   = 64
	MaxChunkTokens       = 4096
	DefaultSegmentBytes  = 1 << 30
	MinSegmentBytes      = 1 << 20
	DefaultCapacityBytes = 64 << 30
	DefaultCacheBytes    = 256 << 20
	DefaultStagingBytes  = 2 << 30
	DefaultQueueDepth    = 32
	DefaultCommitBytes   = 256 << 20
	DefaultGCLiveRatio   = 0.5
	DefaultGCInterval    = 30 * time.Second
	// DefaultReserveBytes is the emergency reserve kept for a full disk.
	DefaultReserveBytes = 64 << 20
	// DefaultIdleReadBufferBytes bounds idle restore buffers.
	DefaultIdleReadBufferBytes = 256 << 20
	// DefaultRestoreAheadBytes bounds the layers one restore reads ahead.
	DefaultRestoreAheadBytes = 32 << 20
)

// Options configure a Store. Zero values take the defaults above.
type Options struct {
	// FS is the file system seam; default vfs.Default.
	FS vfs.FS
	// Dir is the store's directory (required).
	Dir string
	// ChunkTokens is the number of tokens per chunk group. Fixed when the
	// store is created; reopening with another value is an error.
	ChunkTokens int
	// SegmentBytes is the size of each segment file.
	SegmentBytes int64
	// CapacityBytes bounds the live bytes on disk; past it, whole contexts
	// are evicted, least recently used first (pinned ones never). -1: no bound.
	CapacityBytes int64
	// CacheBytes bounds the DRAM tier of recently written or restored
	// slices; 0 disables it.
	CacheBytes int64
	// StagingBytes bounds the DRAM staging slabs of unwritten rows.
	StagingBytes int64
	// Compression is "none" (default) or "lz4" (per slice, byte-plane
	// shuffled, kept only where it saves at least 1/8).
	Compression string
	// Engine is the I/O engine; nil creates one of EngineKind.
	Engine     iouring.Engine
	EngineKind string
	// QueueDepth bounds the flusher's writes in flight.
	QueueDepth int
	// CommitBytes: the flusher indexes written groups once this many bytes
	// await a commit even when nobody is waiting (bounds replay loss).
	CommitBytes int64
	// GCLiveRatio: segments (not the active one) with live/written below
	// it are compacted.
	GCLiveRatio float64
	// GCInterval is how often the store looks for segments to compact on
	// its own; -1 leaves GC to explicit Store.GC calls.
	GCInterval time.Duration
	// DisableDirect keeps segments on the vfs.File path even for real files.
	DisableDirect bool
	// ReadBuffers are called as the store maps and unmaps the buffers
	// Restore hands layers over in, so a GPU backend can pin each once
	// (cuMemHostRegister) and copy straight from it.
	ReadBuffers BufferHooks
	// MustExist opens only an existing store: a path without a store's
	// creation marker is ErrNotStore and nothing is created there (the
	// CLI's commands on --dir; only an explicit create makes a store).
	MustExist bool
	// ReadOnly opens an existing store without writing anything: no lock
	// file, no index created or recovered to disk, no orphan removed, no
	// flusher or GC. Writes fail with ErrReadOnly. fsck and stat use it.
	ReadOnly bool
	// ReserveBytes is the emergency reserve: a preallocated file of this
	// size that the store releases when the disk fills, so that deletes
	// (index commits), GC and a reopen always have room. -1: none.
	ReserveBytes int64
	// IdleReadBufferBytes bounds the restore buffers kept mapped for reuse
	// while no restore uses them (DefaultIdleReadBufferBytes; -1: keep none).
	IdleReadBufferBytes int64
	// RestoreAheadBytes bounds the layers a Restore (and a RestoreOwned
	// called with ahead 0) keeps read or in flight: max(2, RestoreAheadBytes
	// / the context's layer bytes) buffers, so short contexts still keep
	// the disk's queue deep and long ones do not hold many large buffers
	// (DefaultRestoreAheadBytes; -1: two layers).
	RestoreAheadBytes int64
	// Logf reports notable events; default log.Printf.
	Logf func(string, ...any)
	// OnEvict is called (from the flusher) for each context evicted for space.
	OnEvict func(ns, id string)
	// Now is the clock (Unix nanoseconds) of last-use times, segment headers
	// and index records; default the wall clock. A simulation passes its
	// own so that a seed replays the same eviction order and bytes.
	Now func() int64
	// Synchronous is a test seam for deterministic simulation: each call
	// that hands work to the flusher returns only once the flusher has
	// finished with it (its write and any commit), and the flusher never
	// commits merely because it is idle (only for a Flush, Close, delete,
	// GC or CommitBytes). A caller doing one thing at a time then gets the
	// same file-system operations in the same order every run. Slower.
	Synchronous bool
}

func wallNanos() int64 { return time.Now().UnixNano() }

func (o *Options) fill() error {
	if o.Dir == "" {
		return errors.New("chunk: Options.Dir is required")
	}
	if o.FS == nil {
		o.FS = vfs.Default
	}
	if o.SegmentBytes == 0 {
		o.SegmentBytes = DefaultSegmentBytes
	}
	if o.SegmentBytes < MinSegmentBytes || o.SegmentBytes%BlockBytes != 0 {
		return fmt.Errorf("chunk: SegmentBytes %d must be a multiple of %d and at least %d", o.SegmentBytes, BlockBytes, MinSegmentBytes)
	}
	if o.CapacityBytes == 0 {
		o.CapacityBytes = DefaultCapacityBytes
	}
	if o.CapacityBytes < 0 {
		o.CapacityBytes = math.MaxInt64
	}
	if o.CacheBytes < 0 {
		return fmt.Errorf("chunk: CacheBytes %d is negative", o.CacheBytes)
	}
	if o.StagingBytes == 0 {
		o.StagingBytes = DefaultStagingBytes
	}
	switch o.Compression {
	case "", "none":
		o.Compression = "none"
	case "lz4":
	default:
		return fmt.Errorf("chunk: Compression %q (want none or lz4)", o.Compression)
	}
	if o.QueueDepth == 0 {
		o.QueueDepth = DefaultQueueDepth
	}
	if o.QueueDepth < 1 || o.QueueDepth > iouring.MaxEntries {
		return fmt.Errorf("chunk: QueueDepth %d not in [1, %d]", o.QueueDepth, iouring.MaxEntries)
	}
	if o.CommitBytes == 0 {
		o.CommitBytes = DefaultCommitBytes
	}
	if o.GCLiveRatio == 0 {
		o.GCLiveRatio = DefaultGCLiveRatio
	}
	if o.GCInterval == 0 {
		o.GCInterval = DefaultGCInterval
	}
	if o.GCLiveRatio < 0 || o.GCLiveRatio > 1 {
		return fmt.Errorf("chunk: GCLiveRatio %v not in [0, 1]", o.GCLiveRatio)
	}
	if o.ReserveBytes == 0 {
		o.ReserveBytes = DefaultReserveBytes
	}
	if o.ReserveBytes < 0 {
		o.ReserveBytes = 0
	}
	if o.RestoreAheadBytes == 0 {
		o.RestoreAheadBytes = DefaultRestoreAheadBytes
	}
	if o.RestoreAheadBytes < 0 {
		o.RestoreAheadBytes = 0
	}
	if o.IdleReadBufferBytes == 0 {
		o.IdleReadBufferBytes = DefaultIdleReadBufferBytes
	}
	if o.IdleReadBufferBytes < 0 {
		o.IdleReadBufferBytes = 0
	}
	if o.Logf == nil {
		o.Logf = log.Printf
	}
	if o.Now == nil {
		o.Now = wallNanos
	}
	return nil
}

// BufferHooks see the life of restore buffers: Register after one is
// mapped, Unregister before it is unmapped. A Register error is logged and
// the buffer used as it is.
type BufferHooks struct {
	Register   func(mem []byte) error
	Unregister func(mem []byte)
}

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

// ctxState is a context in memory. Fields are guarded by Store.mu unless
// noted.
type ctxState struct {
	ns, id   string
	rec      lsm.Context // as last committed (Tokens is durable)
	ident    *Identity
	binding  Binding
	stored   []int // layers that store rows, in slice order
	sliceOf  []int // layer -> index in stored, or -1
	live     int64 // bytes of its records (approximate until first commit)
	lastUse  int64
	useDirty bool // lastUse changed since it was last written
	writer   *Writer
	// writerSeq numbers the writers that opened the context (Create: 1,
	// each Append: one more); every group a writer hands to the flusher
	// carries its number.
	writerSeq uint64
	// pending counts the groups handed to the flusher and not yet through
	// a commit (indexed, skipped or failed). A writer abandoned with
	// groups pending leaves them to the flusher; Append waits for them.
	pending  int
	deleted  bool
	dirty    bool // rec must be written at the next commit
	writeErr error
	// wroteSegs: segments this process wrote records of the context to
	// (indexed or not: superseded partial groups, failed writes), so its
	// tombstone lists them (see deleteCtxs).
	wroteSegs map[uint32]bool
}

func ctxMapKey(ns, id string) string { return ns + "\x00" + id }

// Store is an open chunk store.
type Store struct {
	opts     Options
	fs       vfs.FS
	dir      string
	segDir   string
	db       *lsm.DB
	eng      iouring.Engine
	ownEng   bool
	lock     interface{ Close() error }
	ct       int
	scratch  alignedScratch // headers, bounce buffers
	readBufs alignedScratch // the buffers Restore hands layers over in
	staging  staging
	cache    *sliceCache
	recovery Recovery

	allocMu    sync.Mutex // serializes reserve (the flusher; evictions on the committer)
	mu         sync.Mutex
	ctxs       map[string]*ctxState
	segs       map[uint32]*segFile
	segRecs    map[uint32]*lsm.Segment
	namespaces map[string]bool
	active     *segFile
	nextSeg    uint32
	nextGen    uint64
	closed     bool
	readOnly   bool
	diskFull   bool                   // an allocation met ENOSPC: writes refused until GC frees space
	closedFlag atomic.Bool            // closed, readable without s.mu (writers check it)
	failed     error                  // a fatal index error: the store refuses writes
	broken     atomic.Pointer[string] // the first invariant found violated: writes refused (see invariant)

	dirtyCtxs map[*ctxState]struct{} // contexts to write at the next commit (under mu)
	live      int64                  // sum of the contexts' live bytes (under mu)
	restores  sync.WaitGroup         // Restore and Append reads in flight; Close waits for them

	snapFault func() error // test seam: an index read failure in snap

	opsMu     sync.RWMutex // submit's check-and-send vs Close (see submit)
	ops       chan op
	flusherWG sync.WaitGroup
	gcStop    chan struct{}
	gcWG      sync.WaitGroup
	stats     storeStats
}

// Recovery describes what Open found.
type Recovery struct {
	Contexts         int
	Segments         int
	OrphanSegments   int      // segment files not in the index holding no record (removed by a read-write open)
	KeptOrphans      []string // segment files not in the index that hold records (kept, never opened)
	MissingSegments  int      // indexed segments without a file
	UnindexedRecords int      // records past the append point (discarded)
	LiveRecounted    int      // segments whose stored live count disagreed with the chunk keys (recounted)
	// TombstonesRolledForward counts deletes whose tombstone was durable but
	// whose index commit a crash lost: completed on open.
	TombstonesRolledForward int
	Duration                time.Duration
}

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

// storeEntries are the names a store directory may hold.
var storeEntries = map[string]bool{"hcache.lock": true, createdMarker: true, createdMarker + ".tmp": true, "index": true, "segments": true, reserveFile: true}

// Open opens or creates a store (with Options.ReadOnly: opens an existing
// one and writes nothing).
func Open(opts Options) (*Store, error) {
	start := time.Now()
	if err := opts.fill(); err != nil {
		return nil, err
	}
	s := &Store{
		opts: opts, fs: opts.FS, dir: opts.Dir, readOnly: opts.ReadOnly,
		ctxs: map[string]*ctxState{}, segs: map[uint32]*segFile{}, segRecs: map[uint32]*lsm.Segment{},
		namespaces: map[string]bool{}, nextSeg: 1, nextGen: 1,
		ops: make(chan op, 1024), dirtyCtxs: map[*ctxState]struct{}{},
	}
	s.segDir = s.fs.PathJoin(s.dir, "segments")
	st, statErr := s.fs.Stat(s.dir)
	switch {
	case statErr == nil && !st.IsDir():
		return nil, fmt.Errorf("%w: %s is a file, not a store directory", ErrNotStore, s.dir)
	case statErr != nil && (s.readOnly || opts.MustExist):
		return nil, fmt.Errorf("%w: %s: %v", ErrNotStore, s.dir, statErr)
	}
	markerPath := s.fs.PathJoin(s.dir, createdMarker)
	hasMarker, markerErr := readMarker(s.fs, markerPath)
	if markerErr != nil {
		// A marker that does not check: damage, unless nothing was ever
		// stored (a marker from before the atomic write, torn by a crash
		// while the store was being created).
		if statErr != nil || s.segmentsHoldRecords() {
			return nil, indexDamaged(s.dir, "creation marker %s: %v", markerPath, markerErr)
		}
		hasMarker = false
	}
	if !hasMarker {
		if statErr == nil {
			if err := s.checkUnfinished(); err != nil {
				return nil, err
			}
		}
		if s.readOnly || s.opts.MustExist {
			return nil, fmt.Errorf("%w: %s has no %s", ErrNotStore, s.dir, createdMarker)
		}
	}
	if !s.readOnly {
		if err := s.fs.MkdirAll(s.segDir, 0o755); err != nil {
			return nil, fmt.Errorf("chunk: create %s: %w", s.segDir, err)
		}
		lock, err := s.fs.Lock(s.fs.PathJoin(s.dir, "hcache.lock"))
		if err != nil {
			return nil, fmt.Errorf("chunk: %s is in use by another process: %w", s.dir, err)
		}
		s.lock = lock
	}
	ok := false
	defer func() {
		if !ok {
			s.releaseOnFailedOpen()
		}
	}()
	indexDir := s.fs.PathJoin(s.dir, "index")
	var err error
	if !s.readOnly && s.opts.ReserveBytes > 0 {
		// On a (nearly) full disk, release the emergency reserve before
		// Pebble's recovery needs room for a new WAL and manifest; the
		// store then opens refusing writes until GC frees space.
		if du, err := s.fs.GetDiskUsage(s.dir); err == nil && int64(du.AvailBytes) < s.opts.ReserveBytes/2 {
			s.diskFull = true
			released := s.releaseReserve()
			opts.Logf("chunk: %s: only %d bytes free: emergency reserve released (%v); writes refused until GC frees space", s.dir, du.AvailBytes, released)
		}
	}
	if hasMarker && !s.readOnly {
		// Read the whole index read-only first: a damaged index is
		// refused before Pebble's own recovery rewrites anything.
		if err := validateIndex(s.fs, indexDir); err != nil {
			return nil, indexDamaged(s.dir, "%v", err)
		}
	}
	if hasMarker {
		if s.readOnly {
			if err := lsm.CheckWAL(s.fs, indexDir); err != nil {
				return nil, indexDamaged(s.dir, "%v", err)
			}
		}
		if s.db, err = lsm.Open(s.fs, indexDir, lsm.Options{ReadOnly: s.readOnly, MustExist: true}); err != nil {
			if errors.Is(err, lsm.ErrLocked) {
				return nil, fmt.Errorf("chunk: %s is in use by another process: %w", s.dir, err)
			}
			return nil, indexDamaged(s.dir, "%v", err)
		}
	} else if s.db, err = lsm.Open(s.fs, indexDir, lsm.Options{}); err != nil {
		// The store's creation was cut short (no marker, no segment
		// data): it never acknowledged anything, so start it again.
		opts.Logf("chunk: %s: unfinished store creation (%v); creating it again", s.dir, err)
		if err := s.fs.RemoveAll(indexDir); err != nil {
			return nil, err
		}
		if s.db, err = lsm.Open(s.fs, indexDir, lsm.Options{}); err != nil {
			return nil, err
		}
	}
	if opts.Engine != nil {
		s.eng = opts.Engine
	} else {
		if s.eng, err = iouring.New(iouring.Config{Kind: opts.EngineKind, Entries: nextPow2(max(opts.QueueDepth*4, iouring.DefaultEntries)), Logf: opts.Logf}); err != nil {
			return nil, err
		}
		s.ownEng = true
	}
	if !s.readOnly {
		// Make the directory entries of the store itself durable
		// (segments/, index/ and the store directory in its parent).
		for _, d := range []string{s.fs.PathDir(s.dir), s.dir} {
			if err := syncDir(s.fs, d); err != nil {
				return nil, fmt.Errorf("chunk: sync directory %s: %w", d, err)
			}
		}
	}
	if err := s.loadMeta(hasMarker); err != nil {
		return nil, err
	}
	if !hasMarker {
		if err := writeMarker(s.fs, markerPath); err != nil {
			return nil, fmt.Errorf("chunk: write %s: %w", markerPath, err)
		}
		if err := syncDir(s.fs, s.dir); err != nil {
			return nil, err
		}
	}
	if err := s.recover(); err != nil {
		if errors.Is(err, lsm.ErrCorrupt) || errors.Is(err, lsm.ErrFatal) {
			return nil, indexDamaged(s.dir, "%v", err)
		}
		return nil, err
	}
	if err := s.rollForwardTombstones(); err != nil {
		return nil, err
	}
	if !s.readOnly && !s.diskFull && s.opts.ReserveBytes > 0 {
		if err := s.takeReserve(); err != nil {
			if !errors.Is(err, syscall.ENOSPC) {
				return nil, fmt.Errorf("chunk: emergency reserve: %w", err)
			}
			s.mu.Lock()
			s.enterDiskFullLocked(err)
			s.mu.Unlock()
		}
	}
	s.readBufs.hooks, s.readBufs.logf, s.readBufs.bounded, s.readBufs.limit = opts.ReadBuffers, opts.Logf, true, opts.IdleReadBufferBytes
	s.staging.init(opts.StagingBytes)
	s.staging.invariant = s.invariant
	s.cache = newSliceCache(opts.CacheBytes)
	s.recovery.Duration = time.Since(start)
	s.gcStop = make(chan struct{})
	if !s.readOnly {
		s.flusherWG.Add(1)
		go s.flushLoop()
		if opts.GCInterval > 0 {
			s.gcWG.Add(1)
			go s.gcLoop(opts.GCInterval)
		}
	}
	ok = true
	return s, nil
}

// validateIndex opens the index read-only and reads every key: Pebble
// reports a WAL that lost a synced record, a missing manifest or a corrupt
// sstable block as an error here, without writing anything.
func validateIndex(fs vfs.FS, dir string) error {
	if err := lsm.CheckWAL(fs, dir); err != nil {
		return err
	}
	db, err := lsm.Open(fs, dir, lsm.Options{ReadOnly: true})
	if err != nil {
		return err
	}
	defer db.Close()
	if _, err := db.Get(lsm.MetaKey()); err != nil {
		if errors.Is(err, lsm.ErrNotFound) {
			return fmt.Errorf("the index holds no store record though %s says the store was created", createdMarker)
		}
		return err
	}
	if err := db.Scan(nil, nil, func(k, v []byte) error { return nil }); err != nil {
		return err
	}
	return db.Err()
}

// checkUnfinished runs when the directory exists without a creation
// marker: that is an unfinished creation only if nothing else is there and
// no segment holds a record; otherwise the marker was lost and Open refuses.
func (s *Store) checkUnfinished() error {
	names, err := s.fs.List(s.dir)
	if err != nil {
		return fmt.Errorf("chunk: list %s: %w", s.dir, err)
	}
	for _, n := range names {
		if !storeEntries[n] && !strings.HasPrefix(n, "index.") && n != "lost+found" {
			return fmt.Errorf("%w: %s is not empty (it holds %q) and has no %s; refusing to create a store in it", ErrNotStore, s.dir, n, createdMarker)
		}
	}
	if s.segmentsHoldRecords() {
		return indexDamaged(s.dir, "%s is missing but segments hold records", createdMarker)
	}
	return nil
}

// segmentsHoldRecords reports whether any segment file holds a record.
func (s *Store) segmentsHoldRecords() bool {
	segs, err := s.fs.List(s.segDir)
	if err != nil {
		return false // no segments directory: nothing written yet
	}
	for _, n := range segs {
		if _, ok := parseSegName(n); !ok {
			continue
		}
		if recs, _ := scanSegmentFile(s.fs, s.fs.PathJoin(s.segDir, n), 1); recs > 0 {
			return true
		}
	}
	return false
}

// scanSegmentFile counts (up to limit) the records whose headers check in a
// segment file, reading it through the vfs.
func scanSegmentFile(fs vfs.FS, path string, limit int) (int, error) {
	f, err := fs.Open(path)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return 0, err
	}
	n := 0
	hdr := make([]byte, BlockBytes)
	for off := int64(segHeaderBytes); off+BlockBytes <= st.Size() && n < limit; {
		if _, err := f.ReadAt(hdr, off); err != nil {
			return n, err
		}
		h, err := DecodeRecordHeader(hdr)
		if err != nil {
			// A header longer than a block, or none.
			if want := int(binary.LittleEndian.Uint32(hdr[12:])); err != nil && len(hdr) < want && want <= maxHeaderBytes && want%BlockBytes == 0 {
				big := make([]byte, want)
				if _, err := f.ReadAt(big, off); err == nil {
					h, err = DecodeRecordHeader(big)
					if err == nil {
						n++
						off += int64(h.RecordBytes)
						continue
					}
				}
			}
			break
		}
		n++
		off += int64(h.RecordBytes)
	}
	return n, nil
}

// reserveFile is the emergency reserve (Options.ReserveBytes).
const reserveFile = "hcache.reserve"

// takeReserve makes sure the reserve file holds ReserveBytes of allocated
// space (fallocate; on file systems without it, nothing is held).
func (s *Store) takeReserve() error {
	if s.opts.ReserveBytes <= 0 {
		return nil
	}
	path := s.fs.PathJoin(s.dir, reserveFile)
	f, err := s.fs.OpenReadWrite(path, vfs.WriteCategoryUnspecified)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := f.Preallocate(0, s.opts.ReserveBytes); err != nil {
		return err
	}
	return f.Sync()
}

// releaseReserve removes the reserve file and reports whether it existed.
func (s *Store) releaseReserve() bool {
	path := s.fs.PathJoin(s.dir, reserveFile)
	if _, err := s.fs.Stat(path); err != nil {
		return false
	}
	if err := s.fs.Remove(path); err != nil {
		s.opts.Logf("chunk: release the emergency reserve %s: %v", path, err)
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
	if _, err := f.Write([]byte(fmt.Sprintf("%scrc32c %08x\n", body, crc32.Checksum([]byte(body), castagnoli)))); err != nil {
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
	if _, err := fmt.Sscanf(text[i:], "crc32c %08x\n", &sum); err != nil || crc32.Checksum([]byte(text[:i]), castagnoli) != sum {
		return true, errors.New("creation marker checksum mismatch")
	}
	var v int
	if _, err := fmt.Sscanf(text[len("hcache store\n"):i], "version %d\n", &v); err != nil || v != StoreVersion {
		return true, fmt.Errorf("creation marker version %d, this build reads %d", v, StoreVersion)
	}
	return true, nil
}

func nextPow2(n int) int {
	p := 1
	for p < n {
		p <<= 1
	}
	return min(p, iouring.MaxEntries)
}

func (s *Store) releaseOnFailedOpen() {
	for _, sg := range s.segs {
		sg.close()
	}
	if s.db != nil {
		s.db.Close()
	}
	if s.ownEng && s.eng != nil {
		s.eng.Close()
	}
	if s.lock != nil {
		s.lock.Close()
	}
}

func (s *Store) loadMeta(hasMarker bool) error {
	v, err := s.db.Get(lsm.MetaKey())
	if errors.Is(err, lsm.ErrNotFound) && hasMarker {
		return indexDamaged(s.dir, "the index holds no store record though %s says the store was created", createdMarker)
	}
	if errors.Is(err, lsm.ErrNotFound) {
		ct := s.opts.ChunkTokens
		if ct == 0 {
			ct = DefaultChunkTokens
		}
		if ct < 1 || ct > MaxChunkTokens {
			return fmt.Errorf("chunk: ChunkTokens %d not in [1, %d]", ct, MaxChunkTokens)
		}
		m := lsm.Meta{StoreVersion: StoreVersion, ChunkTokens: uint32(ct), CreatedNanos: s.opts.Now()}
		b := s.db.NewBatch()
		b.Set(lsm.MetaKey(), m.Encode())
		if err := b.Commit(true); err != nil {
			return err
		}
		s.ct = ct
		return nil
	}
	if err != nil {
		return indexDamaged(s.dir, "reading the store record: %v", err)
	}
	m, err := lsm.DecodeMeta(v)
	if err != nil {
		return indexDamaged(s.dir, "store record: %v", err)
	}
	if m.StoreVersion != StoreVersion {
		return fmt.Errorf("chunk: store version %d, this build reads %d", m.StoreVersion, StoreVersion)
	}
	if s.opts.ChunkTokens != 0 && s.opts.ChunkTokens != int(m.ChunkTokens) {
		return fmt.Errorf("chunk: store was created with ChunkTokens %d, opened with %d", m.ChunkTokens, s.opts.ChunkTokens)
	}
	s.ct = int(m.ChunkTokens)
	return nil
}

// recover loads the index into memory, reconciles it with the segment files
// and positions the append point.
func (s *Store) recover() error {
	// Segments.
	err := s.db.Scan([]byte{'s'}, []byte{'t'}, func(k, v []byte) error {
		id, err := lsm.ParseSegmentKey(k)
		if err != nil {
			return err
		}
		rec, err := lsm.DecodeSegment(v)
		if err != nil {
			return fmt.Errorf("segment %d: %w", id, err)
		}
		s.segRecs[id] = rec
		s.nextSeg = max(s.nextSeg, id+1)
		return nil
	})
	if err != nil {
		return fmt.Errorf("chunk: load segments: %w", err)
	}
	names, err := s.fs.List(s.segDir)
	if err != nil {
		return fmt.Errorf("chunk: list %s: %w", s.segDir, err)
	}
	onDisk := map[uint32]bool{}
	for _, n := range names {
		id, ok := parseSegName(n)
		if !ok {
			continue
		}
		onDisk[id] = true
		s.nextSeg = max(s.nextSeg, id+1)
		if _, indexed := s.segRecs[id]; !indexed {
			// Not in the index: normally created and never committed
			// (a crash before its first commit). It is removed only if it
			// holds no record at all; otherwise it is kept, unopened,
			// for Repair to adopt what verifies.
			path := s.fs.PathJoin(s.segDir, n)
			recs, err := scanSegmentFile(s.fs, path, 1)
			if err == nil && recs == 0 {
				if !s.readOnly {
					if err := s.fs.Remove(path); err != nil {
						return fmt.Errorf("chunk: remove empty orphan segment %s: %w", n, err)
					}
				}
				s.recovery.OrphanSegments++
				continue
			}
			s.recovery.KeptOrphans = append(s.recovery.KeptOrphans, n)
			s.opts.Logf("chunk: segment file %s is not in the index but holds records; kept (hcache repair adopts what verifies)", n)
		}
	}
	ids := make([]uint32, 0, len(s.segRecs))
	for id := range s.segRecs {
		ids = append(ids, id)
	}
	sort.Slice(ids, func(i, j int) bool { return ids[i] < ids[j] })
	for _, id := range ids {
		if !onDisk[id] {
			s.recovery.MissingSegments++
			s.opts.Logf("chunk: segment %d is indexed but its file is missing; its contexts are damaged", id)
			continue
		}
		sg, err := openSegMode(s.fs, s.segDir, id, s.eng, !s.opts.DisableDirect, s.readOnly)
		if err != nil {
			return err
		}
		if size, err := sg.size(); err == nil {
			sg.allocated = size
		}
		s.segs[id] = sg
		s.recovery.Segments++
	}
	// The newest unsealed segment is the active one; records past its
	// append point were never indexed: count and discard them.
	for i := len(ids) - 1; i >= 0; i-- {
		rec := s.segRecs[ids[i]]
		sg := s.segs[ids[i]]
		if rec.Sealed || sg == nil {
			continue
		}
		s.active = sg
		s.recovery.UnindexedRecords = s.countTail(sg, rec.Written)
		break
	}
	// Every other segment takes no more appends (a seal is recorded in the
	// index only when its record is next written).
	for id, rec := range s.segRecs {
		if s.active == nil || id != s.active.id {
			rec.Sealed = true
		}
	}
	// Contexts.
	err = s.db.Scan([]byte{'c'}, []byte{'d'}, func(k, v []byte) error {
		ns, id, err := lsm.ParseContextKey(k)
		if err != nil {
			return err
		}
		c := &ctxState{ns: ns, id: id}
		rec, err := lsm.DecodeContext(v)
		if err == nil {
			c.rec = *rec
			c.ident, err = DecodeIdentity(rec.Identity)
		}
		if err != nil {
			s.opts.Logf("chunk: context %s/%s: %v; marked damaged", ns, id, err)
			c.rec.Flags |= lsm.FlagDamaged
			c.ident = nil
		} else {
			c.setIdentity(c.ident)
		}
		s.nextGen = max(s.nextGen, c.rec.Gen+1)
		s.namespaces[ns] = true
		s.ctxs[ctxMapKey(ns, id)] = c
		s.recovery.Contexts++
		return nil
	})
	if err != nil {
		return fmt.Errorf("chunk: load contexts: %w", err)
	}
	err = s.db.Scan([]byte{'u'}, []byte{'v'}, func(k, v []byte) error {
		ns, id, err := lsm.ParseContextKey(k)
		if err != nil {
			return nil
		}
		if c := s.ctxs[ctxMapKey(ns, id)]; c != nil {
			if t, err := lsm.DecodeNanos(lsm.KindLastUse, v); err == nil {
				c.lastUse = t
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	// Per-context live bytes, for eviction; chunks of a missing segment
	// damage their context. Segment live counts are derived from the same
	// scan: the chunk keys are the truth, the stored count a summary that
	// the next commit of the segment rewrites.
	liveBySeg := map[uint32]uint64{}
	err = s.db.Scan([]byte{'k'}, []byte{'l'}, func(k, v []byte) error {
		ns, id, _, err := lsm.ParseChunkKey(k)
		if err != nil {
			return err
		}
		ch, derr := lsm.DecodeChunk(v)
		if derr == nil {
			liveBySeg[ch.Segment] += uint64(ch.Length)
		}
		c := s.ctxs[ctxMapKey(ns, id)]
		if c == nil {
			return nil
		}
		if derr != nil || s.segs[ch.Segment] == nil {
			c.rec.Flags |= lsm.FlagDamaged
			return nil
		}
		c.live += int64(ch.Length)
		s.live += int64(ch.Length)
		return nil
	})
	if err != nil {
		return err
	}
	for id, rec := range s.segRecs {
		if rec.Live != liveBySeg[id] {
			s.recovery.LiveRecounted++
			s.opts.Logf("chunk: segment %d: stored live count %d, chunk keys reference %d; using the latter", id, rec.Live, liveBySeg[id])
			rec.Live = liveBySeg[id]
		}
	}
	return nil
}

// countTail counts the valid records a crash left past the append point.
func (s *Store) countTail(sg *segFile, written uint64) int {
	size, err := sg.size()
	if err != nil || uint64(size) <= written {
		return 0
	}
	const window = 8 << 20
	n := min(uint64(size)-written, window)
	buf, err := s.scratch.get(int(n))
	if err != nil {
		return 0
	}
	defer s.scratch.put(buf)
	b := buf.Bytes()[:n]
	// A tail that is not whole blocks is refused by an O_DIRECT read:
	// then there is nothing to count.
	if err := sg.readAt(b, int64(written)); err != nil {
		return 0
	}
	return len(ScanRecords(b, written))
}

func (c *ctxState) setIdentity(id *Identity) {
	c.ident = id
	c.binding = NewBinding(c.ns, c.id, c.rec.Gen, id)
	c.stored = c.stored[:0]
	c.sliceOf = make([]int, len(id.Plan))
	for l, p := range id.Plan {
		c.sliceOf[l] = -1
		if p.Kind != LayerNone {
			c.sliceOf[l] = len(c.stored)
			c.stored = append(c.stored, l)
		}
	}
}

// ChunkTokens is the store's tokens per chunk group.
func (s *Store) ChunkTokens() int { return s.ct }

// Recovery returns what Open found and how long it took.
func (s *Store) Recovery() Recovery { return s.recovery }

// EngineName names the I/O engine in use.
func (s *Store) EngineName() string { return s.eng.Name() }

// EngineStats returns the I/O engine's counters.
func (s *Store) EngineStats() iouring.Stats { return s.eng.Stats() }

// Close stops the flusher and closes files and the index. It flushes
// nothing: writers still open are abandoned (Writer.Abandon: the whole
// groups they handed to the flusher are committed, the rest is dropped;
// flush or close writers first), and fail with ErrClosed afterwards. It must not run
// concurrently with calls on those writers.
func (s *Store) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	s.closedFlag.Store(true)
	close(s.gcStop)
	// Writers still open lose their unflushed rows: their staging memory
	// is released below, and their methods fail with ErrClosed from now.
	var open []*Writer
	for _, c := range s.ctxs {
		if c.writer != nil {
			open = append(open, c.writer)
		}
	}
	s.mu.Unlock()
	for _, w := range open {
		w.abandon(ErrClosed)
	}
	s.gcWG.Wait()
	// Restores in flight finish (they stop at the next layer) before the
	// files they read are closed.
	s.restores.Wait()
	if !s.readOnly {
		// Every submit that saw the store open has sent its op; later
		// ones see it closed. The flusher handles them all before this.
		s.opsMu.Lock()
		s.opsMu.Unlock() //nolint:staticcheck // a barrier, not a critical section
		done := make(chan error, 1)
		s.ops <- op{kind: opClose, done: done}
		<-done
		s.flusherWG.Wait()
	}
	var firstErr error
	for _, sg := range s.segs {
		if err := sg.close(); err != nil && firstErr == nil {
			firstErr = err
		}
	}
	if err := s.db.Close(); err != nil && firstErr == nil {
		firstErr = err
	}
	s.staging.release()
	s.scratch.release()
	s.readBufs.release()
	if s.ownEng {
		s.eng.Close()
	}
	if s.lock != nil {
		if err := s.lock.Close(); err != nil && firstErr == nil {
			firstErr = err
		}
	}
	return firstErr
}

// ContextInfo describes a stored context.
type ContextInfo struct {
	Namespace, ID string
	Tokens        uint64
	Gen           uint64
	LiveBytes     int64
	Pinned        bool
	Damaged       bool
	LastUse       time.Time
	Identity      *Identity
}

// Contexts lists the contexts, sorted by namespace and id.
func (s *Store) Contexts() []ContextInfo {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]ContextInfo, 0, len(s.ctxs))
	for _, c := range s.ctxs {
		if c.deleted {
			continue
		}
		out = append(out, ContextInfo{
			Namespace: c.ns, ID: c.id, Tokens: c.rec.Tokens, Gen: c.rec.Gen, LiveBytes: c.live,
			Pinned: c.rec.Flags&lsm.FlagPinned != 0, Damaged: c.rec.Flags&lsm.FlagDamaged != 0,
			LastUse: time.Unix(0, c.lastUse), Identity: c.ident,
		})
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].Namespace != out[j].Namespace {
			return out[i].Namespace < out[j].Namespace
		}
		return out[i].ID < out[j].ID
	})
	return out
}

// SegmentInfo describes a segment.
type SegmentInfo struct {
	ID            uint32
	Written, Live uint64
	Sealed        bool
	Active        bool
}

// Segments lists the segments by id.
func (s *Store) Segments() []SegmentInfo {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []SegmentInfo
	for id, r := range s.segRecs {
		out = append(out, SegmentInfo{ID: id, Written: r.Written, Live: r.Live, Sealed: r.Sealed, Active: s.active != nil && s.active.id == id})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out
}

// Namespaces lists the namespaces.
func (s *Store) Namespaces() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []string
	for ns := range s.namespaces {
		out = append(out, ns)
	}
	sort.Strings(out)
	return out
}

// lookup returns a live context or ErrNotFound. Call with s.mu held.
func (s *Store) lookup(ns, id string) (*ctxState, error) {
	c := s.ctxs[ctxMapKey(ns, id)]
	if c == nil || c.deleted {
		return nil, fmt.Errorf("%w: %s/%s", ErrNotFound, ns, id)
	}
	return c, nil
}

// Pin exempts a context from eviction (or lifts the exemption). The change is
// durable after the next Flush of any context.
func (s *Store) Pin(ns, id string, pinned bool) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	c, err := s.lookup(ns, id)
	if err != nil {
		return err
	}
	if pinned {
		c.rec.Flags |= lsm.FlagPinned
	} else {
		c.rec.Flags &^= lsm.FlagPinned
	}
	s.markDirty(c)
	return nil
}
