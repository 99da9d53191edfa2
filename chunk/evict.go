package chunk

import (
	"container/heap"

	"github.com/hcache/hcache/lsm"
)

// evictCand is an eviction candidate and its rank (a last-use time; lower
// goes first, then the older generation).
type evictCand struct {
	c    *ctxState
	rank int64
	gen  uint64
}

// evictQueue is a min-heap of candidates by rank.
type evictQueue []evictCand

func (q evictQueue) Len() int { return len(q) }
func (q evictQueue) Less(i, j int) bool {
	if q[i].rank != q[j].rank {
		return q[i].rank < q[j].rank
	}
	return q[i].gen < q[j].gen
}
func (q evictQueue) Swap(i, j int) { q[i], q[j] = q[j], q[i] }
func (q *evictQueue) Push(x any)   { *q = append(*q, x.(evictCand)) }
func (q *evictQueue) Pop() any {
	old := *q
	x := old[len(old)-1]
	*q = old[:len(old)-1]
	return x
}

// evict deletes least recently used, unpinned contexts without an open
// writer while the live bytes exceed CapacityBytes. A context ranks by its
// own last use (Create, Append, a restore naming it), plus the shared
// bonus, or, when evicting it would drop shared groups (it holds their
// last reference, counting the victims chosen before it), by the latest
// restore by tokens that served one of them, if later. So a prefix that
// restores by tokens keep reading stays stored, held by one of its
// sharers, while the others go by their own use.
func (f *flusher) evict() {
	s := f.s
	s.mu.Lock()
	if s.live <= s.opts.CapacityBytes {
		s.mu.Unlock()
		return // the common case: O(1) per commit
	}
	// Over capacity: rank the candidates once, with their last-use times
	// read under the lock (Restore writes them).
	var cands evictQueue
	for _, c := range s.ctxs {
		if !c.deleted && c.writer == nil && c.rec.Flags&lsm.FlagPinned == 0 {
			// A token-addressed context whose bytes are shared ranks as
			// if used later (Options.EvictSharedBonus; prefix.go).
			cands = append(cands, evictCand{c, c.lastUse + s.sharedBonusLocked(c), c.rec.Gen})
		}
	}
	s.mu.Unlock()
	heap.Init(&cands)
	// The victims, least recently used first, until the live bytes fit;
	// their tombstones go out together (one append each, one fdatasync,
	// one index batch), not one fsync per context.
	s.mu.Lock()
	over := s.live - s.opts.CapacityBytes
	var victims []*ctxState
	released := map[*groupEnt]int{} // references the victims so far release
	for over > 0 && cands.Len() > 0 {
		cd := heap.Pop(&cands).(evictCand)
		c := cd.c
		if c.deleted || c.writer != nil || c.rec.Flags&lsm.FlagPinned != 0 {
			continue
		}
		// Groups it would drop that a restore by tokens used later than
		// its rank: rank it again by that use. A rank only rises as
		// victims release references, so the first candidate popped
		// whose rank stands is the least recently used.
		if used := s.heldUseLocked(c, released); used > cd.rank {
			cd.rank = used
			heap.Push(&cands, cd)
			continue
		}
		victims = append(victims, c)
		// What its delete frees: its own records, and the shared groups
		// it holds the last reference to (counting the victims before it).
		over -= c.live + s.freedGroupsLocked(c, released)
	}
	s.mu.Unlock()
	if err := s.deleteCtxs(victims); err != nil {
		s.opts.Logf("chunk: evicting %d contexts: %v", len(victims), err)
		return
	}
	for _, v := range victims {
		s.stats.evictions.Add(1)
		if s.opts.OnEvict != nil {
			s.opts.OnEvict(v.ns, v.id)
		}
	}
}

// EvictOne evicts as the capacity bound does, least recently used first
// (pinned contexts and those with an open writer never), until one context
// holding bytes has gone; empty contexts ranked before it go too (all of
// them if no candidate holds bytes). It returns how many contexts it
// evicted. It lets a harness (or an operator) drive eviction itself,
// independent of how many bytes each configuration stores; OnEvict is
// called for each as usual.
func (s *Store) EvictOne() (int, error) {
	before := s.stats.evictions.Load()
	done := make(chan error, 1)
	if err := s.submit(op{kind: opEvict, done: done}); err != nil {
		return 0, err
	}
	err := <-done
	return int(s.stats.evictions.Load() - before), err
}

// evictOne runs on the flusher: it lowers the capacity bound to just below
// the live bytes for one pass of evict.
func (f *flusher) evictOne() {
	s := f.s
	s.mu.Lock()
	limit := s.opts.CapacityBytes
	// Below the live bytes even when none is live: then every candidate
	// is empty, and all go (a rule that does not depend on how many bytes
	// the contexts that are not candidates hold).
	s.opts.CapacityBytes = s.live - 1
	s.mu.Unlock()
	f.evict()
	s.mu.Lock()
	s.opts.CapacityBytes = limit
	s.mu.Unlock()
}
