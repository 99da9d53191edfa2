package chunk

import (
	"errors"
	"fmt"
	"syscall"
	"time"

	"github.com/hcache/hcache/lsm"
)

// commit makes the completed writes durable (fdatasync of each touched
// segment), indexes them in one Pebble batch (synced when someone waits), and
// answers the waiters.
func (f *flusher) commit(jobs []*writeJob, waiters []waiter) {
	s := f.s
	// 1. Durability of the data.
	touched, syncErr := s.syncTouched(jobs)
	// 2. The index batch.
	stored := s.supersededRecords(jobs)
	b := s.db.NewBatch()
	s.mu.Lock()
	segTouched := map[uint32]bool{}
	for sg := range touched {
		segTouched[sg.id] = true
	}
	ctxTouched, newTokens := s.indexJobs(b, jobs, syncErr, stored, segTouched)
	s.indexTouchedLocked(b, ctxTouched, newTokens, segTouched)
	s.mu.Unlock()
	// 3. The commit, then the jobs' ends in memory.
	t0 := time.Now()
	err := s.commitIndex(b)
	s.saveStages.commits.Add(1)
	s.saveStages.indexNanos.Add(since(t0))
	s.stats.commits.Add(1)
	s.settleJobs(jobs, newTokens, err)
	// Staging slabs go back before anyone is answered, so a writer that
	// flushed finds them free.
	for _, j := range jobs {
		f.release(j)
	}
	// Evict before answering: when a Flush returns, the capacity bound
	// holds again.
	if err == nil {
		f.evict()
	}
	for _, w := range waiters {
		s.mu.Lock()
		werr := err
		if werr == nil && w.c != nil {
			werr = w.c.writeErr
		}
		s.mu.Unlock()
		w.done <- werr
	}
}

// syncTouched fdatasyncs each segment the successful jobs wrote. A segment
// whose fdatasync fails is sealed and marked syncFailed: its unindexed
// writes are never indexed.
func (s *Store) syncTouched(jobs []*writeJob) (map[*segFile]bool, error) {
	touched := map[*segFile]bool{}
	for _, j := range jobs {
		if j.err == nil && j.seg != nil { // a reference writes nothing
			touched[j.seg] = true
		}
	}
	var syncErr error
	for _, sg := range segsByID(touched) {
		t0 := time.Now()
		err := sg.datasync()
		s.saveStages.syncs.Add(1)
		s.saveStages.syncNanos.Add(since(t0))
		if err != nil {
			syncErr = err
			s.opts.Logf("chunk: fdatasync of segment %d failed (%v); its unindexed writes are dropped and the segment is sealed", sg.id, err)
			s.mu.Lock()
			sg.syncFailed = true
			if rec := s.segRecs[sg.id]; rec != nil {
				rec.Sealed = true
			}
			if s.active == sg {
				s.active = nil
			}
			s.mu.Unlock()
		}
	}
	return touched, syncErr
}

// groupKey names a chunk group of a context in memory.
type groupKey struct {
	c *ctxState
	g uint32
}

// supersededRecords reads from the index the records that jobs supersede (a
// partial group written before), without the store lock. Token counts
// change only on the flusher, so they cannot move meanwhile. A job whose
// superseded record cannot be read (an index error, a value that does not
// decode) fails with that error: it is not indexed.
func (s *Store) supersededRecords(jobs []*writeJob) map[groupKey]*lsm.Chunk {
	stored := map[groupKey]*lsm.Chunk{}
	for _, j := range jobs {
		at := uint64(j.group) * uint64(s.ct)
		// A token-addressed context's tip record sits at the chunk key
		// where its next group starts (its own count of tokens).
		if j.err == nil && (at < j.c.rec.Tokens || j.chain != nil && at == j.c.rec.Tokens && at > 0) {
			ch, err := s.db.GetChunk(j.c.ns, j.c.id, j.group)
			switch {
			case err == nil:
				stored[groupKey{j.c, j.group}] = ch
			case !errors.Is(err, lsm.ErrNotFound):
				j.err = fmt.Errorf("chunk: read the record group %d of %s/%s supersedes: %w", j.group, j.c.ns, j.c.id, err)
			}
		}
		if j.err == nil && j.chain != nil {
			s.keptRecords(j) // prefix_write.go
		}
	}
	return stored
}

// indexJobs adds the chunk records of the jobs that may be indexed to b,
// moves live bytes from the records they supersede, and records each
// failed job's error on its context. It returns the contexts touched and
// their token counts after the commit. Call with s.mu held.
func (s *Store) indexJobs(b *lsm.Batch, jobs []*writeJob, syncErr error, stored map[groupKey]*lsm.Chunk, segTouched map[uint32]bool) (map[*ctxState]bool, map[*ctxState]uint64) {
	ctxTouched := map[*ctxState]bool{}
	superseded := map[groupKey]*lsm.Chunk{}
	// Token counts advance in memory only after the index commit, so a
	// restore never expects chunks the index does not have yet.
	newTokens := map[*ctxState]uint64{}
	for _, j := range jobs {
		c := j.c
		if j.chain != nil {
			s.indexChainJob(b, j, syncErr, stored, superseded, newTokens, segTouched, ctxTouched)
			continue
		}
		if j.err == nil && syncErr == nil && j.seg.syncFailed {
			// Written before an fdatasync of its segment failed, even if
			// a later one succeeded: the kernel may have dropped it
			// (fsyncgate). Never index it.
			j.err = errSyncFailed
		}
		if errors.Is(j.err, syscall.ENOSPC) && !errors.Is(j.err, ErrDiskFull) {
			s.enterDiskFullLocked(j.err)
		}
		if j.err != nil || syncErr != nil {
			if j.err != errSkipped && c.writeErr == nil {
				if j.err == nil {
					c.writeErr = syncErr
				} else {
					c.writeErr = j.err
				}
			}
			continue
		}
		if c.deleted || c.writeErr != nil {
			continue
		}
		if _, ok := newTokens[c]; !ok {
			newTokens[c] = c.rec.Tokens
		}
		// What is indexed stays a prefix of whole groups and at most
		// one partial last group, written by the context's current
		// writer. A job that breaks this is a bug: it is not indexed,
		// and its writer's Flush fails with ErrInvariant.
		cur, start, end := newTokens[c], uint64(j.group)*uint64(s.ct), uint64(j.group)*uint64(s.ct)+uint64(j.tokens)
		if !s.invariant(j.wseq == c.writerSeq, "group %d of %s/%s committed for writer %d, which is gone: writer %d has opened the context since", j.group, c.ns, c.id, j.wseq, c.writerSeq) ||
			!s.invariant(start <= cur, "group %d of %s/%s (tokens %d-%d) would leave a gap after the %d tokens indexed", j.group, c.ns, c.id, start, end, cur) ||
			!s.invariant(j.tokens == s.ct || end >= cur, "group %d of %s/%s holds %d of %d tokens but would not be the last (%d tokens indexed)", j.group, c.ns, c.id, j.tokens, s.ct, cur) {
			c.writeErr = s.brokenErr()
			continue
		}
		key := groupKey{c, j.group}
		// The group may already be stored (a partial tail flushed
		// earlier): its old record becomes dead.
		old := superseded[key]
		if old == nil && uint64(j.group)*uint64(s.ct) < c.rec.Tokens {
			old = stored[key]
		}
		if old != nil {
			if rec := s.segRecs[old.Segment]; rec != nil {
				s.invariant(rec.Live >= uint64(old.Length), "segment %d: %d live bytes, less than the %d-byte record of group %d of %s/%s that a rewrite supersedes", old.Segment, rec.Live, old.Length, j.group, c.ns, c.id)
				rec.Live -= min(rec.Live, uint64(old.Length))
				segTouched[old.Segment] = true
			}
			c.live -= int64(old.Length)
			s.live -= int64(old.Length)
			s.invariant(c.live >= 0 && s.live >= 0, "live bytes below zero (%s/%s: %d, store: %d) after group %d's old record was superseded", c.ns, c.id, c.live, s.live, j.group)
		}
		ch := j.chunk
		superseded[key] = &ch
		b.PutChunk(c.ns, c.id, j.group, &ch)
		s.segRecs[j.seg.id].Live += uint64(j.length)
		c.live += int64(j.length)
		s.live += int64(j.length)
		if t := uint64(j.group)*uint64(s.ct) + uint64(j.tokens); t > newTokens[c] {
			newTokens[c] = t
		}
		ctxTouched[c] = true
		if s.cache != nil && s.cache.limit > 0 {
			s.cacheGroup(c, j)
		}
	}
	return ctxTouched, newTokens
}

// indexTouchedLocked adds to b the last-use times of the contexts marked
// dirty since the last commit, the records of the contexts touched (and of
// namespaces new to the index), and the records of the segments touched and
// of the active one. Call with s.mu held.
func (s *Store) indexTouchedLocked(b *lsm.Batch, ctxTouched map[*ctxState]bool, newTokens map[*ctxState]uint64, segTouched map[uint32]bool) {
	// Only contexts marked dirty since the last commit: the work of a
	// commit does not grow with the number of contexts.
	for c := range s.dirtyCtxs {
		if c.dirty {
			ctxTouched[c] = true
		}
		if c.useDirty && !c.deleted {
			b.PutLastUse(c.ns, c.id, c.lastUse)
			c.useDirty = false
		}
	}
	clear(s.dirtyCtxs)
	// Shared groups that lost their last reference outside a commit, and
	// the segments that group drops changed (prefix.go).
	for _, e := range s.dropLater {
		s.maybeDropLocked(b, e)
	}
	s.dropLater = nil
	for id := range s.groupSegTouched {
		segTouched[id] = true
	}
	clear(s.groupSegTouched)
	for c := range ctxTouched {
		if c.deleted {
			continue
		}
		if !s.namespaces[c.ns] {
			s.namespaces[c.ns] = true
			b.PutNamespace(c.ns, s.opts.Now())
		}
		rec := c.rec
		if t, ok := newTokens[c]; ok {
			rec.Tokens = t
		}
		if c.tokCtx() {
			rec.Tip, rec.TailIDs = c.ptip, c.ptail
		}
		b.PutContext(c.ns, c.id, &rec)
		c.dirty = false
	}
	for id := range segTouched {
		if rec := s.segRecs[id]; rec != nil {
			b.PutSegment(id, rec)
		}
	}
	if s.active != nil {
		b.PutSegment(s.active.id, s.segRecs[s.active.id])
	}
}

// commitIndex commits b, synced. A failed commit makes the store refuse
// further writes.
//
// Every index batch is synced, waiters or not, and the store writes
// nothing else to the index: unsynced writes can reach the disk out of
// order, and Pebble, finding a lost WAL record followed by later ones,
// reports corruption rather than replaying a prefix. With each batch
// synced before the next is built, at most the last one is ever
// unsynced. (A sync costs ~0.2 ms here; batches without waiters are
// rare: idle or CommitBytes.) Last-use times ride along with the next
// commit.
func (s *Store) commitIndex(b *lsm.Batch) error {
	var err error
	if b.Empty() {
		b.Discard()
	} else {
		err = b.Commit(true)
	}
	if err != nil {
		s.mu.Lock()
		s.failed = err
		s.mu.Unlock()
		s.opts.Logf("chunk: index commit failed: %v; the store refuses further writes", err)
	}
	return err
}

// settleJobs advances the token counts of a successful commit and counts
// the jobs as no longer pending.
func (s *Store) settleJobs(jobs []*writeJob, newTokens map[*ctxState]uint64, err error) {
	s.mu.Lock()
	if err == nil {
		for c, t := range newTokens {
			s.invariant(t >= c.rec.Tokens, "%s/%s: a commit would shrink the token count from %d to %d", c.ns, c.id, c.rec.Tokens, t)
			c.rec.Tokens = max(c.rec.Tokens, t)
			if c.tokCtx() {
				c.rec.Tip, c.rec.TailIDs = c.ptip, c.ptail
			}
		}
	}
	// The jobs are dealt with only now that the token counts show them:
	// an Append that sees none pending reads the count a restore sees.
	for _, j := range jobs {
		if err != nil && j.c.writeErr == nil {
			// The commit failed, so the token count did not advance
			// over these groups: a later group of the same writer
			// (submitted while this commit was under way, before the
			// store refused writes) must not be indexed after them.
			j.c.writeErr = err
		}
		j.c.pending--
		s.invariant(j.c.pending >= 0, "%s/%s: %d groups pending with the flusher after one was committed", j.c.ns, j.c.id, j.c.pending)
	}
	s.mu.Unlock()
}

// release frees a job's buffers once it is committed (or failed).
func (f *flusher) release(j *writeJob) {
	if j.header != nil {
		f.s.scratch.put(j.header)
	}
	if j.packed != nil {
		f.s.scratch.put(j.packed)
	}
	if j.owned {
		f.s.staging.put(j.slab)
		f.s.staging.handOff(-1)
	}
}
