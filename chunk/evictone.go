package chunk

// EvictOne evicts as the capacity bound does, least recently used first
// (pinned contexts and those with an open writer never), until one context
// holding bytes has gone; empty contexts ranked before it go too (all of
// them if no candidate holds bytes). It returns how many contexts it
// evicted. It lets a harness (or an operator)
// drive eviction itself, independent of how many bytes each configuration
// stores; OnEvict is called for each as usual.
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
