package chunk

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"

	"github.com/hcache/hcache/chunk/format"
	"github.com/hcache/hcache/lsm"
	"github.com/hcache/hcache/state"
)

// Token-addressed state (issue 19): the store side of prefix sharing. See
// the package doc ("Prefix-addressed state") for the API's contract.

// ChainKey is the key of one group of a token chain (state.ChainKey).
type ChainKey = state.ChainKey

// ErrTokens is wrapped by errors about token ids: rows appended for
// tokens whose ids the writer was not given, a token list that does not
// match what is stored.
var ErrTokens = errors.New("chunk: token ids")

// ErrCollision is wrapped by the error of a group whose chain key is stored
// for other tokens (a hash collision, or a bug computing keys): nothing is
// written over it and nothing of it is served.
var ErrCollision = errors.New("chunk: chain key collision")

// groupEnt is a shared group in memory. Fields are guarded by Store.mu.
type groupEnt struct {
	ns     string
	key    ChainKey
	parent ChainKey
	index  uint32
	digest [16]byte
	// sum is a CRC-32C of its token ids: Lookup's cheap check (restores
	// and references compare digest).
	sum    uint32
	seg    uint32 // committed: where its record is
	length uint32 // committed: its record's bytes
	// refs counts the live token-addressed contexts whose committed chain
	// reaches the group (derived at Open from the context records).
	refs int
	// pending counts the jobs handed to the flusher and not yet through a
	// commit that reference the group (the one writing it included): a
	// group is dropped only with refs and pending both 0.
	pending   int
	committed bool
	failed    bool      // its write failed: never committed, dropped once unpinned
	writer    *writeJob // the job writing it (until its commit)
	// lastUse is when a restore by tokens last served it (0: none since
	// Open), in memory only: eviction ranks the context holding its last
	// reference by it (evict.go).
	lastUse int64
}

// gid names a shared group: chain keys already bind the namespace, and
// the table keys by it too, so namespaces never share an entry even under
// a forced collision.
type gid struct {
	ns  string
	key ChainKey
}

// chainOp is the token part of a write op of a token-addressed context.
type chainOp struct {
	// A group op (a full group, written or referenced): key and parent.
	key, parent ChainKey
	// ids: a group op's ChunkTokens token ids, or a tail op's.
	ids []uint32
	// refs: a reference op (CreateTokens' stored prefix, Fork): the
	// groups (in chain order, from op.group) the context takes on
	// without writing anything; pinned (pending) when the op was built.
	refs []*groupEnt
	// ent: a group op's entry, set by the flusher (pinned there).
	ent *groupEnt
	// tip: a tip record (no rows) naming key as the context's tip, at
	// chunk key op.group (where a tail would be): repair finds a context
	// without a tail through it.
	tip bool
	// wrote: the group op writes ent's record (not a reference), whose
	// checksums start from bind (the group binding).
	wrote bool
	bind  Binding
	// kept: a tail or tip op's context's chunk keys below its group,
	// read at commit (keptRecords): an earlier tail or tip record kept
	// live as the newest durable record naming the context, which this
	// op's record replaces once durable.
	kept []keptRec
}

// keptRec is a chunk key of a token-addressed context below its full
// group count: a tail or tip record that a full group superseded, kept.
type keptRec struct {
	g  uint32
	ch *lsm.Chunk
}

// tokCtx reports whether c is token-addressed. Call with s.mu held or on
// a context no one else sees.
func (c *ctxState) tokCtx() bool { return c.rec.Flags&lsm.FlagTokens != 0 }

// chainOf returns the chain of c (token-addressed, with an identity).
func (s *Store) chainOf(ns string, salt []byte, ident *Identity) (state.Chain, error) {
	ch, err := state.NewChain(ns, salt, ident)
	if err != nil {
		return ch, fmt.Errorf("chunk: %w", err)
	}
	return ch, nil
}

// chainKeys computes the keys of tokens' full groups.
func (s *Store) chainKeys(ch state.Chain, tokens []uint32) []ChainKey {
	if s.keyFunc == nil {
		keys, _ := ch.Keys(tokens, s.ct)
		return keys
	}
	keys := make([]ChainKey, len(tokens)/s.ct)
	var parent ChainKey
	for i := range keys {
		parent = s.nextKey(ch, parent, tokens[i*s.ct:(i+1)*s.ct])
		keys[i] = parent
	}
	return keys
}

// ChainKeys returns the chain keys of the full groups of tokens in
// namespace ns under salt and ident, as this store computes them (the
// Options.ChainKeyFunc seam included): the remote tier names group objects
// by them.
func (s *Store) ChainKeys(ns string, salt []byte, ident *Identity, tokens []uint32) ([]ChainKey, error) {
	ch, err := s.chainOf(ns, salt, ident)
	if err != nil {
		return nil, err
	}
	return s.chainKeys(ch, tokens), nil
}

// nextKey is the key of the group of ids after parent: Chain.Next, or the
// keyFunc seam (tests force collisions through it).
func (s *Store) nextKey(ch state.Chain, parent ChainKey, ids []uint32) ChainKey {
	if s.keyFunc != nil {
		return s.keyFunc(ch, parent, ids)
	}
	return ch.Next(parent, ids)
}

// probe walks the chain of tokens group by group, computing each key only
// when the groups before it matched (no lock is held while hashing), and
// returns the leading groups stored in namespace ns (committed; with
// inFlight, also being written) whose token digests equal the request's:
// their keys and entries, pinned (pending) when pin is set, for a
// reference op. The first key not stored ends the walk: the stored groups
// of a chain are prefix-closed (a group lives only while a context's chain
// reaches it, and a chain reaching a group reaches every group before it),
// so no later key can be stored. Keys are chained, so a binary search would
// have to compute them all anyway; this walk costs a hash and a map probe
// per matched group, one more for the first miss. A digest that differs
// (a key collision) ends the walk with ErrCollision.
func (s *Store) probe(ns string, ch state.Chain, tokens []uint32, inFlight, pin bool) ([]ChainKey, []*groupEnt, error) {
	// A reference (pin) compares the token digest; a lookup the CRC-32C
	// (a restore then compares the digest before serving anything).
	strong := pin
	var keys []ChainKey
	var ents []*groupEnt
	var parent ChainKey
	var h state.ChainHasher
	for i := 0; i < len(tokens)/s.ct; i++ {
		ids := tokens[i*s.ct : (i+1)*s.ct]
		var k ChainKey
		if s.keyFunc != nil {
			k = s.keyFunc(ch, parent, ids)
		} else {
			k = h.Next(ch, parent, ids)
		}
		var d [16]byte
		var sum uint32
		if strong {
			d = h.TokensDigest(ids)
		} else {
			sum = tokensSum(ids)
		}
		s.mu.Lock()
		e := s.groups[gid{ns, k}]
		if e == nil || e.failed || !(e.committed || inFlight) {
			s.mu.Unlock()
			break
		}
		if strong && e.digest != d || !strong && e.sum != sum || e.index != uint32(i) {
			s.mu.Unlock()
			s.stats.collisions.Add(1)
			return keys, ents, fmt.Errorf("%w: group %d (key %v) is stored for other tokens", ErrCollision, i, k)
		}
		if pin {
			e.pending++
		}
		s.mu.Unlock()
		keys, ents = append(keys, k), append(ents, e)
		parent = k
	}
	return keys, ents, nil
}

// Prefix names token-addressed state: a namespace, an optional salt (nil
// for none), an identity and token ids. Context optionally names a
// token-addressed context of the namespace whose own partial tail may
// extend the shared groups' match (its tokens must match the request's).
type Prefix struct {
	Namespace string
	Salt      []byte
	Identity  *Identity
	Tokens    []uint32
	Context   string
}

// prefixMatch is what a lookup found: the leading full groups stored (their
// keys), and the named context's tail rows that extend them.
type prefixMatch struct {
	keys   []ChainKey  // the stored groups' keys (len = groups)
	ents   []*groupEnt // their entries as the lookup found them
	tail   int         // tokens of the named context's tail that match
	ctx    *ctxState   // the named context, when its tail matched
	tokens int
}

// match runs a lookup. Call without s.mu.
func (s *Store) match(p Prefix) (*prefixMatch, error) {
	if err := lsm.ValidateName("namespace", p.Namespace); err != nil {
		return nil, fmt.Errorf("chunk: %w", err)
	}
	if p.Context != "" {
		if err := lsm.ValidateName("context id", p.Context); err != nil {
			return nil, fmt.Errorf("chunk: %w", err)
		}
	}
	if p.Identity == nil {
		return nil, fmt.Errorf("%w: lookup in %s with a nil identity", ErrIdentity, p.Namespace)
	}
	ch, err := s.chainOf(p.Namespace, p.Salt, p.Identity)
	if err != nil {
		return nil, err
	}
	keys, ents, err := s.probe(p.Namespace, ch, p.Tokens, false, false)
	if err != nil {
		s.opts.Logf("chunk: lookup in %s: %v; the match stops before it", p.Namespace, err)
	}
	n := len(keys)
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil, ErrClosed
	}
	m := &prefixMatch{keys: keys, ents: ents, tokens: n * s.ct}
	if p.Context == "" {
		return m, nil
	}
	c := s.ctxs[ctxMapKey(p.Namespace, p.Context)]
	if c == nil || c.deleted || !c.tokCtx() || c.ident == nil || c.rec.Flags&lsm.FlagDamaged != 0 || !c.ident.Equal(p.Identity) || string(c.rec.Salt) != string(p.Salt) {
		return m, nil
	}
	full := int(c.rec.Tokens) / s.ct
	if full != n || len(c.rec.TailIDs) == 0 || (full > 0 && c.rec.Tip != keys[full-1]) {
		return m, nil
	}
	rest := p.Tokens[n*s.ct:]
	t := 0
	for t < len(rest) && t < len(c.rec.TailIDs) && rest[t] == c.rec.TailIDs[t] {
		t++
	}
	if t > 0 {
		m.tail, m.ctx, m.tokens = t, c, n*s.ct+t
	}
	return m, nil
}

// Lookup returns how many leading tokens of p.Tokens have stored state:
// whole groups of the namespace's shared chain (ChunkTokens each, from
// position 0), plus, when p.Context names a token-addressed context whose
// chain covers exactly those groups, the leading tokens of its own partial
// tail that match the request. A group whose stored token digest differs
// from the request's tokens (a key collision) ends the match. It reads
// memory only (no I/O).
func (s *Store) Lookup(p Prefix) (int, error) {
	m, err := s.match(p)
	if err != nil {
		return 0, err
	}
	return m.tokens, nil
}

// CreateTokens creates a token-addressed context (ns, id) for a prompt's
// tokens and returns its writer and stored: the number of leading tokens
// (whole groups) whose state the namespace already stores under this salt
// (opts.Salt) and identity, which the context references instead of
// writing. The writer expects rows from token stored on (AppendLayer,
// AppendToken); it knows the ids of tokens [0, len(tokens)), and rows of
// later tokens need their ids first (Writer.ExtendTokens,
// Writer.AppendTokenID). Each full group it hands to the flusher is
// written once per namespace: if its key is stored (or being written) by
// then, it is referenced, not written.
func (s *Store) CreateTokens(ns, id string, ident *Identity, tokens []uint32, opts CreateOptions) (*Writer, int, error) {
	ch, err := s.chainOf(ns, opts.Salt, ident)
	if err != nil {
		return nil, 0, err
	}
	w, err := s.Create(ns, id, ident, opts)
	if err != nil {
		return nil, 0, err
	}
	s.mu.Lock()
	c := w.c
	c.rec.Flags |= lsm.FlagTokens
	c.rec.Salt = append([]byte(nil), opts.Salt...)
	c.chain = ch
	c.ptip, c.ptail = ChainKey{}, nil
	s.mu.Unlock()
	keys, refs, err := s.probe(ns, ch, tokens, true, true)
	if err != nil {
		s.opts.Logf("chunk: create %s/%s: %v; written again from there", ns, id, err)
	}
	n := len(keys)
	stored := n * s.ct
	w.tok = true
	w.tokens, w.handed = stored, stored
	for i := range w.layerTok {
		w.layerTok[i] = stored
	}
	w.idBase, w.ids = stored, append([]uint32(nil), tokens[stored:]...)
	if n > 0 {
		s.stats.groupsDeduped.Add(uint64(n))
		w.parent = keys[n-1]
		if err := w.submitGroup(op{group: 0, tokens: stored, chain: &chainOp{refs: refs}}); err != nil {
			s.mu.Lock()
			s.unpinLocked(nil, refs)
			s.mu.Unlock()
			w.abandon(err)
			return nil, 0, err
		}
	}
	return w, stored, nil
}

// ExtendTokens gives a token-addressed writer the ids of the tokens after
// those it knows (decode: the next token's id before its rows).
func (w *Writer) ExtendTokens(ids []uint32) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if err := w.check(); err != nil {
		return err
	}
	if !w.tok {
		return fmt.Errorf("%w: %s/%s is not token-addressed", ErrTokens, w.c.ns, w.c.id)
	}
	w.ids = append(w.ids, ids...)
	return nil
}

// AppendTokenID is ExtendTokens([]uint32{id}) then AppendToken(rows) for a
// token-addressed writer, the decode producer's call.
func (w *Writer) AppendTokenID(id uint32, rows [][]byte) error {
	w.mu.Lock()
	if !w.tok {
		w.mu.Unlock()
		return fmt.Errorf("%w: %s/%s is not token-addressed", ErrTokens, w.c.ns, w.c.id)
	}
	if w.idBase+len(w.ids) == w.tokens {
		w.ids = append(w.ids, id)
	} else if k := w.tokens - w.idBase; k < 0 || k >= len(w.ids) || w.ids[k] != id {
		w.mu.Unlock()
		return fmt.Errorf("%w: %s/%s: token %d's id is %d, given %d", ErrTokens, w.c.ns, w.c.id, w.tokens, w.knownID(w.tokens), id)
	}
	w.mu.Unlock()
	return w.AppendToken(rows)
}

func (w *Writer) knownID(t int) int64 {
	if k := t - w.idBase; k >= 0 && k < len(w.ids) {
		return int64(w.ids[k])
	}
	return -1
}

// idLimit is the number of tokens whose rows a writer may take: all for a
// legacy context, those with known ids for a token-addressed one.
func (w *Writer) idLimit() int {
	if !w.tok {
		return int(^uint(0) >> 1)
	}
	return w.idBase + len(w.ids)
}

// tooFar is the error of rows past the known token ids.
func (w *Writer) tooFar(end int) error {
	return fmt.Errorf("%w: %s/%s: rows up to token %d, but the writer knows the ids of %d tokens (ExtendTokens first)", ErrTokens, w.c.ns, w.c.id, end, w.idLimit())
}

// chainGroupOp builds the op of full group g of a token-addressed writer
// (its ids consumed, its key computed) and advances the writer's parent.
func (w *Writer) chainGroupOp(g uint32) *chainOp {
	ids := w.ids[:w.ct:w.ct]
	key := w.s.nextKey(w.c.chain, w.parent, ids)
	co := &chainOp{key: key, parent: w.parent, ids: ids}
	w.parent = key
	w.ids = w.ids[w.ct:]
	w.idBase += w.ct
	return co
}

// Fork creates dst, a token-addressed context of namespace ns holding the
// first n tokens of src (token-addressed, not being written): dst
// references src's full groups among them and copies only the rows of a
// partial last group. It returns once dst is durable.
func (s *Store) Fork(ns, src, dst string, n int) error {
	if err := lsm.ValidateName("context id", dst); err != nil {
		return fmt.Errorf("chunk: %w", err)
	}
	s.mu.Lock()
	c, err := s.lookup(ns, src)
	if err == nil && (c.rec.Flags&lsm.FlagDamaged != 0 || c.ident == nil) {
		err = fmt.Errorf("%w: %s/%s", ErrDamaged, ns, src)
	}
	if err == nil && !c.tokCtx() {
		err = fmt.Errorf("%w: fork of %s/%s, which is not token-addressed", ErrTokens, ns, src)
	}
	if err == nil && (n < 0 || uint64(n) > c.rec.Tokens) {
		err = fmt.Errorf("%w: fork of %d tokens of %s/%s, which holds %d", ErrTokens, n, ns, src, c.rec.Tokens)
	}
	if err == nil && c.writer != nil {
		err = fmt.Errorf("%w: %s/%s", ErrBusy, ns, src)
	}
	var chain []*groupEnt
	var ident *Identity
	var salt []byte
	var srcTail []uint32
	var srcTokens int
	if err == nil {
		ident, salt, srcTail, srcTokens = c.ident, c.rec.Salt, c.rec.TailIDs, int(c.rec.Tokens)
		chain, err = s.chainLocked(c)
	}
	full := n / s.ct
	if err == nil {
		chain = chain[:full]
		for _, e := range chain {
			e.pending++
		}
		s.restores.Add(1)
	}
	s.mu.Unlock()
	if err != nil {
		return err
	}
	defer s.restores.Done()
	unpin := func() {
		s.mu.Lock()
		s.unpinLocked(nil, chain)
		s.mu.Unlock()
	}
	// The ids of the partial last group: src's tail, or a group's own.
	tail := n % s.ct
	var tailIDs []uint32
	if tail > 0 {
		if full == srcTokens/s.ct {
			tailIDs = srcTail[:tail]
		} else {
			s.mu.Lock()
			full2, _ := s.chainLocked(c)
			s.mu.Unlock()
			if len(full2) <= full {
				unpin()
				return fmt.Errorf("%w: %s/%s changed during the fork", ErrTokens, ns, src)
			}
			g, err := s.db.GetGroup(ns, full2[full].key)
			if err != nil {
				unpin()
				return fmt.Errorf("chunk: fork %s/%s: group %d: %w", ns, src, full, err)
			}
			tailIDs = g.IDs[:tail]
		}
	}
	w, err := s.Create(ns, dst, ident, CreateOptions{Salt: salt})
	if err != nil {
		unpin()
		return err
	}
	s.mu.Lock()
	d := w.c
	d.rec.Flags |= lsm.FlagTokens
	d.rec.Salt = append([]byte(nil), salt...)
	d.chain = c.chain
	s.mu.Unlock()
	w.tok = true
	w.tokens, w.handed = full*s.ct, full*s.ct
	for i := range w.layerTok {
		w.layerTok[i] = full * s.ct
	}
	w.idBase, w.ids = full*s.ct, append([]uint32(nil), tailIDs...)
	if full > 0 {
		w.parent = chain[full-1].key
		if err := w.submitGroup(op{group: 0, tokens: full * s.ct, chain: &chainOp{refs: chain}}); err != nil {
			unpin()
			w.abandon(err)
			return err
		}
	}
	if tail > 0 {
		slab, err := w.group(uint32(full))
		if err != nil {
			w.abandon(err)
			return err
		}
		if err := s.readGroupRows(c, full, tail, func(layer int, rows []byte) {
			copy(slab[w.layerOff[layer]:], rows)
		}); err != nil {
			w.abandon(err)
			s.deleteAfterFailedFork(ns, dst)
			return err
		}
		w.tokens = full*s.ct + tail
		for i := range w.layerTok {
			w.layerTok[i] = w.tokens
		}
	}
	if err := w.Close(); err != nil {
		s.deleteAfterFailedFork(ns, dst)
		return err
	}
	return nil
}

// deleteAfterFailedFork removes a fork's destination that could not be
// completed (best effort: it holds no acknowledged data).
func (s *Store) deleteAfterFailedFork(ns, id string) {
	if err := s.Delete(ns, id); err != nil && !errors.Is(err, ErrNotFound) {
		s.opts.Logf("chunk: removing the failed fork %s/%s: %v", ns, id, err)
	}
}

// chainLocked returns the committed chain of token-addressed c, group 0
// first, from its tip through the group table. Call with s.mu held.
func (s *Store) chainLocked(c *ctxState) ([]*groupEnt, error) {
	full := int(c.rec.Tokens) / s.ct
	out := make([]*groupEnt, full)
	k := ChainKey(c.rec.Tip)
	for i := full - 1; i >= 0; i-- {
		e := s.groups[gid{c.ns, k}]
		if e == nil || e.ns != c.ns || !e.committed || e.index != uint32(i) {
			return nil, fmt.Errorf("%w: %s/%s: group %d (key %v) of its chain is not stored", ErrCorrupt, c.ns, c.id, i, k)
		}
		out[i] = e
		k = e.parent
	}
	if full > 0 && !k.IsZero() {
		return nil, fmt.Errorf("%w: %s/%s: its chain's first group has a parent", ErrCorrupt, c.ns, c.id)
	}
	return out, nil
}

// unpinLocked drops the pins of jobs that are through (committed or
// failed) on ents; a group left with no reference and no pin is dropped:
// from memory, and (if committed) from the index in b with its bytes
// dead. b is nil only for ents a job never handed over. Call with s.mu
// held.
func (s *Store) unpinLocked(b *lsm.Batch, ents []*groupEnt) {
	for _, e := range ents {
		e.pending--
		s.invariant(e.pending >= 0, "group %v of %s: %d jobs pending after one finished", e.key, e.ns, e.pending)
		s.maybeDropLocked(b, e)
	}
}

// maybeDropLocked drops e if nothing references or pins it. Call with s.mu
// held.
func (s *Store) maybeDropLocked(b *lsm.Batch, e *groupEnt) {
	if e.refs > 0 || e.pending > 0 {
		return
	}
	if e.committed && b == nil {
		// No batch at hand (a writer giving up before its op reached
		// the flusher): the next commit drops it, unless taken again.
		s.dropLater = append(s.dropLater, e)
		return
	}
	if s.groups[gid{e.ns, e.key}] == e {
		delete(s.groups, gid{e.ns, e.key})
	}
	if !e.committed {
		return
	}
	e.committed = false
	b.DeleteGroup(e.ns, e.key)
	if rec := s.segRecs[e.seg]; rec != nil {
		s.invariant(rec.Live >= uint64(e.length), "segment %d: %d live bytes, less than the %d-byte group %v being dropped", e.seg, rec.Live, e.length, e.key)
		rec.Live -= min(rec.Live, uint64(e.length))
		s.groupSegTouched[e.seg] = true
	}
	s.live -= int64(e.length)
	s.groupBytes -= int64(e.length)
	s.groupCount--
	// Its slices in the DRAM tier are named by its record's place too:
	// they age out, and a group written again under the key misses them.
}

// releaseChainLocked drops a deleted (or evicted) token-addressed
// context's references: each group of its committed chain loses one, and
// those left unreferenced (and unpinned) are dropped in b. Call with s.mu
// held, in the batch that deletes the context.
func (s *Store) releaseChainLocked(b *lsm.Batch, c *ctxState) {
	if c.noRefs {
		return
	}
	k := ChainKey(c.rec.Tip)
	for i := int(c.rec.Tokens)/s.ct - 1; i >= 0; i-- {
		e := s.groups[gid{c.ns, k}]
		if e == nil || !e.committed {
			s.opts.Logf("chunk: %s/%s: group %d (key %v) of its chain is not stored; the rest of its chain keeps its references", c.ns, c.id, i, k)
			return
		}
		k = e.parent
		e.refs--
		s.invariant(e.refs >= 0, "group %v of %s: %d references after %s/%s released it", e.key, e.ns, e.refs, c.ns, c.id)
		s.maybeDropLocked(b, e)
	}
}

// loadGroups loads the group entries into the table and derives their
// reference counts from the token-addressed contexts' chains. A context
// whose chain is not stored whole is marked damaged; a group no context
// reaches is kept (recovery deletes nothing it cannot explain; fsck
// reports it).
func (s *Store) loadGroups() error {
	err := s.db.ScanGroups(func(ns string, key [32]byte, g *lsm.Group, err error) error {
		if err != nil {
			return err
		}
		e := &groupEnt{ns: ns, key: key, parent: g.Parent, index: g.Index, digest: g.Digest, sum: tokensSum(g.IDs), seg: g.Segment, length: g.Length, committed: true}
		s.groups[gid{ns, key}] = e
		s.groupBytes += int64(g.Length)
		s.groupCount++
		return nil
	})
	if err != nil {
		return fmt.Errorf("chunk: load groups: %w", err)
	}
	for _, c := range s.ctxs {
		if !c.tokCtx() || c.ident == nil {
			continue
		}
		chain, err := s.chainLocked(c)
		if err != nil {
			s.opts.Logf("chunk: %v; marked damaged", err)
			c.rec.Flags |= lsm.FlagDamaged
			c.noRefs = true
			continue
		}
		for _, e := range chain {
			e.refs++
			if s.segs[e.seg] == nil {
				c.rec.Flags |= lsm.FlagDamaged
			}
		}
	}
	return nil
}

// sharedBonusLocked is the eviction bonus of c (Options.EvictSharedBonus
// times the share of its bytes that other contexts also reference): 0 for
// a legacy context or one whose bytes are all its own. Call with s.mu held.
func (s *Store) sharedBonusLocked(c *ctxState) int64 {
	if s.opts.EvictSharedBonus <= 0 || !c.tokCtx() {
		return 0
	}
	chain, err := s.chainLocked(c)
	if err != nil {
		return 0
	}
	total, shared := c.live, int64(0)
	for _, e := range chain {
		total += int64(e.length)
		if e.refs > 1 {
			shared += int64(e.length)
		}
	}
	if total == 0 {
		return 0
	}
	return int64(float64(s.opts.EvictSharedBonus) * float64(shared) / float64(total))
}

// heldUseLocked is the latest restore by tokens (groupEnt.lastUse) of the
// shared groups whose last reference c holds, given the references
// released (by victims chosen before it): what deleting c would drop. 0
// when there is none. Call with s.mu held.
func (s *Store) heldUseLocked(c *ctxState, released map[*groupEnt]int) int64 {
	if !c.tokCtx() {
		return 0
	}
	chain, err := s.chainLocked(c)
	if err != nil {
		return 0
	}
	var used int64
	for _, e := range chain {
		if e.lastUse > used && e.refs-released[e] == 1 && e.pending == 0 {
			used = e.lastUse
		}
	}
	return used
}

// freedGroupsLocked is the bytes of shared groups whose last reference c
// holds, given the references released (by victims chosen before it),
// which it updates. Call with s.mu held.
func (s *Store) freedGroupsLocked(c *ctxState, released map[*groupEnt]int) int64 {
	if !c.tokCtx() {
		return 0
	}
	chain, err := s.chainLocked(c)
	if err != nil {
		return 0
	}
	var freed int64
	for _, e := range chain {
		released[e]++
		if e.refs-released[e] == 0 && e.pending == 0 {
			freed += int64(e.length)
		}
	}
	return freed
}

// tokensSum is the CRC-32C of token ids (little-endian u32s).
func tokensSum(ids []uint32) uint32 {
	var b [256]byte
	sum := uint32(0)
	for len(ids) > 0 {
		n := min(len(ids), len(b)/4)
		for i, t := range ids[:n] {
			binary.LittleEndian.PutUint32(b[4*i:], t)
		}
		sum = crc32.Update(sum, format.Castagnoli, b[:4*n])
		ids = ids[n:]
	}
	return sum
}
