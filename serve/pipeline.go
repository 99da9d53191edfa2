package serve

import (
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/hcache/hcache/chunk"
	"github.com/hcache/hcache/gpu"
	"github.com/hcache/hcache/model"
	"github.com/hcache/hcache/state"
)

// Recomputer computes the K and V of the first layers of a context from its
// token ids: the restore path of layers a plan stores nothing for. The CPU
// forward pass implements it here; a GPU forward can later.
type Recomputer interface {
	// Recompute runs layers [0, layers) over tokens at positions
	// 0..len(tokens)-1, writes each layer's K and V into dst[layer], and
	// calls done(layer) as each layer is complete. Once stop is closed
	// (nil: never) it may return early with an error.
	Recompute(tokens []int, layers int, dst []*gpu.PagedKV, done func(layer int), stop <-chan struct{}) error
}

// CPURecompute is the Recomputer of the reference forward pass: its K and V
// are bit for bit those the forward pass computed when the context was
// first prefilled.
type CPURecompute struct{ M *model.Model }

// Recompute implements Recomputer.
func (r CPURecompute) Recompute(tokens []int, layers int, dst []*gpu.PagedKV, done func(layer int), stop <-chan struct{}) error {
	c := r.M.Cfg
	kvd, tb := c.KVDim(), c.KVDim()*c.ElemBytes()
	var werr error
	err := r.M.PrefillStop(tokens, layers, func(l int, _, k, v []float32) {
		if werr != nil {
			return
		}
		for i := range tokens {
			kb, vb, err := dst[l].Token(i)
			if err != nil {
				werr = err
				return
			}
			c.EncodeRow(kb[:tb], k[i*kvd:(i+1)*kvd])
			c.EncodeRow(vb[:tb], v[i*kvd:(i+1)*kvd])
		}
		done(l)
	}, stop)
	return errors.Join(err, werr)
}

// Settings of a Restorer. Zero values take the defaults.
type Settings struct {
	// MaxConcurrent is how many restores run at once; later ones wait in
	// arrival order (FIFO). Default DefaultMaxConcurrent.
	MaxConcurrent int
	// BufferBytes bounds the stored rows one restore holds read ahead of
	// its compute stream: the store's buffers are handed over without a
	// copy, and the store reads at most max(2, BufferBytes / layer bytes)
	// layers ahead (two layers always, so a layer larger than the budget
	// still restores; a request without token ids, whose layer size is
	// not known in advance, gets the store's own bound,
	// chunk.Options.RestoreAheadBytes). Default DefaultBufferBytes.
	BufferBytes int64
}

// Defaults of Settings.
const (
	DefaultMaxConcurrent = 4
	DefaultBufferBytes   = 256 << 20
)

// Restorer runs restores of any plan against one store, one projection
// backend and (for plans that recompute a prefix) one Recomputer, shared
// fairly by concurrent restores: admission is FIFO (MaxConcurrent at once),
// each restore has its own read-ahead bound (BufferBytes), and the backend
// is taken one layer at a time in FIFO order, so concurrent restores
// alternate layer by layer on it and none waits behind another's whole
// context. Their reads share the store's io_uring queue, each restore
// keeping at most two layers of reads in flight.
type Restorer struct {
	st       *chunk.Store
	backend  gpu.Backend
	rc       Recomputer
	settings Settings
	admit    *fifoSem
	turn     *fifoSem // the backend, one layer at a time
}

// NewRestorer builds a restorer; rc may be nil when no plan recomputes.
func NewRestorer(st *chunk.Store, b gpu.Backend, rc Recomputer, s Settings) *Restorer {
	if s.MaxConcurrent <= 0 {
		s.MaxConcurrent = DefaultMaxConcurrent
	}
	if s.BufferBytes <= 0 {
		s.BufferBytes = DefaultBufferBytes
	}
	return &Restorer{st: st, backend: b, rc: rc, settings: s, admit: newFIFOSem(s.MaxConcurrent), turn: newFIFOSem(1)}
}

// Settings returns the settings in force (defaults filled in).
func (r *Restorer) Settings() Settings { return r.settings }

// Request names a context to restore and where to.
type Request struct {
	NS, ID string
	Ident  *state.Identity
	// Tokens are the context's token ids, needed when the plan recomputes
	// layers (LayerNone); their count must equal the stored token count.
	// Otherwise optional: when given, their count sizes the read-ahead
	// (Settings.BufferBytes); without them the store reads two layers
	// ahead.
	Tokens []int
	// Dst is one paged cache per layer; positions 0..tokens-1 are written.
	Dst []*gpu.PagedKV
}

// LayerTiming is one layer of a restore, as offsets from the restore's
// start (after admission): when its rows had been read (zero for a
// recomputed layer) and when the compute stream started and finished it.
// A gap between one layer's End and the next one's Start, with ReadDone
// after that End, is a bubble: compute waited for I/O.
type LayerTiming struct {
	Layer    int           `json:"layer"`
	Kind     string        `json:"kind"`
	ReadDone time.Duration `json:"read_done_ns"`
	Start    time.Duration `json:"start_ns"`
	End      time.Duration `json:"end_ns"`
}

// RestoreStats describes one restore. Durations are nanoseconds in JSON.
type RestoreStats struct {
	Tokens     int           `json:"tokens"`
	ReadBytes  int64         `json:"read_bytes"`
	Elapsed    time.Duration `json:"elapsed_ns"`    // admission to the last layer written
	QueueWait  time.Duration `json:"queue_wait_ns"` // waiting for admission
	ProjectDur time.Duration `json:"backend_ns"`    // time in the backend (projection and KV loads)
	// RecomputeDur is the recomputation of the unstored prefix.
	RecomputeDur time.Duration `json:"recompute_ns"`
	// IODur is from the start until the last stored layer was handed to
	// the compute stream (read, verified and within the read-ahead bound).
	IODur time.Duration `json:"io_ns"`
	// ComputeIdle is the time the compute stream waited for reads after
	// its recomputation (bubbles), and BackendWait the time it waited for
	// its turn on a backend shared with other restores.
	ComputeIdle time.Duration `json:"compute_idle_ns"`
	BackendWait time.Duration `json:"backend_wait_ns"`
	// PeakBufferedBytes is the most read-ahead bytes held at once.
	PeakBufferedBytes int64         `json:"peak_buffered_bytes"`
	Layers            []LayerTiming `json:"layers"`
}

// ErrTokens is wrapped when a plan needs token ids that were not given or
// do not match the context.
var ErrTokens = errors.New("serve: token ids do not match the restore")

// recomputedPrefix returns r, the number of leading LayerNone layers, or an
// error when a LayerNone layer follows a stored one.
func recomputedPrefix(plan []state.LayerPlan) (int, error) {
	r := 0
	for r < len(plan) && plan[r].Kind == state.LayerNone {
		r++
	}
	for l := r; l < len(plan); l++ {
		if plan[l].Kind == state.LayerNone {
			return 0, fmt.Errorf("serve: layer %d is recomputed after stored layer %d; only a recomputed prefix of layers can be restored", l, r)
		}
	}
	return r, nil
}

type layerMsg struct {
	layer   int
	rows    []byte
	at      time.Duration
	release func() // gives the store its buffer back
}

// Restore restores one context: the plan's recomputed prefix is computed
// from req.Tokens while the stored layers after it stream from the store
// (read ahead within this restore's bound) and are projected or loaded as
// their reads complete.
func (r *Restorer) Restore(req Request) (RestoreStats, error) {
	var rs RestoreStats
	if req.Ident == nil {
		return rs, fmt.Errorf("serve: restore of %s/%s without an identity", req.NS, req.ID)
	}
	plan := req.Ident.Plan
	if len(req.Dst) != len(plan) {
		return rs, fmt.Errorf("serve: %d paged caches for a %d-layer plan", len(req.Dst), len(plan))
	}
	nr, err := recomputedPrefix(plan)
	if err != nil {
		return rs, err
	}
	if nr > 0 {
		if r.rc == nil {
			return rs, fmt.Errorf("serve: the plan of %s/%s recomputes layers 0..%d but this restorer has no Recomputer", req.NS, req.ID, nr-1)
		}
		if len(req.Tokens) == 0 {
			return rs, fmt.Errorf("%w: the plan of %s/%s recomputes layers 0..%d; the request must carry the context's token ids", ErrTokens, req.NS, req.ID, nr-1)
		}
	}
	q0 := time.Now()
	r.admit.acquire()
	defer r.admit.release()
	start := time.Now()
	rs.QueueWait = start.Sub(q0)
	since := func() time.Duration { return time.Since(start) }

	// Read-ahead: the store keeps reading while the compute stream holds
	// layers (RestoreOwned hands its buffers over without a copy), up to
	// `ahead` buffers. The compute stream may hold layers for long (while
	// it recomputes the prefix, or projects a hidden layer while KV layers
	// arrive), so when the token count is known the budget decides how many
	// layers may be read ahead; otherwise the store's default.
	ahead := 0 // the store's bound (chunk.Options.RestoreAheadBytes)
	stored := len(plan) - nr
	if len(req.Tokens) > 0 {
		maxRow := 0
		for _, p := range plan {
			maxRow = max(maxRow, int(p.RowBytes))
		}
		layer := int64(len(req.Tokens)) * int64(maxRow)
		ahead = int(min(int64(stored+1), max(2, r.settings.BufferBytes/max(1, layer))))
	}
	var held heldBytes
	msgs := make(chan layerMsg, len(plan))
	var stopOnce sync.Once
	stopped := make(chan struct{})
	stop := func() { stopOnce.Do(func() { close(stopped) }) }
	errStop := errors.New("serve: restore stopped")

	type ioResult struct {
		tokens int
		err    error
	}
	ioDone := make(chan ioResult, 1)
	ioFailed := make(chan struct{}) // closed when the reads fail: stop recomputing
	go func() {
		n, err := r.st.RestoreOwned(req.NS, req.ID, req.Ident, ahead, func(layer int, rows []byte, release func()) error {
			select {
			case <-stopped:
				release()
				return errStop
			default:
			}
			held.add(int64(len(rows)))
			msgs <- layerMsg{layer, rows, since(), release}
			return nil
		})
		if err != nil {
			close(ioFailed)
		}
		close(msgs)
		ioDone <- ioResult{n, err}
	}()

	// fail stops the reads and returns err, or the store's error when err
	// is nil.
	fail := func(err error) (RestoreStats, error) {
		stop()
		for m := range msgs {
			held.add(-int64(len(m.rows)))
			m.release()
		}
		res := <-ioDone
		if err == nil {
			err = res.err
		}
		return rs, err
	}

	// Compute stream: the recomputed prefix first, overlapping the reads.
	if nr > 0 {
		t0 := since()
		last := t0
		err := r.rc.Recompute(req.Tokens, nr, req.Dst, func(l int) {
			now := since()
			rs.Layers = append(rs.Layers, LayerTiming{Layer: l, Kind: "recompute", Start: last, End: now})
			last = now
		}, ioFailed)
		rs.RecomputeDur = since() - t0
		select {
		case <-ioFailed: // the store's error explains the restore
			return fail(nil)
		default:
		}
		if err != nil {
			return fail(fmt.Errorf("serve: recompute layers 0..%d of %s/%s: %w", nr-1, req.NS, req.ID, err))
		}
	}
	var positions []int
	prevEnd := since()
	for m := range msgs {
		lp := plan[m.layer]
		n := len(m.rows) / int(lp.RowBytes)
		if positions == nil {
			positions = make([]int, n)
			for i := range positions {
				positions[i] = i
			}
		}
		if nr > 0 && n != len(req.Tokens) {
			held.add(-int64(len(m.rows)))
			m.release()
			return fail(fmt.Errorf("%w: %d token ids given, %s/%s stores %d tokens", ErrTokens, len(req.Tokens), req.NS, req.ID, n))
		}
		rs.ReadBytes += int64(len(m.rows))
		if m.at > prevEnd {
			rs.ComputeIdle += m.at - prevEnd
		}
		w0 := since()
		r.turn.acquire()
		t0 := since()
		rs.BackendWait += t0 - w0
		var err error
		if lp.Kind == state.LayerHidden {
			err = r.backend.Project(m.layer, m.rows, positions, req.Dst[m.layer])
		} else {
			err = r.backend.LoadKV(m.layer, m.rows, positions, req.Dst[m.layer])
		}
		r.turn.release()
		t1 := since()
		rs.ProjectDur += t1 - t0
		held.add(-int64(len(m.rows)))
		m.release()
		rs.Layers = append(rs.Layers, LayerTiming{Layer: m.layer, Kind: lp.Kind.String(), ReadDone: m.at, Start: t0, End: t1})
		prevEnd = t1
		rs.IODur = m.at
		if err != nil {
			return fail(fmt.Errorf("serve: layer %d of %s/%s: %w", m.layer, req.NS, req.ID, err))
		}
	}
	res := <-ioDone
	if res.err != nil {
		return rs, res.err
	}
	if nr > 0 && res.tokens != len(req.Tokens) {
		return rs, fmt.Errorf("%w: %d token ids given, %s/%s holds %d tokens", ErrTokens, len(req.Tokens), req.NS, req.ID, res.tokens)
	}
	rs.Tokens = res.tokens
	rs.Elapsed = since()
	rs.PeakBufferedBytes = held.peakBytes()
	return rs, nil
}

// heldBytes counts the bytes of layers handed over and not yet released.
type heldBytes struct {
	mu        sync.Mutex
	now, peak int64
}

func (h *heldBytes) add(n int64) {
	h.mu.Lock()
	h.now += n
	h.peak = max(h.peak, h.now)
	h.mu.Unlock()
}

func (h *heldBytes) peakBytes() int64 {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.peak
}
