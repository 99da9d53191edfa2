package remote

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"sync"

	"github.com/hcache/hcache/chunk"
	"github.com/hcache/hcache/chunk/format"
	"github.com/hcache/hcache/state"
)

// Tip objects (tip/NS/ID.hct): the by-name form of a named token-addressed
// context. Version 2 (written since 2026-12-03) makes a context object
// unnecessary: the tip object names the chain and carries the partial
// tail's rows, the group objects hold the rest, so a Close uploads only
// its new groups, the tail and the tip.
//
//	description: magic "HCTIP002" | version u16 (2) | reserved u16 |
//	  tokens u64 | tip key [32] | token digest [16] (state.TokensDigest of
//	  every token id) | namespace length u16 | id length u16 | salt length
//	  u16 | identity length u32 | layers u16 | namespace | id | salt |
//	  encoded identity | token ids (tokens x u32, all of them) | layers x
//	  (layer u16, bytes u64, crc u32) | crc32c u32 of the bytes before it
//	tail rows:   the stored layers' rows of the tail (the tokens past the
//	  last full group, tail x RowBytes each), in layer order
//
// A tail layer's checksum is format.SliceCRC of its rows seeded by
// chunk.NewBinding(namespace, id, tokens, identity) (the token count as the
// generation) and the tail's group index (full groups). A reader checks the
// description's checksum, version, names, identity, that the token digest
// is the ids', that the tip key is the last chain key the ids compute (with
// the salt) and the object's size; then every group object it reaches is
// verified against the request as a promotion's (size, description, token
// ids, checksums) and every tail layer against its checksum before
// anything is written locally. A torn upload leaves no object (a PUT is
// visible only once whole) and the previous tip stays; a corrupt or
// truncated tip, or a group it reaches that is missing or corrupt, imports
// nothing (a miss or ErrCorrupt: the local store keeps what it had).
//
// Version 1 ("HCTIP001", written before) names only the chain and the
// tail ids: its rows are in the context's by-name objects (manifest and
// context object), which a reader of such a context uses. remote gc reads
// both versions.

const (
	magicTip2  = "HCTIP002"
	tipVersion = 2
	// maxTipObject bounds a whole tip object a reader accepts (the
	// description and a partial group's rows).
	maxTipObject = 1 << 32
)

// tipDesc is a tip object's description (either version).
type tipDesc struct {
	version uint16
	ns, id  string
	salt    []byte
	ident   *chunk.Identity
	tokens  uint64
	tip     chunk.ChainKey
	tail    []uint32 // the tail's token ids
	// version 2
	ids    []uint32 // every token id
	digest [16]byte
	layers []LayerRef // the tail's stored layers (Bytes, CRC)
	end    int        // description bytes
}

// encode writes a version-2 description.
func (t *tipDesc) encode() []byte {
	ident := t.ident.Encode()
	var p []byte
	p = append(p, magicTip2...)
	p = binary.LittleEndian.AppendUint16(p, tipVersion)
	p = binary.LittleEndian.AppendUint16(p, 0)
	p = binary.LittleEndian.AppendUint64(p, t.tokens)
	p = append(p, t.tip[:]...)
	p = append(p, t.digest[:]...)
	p = binary.LittleEndian.AppendUint16(p, uint16(len(t.ns)))
	p = binary.LittleEndian.AppendUint16(p, uint16(len(t.id)))
	p = binary.LittleEndian.AppendUint16(p, uint16(len(t.salt)))
	p = binary.LittleEndian.AppendUint32(p, uint32(len(ident)))
	p = binary.LittleEndian.AppendUint16(p, uint16(len(t.layers)))
	p = append(p, t.ns...)
	p = append(p, t.id...)
	p = append(p, t.salt...)
	p = append(p, ident...)
	p = appendU32s(p, t.ids)
	p = appendLayerRefs(p, t.layers)
	return seal(p)
}

// encodeV1 writes a version-1 tip object (the form older builds wrote;
// kept for the tests that check it is still read).
func (t *tipDesc) encodeV1() []byte {
	ident := t.ident.Encode()
	var p []byte
	p = append(p, magicTip1...)
	p = binary.LittleEndian.AppendUint16(p, 1)
	p = binary.LittleEndian.AppendUint16(p, 0)
	p = binary.LittleEndian.AppendUint64(p, t.tokens)
	p = append(p, t.tip[:]...)
	p = binary.LittleEndian.AppendUint16(p, uint16(len(t.ns)))
	p = binary.LittleEndian.AppendUint16(p, uint16(len(t.id)))
	p = binary.LittleEndian.AppendUint16(p, uint16(len(t.salt)))
	p = binary.LittleEndian.AppendUint32(p, uint32(len(ident)))
	p = binary.LittleEndian.AppendUint32(p, uint32(len(t.tail)))
	p = append(p, t.ns...)
	p = append(p, t.id...)
	p = append(p, t.salt...)
	p = append(p, ident...)
	p = appendU32s(p, t.tail)
	return seal(p)
}

// rowBytes is the tail rows' bytes (version 2).
func (t *tipDesc) rowBytes() int {
	n := 0
	for _, l := range t.layers {
		n += int(l.Bytes)
	}
	return n
}

// tailBinding seeds a version-2 tip's tail checksums.
func (t *tipDesc) tailBinding() [32]byte {
	return chunk.NewBinding(t.ns, t.id, t.tokens, t.ident)
}

// decodeTip parses a tip object's description (b may go on with the tail
// rows, or be only a leading piece of the object that holds the
// description) and checks its checksum, version, identity and, for
// version 2, that the token digest is the ids' and that the tail layers
// match the identity's plan.
func decodeTip(b []byte) (*tipDesc, error) {
	if len(b) < 8 {
		return nil, fmt.Errorf("%w: tip object truncated", format.ErrCorrupt)
	}
	switch string(b[:8]) {
	case magicTip1:
		return decodeTipV1(b)
	case magicTip2:
	default:
		return nil, fmt.Errorf("%w: no %s or %s magic", format.ErrCorrupt, magicTip2, magicTip1)
	}
	r := &rd{b: b[8:]}
	t := &tipDesc{}
	t.version = r.u16()
	r.u16()
	t.tokens = r.u64()
	copy(t.tip[:], r.take(32))
	copy(t.digest[:], r.take(16))
	nl, il, sl, dl, ll := int(r.u16()), int(r.u16()), int(r.u16()), int(r.u32()), int(r.u16())
	if r.bad || dl > maxManifest || t.tokens > maxManifest/4 {
		return nil, fmt.Errorf("%w: tip object truncated", format.ErrCorrupt)
	}
	t.ns, t.id = string(r.take(nl)), string(r.take(il))
	t.salt = append([]byte(nil), r.take(sl)...)
	identB := r.take(dl)
	t.ids = r.u32s(int(t.tokens))
	t.layers = r.layerRefs(ll)
	n, err := r.sealed(b, "tip object")
	if err != nil {
		return nil, err
	}
	if t.version != tipVersion {
		return nil, fmt.Errorf("%w: tip object version %d under magic %s, this build reads %d", format.ErrCorrupt, t.version, magicTip2, tipVersion)
	}
	t.end = n
	id, err := chunk.DecodeIdentity(identB)
	if err != nil {
		return nil, fmt.Errorf("%w: tip identity: %v", format.ErrCorrupt, err)
	}
	t.ident = id
	if state.TokensDigest(t.ids) != t.digest {
		return nil, fmt.Errorf("%w: tip object's token digest is not its ids'", format.ErrCorrupt)
	}
	return t, nil
}

func decodeTipV1(b []byte) (*tipDesc, error) {
	r := &rd{b: b[8:]}
	t := &tipDesc{}
	t.version = r.u16()
	r.u16()
	t.tokens = r.u64()
	copy(t.tip[:], r.take(32))
	nl, il, sl, dl, tl := int(r.u16()), int(r.u16()), int(r.u16()), int(r.u32()), int(r.u32())
	if r.bad || dl > maxManifest || tl > 1<<20 {
		return nil, fmt.Errorf("%w: tip object truncated", format.ErrCorrupt)
	}
	t.ns, t.id = string(r.take(nl)), string(r.take(il))
	t.salt = append([]byte(nil), r.take(sl)...)
	identB := r.take(dl)
	for range tl {
		if r.bad {
			break
		}
		t.tail = append(t.tail, r.u32())
	}
	end := len(b) - len(r.b)
	sum := r.u32()
	if r.bad || len(r.b) != 0 {
		return nil, fmt.Errorf("%w: tip object truncated or overlong", format.ErrCorrupt)
	}
	if crc32.Checksum(b[:end], format.Castagnoli) != sum {
		return nil, fmt.Errorf("%w: tip object checksum mismatch", format.ErrCorrupt)
	}
	if t.version != 1 {
		return nil, fmt.Errorf("%w: tip object version %d under magic %s, which is version 1", format.ErrCorrupt, t.version, magicTip1)
	}
	t.end = end + 4
	id, err := chunk.DecodeIdentity(identB)
	if err != nil {
		return nil, fmt.Errorf("%w: tip identity: %v", format.ErrCorrupt, err)
	}
	t.ident = id
	return t, nil
}

// PublishTip writes the tip object of the named token-addressed context
// ns/id whose token ids are p.Tokens (all of them: its full groups and its
// tail), once its groups are in the bucket (PublishTokens): the chain's
// tip key, the salt, every token id and the tail's rows (read from s, which
// must still hold the context with exactly these tokens). The upload is
// checked (size) before it returns. This is the context's by-name form: no
// context object or manifest is written for it.
func (c *Client) PublishTip(ctx context.Context, s *chunk.Store, id string, p chunk.Prefix) error {
	gs, err := groupsOf(s, p)
	if err != nil {
		return err
	}
	ct := s.ChunkTokens()
	t := &tipDesc{version: tipVersion, ns: p.Namespace, id: id, salt: p.Salt, ident: p.Identity,
		tokens: uint64(len(p.Tokens)), ids: p.Tokens, digest: state.TokensDigest(p.Tokens)}
	if len(gs) > 0 {
		t.tip = gs[len(gs)-1].key
	}
	full := len(gs) * ct
	tail := len(p.Tokens) - full
	rows := map[int][]byte{}
	if tail > 0 {
		q := p
		q.Context = id
		n, err := s.RestoreTokensOwned(q, 2, func(layer int, r []byte, release func()) error {
			defer release()
			rb := int(p.Identity.Plan[layer].RowBytes)
			if len(r) < len(p.Tokens)*rb {
				return fmt.Errorf("remote: publish tip %s/%s: layer %d has %d bytes, want %d", p.Namespace, id, layer, len(r), len(p.Tokens)*rb)
			}
			rows[layer] = append([]byte(nil), r[full*rb:len(p.Tokens)*rb]...)
			return nil
		})
		if err != nil {
			return err
		}
		if n != len(p.Tokens) {
			return fmt.Errorf("remote: publish tip %s/%s: the store holds %d of its %d tokens (changed since its close?)", p.Namespace, id, n, len(p.Tokens))
		}
	}
	bind := t.tailBinding()
	var data [][]byte
	if tail > 0 {
		for l, pl := range p.Identity.Plan {
			if pl.Kind == chunk.LayerNone {
				continue
			}
			r := rows[l]
			if len(r) != tail*int(pl.RowBytes) {
				return fmt.Errorf("remote: publish tip %s/%s: layer %d of the tail was not restored", p.Namespace, id, l)
			}
			t.layers = append(t.layers, LayerRef{Layer: uint16(l), Bytes: uint64(len(r)), CRC: format.SliceCRC(bind, uint32(len(gs)), uint16(l), r)})
			data = append(data, r)
		}
	}
	body := t.encode()
	for _, d := range data {
		body = append(body, d...)
	}
	key := c.tipKey(p.Namespace, id)
	return c.putChecked(ctx, key, body, map[string]string{"hcache-store": c.cfg.StoreID, "hcache-kind": "tip"})
}

// LookupTip reads and checks the tip object of ns/id: the chain tip, salt,
// token count and tail ids of a named token-addressed context.
func (c *Client) LookupTip(ctx context.Context, ns, id string) (tip chunk.ChainKey, salt []byte, tokens uint64, tail []uint32, err error) {
	t, err := c.readTip(ctx, c.tipKey(ns, id))
	if err != nil {
		return tip, nil, 0, nil, err
	}
	if t.ns != ns || t.id != id {
		return tip, nil, 0, nil, fmt.Errorf("%w: %s describes %s/%s", format.ErrCorrupt, c.tipKey(ns, id), t.ns, t.id)
	}
	return t.tip, t.salt, t.tokens, t.tail, nil
}

// readTip reads and checks a tip object's description (not its tail
// rows: a leading piece of the object, its first 4 KiB and, for a longer
// description, the rest of it).
func (c *Client) readTip(ctx context.Context, key string) (*tipDesc, error) {
	oi, err := c.stat(ctx, key)
	if err != nil {
		return nil, err
	}
	if oi.Size < 0 || oi.Size > maxTipObject {
		return nil, fmt.Errorf("%w: %s: tip object of %d bytes", format.ErrCorrupt, key, oi.Size)
	}
	b := make([]byte, min(oi.Size, 4096))
	if err := c.getRange(ctx, key, b, 0); err != nil {
		return nil, err
	}
	if n := tipDescLen(b); n > len(b) && int64(n) <= oi.Size && n <= 2*maxManifest {
		b = make([]byte, n)
		if err := c.getRange(ctx, key, b, 0); err != nil {
			return nil, err
		}
	}
	t, err := decodeTip(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", key, err)
	}
	if t.version == 1 && int64(t.end) != oi.Size {
		return nil, fmt.Errorf("%w: %s: tip object of %d bytes, its description %d", format.ErrCorrupt, key, oi.Size, t.end)
	}
	if t.version == 1 {
		t.tail = t.tail[:len(t.tail):len(t.tail)]
	} else {
		if want := int64(t.end + t.rowBytes()); oi.Size != want {
			return nil, fmt.Errorf("%w: %s holds %d bytes, its description says %d", format.ErrCorrupt, key, oi.Size, want)
		}
		t.tail = t.ids[len(t.ids)-tailLen(t):]
	}
	return t, nil
}

// tipDescLen is the length of a version-2 description from its fixed
// part (0 when b is too short or not one: decodeTip then says why).
func tipDescLen(b []byte) int {
	const fixed = 8 + 2 + 2 + 8 + 32 + 16 + 2 + 2 + 2 + 4 + 2
	if len(b) < fixed || string(b[:8]) != magicTip2 {
		return 0
	}
	le := binary.LittleEndian
	tokens := le.Uint64(b[12:20])
	if tokens > maxManifest {
		return 0
	}
	nl, il, sl := int(le.Uint16(b[68:70])), int(le.Uint16(b[70:72])), int(le.Uint16(b[72:74]))
	dl, ll := int(le.Uint32(b[74:78])), int(le.Uint16(b[78:80]))
	return fixed + nl + il + sl + dl + 4*int(tokens) + ll*layerEntryBytes + 4
}

// tailLen is how many tokens of a version-2 tip are past its full groups
// (from its tail layers' bytes and the plan's row bytes).
func tailLen(t *tipDesc) int {
	for _, l := range t.layers {
		if rb := int(t.ident.Plan[l.Layer].RowBytes); rb > 0 {
			return min(int(l.Bytes)/rb, len(t.ids))
		}
	}
	return 0
}

// tipContext is a version-2 tip object read whole and verified on its own:
// its description against the names asked for and the chain keys its ids
// compute in s, its size, its tail layers' checksums.
type tipContext struct {
	t    *tipDesc
	gs   []*groupDesc
	tail map[int][]byte // layer -> the tail's rows
}

// readTipContext reads ns/id's tip object's description (ErrNotFound:
// none); loadTipContext then reads it whole and verifies it. A version-1
// tip is errTipV1 (its rows are in the by-name objects).
func (c *Client) readTipContext(ctx context.Context, s *chunk.Store, ns, id string) (*tipContext, error) {
	key := c.tipKey(ns, id)
	td, err := c.readTip(ctx, key)
	if err != nil {
		return nil, err
	}
	if td.version == 1 {
		return nil, errTipV1
	}
	if td.ns != ns || td.id != id {
		return nil, fmt.Errorf("%w: %s describes %s/%s", format.ErrCorrupt, key, td.ns, td.id)
	}
	return &tipContext{t: td}, nil
}

// loadTipContext reads the tip object of tc (from readTipContext) whole and
// verifies it (see readTipContext) against its description as read first.
func (c *Client) loadTipContext(ctx context.Context, s *chunk.Store, tc *tipContext) (*tipContext, error) {
	ns, id := tc.t.ns, tc.t.id
	key := c.tipKey(ns, id)
	b, err := c.get(ctx, key, maxTipObject)
	if err != nil {
		return nil, err
	}
	t, err := decodeTip(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", key, err)
	}
	if t.version == 1 || t.tokens != tc.t.tokens || t.digest != tc.t.digest {
		return nil, fmt.Errorf("%w: %s changed while it was read (another publish?)", ErrNotFound, key)
	}
	if t.ns != ns || t.id != id {
		return nil, fmt.Errorf("%w: %s describes %s/%s", format.ErrCorrupt, key, t.ns, t.id)
	}
	gs, err := groupsOf(s, chunk.Prefix{Namespace: ns, Salt: t.salt, Identity: t.ident, Tokens: t.ids})
	if err != nil {
		return nil, fmt.Errorf("%s: %w", key, err)
	}
	var tip chunk.ChainKey
	if len(gs) > 0 {
		tip = gs[len(gs)-1].key
	}
	if tip != t.tip {
		return nil, fmt.Errorf("%w: %s: tip key %x is not the chain key its %d ids compute", format.ErrCorrupt, key, t.tip[:8], len(t.ids))
	}
	ct := s.ChunkTokens()
	tail := len(t.ids) - len(gs)*ct
	var want []LayerRef
	if tail > 0 {
		for l, pl := range t.ident.Plan {
			if pl.Kind != chunk.LayerNone {
				want = append(want, LayerRef{Layer: uint16(l), Bytes: uint64(tail) * uint64(pl.RowBytes)})
			}
		}
	}
	if len(want) != len(t.layers) {
		return nil, fmt.Errorf("%w: %s: %d tail layers, a tail of %d tokens has %d", format.ErrCorrupt, key, len(t.layers), tail, len(want))
	}
	for i, l := range want {
		if t.layers[i].Layer != l.Layer || t.layers[i].Bytes != l.Bytes {
			return nil, fmt.Errorf("%w: %s: tail layer entry %d does not match the identity", format.ErrCorrupt, key, i)
		}
	}
	if len(b) != t.end+t.rowBytes() {
		return nil, fmt.Errorf("%w: %s holds %d bytes, its description says %d", format.ErrCorrupt, key, len(b), t.end+t.rowBytes())
	}
	out := &tipContext{t: t, gs: gs, tail: map[int][]byte{}}
	bind := t.tailBinding()
	off := t.end
	for _, l := range t.layers {
		r := b[off : off+int(l.Bytes)]
		off += int(l.Bytes)
		if format.SliceCRC(bind, uint32(len(gs)), l.Layer, r) != l.CRC {
			return nil, fmt.Errorf("%w: %s tail layer %d: checksum mismatch", format.ErrCorrupt, key, l.Layer)
		}
		out.tail[int(l.Layer)] = r
	}
	return out, nil
}

var errTipV1 = errors.New("remote: a version-1 tip object (its rows are in the by-name objects)")

// fetchGroups fetches and verifies gs[a:b] (parallel at once).
func (c *Client) fetchGroups(ctx context.Context, gs []*groupDesc, a, b, parallel int) ([]map[int][]byte, error) {
	if parallel <= 0 {
		parallel = DefaultLookupParallel
	}
	out := make([]map[int][]byte, b-a)
	errs := make([]error, b-a)
	sem := make(chan struct{}, parallel)
	var wg sync.WaitGroup
	for i := range b - a {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			out[i], errs[i] = c.fetchGroup(ctx, gs[a+i])
		}()
	}
	wg.Wait()
	return out, errors.Join(errs...)
}

// importTip writes the context tc describes into s as the token-addressed
// context ns/id (replacing an older local copy, once everything it needs
// from the bucket is fetched and verified): the groups the store lacks are
// fetched from their group objects, the tail comes from the tip object.
// Each layer's rows are also handed to fn (a restore served while it is
// promoted), if not nil. A failure leaves no local context of that name.
func (c *Client) importTip(ctx context.Context, s *chunk.Store, tc *tipContext, parallel int, fn func(layer int, rows []byte) error) error {
	t := tc.t
	ct := s.ChunkTokens()
	local, err := s.Lookup(chunk.Prefix{Namespace: t.ns, Salt: t.salt, Identity: t.ident, Tokens: t.ids[:len(tc.gs)*ct]})
	if err != nil {
		return err
	}
	from := local / ct
	fetched := make([]map[int][]byte, len(tc.gs))
	got, err := c.fetchGroups(ctx, tc.gs, from, len(tc.gs), parallel)
	if err != nil {
		return err
	}
	copy(fetched[from:], got)
	if _, err := s.Context(t.ns, t.id); err == nil {
		if err := s.Delete(t.ns, t.id); err != nil {
			return err
		}
	}
	w, stored, err := s.CreateTokens(t.ns, t.id, t.ident, t.ids, chunk.CreateOptions{Salt: t.salt})
	if err != nil {
		return err
	}
	fail := func(err error) error {
		w.Abandon()
		if derr := s.Delete(t.ns, t.id); derr != nil && !errors.Is(derr, chunk.ErrNotFound) {
			err = fmt.Errorf("%w (and removing the partial import: %v)", err, derr)
		}
		return err
	}
	if stored%ct != 0 || stored > len(tc.gs)*ct {
		return fail(fmt.Errorf("remote: import %s/%s by its tip: the store holds %d of its tokens, not whole groups of its %d", t.ns, t.id, stored, len(tc.gs)))
	}
	if first := stored / ct; first < from { // groups evicted since the lookup
		more, err := c.fetchGroups(ctx, tc.gs, first, from, parallel)
		if err != nil {
			return fail(err)
		}
		copy(fetched[first:], more)
	}
	var all map[int][]byte
	if fn != nil && stored > 0 {
		// The rows the store held already, for fn.
		all = map[int][]byte{}
		if _, err := s.RestoreTokens(chunk.Prefix{Namespace: t.ns, Salt: t.salt, Identity: t.ident, Tokens: t.ids[:stored]}, func(layer int, r []byte) error {
			all[layer] = append([]byte(nil), r...)
			return nil
		}); err != nil {
			return fail(err)
		}
	}
	for l, pl := range t.ident.Plan {
		if pl.Kind == chunk.LayerNone {
			continue
		}
		var rows []byte
		for g := stored / ct; g < len(tc.gs); g++ {
			rows = append(rows, fetched[g][l]...)
		}
		rows = append(rows, tc.tail[l]...)
		if len(rows) > 0 {
			if err := w.AppendLayer(l, rows); err != nil {
				return fail(err)
			}
		}
		if fn != nil {
			if err := fn(l, append(all[l], rows...)); err != nil {
				return fail(err)
			}
		}
	}
	if err := w.Close(); err != nil {
		return fail(err)
	}
	return nil
}
