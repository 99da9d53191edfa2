package chunk

import (
	"sync/atomic"
	"time"
)

// restoreStages sums, over every layer of every restore, where the time
// went: mapping (or finding) a restore buffer, waiting for the layer's
// reads (from their submission to the last completion), verifying it, and
// the restore's whole time. Cheap enough to run always (a few clock reads
// per layer).
type restoreStages struct {
	layers, restores                                       atomic.Uint64
	bufferNanos, submitNanos, readNanos, verifyNanos, wall atomic.Int64
	queuedNanos                                            atomic.Int64
}

// saveStages sums where the flusher's time went.
type saveStages struct {
	writes, syncs, commits            atomic.Uint64
	writeNanos, syncNanos, indexNanos atomic.Int64
	writeBytes                        atomic.Uint64
	yieldedNanos                      atomic.Int64
	// busyNanos: time with at least one group write in flight;
	// segNanos/segs: segment files created or grown (fallocate), on the
	// flusher, which submits nothing meanwhile.
	busyNanos, segNanos atomic.Int64
	segs                atomic.Uint64
}

// SaveStages is where saves spent their time since Open, summed
// (nanoseconds): the flusher's group writes from submission to completion
// (several are in flight at once, so Write can exceed the wall time), the
// fdatasyncs and index commits of group commits (one at a time).
type SaveStages struct {
	Writes     uint64 // group writes completed
	WriteBytes uint64
	Syncs      uint64 // fdatasyncs
	Commits    uint64 // index commits
	Write      time.Duration
	Sync       time.Duration
	Index      time.Duration
	// Busy is the time during which at least one group write was in
	// flight: over a save's wall time, the rest is time the disk had
	// nothing of ours to do (rows still being copied into staging, a
	// commit's fdatasync with no write queued, segment creation).
	Busy time.Duration
	// Segments counts segment files created or grown (fallocate), and
	// Segment the flusher's time in them (it submits nothing meanwhile).
	Segments uint64
	Segment  time.Duration
}

// SaveStages returns the sums of where saves spent their time.
func (s *Store) SaveStages() SaveStages {
	st := &s.saveStages
	return SaveStages{Writes: st.writes.Load(), WriteBytes: st.writeBytes.Load(), Syncs: st.syncs.Load(), Commits: st.commits.Load(),
		Write: time.Duration(st.writeNanos.Load()), Sync: time.Duration(st.syncNanos.Load()), Index: time.Duration(st.indexNanos.Load()),
		Busy: time.Duration(st.busyNanos.Load()), Segments: st.segs.Load(), Segment: time.Duration(st.segNanos.Load())}
}

// RestoreStages is where restores spent their time, summed over every
// restore since Open (nanoseconds), so that a benchmark can tell a restore
// waiting for the disk from one waiting for memory or for a CPU.
type RestoreStages struct {
	Restores uint64 // restores counted (successful or not)
	Layers   uint64 // layers started
	// Buffer is the time spent getting restore buffers (mapping and
	// populating a new one when no idle one fits).
	Buffer time.Duration
	// Submit is the time spent handing reads to the I/O engine (waiting
	// for a free slot of the ring included).
	Submit time.Duration
	// Queued is the time restores waited for admission behind earlier
	// restores (priority.go).
	Queued time.Duration
	// Read is, per layer, the time from the submission of its reads to the
	// completion of the last one.
	Read time.Duration
	// Verify is the time spent checking checksums (and copying bounce
	// buffers) before layers were handed over; most of it overlaps the
	// layer's reads (slices are checked as the reads they need land).
	Verify time.Duration
	// Wall is the restores' own time, from the call to the return.
	Wall time.Duration
	// BasePageBuffers counts restore buffers handed out in base pages
	// because no idle buffer fitted (one in huge pages is then mapped in
	// the background for the next restores; see alignedScratch).
	BasePageBuffers uint64
}

// RestoreStages returns the sums of where restores spent their time.
func (s *Store) RestoreStages() RestoreStages {
	st := &s.stages
	return RestoreStages{Restores: st.restores.Load(), Layers: st.layers.Load(),
		Buffer: time.Duration(st.bufferNanos.Load()), Submit: time.Duration(st.submitNanos.Load()),
		Queued: time.Duration(st.queuedNanos.Load()), Read: time.Duration(st.readNanos.Load()),
		Verify: time.Duration(st.verifyNanos.Load()), Wall: time.Duration(st.wall.Load()),
		BasePageBuffers: s.readBufs.smallPages.Load()}
}

func since(t time.Time) int64 { return int64(time.Since(t)) }
