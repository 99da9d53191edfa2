package serve

import (
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/hcache/hcache/gpu"
	"github.com/hcache/hcache/model"
	"github.com/hcache/hcache/state"
	"github.com/hcache/hcache/state/codec"
)

// Source is what a restore reads: a context's stored layers, handed over
// without a copy as their reads complete (*chunk.Store implements it; see
// chunk.Store.RestoreOwned for the contract: fn owns rows until it calls
// release, at most ahead buffers are out at once, 0 takes the store's own
// bound, and the token count is returned once every buffer is released).
type Source interface {
	RestoreOwned(ns, id string, ident *state.Identity, ahead int, fn func(layer int, rows []byte, release func()) error) (int, error)
}

// Prefix names state by its tokens for a PrefixSource: a namespace, a salt
// (nil for none), an identity, token ids, and optionally a context whose own
// partial tail may extend the shared groups (Prefix's fields).
type Prefix struct {
	Namespace string
	Salt      []byte
	Identity  *state.Identity
	Tokens    []uint32
	Context   string
}

// PrefixSource is a Source that also restores by tokens: a request with
// ByTokens set needs one. serve/chunksrc adapts a *chunk.Store (see
// chunk.Store.Lookup and RestoreTokensOwned for the contract: LookupPrefix
// reads memory only; RestorePrefixOwned hands over the stored layers of
// what LookupPrefix reports, as RestoreOwned, and returns its token count,
// 0 with fn never called when nothing is stored).
type PrefixSource interface {
	Source
	LookupPrefix(p Prefix) (int, error)
	RestorePrefixOwned(p Prefix, ahead int, fn func(layer int, rows []byte, release func()) error) (int, error)
}

// ErrNoPrefixSource is returned for a restore by tokens from a Source that
// cannot restore by tokens.
var ErrNoPrefixSource = errors.New("serve: the source cannot restore by tokens (serve/chunksrc adapts a *chunk.Store)")

// prefixOf builds the source's Prefix of a restore by tokens.
func prefixOf(ns, id string, ident *state.Identity, tokens []int, salt []byte) (Prefix, error) {
	ids := make([]uint32, len(tokens))
	for i, t := range tokens {
		if t < 0 || int64(t) > int64(^uint32(0)) {
			return Prefix{}, fmt.Errorf("%w: token %d is id %d, outside [0, 2^32)", ErrTokens, i, t)
		}
		ids[i] = uint32(t)
	}
	return Prefix{Namespace: ns, Salt: salt, Identity: ident, Tokens: ids, Context: id}, nil
}

// byTokens resolves a restore by tokens: the store's prefix of the request
// and the leading tokens with stored state (what the restore reads).
func (r *Restorer) byTokens(ns, id string, ident *state.Identity, tokens []int, salt []byte) (PrefixSource, Prefix, int, error) {
	ps, ok := r.src.(PrefixSource)
	if !ok {
		return nil, Prefix{}, 0, fmt.Errorf("%w (%T)", ErrNoPrefixSource, r.src)
	}
	if len(tokens) == 0 {
		return nil, Prefix{}, 0, fmt.Errorf("%w: a restore by tokens in %s without token ids", ErrTokens, ns)
	}
	p, err := prefixOf(ns, id, ident, tokens, salt)
	if err != nil {
		return nil, p, 0, err
	}
	n, err := ps.LookupPrefix(p)
	if err != nil {
		return nil, p, 0, err
	}
	p.Tokens = p.Tokens[:n]
	return ps, p, n, nil
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

// Restorer runs restores of any plan the scheduler emits, from one source
// through one backend, for every caller: the library and the CLI (host
// caches), the GPU path (the backend's device caches) and the daemon
// (Stream: stored or projected rows handed onward). Admission is FIFO
// (Settings.MaxConcurrent at once) and each restore has its own read-ahead
// bound (Settings.BufferBytes). Admitted restores share the backend side by
// side, each with its own gpu.Restore, up to the backend's Concurrency;
// past that BeginRestore waits while the restore's reads already run ahead
// (within its bound). Their reads share the source (the store's io_uring
// queue).
type Restorer struct {
	src      Source
	backend  gpu.Backend
	settings Settings
	admit    *fifoSem
}

// NewRestorer builds a restorer; b may be nil for a restorer that only
// streams stored rows (Stream without Project). A plan that recomputes a
// prefix needs b.LoadRecompute to have loaded those layers.
func NewRestorer(src Source, b gpu.Backend, s Settings) *Restorer {
	if s.MaxConcurrent <= 0 {
		s.MaxConcurrent = DefaultMaxConcurrent
	}
	if s.BufferBytes <= 0 {
		s.BufferBytes = DefaultBufferBytes
	}
	return &Restorer{src: src, backend: b, settings: s, admit: newFIFOSem(s.MaxConcurrent)}
}

// Settings returns the settings in force (defaults filled in).
func (r *Restorer) Settings() Settings { return r.settings }

// Backend is the restorer's backend (nil for one that only streams).
func (r *Restorer) Backend() gpu.Backend { return r.backend }

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
	// Dst is the cache written: a gpu.HostCache (one paged cache per
	// layer) or a cache of the backend's device memory.
	Dst gpu.Cache
	// Start is the position of the first token (tokens land at Start,
	// Start+1, ...). A plan that recomputes layers needs 0.
	Start int
	// ByTokens restores by tokens (the source must be a PrefixSource):
	// the longest prefix of Tokens whose state is stored in namespace NS
	// under Salt and Ident (whole chunk groups, plus the partial tail of
	// context ID when ID names one whose tokens match; ID may be empty).
	// RestoreStats.Tokens is that prefix's length, and the restore writes
	// positions Start.. of it (0 tokens: nothing stored, nothing written,
	// no error). A plan that recomputes layers recomputes them from the
	// prefix's token ids.
	ByTokens bool
	Salt     []byte
}

// LayerTiming is one layer of a restore, as offsets from the restore's
// start (after admission): when its rows had been read (zero for a
// recomputed layer) and when the compute stream started and finished it.
// A gap between one layer's End and the next one's Start, with ReadDone
// after that End, is a bubble: compute waited for I/O. On a device backend
// Start and End bound the queueing of the layer's work, not its run (the
// device's own time is RestoreStats.Device.GPU).
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
	ProjectDur time.Duration `json:"backend_ns"`    // time in the backend's calls (projection and KV loads), decode included
	// DecodeDur is the time spent decoding rows stored under a codec into
	// the model dtype on the host (part of ProjectDur).
	DecodeDur time.Duration `json:"decode_ns"`
	// RecomputeDur is the recomputation of the unstored prefix (its
	// queueing, on a device).
	RecomputeDur time.Duration `json:"recompute_ns"`
	// IODur is from the start until the last stored layer was handed to
	// the compute stream (read, verified and within the read-ahead bound).
	IODur time.Duration `json:"io_ns"`
	// ComputeIdle is the time the compute stream waited for reads after
	// its recomputation (bubbles), and BackendWait the time BeginRestore
	// waited for the backend (a backend running as many restores as its
	// Concurrency).
	ComputeIdle time.Duration `json:"compute_idle_ns"`
	BackendWait time.Duration `json:"backend_wait_ns"`
	// PeakBufferedBytes is the most read-ahead bytes held at once.
	PeakBufferedBytes int64         `json:"peak_buffered_bytes"`
	Layers            []LayerTiming `json:"layers"`
	// Device is the backend's account of the restore (gpu.Timing).
	Device gpu.Timing `json:"device"`
}

// ErrTokens is wrapped when a plan needs token ids that were not given or
// do not match the context.
var ErrTokens = errors.New("serve: token ids do not match the restore")

// ErrPlan is wrapped when a plan cannot be restored by the backend's model:
// another layer count, rows of another size, or a recomputed layer after a
// stored one.
var ErrPlan = errors.New("serve: the plan does not fit")

// CheckPlan checks that a plan's rows are c's: as many layers, hidden rows of
// c.HiddenRowBytes, KV rows of c.KVRowBytes, none for recomputed layers.
func CheckPlan(c *model.Config, plan []state.LayerPlan) error {
	return CheckPlanCodec(c, plan, state.CodecNone)
}

// CheckPlanCodec is CheckPlan for rows encoded by cd: hidden rows of
// codec.HiddenRowBytes, KV rows of codec.KVRowBytes.
func CheckPlanCodec(c *model.Config, plan []state.LayerPlan, cd state.Codec) error {
	if !cd.Known() {
		return fmt.Errorf("%w: unknown codec %d", ErrPlan, uint8(cd))
	}
	if len(plan) != c.Layers {
		return fmt.Errorf("%w: a %d-layer plan for a %d-layer model", ErrPlan, len(plan), c.Layers)
	}
	for l, p := range plan {
		want := 0
		switch p.Kind {
		case state.LayerHidden:
			want = codec.HiddenRowBytes(cd, c.DType, c.HiddenSize)
		case state.LayerKV:
			want = codec.KVRowBytes(cd, c.DType, c.KVDim())
		}
		if int(p.RowBytes) != want {
			if cd != state.CodecNone {
				return fmt.Errorf("%w: layer %d (%s) stores %d-byte rows; the model has %d under codec %s", ErrPlan, l, p.Kind, p.RowBytes, want, cd)
			}
			return fmt.Errorf("%w: layer %d (%s) stores %d-byte rows; the model has %d", ErrPlan, l, p.Kind, p.RowBytes, want)
		}
	}
	return nil
}

// recomputedPrefix returns r, the number of leading LayerNone layers, or an
// error when a LayerNone layer follows a stored one.
func recomputedPrefix(plan []state.LayerPlan) (int, error) {
	r := 0
	for r < len(plan) && plan[r].Kind == state.LayerNone {
		r++
	}
	for l := r; l < len(plan); l++ {
		if plan[l].Kind == state.LayerNone {
			return 0, fmt.Errorf("%w: layer %d is recomputed after stored layer %d; only a recomputed prefix of layers can be restored", ErrPlan, l, r)
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

type ioResult struct {
	tokens int
	err    error
}

// reads is one restore's reads from the source, on their own goroutine:
// layers arrive on msgs (each owned until released) while the source reads
// the next ones, at most ahead buffers out.
type reads struct {
	msgs     chan layerMsg
	done     chan ioResult
	failed   chan struct{} // closed when the reads fail
	stopped  chan struct{}
	stopOnce sync.Once
	held     heldBytes
}

var errStop = errors.New("serve: restore stopped")

// readFn is a source's owned restore: by name or by tokens.
type readFn func(ahead int, fn func(layer int, rows []byte, release func()) error) (int, error)

// reader is the read of a context by name, or of p by tokens when ps is set.
func (r *Restorer) reader(ns, id string, ident *state.Identity, ps PrefixSource, p Prefix) readFn {
	if ps != nil {
		return func(ahead int, fn func(layer int, rows []byte, release func()) error) (int, error) {
			return ps.RestorePrefixOwned(p, ahead, fn)
		}
	}
	return func(ahead int, fn func(layer int, rows []byte, release func()) error) (int, error) {
		return r.src.RestoreOwned(ns, id, ident, ahead, fn)
	}
}

func (r *Restorer) startReads(read readFn, ident *state.Identity, ahead int, since func() time.Duration) *reads {
	rd := &reads{msgs: make(chan layerMsg, len(ident.Plan)), done: make(chan ioResult, 1), failed: make(chan struct{}), stopped: make(chan struct{})}
	go func() {
		n, err := read(ahead, func(layer int, rows []byte, release func()) error {
			select {
			case <-rd.stopped:
				release()
				return errStop
			default:
			}
			rd.held.add(int64(len(rows)))
			rd.msgs <- layerMsg{layer, rows, since(), release}
			return nil
		})
		if err != nil {
			close(rd.failed)
		}
		close(rd.msgs)
		rd.done <- ioResult{n, err}
	}()
	return rd
}

// release hands a layer's buffer back.
func (rd *reads) release(m layerMsg) {
	rd.held.add(-int64(len(m.rows)))
	m.release()
}

// settle waits for the backend's queued work (dev may be nil) and then for
// the reads, and returns the reads' outcome: a failed read is the error
// that names the store's failure, so it wins over the device's.
func (r *Restorer) settle(dev gpu.Restore, rd *reads, rs *RestoreStats, what, ns, id string) (ioResult, error) {
	var werr error
	if dev != nil {
		rs.Device, werr = dev.Wait()
	}
	res := <-rd.done
	if res.err != nil {
		return res, res.err
	}
	if werr != nil {
		return res, fmt.Errorf("serve: %s %s/%s on the %s backend: %w", what, ns, id, r.backend.Name(), werr)
	}
	return res, nil
}

// drain stops the reads, hands back every layer not consumed and returns
// the reads' outcome.
func (rd *reads) drain() ioResult {
	rd.stopOnce.Do(func() { close(rd.stopped) })
	for m := range rd.msgs {
		rd.release(m)
	}
	return <-rd.done
}

// Restore restores one context into req.Dst: the plan's recomputed prefix is
// queued on the backend (gpu.Restore.Recompute) from req.Tokens while the
// stored layers after it stream from the source (read ahead within this
// restore's bound) and are queued as their reads complete (hidden layers
// projected, KV layers loaded), each buffer handed back once the backend
// has read it.
func (r *Restorer) Restore(req Request) (RestoreStats, error) {
	var rs RestoreStats
	if req.Ident == nil {
		return rs, fmt.Errorf("serve: restore of %s/%s without an identity", req.NS, req.ID)
	}
	plan := req.Ident.Plan
	if req.Dst == nil {
		return rs, fmt.Errorf("serve: restore of %s/%s without a destination cache", req.NS, req.ID)
	}
	if req.Dst.CacheLayers() != len(plan) {
		return rs, fmt.Errorf("serve: %d paged caches for a %d-layer plan", req.Dst.CacheLayers(), len(plan))
	}
	if r.backend == nil {
		return rs, fmt.Errorf("serve: restore of %s/%s into a cache needs a backend", req.NS, req.ID)
	}
	if req.Start < 0 {
		return rs, fmt.Errorf("serve: start position %d", req.Start)
	}
	nr, err := recomputedPrefix(plan)
	if err != nil {
		return rs, err
	}
	if err := CheckPlanCodec(r.backend.Config(), plan, req.Ident.Codec); err != nil {
		return rs, err
	}
	var (
		ps PrefixSource
		p  Prefix
	)
	if req.ByTokens {
		var n int
		if ps, p, n, err = r.byTokens(req.NS, req.ID, req.Ident, req.Tokens, req.Salt); err != nil {
			return rs, err
		}
		if n == 0 {
			return rs, nil // nothing stored: nothing to restore
		}
		// The restore reads (and a recomputed prefix recomputes) the
		// stored prefix only; the reads check that they cover exactly it.
		req.Tokens = req.Tokens[:n]
	}
	cd := req.Ident.Codec
	if nr > 0 {
		if len(req.Tokens) == 0 {
			return rs, fmt.Errorf("%w: the plan of %s/%s recomputes layers 0..%d; the request must carry the context's token ids", ErrTokens, req.NS, req.ID, nr-1)
		}
		if req.Start != 0 {
			return rs, fmt.Errorf("serve: the plan of %s/%s recomputes layers 0..%d, which needs the whole context at positions from 0, not from %d", req.NS, req.ID, nr-1, req.Start)
		}
	}
	q0 := time.Now()
	r.admit.acquire()
	defer r.admit.release()
	start := time.Now()
	rs.QueueWait = start.Sub(q0)
	since := func() time.Duration { return time.Since(start) }

	// Read-ahead: the source keeps reading while the backend holds layers
	// (buffers are handed over without a copy), up to `ahead` buffers. The
	// backend may hold layers for long (while it recomputes the prefix, or
	// projects a hidden layer while KV layers arrive), so when the token
	// count is known the budget decides how many layers may be read ahead;
	// otherwise the store's default.
	ahead := 0 // the store's bound (chunk.Options.RestoreAheadBytes)
	if len(req.Tokens) > 0 {
		maxRow := 0
		for _, p := range plan {
			maxRow = max(maxRow, int(p.RowBytes))
		}
		layer := int64(len(req.Tokens)) * int64(maxRow)
		ahead = int(min(int64(len(plan)-nr+1), max(2, r.settings.BufferBytes/max(1, layer))))
	}
	rd := r.startReads(r.reader(req.NS, req.ID, req.Ident, ps, p), req.Ident, ahead, since)
	finished := make(chan struct{})
	defer close(finished)

	// The backend's restore begins once the token count is known: at once
	// for a plan that recomputes (the token ids), else at the first layer.
	var dev gpu.Restore
	begin := func(n int) error {
		positions := make([]int, n)
		for i := range positions {
			positions[i] = req.Start + i
		}
		w0 := since()
		d, err := r.backend.BeginRestore(req.Dst, positions)
		rs.BackendWait += since() - w0
		if err != nil {
			return fmt.Errorf("serve: restore of %s/%s on the %s backend: %w", req.NS, req.ID, r.backend.Name(), err)
		}
		dev = d
		go func() { // failed reads stop the backend's work early
			select {
			case <-rd.failed:
				d.Abort()
			case <-finished:
			}
		}()
		return nil
	}
	// fail ends the backend's restore and the reads and returns err, or the
	// reads' error when err is nil.
	fail := func(err error) (RestoreStats, error) {
		if dev != nil {
			dev.Abort()
			dev.Wait() // every queued release called; err explains the restore
		}
		res := rd.drain()
		if err == nil {
			err = res.err
		}
		return rs, err
	}

	// Compute stream: the recomputed prefix first, overlapping the reads.
	if nr > 0 {
		if err := begin(len(req.Tokens)); err != nil {
			return fail(err)
		}
		t0 := since()
		last := t0
		err := dev.Recompute(req.Tokens, nr, func(l int) {
			now := since()
			rs.Layers = append(rs.Layers, LayerTiming{Layer: l, Kind: "recompute", Start: last, End: now})
			last = now
		})
		rs.RecomputeDur = since() - t0
		select {
		case <-rd.failed: // the reads' error explains the restore
			return fail(nil)
		default:
		}
		if err != nil {
			return fail(fmt.Errorf("serve: recompute layers 0..%d of %s/%s: %w", nr-1, req.NS, req.ID, err))
		}
	}
	prevEnd := since()
	for m := range rd.msgs {
		lp := plan[m.layer]
		n := len(m.rows) / int(lp.RowBytes)
		if nr > 0 && n != len(req.Tokens) {
			rd.release(m)
			return fail(fmt.Errorf("%w: %d token ids given, %s/%s stores %d tokens", ErrTokens, len(req.Tokens), req.NS, req.ID, n))
		}
		rs.ReadBytes += int64(len(m.rows))
		if n == 0 { // nothing stored yet: nothing to write
			rd.release(m)
			continue
		}
		if dev == nil {
			if err := begin(n); err != nil {
				rd.release(m)
				return fail(err)
			}
		}
		if m.at > prevEnd {
			rs.ComputeIdle += m.at - prevEnd
		}
		t0 := since()
		rows, release := m.rows, func() { rd.release(m) }
		if dd, ok := dev.(gpu.DeviceDecoder); ok && cd != state.CodecNone && dd.DecodesOnDevice(cd) {
			// The backend decodes on the device: the copy moves the
			// stored (encoded) bytes.
			err := dd.Encoded(m.layer, lp.Kind, cd, rows, release)
			t1 := since()
			rs.ProjectDur += t1 - t0
			rs.Layers = append(rs.Layers, LayerTiming{Layer: m.layer, Kind: lp.Kind.String(), ReadDone: m.at, Start: t0, End: t1})
			prevEnd = t1
			rs.IODur = m.at
			if err != nil {
				return fail(fmt.Errorf("serve: layer %d of %s/%s: %w", m.layer, req.NS, req.ID, err))
			}
			continue
		}
		if cd != state.CodecNone {
			// Decode on the host into the consumer's dtype and give the
			// store its buffer back at once.
			dec, err := decodeRows(r.backend.Config(), cd, lp.Kind, m.rows, n)
			rd.release(m)
			rs.DecodeDur += since() - t0
			if err != nil {
				return fail(fmt.Errorf("serve: layer %d of %s/%s: %w", m.layer, req.NS, req.ID, err))
			}
			rows, release = dec, nil
		}
		var err error
		if lp.Kind == state.LayerHidden {
			err = dev.Hidden(m.layer, rows, release)
		} else {
			err = dev.KV(m.layer, rows, release)
		}
		t1 := since()
		rs.ProjectDur += t1 - t0
		rs.Layers = append(rs.Layers, LayerTiming{Layer: m.layer, Kind: lp.Kind.String(), ReadDone: m.at, Start: t0, End: t1})
		prevEnd = t1
		rs.IODur = m.at
		if err != nil {
			return fail(fmt.Errorf("serve: layer %d of %s/%s: %w", m.layer, req.NS, req.ID, err))
		}
	}
	res, err := r.settle(dev, rd, &rs, "restore of", req.NS, req.ID)
	if err != nil {
		return rs, err
	}
	if nr > 0 && res.tokens != len(req.Tokens) {
		return rs, fmt.Errorf("%w: %d token ids given, %s/%s holds %d tokens", ErrTokens, len(req.Tokens), req.NS, req.ID, res.tokens)
	}
	rs.Tokens = res.tokens
	rs.Elapsed = since()
	rs.PeakBufferedBytes = rd.held.peakBytes()
	return rs, nil
}

// StreamRequest names a context whose stored layers Stream hands onward.
type StreamRequest struct {
	NS, ID string
	Ident  *state.Identity
	// Project turns hidden layers into K|V rows through the backend
	// before they are handed on; KV layers go as stored.
	Project bool
	// ByTokens streams by tokens, as Request.ByTokens: the longest stored
	// prefix of Tokens in NS under Salt and Ident (plus context ID's
	// matching tail when ID is set); the sink is never called when
	// nothing is stored (RestoreStats.Tokens 0, no error).
	ByTokens bool
	Tokens   []int
	Salt     []byte
}

// StreamLayer is one layer handed to a Stream sink.
type StreamLayer struct {
	Layer int
	// Kind is the kind of Rows: as stored, or LayerKV once projected.
	Kind     state.LayerKind
	Rows     []byte // valid until the sink returns
	RowBytes int
	Tokens   int
	// ReadDone is when the layer's read completed, and Compute the time
	// its projection took (0 when handed on as stored).
	ReadDone time.Duration
	Compute  time.Duration
}

// Stream restores a context's stored layers to sink, in the store's order,
// as their reads complete (a recomputed prefix stores nothing and is the
// receiver's to recompute): the daemon's restore, which sends each layer to
// its client inline or through a shared region. With req.Project, hidden
// layers are projected to K|V rows ([tokens x 2 x kv_dim]: K then V) by the
// backend into a host cache first. The source keeps reading the next layers
// (its own read-ahead bound) while the sink sends one. A sink error ends the
// stream with it.
func (r *Restorer) Stream(req StreamRequest, sink func(StreamLayer) error) (RestoreStats, error) {
	var rs RestoreStats
	if req.Ident == nil {
		return rs, fmt.Errorf("serve: stream of %s/%s without an identity", req.NS, req.ID)
	}
	plan := req.Ident.Plan
	cd := req.Ident.Codec
	var c *model.Config
	if req.Project {
		if r.backend == nil {
			return rs, fmt.Errorf("serve: projected stream of %s/%s without a backend", req.NS, req.ID)
		}
		c = r.backend.Config()
		if err := CheckPlanCodec(c, plan, cd); err != nil {
			return rs, err
		}
	}
	var (
		ps PrefixSource
		p  Prefix
	)
	if req.ByTokens {
		var n int
		var err error
		if ps, p, n, err = r.byTokens(req.NS, req.ID, req.Ident, req.Tokens, req.Salt); err != nil {
			return rs, err
		}
		if n == 0 {
			return rs, nil
		}
	}
	q0 := time.Now()
	r.admit.acquire()
	defer r.admit.release()
	start := time.Now()
	rs.QueueWait = start.Sub(q0)
	since := func() time.Duration { return time.Since(start) }
	rd := r.startReads(r.reader(req.NS, req.ID, req.Ident, ps, p), req.Ident, 0, since)

	// The projection's scratch: one block of the context's tokens, shared
	// by every layer's slot of the host cache (each layer is read out
	// before the next is written).
	var (
		dev     gpu.Restore
		scratch *gpu.PagedKV
		out     []byte
	)
	fail := func(err error) (RestoreStats, error) {
		if dev != nil {
			dev.Abort()
			dev.Wait()
		}
		res := rd.drain()
		if err == nil {
			err = res.err
		}
		return rs, err
	}
	for m := range rd.msgs {
		lp := plan[m.layer]
		l := StreamLayer{Layer: m.layer, Kind: lp.Kind, Rows: m.rows, RowBytes: int(lp.RowBytes), ReadDone: m.at}
		l.Tokens = len(m.rows) / l.RowBytes
		rs.ReadBytes += int64(len(m.rows))
		if req.Project && lp.Kind == state.LayerHidden && l.Tokens == 0 {
			l.Kind, l.RowBytes = state.LayerKV, c.KVRowBytes() // nothing to project
		}
		if req.Project && cd != state.CodecNone && l.Tokens > 0 {
			// A projected stream hands on rows in the model dtype: decode
			// both kinds (hidden before projecting, KV as they go).
			t0 := since()
			dec, err := decodeRows(c, cd, lp.Kind, m.rows, l.Tokens)
			rd.release(m)
			rs.DecodeDur += since() - t0
			if err != nil {
				return fail(fmt.Errorf("serve: layer %d of %s/%s: %w", m.layer, req.NS, req.ID, err))
			}
			m = layerMsg{layer: m.layer, rows: dec, at: m.at, release: func() {}}
			rd.held.add(int64(len(dec))) // released (subtracted) like a stored buffer
			l.Rows = dec
			if lp.Kind == state.LayerKV {
				l.RowBytes = c.KVRowBytes()
			}
		}
		if req.Project && lp.Kind == state.LayerHidden && l.Tokens > 0 {
			t0 := since()
			if dev == nil {
				var err error
				if scratch, err = gpu.NewPagedKV(c, l.Tokens, 1); err == nil {
					positions := make([]int, l.Tokens)
					for i := range positions {
						positions[i] = i
					}
					host := make(gpu.HostCache, len(plan))
					for i := range host {
						host[i] = scratch
					}
					dev, err = r.backend.BeginRestore(host, positions)
					out = make([]byte, l.Tokens*c.KVRowBytes())
				}
				if err != nil {
					rd.release(m)
					return fail(fmt.Errorf("serve: project %s/%s on the %s backend: %w", req.NS, req.ID, r.backend.Name(), err))
				}
			}
			if len(out) != l.Tokens*c.KVRowBytes() {
				rd.release(m)
				return fail(fmt.Errorf("serve: layer %d of %s/%s holds %d tokens, earlier layers %d", m.layer, req.NS, req.ID, l.Tokens, len(out)/c.KVRowBytes()))
			}
			// A host cache's layer is written when Hidden returns.
			if err := dev.Hidden(m.layer, m.rows, func() { rd.release(m) }); err != nil {
				return fail(fmt.Errorf("serve: project layer %d of %s/%s: %w", m.layer, req.NS, req.ID, err))
			}
			half := c.KVRowBytes() / 2
			for i := 0; i < l.Tokens; i++ {
				copy(out[i*2*half:], scratch.K[i*half:(i+1)*half])
				copy(out[i*2*half+half:], scratch.V[i*half:(i+1)*half])
			}
			l.Kind, l.Rows, l.RowBytes, l.Compute = state.LayerKV, out, c.KVRowBytes(), since()-t0
			if err := sink(l); err != nil {
				return fail(err)
			}
			continue
		}
		err := sink(l)
		rd.release(m)
		if err != nil {
			return fail(err)
		}
	}
	res, err := r.settle(dev, rd, &rs, "project", req.NS, req.ID)
	if err != nil {
		return rs, err
	}
	rs.Tokens = res.tokens
	rs.Elapsed = since()
	rs.PeakBufferedBytes = rd.held.peakBytes()
	return rs, nil
}

// decodeRows decodes n rows of a layer stored under codec cd into the model
// dtype: a hidden row is one segment of hidden_size values, a KV row K then V
// segments of kv_dim values.
func decodeRows(c *model.Config, cd state.Codec, kind state.LayerKind, rows []byte, n int) ([]byte, error) {
	segs, vals, out := 1, c.HiddenSize, c.HiddenRowBytes()
	if kind == state.LayerKV {
		segs, vals, out = 2, c.KVDim(), c.KVRowBytes()
	}
	dst := make([]byte, n*out)
	if err := codec.TranscodeRows(cd, c.DType, dst, rows, segs, vals); err != nil {
		return nil, err
	}
	return dst, nil
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
