package chunk

import (
	"errors"
	"fmt"
	"log"
	"math"
	"time"

	"github.com/cockroachdb/pebble/v2/vfs"
	"github.com/hcache/hcache/iouring"
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
	// DefaultBallastBytes is the ballast kept for a full disk.
	DefaultBallastBytes = 64 << 20
	// DefaultIdleReadBufferBytes bounds idle restore buffers.
	DefaultIdleReadBufferBytes = 256 << 20
	// DefaultEvictSharedBonus is Options.EvictSharedBonus's default.
	DefaultEvictSharedBonus = 10 * time.Minute
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
	// BallastBytes is the ballast: a preallocated file of this
	// size that the store releases when the disk fills, so that deletes
	// (index commits), GC and a reopen always have room. -1: none.
	BallastBytes int64
	// IdleReadBufferBytes bounds the restore buffers kept mapped for reuse
	// while no restore uses them (DefaultIdleReadBufferBytes; -1: keep none).
	IdleReadBufferBytes int64
	// Providers serve the sealed segments the index records as held
	// elsewhere than the store's own files (lsm.Segment.Location; see
	// ObjectProvider). Open refuses a store whose index names a location
	// none of them serves.
	Providers []ObjectProvider
	// RestoreAheadBytes bounds the layers a Restore (and a RestoreOwned
	// called with ahead 0) keeps read or in flight: max(2, RestoreAheadBytes
	// / the context's layer bytes) buffers, so short contexts still keep
	// the disk's queue deep and long ones do not hold many large buffers
	// (DefaultRestoreAheadBytes; -1: two layers).
	RestoreAheadBytes int64
	// Logf reports notable events; default log.Printf.
	Logf func(string, ...any)
	// EvictSharedBonus is how much later than its last use a
	// token-addressed context whose bytes are all shared with other
	// contexts ranks for eviction (scaled by the share of its bytes that
	// are shared): evicting it frees little, and its prefix serves the
	// others' lookups (DefaultEvictSharedBonus; -1: plain LRU). See
	// TestEvictionPrefersUnshared for what it does to a workload's hits.
	EvictSharedBonus time.Duration
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
	if o.BallastBytes == 0 {
		o.BallastBytes = DefaultBallastBytes
	}
	if o.BallastBytes < 0 {
		o.BallastBytes = 0
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
	if o.EvictSharedBonus == 0 {
		o.EvictSharedBonus = DefaultEvictSharedBonus
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
