package chunk

import (
	"errors"
	"fmt"
	"sync"

	"github.com/hcache/hcache/chunk/format"
	"github.com/hcache/hcache/lsm"
)

// Writer appends rows to one context. It is not safe for concurrent use; use
// one Writer per context (many Writers may run at once).
type Writer struct {
	// mu is held by each method: a Writer is used by one goroutine, but
	// Store.Close may abandon it from another (its slabs are unmapped).
	mu         sync.Mutex
	s          *Store
	c          *ctxState
	ct         int
	rowBytes   []int // per layer
	layerOff   []int // per layer: offset of its slice in a group slab
	groupBytes int
	groups     map[uint32][]byte // staged groups not yet handed over
	cur        []byte            // slab of the group AppendToken fills
	curGroup   uint32
	layerTok   []int  // tokens appended per stored layer (index: slice index)
	tokens     int    // min over layerTok: complete tokens
	handed     int    // tokens in full groups handed to the flusher
	seq        uint64 // its number among the context's writers (ctxState.writerSeq)
	closed     bool
	closeErr   error // what Close returned; later calls return it again
	// Token-addressed writers (prefix.go): the ids of tokens [idBase,
	// idBase+len(ids)) and the key of the last full group handed over.
	tok    bool
	idBase int
	ids    []uint32
	parent ChainKey
	// tipRecorded: the tip that the context's last tail or tip record
	// (indexed or handed over) names.
	tipRecorded ChainKey
}

// CreateOptions are per-context settings.
type CreateOptions struct {
	Pinned bool // never evicted
	// Salt (CreateTokens) is mixed into the chain's root: only lookups
	// with the same salt share the context's groups (nil: none).
	Salt []byte
}

// Create creates a context and returns its writer. The context becomes
// durable (with the rows appended so far) at the writer's first Flush.
func (s *Store) Create(ns, id string, ident *Identity, opts CreateOptions) (*Writer, error) {
	if err := lsm.ValidateName("namespace", ns); err != nil {
		return nil, fmt.Errorf("chunk: %w", err)
	}
	if err := lsm.ValidateName("context id", id); err != nil {
		return nil, fmt.Errorf("chunk: %w", err)
	}
	if ident == nil {
		return nil, fmt.Errorf("%w: Create %s/%s with a nil identity", ErrIdentity, ns, id)
	}
	if err := ident.Validate(); err != nil {
		return nil, err
	}
	ident = &Identity{Model: append([]byte(nil), ident.Model...), Plan: append([]LayerPlan(nil), ident.Plan...), Codec: ident.Codec}
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.writable(); err != nil {
		return nil, err
	}
	if c := s.ctxs[ctxMapKey(ns, id)]; c != nil && !c.deleted {
		return nil, fmt.Errorf("%w: %s/%s", ErrExists, ns, id)
	}
	c := &ctxState{ns: ns, id: id, lastUse: s.opts.Now(), useDirty: true, writerSeq: 1}
	c.rec = lsm.Context{Identity: ident.Encode(), Gen: s.nextGen}
	s.nextGen++
	if opts.Pinned {
		c.rec.Flags |= lsm.FlagPinned
	}
	c.setIdentity(ident)
	s.markDirty(c)
	s.ctxs[ctxMapKey(ns, id)] = c
	w := s.newWriter(c)
	w.seq = c.writerSeq
	c.writer = w
	return w, nil
}

// Append opens a writer that continues an existing context (the next turn of
// a conversation). ident must match the stored identity. A partial tail group
// is read back into staging so that new rows complete it.
//
// If the context's previous writer was abandoned (Writer.Abandon, or a store
// error) while whole groups it had handed to the flusher were not yet
// committed, Append first waits for the flusher to commit them (or fail
// them): the new writer then starts from, and Tokens reports, exactly the
// count a restore sees. It never writes over groups still in flight.
func (s *Store) Append(ns, id string, ident *Identity) (*Writer, error) {
	if ident == nil {
		return nil, fmt.Errorf("%w: Append %s/%s with a nil identity", ErrIdentity, ns, id)
	}
	s.mu.Lock()
	if err := s.writable(); err != nil {
		s.mu.Unlock()
		return nil, err
	}
	c, err := s.lookup(ns, id)
	if err != nil {
		s.mu.Unlock()
		return nil, err
	}
	if c.rec.Flags&lsm.FlagDamaged != 0 || c.ident == nil {
		s.mu.Unlock()
		return nil, fmt.Errorf("%w: %s/%s", ErrDamaged, ns, id)
	}
	if !c.ident.Equal(ident) {
		s.mu.Unlock()
		return nil, fmt.Errorf("%w: %s/%s", ErrIdentityMismatch, ns, id)
	}
	if c.writer != nil {
		s.mu.Unlock()
		return nil, fmt.Errorf("%w: %s/%s", ErrBusy, ns, id)
	}
	w := s.newWriter(c)
	c.writer = w // no other writer opens the context from here on
	wait := c.pending > 0
	s.restores.Add(1) // Close waits for the wait and the tail read below
	s.mu.Unlock()
	defer s.restores.Done()
	if wait {
		// The error of an abandoned writer's own group write is not
		// this writer's: it starts from what was committed.
		_ = s.barrier(c)
	}
	s.mu.Lock()
	err = s.writable()
	if err == nil && c.deleted {
		err = fmt.Errorf("%w: %s/%s was deleted", ErrNotFound, ns, id)
	}
	if err == nil && !s.invariant(c.pending == 0, "Append of %s/%s found %d groups of an earlier writer uncommitted after waiting for them", ns, id, c.pending) {
		err = s.brokenErr()
	}
	if err != nil {
		s.mu.Unlock()
		w.abandon(err)
		return nil, err
	}
	c.writerSeq++
	w.seq = c.writerSeq
	c.writeErr = nil // a failed writer's unflushed rows are gone; start again from what is durable
	tokens := int(c.rec.Tokens)
	c.lastUse = s.opts.Now()
	c.useDirty = true // persisted with the next index commit
	s.dirtyCtxs[c] = struct{}{}
	s.mu.Unlock()

	w.tokens, w.handed = tokens, tokens-tokens%w.ct
	if w.tok {
		s.mu.Lock()
		w.idBase, w.ids, w.parent = w.handed, append([]uint32(nil), c.rec.TailIDs...), c.rec.Tip
		s.mu.Unlock()
		w.tipRecorded = w.parent
		if tokens > 0 && tokens%w.ct == 0 {
			// No tail: a tip record at the full group count names the
			// context's extent, unless none was written (a context
			// whose groups were all stored already, its writer
			// abandoned before Close) or a full group superseded it
			// (an abandoned writer's groups committed). Then Close
			// writes one, so that repair finds the context (an index
			// read error counts as none: a tip too many is harmless).
			if _, err := s.db.GetChunk(ns, id, uint32(tokens/w.ct)); err != nil {
				w.tipRecorded = ChainKey{}
			}
		}
	}
	for i := range w.layerTok {
		w.layerTok[i] = tokens
	}
	if tail := tokens % w.ct; tail != 0 {
		g := uint32(tokens / w.ct)
		slab, err := w.group(g)
		if err != nil {
			w.abandon(err)
			return nil, err
		}
		// Read the stored tail rows of every layer back into the slab.
		_, err = s.restoreGroupInto(c, g, tail, func(layer int, rows []byte) {
			copy(slab[w.layerOff[layer]:], rows)
		})
		if err != nil {
			w.abandon(err)
			return nil, err
		}
	}
	return w, nil
}

func (s *Store) writable() error {
	if s.closed {
		return ErrClosed
	}
	if s.readOnly {
		return ErrReadOnly
	}
	if s.failed != nil {
		return fmt.Errorf("chunk: store failed earlier and refuses writes: %w", s.failed)
	}
	return s.brokenErr()
}

func (s *Store) newWriter(c *ctxState) *Writer {
	w := &Writer{s: s, c: c, ct: s.ct, groups: map[uint32][]byte{}, curGroup: math32}
	w.rowBytes = make([]int, len(c.ident.Plan))
	w.layerOff = make([]int, len(c.ident.Plan))
	off := 0
	for l, p := range c.ident.Plan {
		w.rowBytes[l] = int(p.RowBytes)
		w.layerOff[l] = off
		off += format.RoundUp(s.ct * int(p.RowBytes))
	}
	w.groupBytes = off
	w.layerTok = make([]int, len(c.stored))
	w.tok = c.tokCtx()
	return w
}

const math32 = ^uint32(0)

// Tokens is the number of complete tokens appended (durable or not).
func (w *Writer) Tokens() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.tokens
}

func (w *Writer) group(g uint32) ([]byte, error) {
	if b, ok := w.groups[g]; ok {
		return b, nil
	}
	b, err := w.s.staging.get(w.groupBytes)
	if err != nil {
		return nil, err
	}
	w.groups[g] = b
	return b, nil
}

func (w *Writer) check() error {
	if w.s.closedFlag.Load() {
		return ErrClosed
	}
	if w.closed {
		return errors.New("chunk: writer is closed")
	}
	return w.s.brokenErr()
}

// AppendLayer appends rows (whole rows of the layer's RowBytes) for the next
// tokens of one layer: the prefill producer, which hands over all tokens of
// layer 0, then layer 1, and so on.
func (w *Writer) AppendLayer(layer int, rows []byte) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if err := w.check(); err != nil {
		return err
	}
	if layer < 0 || layer >= len(w.rowBytes) {
		return fmt.Errorf("chunk: layer %d out of range [0, %d)", layer, len(w.rowBytes))
	}
	si := w.c.sliceOf[layer]
	if si < 0 {
		return fmt.Errorf("chunk: layer %d stores nothing in this context's plan", layer)
	}
	rb := w.rowBytes[layer]
	if len(rows)%rb != 0 {
		return fmt.Errorf("%w: layer %d: %d bytes is not a whole number of %d-byte rows", ErrRowSize, layer, len(rows), rb)
	}
	t := w.layerTok[si]
	if end := t + len(rows)/rb; end > w.idLimit() {
		return w.tooFar(end)
	}
	// Take every slab the rows need before copying any, so that a failure
	// (ErrStagingFull) appends nothing and a retry stores the rows where
	// they belong.
	if n := len(rows) / rb; n > 0 {
		var taken []uint32
		for g := uint32(t / w.ct); g <= uint32((t+n-1)/w.ct); g++ {
			if _, ok := w.groups[g]; ok {
				continue
			}
			if _, err := w.group(g); err != nil {
				for _, tg := range taken {
					w.s.staging.put(w.groups[tg])
					delete(w.groups, tg)
				}
				return err
			}
			taken = append(taken, g)
		}
	}
	for len(rows) > 0 {
		g := uint32(t / w.ct)
		slab := w.groups[g]
		in := t % w.ct
		n := min(w.ct-in, len(rows)/rb)
		copy(slab[w.layerOff[layer]+in*rb:], rows[:n*rb])
		rows = rows[n*rb:]
		t += n
		w.layerTok[si] = t
	}
	return w.advance()
}

// AppendToken appends one token's row for every layer (the decode producer):
// rows[l] is layer l's row, nil for layers that store nothing.
func (w *Writer) AppendToken(rows [][]byte) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if err := w.check(); err != nil {
		return err
	}
	if len(rows) != len(w.rowBytes) {
		return fmt.Errorf("chunk: AppendToken got %d layers, the plan has %d", len(rows), len(w.rowBytes))
	}
	t := w.tokens
	if t+1 > w.idLimit() {
		return w.tooFar(t + 1)
	}
	for _, lt := range w.layerTok {
		if lt != t {
			return fmt.Errorf("chunk: AppendToken while a prefill is incomplete (layers at %d and %d tokens)", t, lt)
		}
	}
	for l, r := range rows {
		if len(r) != w.rowBytes[l] {
			return fmt.Errorf("%w: layer %d row is %d bytes, want %d", ErrRowSize, l, len(r), w.rowBytes[l])
		}
	}
	g := uint32(t / w.ct)
	if g != w.curGroup {
		slab, err := w.group(g)
		if err != nil {
			return err
		}
		w.cur, w.curGroup = slab, g
	}
	in := t % w.ct
	for l, r := range rows {
		rb := w.rowBytes[l]
		if len(r) != rb {
			return fmt.Errorf("%w: layer %d row is %d bytes, want %d", ErrRowSize, l, len(r), rb)
		}
		if rb != 0 {
			copy(w.cur[w.layerOff[l]+in*rb:], r)
		}
	}
	for i := range w.layerTok {
		w.layerTok[i]++
	}
	w.tokens++
	if w.tokens%w.ct == 0 {
		return w.handFull()
	}
	return nil
}

// advance recomputes the complete token count and hands over full groups.
func (w *Writer) advance() error {
	t := w.layerTok[0]
	for _, lt := range w.layerTok[1:] {
		t = min(t, lt)
	}
	w.tokens = t
	return w.handFull()
}

// handFull gives every full group to the flusher (which returns its slab).
func (w *Writer) handFull() error {
	for w.handed+w.ct <= w.tokens {
		g := uint32(w.handed / w.ct)
		slab := w.groups[g]
		delete(w.groups, g)
		if g == w.curGroup {
			w.cur, w.curGroup = nil, math32
		}
		w.s.staging.handOff(1)
		o := op{group: g, tokens: w.ct, slab: slab, groupBytes: w.groupBytes, layerOff: w.layerOff, owned: true}
		if w.tok {
			o.chain = w.chainGroupOp(g)
		}
		if err := w.submitGroup(o); err != nil {
			w.s.staging.handOff(-1)
			w.s.staging.put(slab)
			return err
		}
		w.handed += w.ct
	}
	return nil
}

// submitGroup hands one group write to the flusher, counted as pending on
// the context until a commit has dealt with it.
func (w *Writer) submitGroup(o op) error {
	s := w.s
	o.kind, o.c, o.wseq = opWrite, w.c, w.seq
	s.mu.Lock()
	w.c.pending++
	s.mu.Unlock()
	if err := s.submit(o); err != nil {
		s.mu.Lock()
		w.c.pending--
		s.mu.Unlock()
		return err
	}
	return nil
}

// Flush makes every complete token appended so far durable (data and index)
// and returns after that, or with the error that prevented it.
func (w *Writer) Flush() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.flushLocked()
}

func (w *Writer) flushLocked() error {
	if err := w.check(); err != nil {
		return err
	}
	if err := w.deletedErr(); err != nil {
		return err
	}
	if tail := w.tokens - w.handed; tail > 0 {
		g := uint32(w.handed / w.ct)
		o := op{group: g, tokens: tail, slab: w.groups[g], groupBytes: w.groupBytes, layerOff: w.layerOff}
		if w.tok {
			o.chain = &chainOp{parent: w.parent, ids: append([]uint32(nil), w.ids[:tail]...)}
		}
		if err := w.submitGroup(o); err != nil {
			return err
		}
		w.tipRecorded = w.parent // the tail record names it
	} else if w.tok && w.handed > 0 && w.parent != w.tipRecorded {
		// No tail: a tip record names the chain's new tip, so that
		// repair finds this context (prefix_write.go startTip).
		o := op{group: uint32(w.handed / w.ct), chain: &chainOp{tip: true, key: w.parent}}
		if err := w.submitGroup(o); err != nil {
			return err
		}
		w.tipRecorded = w.parent
	}
	if err := w.s.barrier(w.c); err != nil {
		return err
	}
	return w.deletedErr()
}

// deletedErr is ErrNotFound once the writer's context was deleted (or
// evicted): nothing it appends can become durable.
func (w *Writer) deletedErr() error {
	w.s.mu.Lock()
	defer w.s.mu.Unlock()
	if w.c.deleted {
		return fmt.Errorf("%w: %s/%s was deleted", ErrNotFound, w.c.ns, w.c.id)
	}
	return nil
}

// ErrIncompleteTokens is wrapped by Close's error when tokens were appended
// in only some layers: the complete ones are stored, those are not.
var ErrIncompleteTokens = errors.New("chunk: tokens appended in only some layers are not stored")

// Close flushes and releases the writer's staging memory. Tokens appended
// in only some of the stored layers are dropped, and Close says so
// (ErrIncompleteTokens, naming them) after storing the complete ones.
// Calling it again returns the first call's result.
func (w *Writer) Close() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.closed {
		return w.closeErr
	}
	err := w.flushLocked()
	if err == nil {
		err = w.incompleteErr()
	}
	if err == nil {
		// A saved context is restored later: have its restore buffers
		// mapped in huge pages now, off any restore's path.
		if ahead, layer := w.s.restoreBuffers(w.c, w.tokens); layer > 0 {
			w.s.readBufs.prepare(layer, ahead)
		}
	}
	w.abandonLocked()
	w.closeErr = err
	return err
}

// incompleteErr names the tokens appended in only some stored layers.
func (w *Writer) incompleteErr() error {
	most, layer := w.tokens, -1
	for si, lt := range w.layerTok {
		if lt > most {
			most, layer = lt, w.c.stored[si]
		}
	}
	if layer < 0 {
		return nil
	}
	return fmt.Errorf("%w: %s/%s: tokens [%d, %d) (layer %d has %d tokens, the context %d complete ones) were lost; append every stored layer of a token before Close",
		ErrIncompleteTokens, w.c.ns, w.c.id, w.tokens, most, layer, most, w.tokens)
}

// abandon releases the writer without flushing (see Abandon for what
// becomes durable); later calls fail with err.
func (w *Writer) abandon(err error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.closed {
		w.abandonLocked()
		w.closeErr = err
	}
}

func (w *Writer) abandonLocked() {
	w.closed = true
	for g, b := range w.groups {
		w.s.staging.put(b)
		delete(w.groups, g)
	}
	w.s.mu.Lock()
	if w.c.writer == w {
		w.c.writer = nil
	}
	w.s.mu.Unlock()
}
