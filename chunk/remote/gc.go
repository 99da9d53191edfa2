package remote

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/hcache/hcache/chunk"
	"github.com/hcache/hcache/chunk/format"
	"github.com/hcache/hcache/state"
)

// DefaultGrace is the age below which remote gc never deletes an object.
const DefaultGrace = time.Hour

// GCOptions configure a remote gc.
type GCOptions struct {
	// Grace: objects modified less than this long ago are kept whatever
	// refers to them (DefaultGrace when 0). This is how a fleet avoids
	// deleting what another node just wrote: a node uploads a context
	// object before the manifest that refers to it, and a segment before
	// its index records it, each within seconds; a reader holding an
	// older manifest finishes within the grace too. Set it well above the
	// longest upload and restore (and above clock skew between nodes and
	// the object store, whose clock dates the objects). Group objects: a
	// node uploads a context's groups, then its tip object (which keeps
	// them), within one publish. A publish that finds a group object
	// already there does not upload it again; if that object was
	// unreferenced and past the grace, a gc running before the new tip is
	// written may delete it: the new chain then ends early in the bucket
	// (lookups stop at the missing group: a shorter hit, never wrong
	// bytes), and the context's next publish uploads the group again.
	Grace time.Duration
	// Stores are the local stores whose segment objects this gc may
	// remove (the segments their index no longer lists); the segments of
	// other stores in the bucket are left alone, as gc cannot see their
	// indexes.
	Stores []*chunk.Store
	// StoreIDs are the store ids of Stores, in the same order.
	StoreIDs []string
	// DryRun lists what would be deleted and deletes nothing.
	DryRun bool
	// Now is the clock (default time.Now).
	Now func() time.Time
}

// GCReport says what a remote gc found and did.
type GCReport struct {
	Manifests, ContextObjects, SegmentObjects int
	Tips, GroupObjects                        int
	Deleted                                   []string
	KeptYoung                                 int      // unreferenced but within the grace
	Skipped                                   []string // why something was not examined
	Errors                                    []string
}

// GC removes objects nothing refers to: context objects no manifest names
// and (for the given stores) segment objects their index no longer lists,
// once older than the grace. It is idempotent (a second run finds nothing
// more; deleting an object already gone is no error) and safe with
// concurrent readers: a reader that finds an object gone falls back as on
// a miss (ErrNotFound), never serves other bytes. An unreadable manifest
// stops the deletion of context objects (it may name one).
func (c *Client) GC(ctx context.Context, o GCOptions) (*GCReport, error) {
	if o.Grace == 0 {
		o.Grace = DefaultGrace
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if len(o.Stores) != len(o.StoreIDs) {
		return nil, fmt.Errorf("remote: gc: %d stores, %d store ids", len(o.Stores), len(o.StoreIDs))
	}
	rep := &GCReport{}
	cutoff := o.Now().Add(-o.Grace)
	del := func(key string) {
		if !o.DryRun {
			if err := c.remove(ctx, key); err != nil {
				rep.Errors = append(rep.Errors, err.Error())
				return
			}
		}
		rep.Deleted = append(rep.Deleted, key)
	}

	mans, err := c.list(ctx, "name/")
	if err != nil {
		return nil, err
	}
	refs := map[string]bool{}
	manifestsOK := true
	for _, oi := range mans {
		rep.Manifests++
		b, err := c.get(ctx, oi.Key, maxManifest)
		if err == nil {
			var m *Manifest
			if m, err = decodeManifest(b, magicManifest); err == nil {
				refs[m.Object] = true
				continue
			}
		}
		if isNotFound(err) {
			continue // overwritten or deleted since the listing
		}
		manifestsOK = false
		rep.Errors = append(rep.Errors, fmt.Sprintf("manifest %s: %v", oi.Key, err))
	}
	objs, err := c.list(ctx, "ctx/")
	if err != nil {
		return nil, err
	}
	for _, oi := range objs {
		rep.ContextObjects++
		if refs[oi.Key] {
			continue
		}
		if oi.Modified.After(cutoff) {
			rep.KeptYoung++
			continue
		}
		if !manifestsOK {
			continue
		}
		del(oi.Key)
	}
	if !manifestsOK {
		rep.Skipped = append(rep.Skipped, "context objects: a manifest could not be read, so none was deleted")
	}

	if err := c.gcGroups(ctx, rep, cutoff, del); err != nil {
		return nil, err
	}

	for i, s := range o.Stores {
		store := o.StoreIDs[i]
		known := map[uint32]bool{}
		for _, sg := range s.Segments() {
			known[sg.ID] = true
		}
		segs, err := c.list(ctx, "seg/"+store+"/")
		if err != nil {
			return nil, err
		}
		for _, oi := range segs {
			rep.SegmentObjects++
			id, ok := segIDOfKey(oi.Key)
			if !ok {
				rep.Skipped = append(rep.Skipped, "not a segment object: "+oi.Key)
				continue
			}
			if known[id] {
				continue
			}
			if oi.Modified.After(cutoff) {
				rep.KeptYoung++
				continue
			}
			del(oi.Key)
		}
	}
	return rep, nil
}

// gcGroups removes group objects no tip object's chain reaches (walked
// back from each tip through the group descriptions' parent keys), once
// older than the grace. A tip that cannot be read, or a chain that breaks
// on anything but a missing group, stops the deletion of group objects
// (what it would have reached is unknown).
func (c *Client) gcGroups(ctx context.Context, rep *GCReport, cutoff time.Time, del func(string)) error {
	tips, err := c.list(ctx, "tip/")
	if err != nil {
		return err
	}
	refs := map[string]bool{}
	ok := true
	for _, oi := range tips {
		rep.Tips++
		t, err := c.readTip(ctx, oi.Key)
		if isNotFound(err) {
			continue
		}
		if err != nil {
			ok = false
			rep.Errors = append(rep.Errors, fmt.Sprintf("tip %s: %v", oi.Key, err))
			continue
		}
		for key := t.tip; !key.IsZero(); {
			k := c.groupKey(t.ns, key)
			if refs[k] {
				break
			}
			refs[k] = true
			parent, _, err := c.groupParent(ctx, t.ns, t.ident, key)
			if isNotFound(err) {
				break // gone: nothing to keep past it on this chain
			}
			if err != nil {
				ok = false
				rep.Errors = append(rep.Errors, fmt.Sprintf("chain of %s at %s: %v", oi.Key, k, err))
				break
			}
			key = parent
		}
	}
	objs, err := c.list(ctx, "grp/")
	if err != nil {
		return err
	}
	for _, oi := range objs {
		rep.GroupObjects++
		if refs[oi.Key] {
			continue
		}
		if oi.Modified.After(cutoff) {
			rep.KeptYoung++
			continue
		}
		if ok {
			del(oi.Key)
		}
	}
	if !ok {
		rep.Skipped = append(rep.Skipped, "group objects: a tip or a chain could not be read, so none was deleted")
	}
	return nil
}

func isNotFound(err error) bool { return errors.Is(err, ErrNotFound) }

func segIDOfKey(key string) (uint32, bool) {
	base := key[strings.LastIndexByte(key, '/')+1:]
	if !strings.HasPrefix(base, "seg-") || !strings.HasSuffix(base, ".hcs") {
		return 0, false
	}
	n, err := strconv.ParseUint(strings.TrimSuffix(strings.TrimPrefix(base, "seg-"), ".hcs"), 10, 32)
	return uint32(n), err == nil
}

// CheckReport is what a read-only check of the bucket found.
type CheckReport struct {
	Manifests, Layers int
	Tips, Groups      int // tip objects read; group objects verified (deep)
	Errors            []string
}

// OK reports whether the check found nothing wrong.
func (r *CheckReport) OK() bool { return len(r.Errors) == 0 }

// Check verifies every manifest in the bucket (checksum, binding, layout),
// that its context object exists with the right size and that the
// object's header and trailer describe the same context, and every tip
// object's description; deep also reads every layer and checks its
// checksum, every group object and each tip's chain (see below). It
// writes nothing.
func (c *Client) Check(ctx context.Context, deep bool) (*CheckReport, error) {
	mans, err := c.list(ctx, "name/")
	if err != nil {
		return nil, err
	}
	rep := &CheckReport{}
	for _, oi := range mans {
		rep.Manifests++
		b, err := c.get(ctx, oi.Key, maxManifest)
		if isNotFound(err) {
			continue
		}
		if err != nil {
			rep.Errors = append(rep.Errors, err.Error())
			continue
		}
		m, err := decodeManifest(b, magicManifest)
		if err != nil {
			rep.Errors = append(rep.Errors, fmt.Sprintf("%s: %v", oi.Key, err))
			continue
		}
		if err := c.checkObject(ctx, m); err != nil {
			rep.Errors = append(rep.Errors, fmt.Sprintf("%s (%s/%s): %v", oi.Key, m.Namespace, m.ID, err))
			continue
		}
		if deep {
			if err := c.Fetch(ctx, m, 0, func(int, []byte) error { rep.Layers++; return nil }); err != nil {
				rep.Errors = append(rep.Errors, fmt.Sprintf("%s (%s/%s): %v", oi.Key, m.Namespace, m.ID, err))
			}
		}
	}
	// By tokens: every tip object's description decodes and matches its
	// size; deep also reads every group object whole and verifies it on
	// its own (checkGroupObject), its parent link (the parent it names, if
	// the bucket holds it, is the group before it on the same chain), and
	// walks each tip's chain back to its first group through the verified
	// descriptions (a group missing or refused on the way is an error: a
	// restore by that name would fail), comparing each group's token ids
	// with the tip's, and checks the tip's tail rows against their
	// checksums.
	groups := map[string]*groupDesc{} // verified group objects by key
	bad := map[string]bool{}          // group objects that failed
	if deep {
		grps, err := c.list(ctx, "grp/")
		if err != nil {
			return nil, err
		}
		for _, oi := range grps {
			g, err := c.checkGroupObject(ctx, oi.Key)
			if isNotFound(err) {
				continue
			}
			rep.Groups++
			if err != nil {
				bad[oi.Key] = true
				rep.Errors = append(rep.Errors, fmt.Sprintf("%s: %v", oi.Key, err))
				continue
			}
			groups[oi.Key] = g
		}
		for key, g := range groups {
			if g.index == 0 {
				if !g.parent.IsZero() {
					rep.Errors = append(rep.Errors, fmt.Sprintf("%s: group 0 names parent %x", key, g.parent[:8]))
				}
				continue
			}
			pg := groups[c.groupKey(g.ns, g.parent)]
			if pg != nil && (pg.index != g.index-1 || !pg.ident.Equal(g.ident) || len(pg.ids) != len(g.ids)) {
				rep.Errors = append(rep.Errors, fmt.Sprintf("%s: its parent %x is group %d of %d tokens, not group %d of this chain", key, g.parent[:8], pg.index, len(pg.ids), g.index-1))
			}
		}
	}
	tips, err := c.list(ctx, "tip/")
	if err != nil {
		return nil, err
	}
	for _, oi := range tips {
		t, err := c.readTip(ctx, oi.Key)
		if isNotFound(err) {
			continue
		}
		rep.Tips++
		if err != nil {
			rep.Errors = append(rep.Errors, err.Error())
			continue
		}
		if deep {
			if err := c.checkTipChain(ctx, oi.Key, t, groups, bad); err != nil {
				rep.Errors = append(rep.Errors, fmt.Sprintf("%s (%s/%s): %v", oi.Key, t.ns, t.id, err))
			}
		}
	}
	return rep, nil
}

// checkTipChain walks t's chain back from its tip key through the verified
// group descriptions in groups (bad: group objects that failed their own
// check) and, for a version-2 tip, compares each group's token ids with
// the tip's and verifies the tail rows' checksums.
func (c *Client) checkTipChain(ctx context.Context, key string, t *tipDesc, groups map[string]*groupDesc, bad map[string]bool) error {
	n := 0 // groups on the chain
	want, first, last := 0, true, uint32(0)
	k := t.tip
	for !k.IsZero() {
		gk := c.groupKey(t.ns, k)
		g := groups[gk]
		switch {
		case bad[gk]:
			return fmt.Errorf("%w: its chain reaches %s, which failed its check", format.ErrCorrupt, gk)
		case g == nil:
			return fmt.Errorf("%w: its chain reaches %s, which the bucket lacks", ErrNotFound, gk)
		case !first && int(g.index) != want:
			return fmt.Errorf("%w: its chain reaches %s as group %d, expected %d", format.ErrCorrupt, gk, g.index, want)
		case !g.ident.Equal(t.ident):
			return fmt.Errorf("%w: its chain reaches %s of another identity", format.ErrCorrupt, gk)
		}
		if first {
			n, first = int(g.index)+1, false
		}
		if t.version != 1 {
			ct := len(g.ids)
			lo := int(g.index) * ct
			if lo+ct > len(t.ids) || !equalIDs(g.ids, t.ids[lo:lo+ct]) {
				return fmt.Errorf("%w: %s (group %d) holds other token ids than the tip's", format.ErrCorrupt, gk, g.index)
			}
		}
		last = g.index
		if g.index == 0 {
			break
		}
		want = int(g.index) - 1
		k = g.parent
	}
	if last != 0 {
		return fmt.Errorf("%w: its chain ends at group %d (no parent), not 0", format.ErrCorrupt, last)
	}
	if t.version == 1 {
		return nil
	}
	if full := int(t.tokens) - tailLen(t); n > 0 && full%n != 0 {
		return fmt.Errorf("%w: %d tokens past a %d-token tail in %d groups", format.ErrCorrupt, full, tailLen(t), n)
	}
	b, err := c.get(ctx, key, maxTipObject)
	if err != nil {
		return err
	}
	if len(b) != t.end+t.rowBytes() {
		return fmt.Errorf("%w: %d bytes, its description says %d", format.ErrCorrupt, len(b), t.end+t.rowBytes())
	}
	bind := t.tailBinding()
	off := t.end
	for _, l := range t.layers {
		if format.SliceCRC(bind, uint32(n), l.Layer, b[off:off+int(l.Bytes)]) != l.CRC {
			return fmt.Errorf("%w: tail layer %d: checksum mismatch", format.ErrCorrupt, l.Layer)
		}
		off += int(l.Bytes)
	}
	return nil
}

// checkGroupObject verifies a group object without a request to compare
// it with: its description (checksum, version, identity), that its key
// is the one its name carries, its size, its binding and token digest as
// its namespace, identity, key and ids compute, and every layer's
// checksum.
func (c *Client) checkGroupObject(ctx context.Context, key string) (*groupDesc, error) {
	g, err := c.checkGroupObjectErr(ctx, key)
	if err != nil {
		return nil, err
	}
	return g, nil
}

func (c *Client) checkGroupObjectErr(ctx context.Context, key string) (*groupDesc, error) {
	oi, err := c.stat(ctx, key)
	if err != nil {
		return nil, err
	}
	if oi.Size > 1<<34 {
		return nil, fmt.Errorf("%w: %d bytes", format.ErrCorrupt, oi.Size)
	}
	b, err := c.get(ctx, key, oi.Size+1)
	if err != nil {
		return nil, err
	}
	g, end, err := decodeGroup(b, nil)
	if err != nil {
		return nil, err
	}
	if c.groupKey(g.ns, g.key) != key {
		return nil, fmt.Errorf("%w: it describes %s key %x", format.ErrCorrupt, g.ns, g.key[:8])
	}
	if g.binding != state.NewGroupBinding(g.ns, g.ident, g.key) || g.digest != state.TokensDigest(g.ids) {
		return nil, fmt.Errorf("%w: binding or token digest is not the one its description computes", format.ErrCorrupt)
	}
	want := newGroupDesc(g.ns, g.ident, int(g.index), g.key, g.parent, g.ids)
	_, total := want.size()
	if len(b) != total || end != len(want.encode()) {
		return nil, fmt.Errorf("%w: %d bytes, its description says %d", format.ErrCorrupt, len(b), total)
	}
	if len(g.layers) != len(want.layers) {
		return nil, fmt.Errorf("%w: %d layers, its identity %d", format.ErrCorrupt, len(g.layers), len(want.layers))
	}
	off := end
	for i, l := range g.layers {
		if l.Layer != want.layers[i].Layer || l.Bytes != want.layers[i].Bytes {
			return nil, fmt.Errorf("%w: layer entry %d does not match its identity", format.ErrCorrupt, i)
		}
		if format.SliceCRC(g.binding, g.index, l.Layer, b[off:off+int(l.Bytes)]) != l.CRC {
			return nil, fmt.Errorf("%w: layer %d: checksum mismatch", format.ErrCorrupt, l.Layer)
		}
		off += int(l.Bytes)
	}
	return g, nil
}

func (c *Client) checkObject(ctx context.Context, m *Manifest) error {
	oi, err := c.stat(ctx, m.Object)
	if err != nil {
		return err
	}
	if uint64(oi.Size) != m.ObjectBytes {
		return fmt.Errorf("%w: %s holds %d bytes, the manifest says %d", format.ErrCorrupt, m.Object, oi.Size, m.ObjectBytes)
	}
	h := make([]byte, m.HeaderBytes)
	if err := c.getRange(ctx, m.Object, h, 0); err != nil {
		return err
	}
	hm, err := decodeManifest(h, magicHeader)
	if err != nil {
		return fmt.Errorf("%s header: %w", m.Object, err)
	}
	tr := make([]byte, m.HeaderBytes)
	if err := c.getRange(ctx, m.Object, tr, int64(m.ObjectBytes-uint64(m.HeaderBytes))); err != nil {
		return err
	}
	tm, err := decodeManifest(tr, magicTrailer)
	if err != nil {
		return fmt.Errorf("%s trailer: %w", m.Object, err)
	}
	if hm.Binding != m.Binding || tm.Binding != m.Binding || tm.Tokens != m.Tokens {
		return fmt.Errorf("%w: %s describes another context than its manifest", format.ErrCorrupt, m.Object)
	}
	for i := range m.Layers {
		if tm.Layers[i].CRC != m.Layers[i].CRC {
			return fmt.Errorf("%w: %s trailer checksum of layer %d differs from the manifest's", format.ErrCorrupt, m.Object, m.Layers[i].Layer)
		}
	}
	return nil
}

// DownloadSegments copies this store's segment objects that have no local
// file into dir/segments (before `hcache repair` rebuilds an index from
// the segments alone: the remote ones are then found too). Each lands
// under a temporary name, is checked (size, segment header naming its
// id), and renamed into place. It writes nothing to the bucket.
func (c *Client) DownloadSegments(ctx context.Context, dir string) ([]string, error) {
	segs, err := c.list(ctx, "seg/"+c.cfg.StoreID+"/")
	if err != nil {
		return nil, err
	}
	var got []string
	for _, oi := range segs {
		id, ok := segIDOfKey(oi.Key)
		if !ok {
			continue
		}
		name := filepath.Join(dir, "segments", fmt.Sprintf("seg-%08d.hcs", id))
		if _, err := os.Stat(name); err == nil {
			continue
		}
		b := make([]byte, oi.Size)
		if err := c.readRanges(ctx, oi.Key, b, 0); err != nil {
			return got, err
		}
		if h, err := chunk.DecodeSegmentHeader(b); err != nil || h.ID != id {
			return got, fmt.Errorf("%w: %s: segment header %v", format.ErrCorrupt, oi.Key, err)
		}
		tmp := name + ".download"
		if err := os.WriteFile(tmp, b, 0o644); err != nil {
			return got, err
		}
		f, err := os.Open(tmp)
		if err == nil {
			err = f.Sync()
			f.Close()
		}
		if err == nil {
			err = os.Rename(tmp, name)
		}
		if err != nil {
			return got, err
		}
		got = append(got, name)
	}
	return got, nil
}
