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
//
// The files follow the data path, producer -> staging -> segment -> index ->
// reader:
//
//	options.go   Options and their defaults
//	open.go      Open and Close: lock, meta record, index, segment files
//	recover.go   recovery at Open: replaying what the index misses
//	marker.go    the creation marker and the emergency ballast file
//	store.go     the Store and its in-memory contexts, listings, Pin
//	writer.go    Writer: Create, Append, AppendLayer, AppendToken, Flush
//	staging.go   DRAM staging slabs of unwritten rows
//	flush.go     the flusher goroutine: ops, writes in flight
//	commit.go    group commit: fdatasync, then one index batch
//	alloc.go     segment allocation, the append point, disk-full handling
//	segment.go   segment files and their reads and writes
//	object.go    the object seam: sealed segments other providers hold
//	format.go    aliases of package chunk/format, the on-disk encodings
//	tombstone.go Delete: tombstone records, roll-forward
//	evict.go     eviction under CapacityBytes
//	gc.go        compaction of segments
//	fetch.go     snapshots of a context and verified slice reads
//	restore.go   Restore and RestoreOwned: layer-pipelined restores
//	priority.go  restore admission (arrival order, bounded) and writes yielding to restores
//	stages.go    where restores and saves spend their time (RestoreStages, SaveStages)
//	cache.go     the DRAM tier of recent slices
//	fsck.go      Check: read-only consistency check
//	repair.go    Repair: rebuilding the index from segments
//	stats.go     counters
package chunk
