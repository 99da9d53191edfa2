package chunk

import (
	"fmt"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cockroachdb/pebble/v2/vfs"
	"github.com/hcache/hcache/iouring"
	"github.com/hcache/hcache/lsm"
	"github.com/hcache/hcache/state"
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
	// Token-addressed contexts (prefix.go): the chain of (ns, salt,
	// identity), and the tip and tail ids as indexed by the commit under
	// way (c.rec holds them as committed).
	chain state.Chain
	ptip  ChainKey
	ptail []uint32
	// probe: a stand-in context of a restore by tokens, never stored.
	probe bool
	// noRefs: Open found its chain broken and counted no references
	// for it (a delete has none to release).
	noRefs bool
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

	allocMu sync.Mutex // serializes allocate (the flusher; evictions on the committer)
	// wholeSegments (under allocMu): new segments are preallocated at
	// SegmentBytes, not grown from initialSegmentBytes (alloc.go).
	wholeSegments bool
	mu            sync.Mutex
	ctxs          map[string]*ctxState
	segs          map[uint32]*segFile
	segRecs       map[uint32]*lsm.Segment
	namespaces    map[string]bool
	active        *segFile
	nextSeg       uint32
	nextGen       uint64
	closed        bool
	readOnly      bool
	diskFull      bool                   // an allocation met ENOSPC: writes refused until GC frees space
	closedFlag    atomic.Bool            // closed, readable without s.mu (writers check it)
	failed        error                  // a fatal index error: the store refuses writes
	broken        atomic.Pointer[string] // the first invariant found violated: writes refused (see invariant)

	dirtyCtxs map[*ctxState]struct{} // contexts to write at the next commit (under mu)
	live      int64                  // sum of the contexts' live bytes (under mu)
	restores  sync.WaitGroup         // Restore and Append reads in flight; Close waits for them

	snapFault func() error // test seam: an index read failure in snap

	// Restores first (priority.go) and where time goes (stages.go).
	gate       readGate
	stages     restoreStages
	saveStages saveStages

	opsMu     sync.RWMutex // submit's check-and-send vs Close (see submit)
	ops       chan op
	flusherWG sync.WaitGroup
	gcStop    chan struct{}
	gcWG      sync.WaitGroup
	stats     storeStats

	// Shared groups of token chains (prefix.go), under mu.
	groups          map[gid]*groupEnt
	groupBytes      int64           // bytes of committed group records
	groupCount      int             // committed group records
	groupSegTouched map[uint32]bool // segments whose live bytes group drops changed
	dropLater       []*groupEnt     // groups to drop at the next commit
	// keyFunc replaces Chain.Next (a test seam that forces collisions).
	keyFunc func(ch state.Chain, parent ChainKey, ids []uint32) ChainKey
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
	// TokenAddressed: created by CreateTokens or Fork (its full groups are
	// shared group records; LiveBytes counts only its own tail).
	TokenAddressed bool
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
			LastUse: time.Unix(0, c.lastUse), Identity: c.ident, TokenAddressed: c.tokCtx(),
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
	Location      string // the provider holding it; "" for a local file
}

// Segments lists the segments by id.
func (s *Store) Segments() []SegmentInfo {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []SegmentInfo
	for id, r := range s.segRecs {
		out = append(out, SegmentInfo{ID: id, Written: r.Written, Live: r.Live, Sealed: r.Sealed, Active: s.active != nil && s.active.id == id, Location: r.Location})
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
