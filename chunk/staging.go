package chunk

import (
	"fmt"
	"sync"

	"github.com/hcache/hcache/iouring"
)

// staging hands out aligned DRAM slabs for chunk groups, bounded by a byte
// limit. Slabs are reused by size.
type staging struct {
	mu        sync.Mutex
	cond      *sync.Cond
	limit     int64
	used      int64
	inFlusher int // slabs handed to the flusher (they come back)
	free      map[int][]*iouring.AlignedBuffer
	all       map[*byte]*iouring.AlignedBuffer
	// invariant is the store's (Store.invariant); called with mu held.
	invariant func(ok bool, format string, args ...any) bool
}

func (st *staging) init(limit int64) {
	st.limit = limit
	st.cond = sync.NewCond(&st.mu)
	st.free = map[int][]*iouring.AlignedBuffer{}
	st.all = map[*byte]*iouring.AlignedBuffer{}
}

// get returns a slab of n bytes (n a multiple of BlockBytes). It waits while
// the limit is reached and slabs are on their way back from the flusher; if
// none are, waiting could not end, and it fails with ErrStagingFull.
func (st *staging) get(n int) ([]byte, error) {
	st.mu.Lock()
	defer st.mu.Unlock()
	for {
		if l := st.free[n]; len(l) > 0 {
			b := l[len(l)-1]
			st.free[n] = l[:len(l)-1]
			return b.Bytes(), nil
		}
		if st.used+int64(n) <= st.limit {
			b, err := iouring.Alloc(n)
			if err != nil {
				return nil, err
			}
			st.used += int64(n)
			st.all[&b.Bytes()[0]] = b
			return b.Bytes(), nil
		}
		// Reuse idle slabs of other sizes.
		for sz, l := range st.free {
			if len(l) > 0 {
				b := l[len(l)-1]
				st.free[sz] = l[:len(l)-1]
				delete(st.all, &b.Bytes()[0])
				st.used -= int64(sz)
				st.check(st.used >= 0, "staging: %d bytes in use after freeing an idle %d-byte slab", st.used, sz)
				b.Free()
				break
			}
		}
		if st.used+int64(n) <= st.limit {
			continue
		}
		if st.inFlusher == 0 {
			return nil, fmt.Errorf("%w: %d bytes staged (StagingBytes = %d); flush or close writers", ErrStagingFull, st.used, st.limit)
		}
		st.cond.Wait()
	}
}

func (st *staging) put(b []byte) {
	st.mu.Lock()
	defer st.mu.Unlock()
	ab := st.all[&b[0]]
	if !st.check(ab != nil, "staging: a slab the staging pool did not hand out was given back") {
		return
	}
	st.free[len(ab.Bytes())] = append(st.free[len(ab.Bytes())], ab)
	st.cond.Broadcast()
}

func (st *staging) handOff(delta int) {
	st.mu.Lock()
	st.inFlusher += delta
	if !st.check(st.inFlusher >= 0, "staging: %d slabs with the flusher after one came back", st.inFlusher) {
		st.inFlusher = 0
	}
	st.mu.Unlock()
	st.cond.Broadcast()
}

// check reports a violated staging invariant to the store. Call with mu
// held.
func (st *staging) check(ok bool, format string, args ...any) bool {
	if ok || st.invariant == nil {
		return ok
	}
	return st.invariant(false, format, args...)
}

func (st *staging) release() {
	st.mu.Lock()
	defer st.mu.Unlock()
	for _, b := range st.all {
		b.Free()
	}
	st.all = map[*byte]*iouring.AlignedBuffer{}
	st.free = map[int][]*iouring.AlignedBuffer{}
	st.used = 0
}
