package chunk

import (
	"errors"
	"sync/atomic"
)

type storeStats struct {
	bytesWritten, bytesRead, commits, restores atomic.Uint64
	cacheHits, evictions, damaged              atomic.Uint64
	identityMismatch, gcRuns, gcMoved          atomic.Uint64
	rawBytes, storedBytes, lz4Bytes            atomic.Uint64
	diskFull, invariants                       atomic.Uint64
	groupsWritten, groupsDeduped, collisions   atomic.Uint64
	groupBytesWritten                          atomic.Uint64
}

// Stats are the store's counters (exported as metrics by the daemon).
type Stats struct {
	BytesWritten     uint64 // record bytes written to segments
	BytesRead        uint64 // bytes read from segments
	Commits          uint64 // index commits (group commits)
	Restores         uint64 // successful restores
	CacheHits        uint64 // slices served from the DRAM tier
	CacheBytes       int64  // bytes in the DRAM tier
	Evictions        uint64 // contexts evicted for space
	Damaged          uint64 // contexts marked damaged
	IdentityMismatch uint64 // restores refused for identity mismatch
	GCRuns           uint64 // segments compacted
	GCMovedBytes     uint64 // bytes rewritten by GC
	LiveBytes        int64  // bytes of live records
	CompressRawBytes uint64 // raw bytes of slices that went through lz4
	CompressStored   uint64 // their bytes as stored
	CompressLZ4      uint64 // what lz4 made of them, kept or not
	DiskFullEvents   uint64 // times writes were refused for a full disk
	DiskFull         bool   // writes are refused now (until GC frees space)
	IdleReadBuffers  int64  // bytes of idle restore buffers (bounded by IdleReadBufferBytes)
	// InvariantViolations counts the store's own invariants found
	// violated (bugs); Broken names the first one. While Broken is set,
	// writes fail with ErrInvariant and restores go on.
	InvariantViolations uint64
	Broken              string
	// Shared groups of token-addressed contexts (prefix.go).
	GroupsWritten     uint64 // group records written
	GroupBytesWritten uint64 // their bytes
	GroupsDeduped     uint64 // full groups handed over whose key was stored: referenced, not written
	Collisions        uint64 // groups whose key was stored for other tokens (nothing served or written over)
	Groups            int    // shared groups stored
	GroupBytes        int64  // their bytes (counted once, however many contexts reference them)
}

// Stats returns the counters.
func (s *Store) Stats() Stats {
	st := Stats{
		BytesWritten: s.stats.bytesWritten.Load(), BytesRead: s.stats.bytesRead.Load(),
		Commits: s.stats.commits.Load(), Restores: s.stats.restores.Load(), CacheHits: s.stats.cacheHits.Load(),
		CacheBytes: s.cache.size(), Evictions: s.stats.evictions.Load(), Damaged: s.stats.damaged.Load(),
		IdentityMismatch: s.stats.identityMismatch.Load(), GCRuns: s.stats.gcRuns.Load(), GCMovedBytes: s.stats.gcMoved.Load(),
		CompressRawBytes: s.stats.rawBytes.Load(), CompressStored: s.stats.storedBytes.Load(), CompressLZ4: s.stats.lz4Bytes.Load(),
	}
	st.DiskFullEvents = s.stats.diskFull.Load()
	st.IdleReadBuffers = s.readBufs.idleBytes()
	st.InvariantViolations = s.stats.invariants.Load()
	if m := s.broken.Load(); m != nil {
		st.Broken = *m
	}
	s.mu.Lock()
	st.LiveBytes = s.live
	st.GroupsWritten, st.GroupBytesWritten = s.stats.groupsWritten.Load(), s.stats.groupBytesWritten.Load()
	st.GroupsDeduped, st.Collisions = s.stats.groupsDeduped.Load(), s.stats.collisions.Load()
	st.Groups, st.GroupBytes = s.groupCount, s.groupBytes
	st.DiskFull = s.diskFull
	s.mu.Unlock()
	return st
}

func errorsIsCorrupt(err error) bool { return errors.Is(err, ErrCorrupt) }
