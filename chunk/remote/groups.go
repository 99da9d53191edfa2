package remote

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"sync"

	"github.com/hcache/hcache/chunk"
	"github.com/hcache/hcache/chunk/format"
	"github.com/hcache/hcache/state"
)

// Token-addressed state in the bucket (by tokens).
//
// A shared group (ChunkTokens tokens of a token-addressed context, see
// chunk's "Prefix-addressed state") is one group object,
// grp/NS/KEY.hcg, KEY the 64 hex digits of its chain key: content-addressed,
// so it is written once fleet-wide (a publish first asks whether the key
// exists and uploads only what is missing). Its bytes:
//
//	description: magic "HCGROUP1" | version u16 | reserved u16 |
//	  index u32 | tokens u32 | key [32] | parent [32] | token digest [16] |
//	  group binding [32] | namespace length u16 | identity length u32 |
//	  layers u16 | namespace | encoded identity | token ids (tokens x u32) |
//	  layers x (layer u16, bytes u64, crc u32) | crc32c u32 of the bytes
//	  before it
//	rows:        the stored layers' rows (tokens x RowBytes each), in
//	  layer order, right after the description
//
// Its user metadata carries the token digest (hcache-digest), so an
// existence check (a HEAD) also tells a collision from a hit. A layer's
// checksum is format.SliceCRC of its rows seeded by the group binding
// (state.NewGroupBinding of namespace, identity, key) and the group index,
// as a local group record's slices. A reader knows the namespace, identity
// and tokens it asks for, hence the object's exact size; it checks the
// size, the description's checksum, that namespace, identity, index, key,
// parent, binding and token ids are the request's, and every layer's
// checksum before anything is served or promoted: a collision, a corrupt or
// a truncated object serves nothing.
//
// A named token-addressed context also gets a tip object, tip/NS/ID.hct
// (written after its groups; format in tip.go): it names the context's
// chain (tip key, salt, every token id) and holds its partial tail's rows,
// so the tip object and the group objects it reaches are the context's
// whole by-name form (no context object, no manifest). remote gc keeps a
// group object while some tip object's chain reaches it.

const (
	groupVersion = 1
	magicGroup   = "HCGROUP1"
	magicTip1    = "HCTIP001" // tip objects of version 1 (read, never written)
	metaDigest   = "hcache-digest"
	// DefaultLookupParallel bounds the existence checks in flight of one
	// lookup by tokens (Config.LookupParallel when 0).
	DefaultLookupParallel = 16
	// DefaultPublishBatchBytes is Config.PublishBatchBytes when 0.
	DefaultPublishBatchBytes = 64 << 20
)

// ErrCollision is wrapped by the error of a group object whose key is the
// request's but whose tokens, namespace or identity are not: nothing of it
// is served.
var ErrCollision = errors.New("remote: group object holds other tokens (chain key collision)")

func (c *Client) groupKey(ns string, k chunk.ChainKey) string {
	return fmt.Sprintf("%sgrp/%s/%x.hcg", c.cfg.Prefix, escape(ns), k[:])
}

func (c *Client) tipKey(ns, id string) string {
	return fmt.Sprintf("%stip/%s/%s.hct", c.cfg.Prefix, escape(ns), escape(id))
}

// groupDesc is a group object's description.
type groupDesc struct {
	ns          string
	ident       *chunk.Identity
	index       uint32
	key, parent chunk.ChainKey
	digest      [16]byte
	binding     [32]byte
	ids         []uint32
	layers      []LayerRef // Off unused; Bytes and CRC
}

func (g *groupDesc) encode() []byte {
	ident := g.ident.Encode()
	var p []byte
	p = append(p, magicGroup...)
	p = binary.LittleEndian.AppendUint16(p, groupVersion)
	p = binary.LittleEndian.AppendUint16(p, 0)
	p = binary.LittleEndian.AppendUint32(p, g.index)
	p = binary.LittleEndian.AppendUint32(p, uint32(len(g.ids)))
	p = append(p, g.key[:]...)
	p = append(p, g.parent[:]...)
	p = append(p, g.digest[:]...)
	p = append(p, g.binding[:]...)
	p = binary.LittleEndian.AppendUint16(p, uint16(len(g.ns)))
	p = binary.LittleEndian.AppendUint32(p, uint32(len(ident)))
	p = binary.LittleEndian.AppendUint16(p, uint16(len(g.layers)))
	p = append(p, g.ns...)
	p = append(p, ident...)
	p = appendU32s(p, g.ids)
	p = appendLayerRefs(p, g.layers)
	return seal(p)
}

// newGroupDesc is the description of group index of tokens (its ids),
// checksums zero.
func newGroupDesc(ns string, ident *chunk.Identity, index int, key, parent chunk.ChainKey, ids []uint32) *groupDesc {
	g := &groupDesc{ns: ns, ident: ident, index: uint32(index), key: key, parent: parent,
		digest: state.TokensDigest(ids), binding: state.NewGroupBinding(ns, ident, key), ids: ids}
	for l, p := range ident.Plan {
		if p.Kind != chunk.LayerNone {
			g.layers = append(g.layers, LayerRef{Layer: uint16(l), Bytes: uint64(len(ids)) * uint64(p.RowBytes)})
		}
	}
	return g
}

// size is the object's bytes: the description and the rows.
func (g *groupDesc) size() (desc, total int) {
	desc = len(g.encode())
	total = desc
	for _, l := range g.layers {
		total += int(l.Bytes)
	}
	return desc, total
}

// decodeGroup parses a group object's description and checks it against
// want (what the reader asked for: everything but the checksums).
func decodeGroup(b []byte, want *groupDesc) (*groupDesc, int, error) {
	if len(b) < 8 || !bytes.Equal(b[:8], []byte(magicGroup)) {
		return nil, 0, fmt.Errorf("%w: no %s magic", format.ErrCorrupt, magicGroup)
	}
	r := &rd{b: b[8:]}
	g := &groupDesc{}
	v := r.u16()
	r.u16()
	g.index = r.u32()
	nt := int(r.u32())
	copy(g.key[:], r.take(32))
	copy(g.parent[:], r.take(32))
	copy(g.digest[:], r.take(16))
	copy(g.binding[:], r.take(32))
	nl, dl, ll := int(r.u16()), int(r.u32()), int(r.u16())
	if r.bad || dl > maxManifest || nt > 1<<20 {
		return nil, 0, fmt.Errorf("%w: group description truncated", format.ErrCorrupt)
	}
	g.ns = string(r.take(nl))
	identB := r.take(dl)
	g.ids = r.u32s(nt)
	g.layers = r.layerRefs(ll)
	n, err := r.sealed(b, "group description")
	if err != nil {
		return nil, 0, err
	}
	if v != groupVersion {
		return nil, 0, fmt.Errorf("%w: group object version %d, this build reads %d", format.ErrCorrupt, v, groupVersion)
	}
	id, err := chunk.DecodeIdentity(identB)
	if err != nil {
		return nil, 0, fmt.Errorf("%w: group identity: %v", format.ErrCorrupt, err)
	}
	g.ident = id
	if want != nil {
		switch {
		case g.key != want.key:
			return nil, 0, fmt.Errorf("%w: group object describes key %x, not %x", format.ErrCorrupt, g.key[:8], want.key[:8])
		case g.ns != want.ns || !id.Equal(want.ident) || g.binding != want.binding || g.index != want.index || g.parent != want.parent:
			return nil, 0, fmt.Errorf("%w: group %x holds namespace %q index %d for another identity or chain", ErrCollision, g.key[:8], g.ns, g.index)
		case g.digest != want.digest || !equalIDs(g.ids, want.ids):
			return nil, 0, fmt.Errorf("%w: group %x (index %d)", ErrCollision, g.key[:8], g.index)
		case len(g.layers) != len(want.layers):
			return nil, 0, fmt.Errorf("%w: group %x has %d layers, the identity %d", format.ErrCorrupt, g.key[:8], len(g.layers), len(want.layers))
		}
		for i, l := range want.layers {
			if gl := g.layers[i]; gl.Layer != l.Layer || gl.Bytes != l.Bytes {
				return nil, 0, fmt.Errorf("%w: group %x layer entry %d does not match the identity", format.ErrCorrupt, g.key[:8], i)
			}
		}
	}
	return g, n, nil
}

func equalIDs(a, b []uint32) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// groupsOf describes the full groups of p.Tokens (keys as s computes them).
func groupsOf(s *chunk.Store, p chunk.Prefix) ([]*groupDesc, error) {
	if p.Identity == nil {
		return nil, fmt.Errorf("remote: by tokens: no identity")
	}
	keys, err := s.ChainKeys(p.Namespace, p.Salt, p.Identity, p.Tokens)
	if err != nil {
		return nil, err
	}
	ct := s.ChunkTokens()
	out := make([]*groupDesc, len(keys))
	var parent chunk.ChainKey
	for i, k := range keys {
		out[i] = newGroupDesc(p.Namespace, p.Identity, i, k, parent, p.Tokens[i*ct:(i+1)*ct])
		parent = k
	}
	return out, nil
}

// groupState is what an existence check found.
type groupState int

const (
	groupMissing groupState = iota
	groupPresent
	groupOther // the key holds other tokens (its digest differs)
)

func (c *Client) groupExists(ctx context.Context, g *groupDesc) (groupState, error) {
	oi, err := c.stat(ctx, c.groupKey(g.ns, g.key))
	if errors.Is(err, ErrNotFound) {
		return groupMissing, nil
	}
	if err != nil {
		return groupMissing, err
	}
	for k, v := range oi.UserMetadata {
		if strings.EqualFold(k, metaDigest) || strings.EqualFold(k, "x-amz-meta-"+metaDigest) {
			if v == hex.EncodeToString(g.digest[:]) {
				return groupPresent, nil
			}
			return groupOther, nil
		}
	}
	return groupOther, nil
}

// leadingPresent checks gs in order, at most parallel at once, and returns
// how many leading ones the bucket holds with the request's digest. A
// batch is checked together; the first missing (or colliding) group ends
// the walk (a chain's groups are published parent first, so a later one
// without an earlier is of no use).
func (c *Client) leadingPresent(ctx context.Context, gs []*groupDesc, parallel int) (int, error) {
	if parallel <= 0 {
		parallel = DefaultLookupParallel
	}
	n := 0
	for n < len(gs) {
		batch := gs[n:min(len(gs), n+parallel)]
		st := make([]groupState, len(batch))
		errs := make([]error, len(batch))
		var wg sync.WaitGroup
		for i, g := range batch {
			wg.Add(1)
			go func() {
				defer wg.Done()
				st[i], errs[i] = c.groupExists(ctx, g)
			}()
		}
		wg.Wait()
		for i := range batch {
			if errs[i] != nil {
				return n, errs[i]
			}
			if st[i] != groupPresent {
				return n, nil
			}
			n++
		}
	}
	return n, nil
}

// LookupTokens returns how many leading tokens of p.Tokens (whole groups,
// from group from on) the bucket holds for p's namespace, salt and
// identity: existence checks (HEADs, parallel at once) whose digests match.
// It reads no rows.
func (c *Client) LookupTokens(ctx context.Context, s *chunk.Store, p chunk.Prefix, from, parallel int) (int, error) {
	gs, err := groupsOf(s, p)
	if err != nil || from >= len(gs) {
		return 0, err
	}
	n, err := c.leadingPresent(ctx, gs[from:], parallel)
	return n * s.ChunkTokens(), err
}

// PublishReport says what a publish by tokens did.
type PublishReport struct {
	Groups, Uploaded, Existing int
	// Batches is how many reads of the store the upload took (see
	// Config.PublishBatchBytes).
	Batches int
}

// PublishTokens uploads the full groups of p.Tokens that the bucket lacks
// (the store must hold them: a token-addressed context's durable groups)
// as group objects, parent first; a group object already there (with the
// same token digest) is not uploaded again. A key the bucket holds for
// other tokens (a collision) stops the publish there with ErrCollision.
// The rows are read from the store by tokens in batches of at most
// Config.PublishBatchBytes (bounded memory whatever the prefix's length)
// and each object is checked (size) after its upload.
func (c *Client) PublishTokens(ctx context.Context, s *chunk.Store, p chunk.Prefix, parallel int) (PublishReport, error) {
	var rep PublishReport
	gs, err := groupsOf(s, p)
	if err != nil {
		return rep, err
	}
	rep.Groups = len(gs)
	if len(gs) == 0 {
		return rep, nil
	}
	if parallel <= 0 {
		parallel = DefaultLookupParallel
	}
	st := make([]groupState, len(gs))
	errs := make([]error, len(gs))
	sem := make(chan struct{}, parallel)
	var wg sync.WaitGroup
	for i, g := range gs {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			st[i], errs[i] = c.groupExists(ctx, g)
		}()
	}
	wg.Wait()
	last := -1
	for i := range gs {
		if errs[i] != nil {
			return rep, errs[i]
		}
		switch st[i] {
		case groupOther:
			return rep, fmt.Errorf("%w: %s key %x (group %d)", ErrCollision, c.groupKey(p.Namespace, gs[i].key), gs[i].key[:8], i)
		case groupPresent:
			rep.Existing++
		default:
			last = i
		}
	}
	if last < 0 {
		return rep, nil
	}
	// The missing groups, in batches of at most PublishBatchBytes of rows
	// (at least one group): each batch is read from the store (a restore
	// by tokens of the prefix up to its last group, two layers' buffers at
	// a time, keeping only the batch's rows) and uploaded before the next.
	_, gtotal := gs[0].size()
	per := max(1, int(c.cfg.PublishBatchBytes/int64(gtotal)))
	for i := 0; i <= last; {
		if st[i] == groupPresent {
			i++
			continue
		}
		var batch []int
		for ; i <= last && len(batch) < per; i++ {
			if st[i] != groupPresent {
				batch = append(batch, i)
			}
		}
		if err := c.publishGroups(ctx, s, p, gs, batch); err != nil {
			return rep, err
		}
		rep.Uploaded += len(batch)
		rep.Batches++
	}
	return rep, nil
}

// publishGroups reads the rows of groups idx (ascending) of p from s and
// uploads each as its group object, checking its size after the upload.
func (c *Client) publishGroups(ctx context.Context, s *chunk.Store, p chunk.Prefix, gs []*groupDesc, idx []int) error {
	ct := s.ChunkTokens()
	lo, hi := idx[0], idx[len(idx)-1]+1
	q := p
	q.Context = ""
	q.Tokens = p.Tokens[:hi*ct]
	rows := map[int][]byte{} // layer -> rows of groups [lo, hi)
	n, err := s.RestoreTokensOwned(q, 2, func(layer int, r []byte, release func()) error {
		defer release()
		rb := int(p.Identity.Plan[layer].RowBytes)
		if len(r) < hi*ct*rb {
			return fmt.Errorf("remote: publish by tokens in %s: layer %d has %d bytes, want %d", p.Namespace, layer, len(r), hi*ct*rb)
		}
		rows[layer] = append([]byte(nil), r[lo*ct*rb:hi*ct*rb]...)
		return nil
	})
	if err != nil {
		return err
	}
	if n < len(q.Tokens) {
		return fmt.Errorf("remote: publish by tokens in %s: the store holds %d of the %d tokens", p.Namespace, n, len(q.Tokens))
	}
	for _, i := range idx {
		g := gs[i]
		var data [][]byte
		for li, l := range g.layers {
			rb := int(l.Bytes) / ct
			r := rows[int(l.Layer)][(i-lo)*ct*rb : (i-lo+1)*ct*rb]
			g.layers[li].CRC = format.SliceCRC(g.binding, g.index, l.Layer, r)
			data = append(data, r)
		}
		body := g.encode()
		for _, d := range data {
			body = append(body, d...)
		}
		key := c.groupKey(g.ns, g.key)
		meta := map[string]string{"hcache-store": c.cfg.StoreID, "hcache-kind": "group", metaDigest: hex.EncodeToString(g.digest[:])}
		if err := c.putChecked(ctx, key, body, meta); err != nil {
			return err
		}
	}
	return nil
}

// fetchGroup reads and verifies one group object: the rows of each stored
// layer (layer -> rows), handed over only once every check passed.
func (c *Client) fetchGroup(ctx context.Context, want *groupDesc) (map[int][]byte, error) {
	descLen, total := want.size()
	key := c.groupKey(want.ns, want.key)
	b, err := c.get(ctx, key, int64(total)+1)
	if err != nil {
		return nil, err
	}
	if len(b) != total {
		return nil, fmt.Errorf("%w: %s holds %d bytes, a group of %d tokens %d", format.ErrCorrupt, key, len(b), len(want.ids), total)
	}
	g, end, err := decodeGroup(b[:descLen], want)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", key, err)
	}
	if end != descLen {
		return nil, fmt.Errorf("%w: %s: description of %d bytes, %d expected", format.ErrCorrupt, key, end, descLen)
	}
	out := map[int][]byte{}
	off := descLen
	for _, l := range g.layers {
		r := b[off : off+int(l.Bytes)]
		off += int(l.Bytes)
		if format.SliceCRC(g.binding, g.index, l.Layer, r) != l.CRC {
			return nil, fmt.Errorf("%w: %s layer %d: checksum mismatch", format.ErrCorrupt, key, l.Layer)
		}
		out[int(l.Layer)] = r
	}
	return out, nil
}

// PromotedID is the id of the context a promotion by tokens creates: it
// holds the promoted groups (the prefix up to its tip key) as a
// token-addressed context of the namespace, so they are local shared
// groups from then on (evicted as any context).
func PromotedID(tip chunk.ChainKey) string { return fmt.Sprintf("remote-prefix-%x", tip[:16]) }

// PromoteTokens makes the local store hold what the bucket holds of
// p.Tokens past what the store holds: it finds the groups the bucket has
// after the local match (LookupTokens), fetches them (parallel at once),
// verifies every one (size, description, token ids against the request,
// checksums), and writes them into s as the groups of a token-addressed
// context PromotedID(tip) (CreateTokens of the prompt's tokens up to the
// last fetched group, with the fetched rows). A restore by tokens then
// serves them from the local store. It returns how many tokens the
// promotion added; 0 and no error when the bucket has nothing more. A
// failure (a collision, a corrupt or truncated object, the store down)
// promotes nothing: no context is left behind.
func (c *Client) PromoteTokens(ctx context.Context, s *chunk.Store, p chunk.Prefix, parallel int) (int, error) {
	q := p
	q.Context = ""
	local, err := s.Lookup(q)
	if err != nil {
		return 0, err
	}
	ct := s.ChunkTokens()
	gs, err := groupsOf(s, p)
	if err != nil {
		return 0, err
	}
	from := local / ct
	if from >= len(gs) {
		return 0, nil
	}
	m, err := c.leadingPresent(ctx, gs[from:], parallel)
	if err != nil || m == 0 {
		return 0, err
	}
	if parallel <= 0 {
		parallel = DefaultLookupParallel
	}
	fetched := make([]map[int][]byte, m)
	errs := make([]error, m)
	sem := make(chan struct{}, parallel)
	var wg sync.WaitGroup
	for i := range m {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			fetched[i], errs[i] = c.fetchGroup(ctx, gs[from+i])
		}()
	}
	wg.Wait()
	for _, e := range errs {
		if e != nil {
			return 0, e
		}
	}
	end := (from + m) * ct
	tip := gs[from+m-1].key
	id := PromotedID(tip)
	w, stored, err := s.CreateTokens(p.Namespace, id, p.Identity, p.Tokens[:end], chunk.CreateOptions{Salt: p.Salt})
	if err != nil {
		if errors.Is(err, chunk.ErrExists) {
			return 0, nil // promoted already (by a concurrent restore)
		}
		return 0, err
	}
	fail := func(err error) (int, error) {
		w.Abandon()
		if derr := s.Delete(p.Namespace, id); derr != nil && !errors.Is(derr, chunk.ErrNotFound) {
			err = fmt.Errorf("%w (and removing the partial promotion: %v)", err, derr)
		}
		return 0, err
	}
	if stored < from*ct {
		return fail(fmt.Errorf("remote: promote by tokens in %s: the store now holds %d tokens of the prefix, %d before", p.Namespace, stored, local))
	}
	for l, pl := range p.Identity.Plan {
		if pl.Kind == chunk.LayerNone {
			continue
		}
		var rows []byte
		for g := stored / ct; g < from+m; g++ {
			rows = append(rows, fetched[g-from][l]...)
		}
		if len(rows) == 0 {
			continue
		}
		if err := w.AppendLayer(l, rows); err != nil {
			return fail(err)
		}
	}
	if err := w.Close(); err != nil {
		return fail(err)
	}
	return end - local, nil
}

// groupParent reads the description of a group object (for gc's walk of a
// chain): its namespace must be ns and its key key.
func (c *Client) groupParent(ctx context.Context, ns string, ident *chunk.Identity, key chunk.ChainKey) (chunk.ChainKey, uint32, error) {
	k := c.groupKey(ns, key)
	// The description is at most its fixed part, the names, the identity
	// and 4 bytes per token: read a generous first piece.
	b := make([]byte, 0)
	oi, err := c.stat(ctx, k)
	if err != nil {
		return chunk.ChainKey{}, 0, err
	}
	n := min(oi.Size, int64(len(ident.Encode())+len(ns)+256+4*(1<<16)+len(ident.Plan)*14))
	b = make([]byte, n)
	if err := c.getRange(ctx, k, b, 0); err != nil {
		return chunk.ChainKey{}, 0, err
	}
	g, _, err := decodeGroup(b, nil)
	if err != nil {
		return chunk.ChainKey{}, 0, fmt.Errorf("%s: %w", k, err)
	}
	if g.key != key || g.ns != ns {
		return chunk.ChainKey{}, 0, fmt.Errorf("%w: %s describes %s key %x", format.ErrCorrupt, k, g.ns, g.key[:8])
	}
	return g.parent, g.index, nil
}
