package remote

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hcache/hcache/chunk"
	"github.com/hcache/hcache/chunk/format"
)

// Publish uploads the stored state of context ns/id (its current
// generation, every durable token) as a context object, checks it, then
// writes its manifest: from that moment any node restores it by name.
// A failure at any step leaves the previous manifest (if any) in place
// and at worst an unreferenced context object (remote gc removes it).
func (c *Client) Publish(ctx context.Context, s *chunk.Store, ns, id string) (*Manifest, error) {
	info, err := s.Context(ns, id)
	if err != nil {
		return nil, err
	}
	m := &Manifest{
		Namespace: ns, ID: id, Identity: info.Identity, Gen: info.Gen, Tokens: info.Tokens,
		Created: time.Now().UnixNano(), Store: c.cfg.StoreID,
		Binding: chunk.NewBinding(ns, id, info.Gen, info.Identity),
	}
	m.Object = c.ctxKey(c.cfg.StoreID, m.Binding)
	m.place()
	header := pad(m.encode(magicHeader), int(m.HeaderBytes))

	pr, pw := io.Pipe()
	crcs := make([]uint32, len(m.Layers))
	go func() {
		_, werr := pw.Write(header)
		si := 0
		n, err := s.Restore(ns, id, m.Identity, func(layer int, rows []byte) error {
			if werr != nil {
				return werr
			}
			if si >= len(m.Layers) || int(m.Layers[si].Layer) != layer {
				return fmt.Errorf("remote: publish %s/%s: restore handed layer %d out of the plan's order", ns, id, layer)
			}
			want := m.Layers[si].Bytes
			if uint64(len(rows)) < want {
				return fmt.Errorf("remote: publish %s/%s: layer %d has %d bytes, want %d", ns, id, layer, len(rows), want)
			}
			rows = rows[:want]
			crcs[si] = format.SliceCRC(m.Binding, wholeGroup, uint16(layer), rows)
			if _, werr = pw.Write(rows); werr == nil {
				_, werr = pw.Write(make([]byte, format.RoundUp(len(rows))-len(rows)))
			}
			si++
			return werr
		})
		if err == nil && uint64(n) < m.Tokens {
			err = fmt.Errorf("remote: publish %s/%s: restored %d tokens of %d", ns, id, n, m.Tokens)
		}
		if err == nil && si != len(m.Layers) {
			err = fmt.Errorf("remote: publish %s/%s: restored %d layers of %d", ns, id, si, len(m.Layers))
		}
		if err == nil {
			for i := range m.Layers {
				m.Layers[i].CRC = crcs[i]
			}
			_, err = pw.Write(pad(m.encode(magicTrailer), int(m.HeaderBytes)))
		}
		pw.CloseWithError(err)
	}()
	meta := map[string]string{"hcache-store": c.cfg.StoreID, "hcache-kind": "context"}
	err = c.put(ctx, m.Object, pr, int64(m.ObjectBytes), meta)
	pr.CloseWithError(errors.New("remote: publish ended"))
	if err != nil {
		return nil, err
	}
	// The context must still be this generation (a delete and re-create
	// while it was read would have handed another generation's rows,
	// which its checksums would then misdescribe).
	if now, err := s.Context(ns, id); err != nil || now.Gen != m.Gen {
		return nil, fmt.Errorf("remote: publish %s/%s: the context changed while it was uploaded (%v)", ns, id, err)
	}
	// Check the object: its size and its trailer as uploaded.
	oi, err := c.stat(ctx, m.Object)
	if err != nil {
		return nil, err
	}
	if uint64(oi.Size) != m.ObjectBytes {
		return nil, fmt.Errorf("%w: %s holds %d bytes, %d uploaded", format.ErrCorrupt, m.Object, oi.Size, m.ObjectBytes)
	}
	tr := make([]byte, m.HeaderBytes)
	if err := c.getRange(ctx, m.Object, tr, int64(m.ObjectBytes)-int64(m.HeaderBytes)); err != nil {
		return nil, err
	}
	if !bytes.Equal(tr, pad(m.encode(magicTrailer), int(m.HeaderBytes))) {
		return nil, fmt.Errorf("%w: %s: its trailer is not the one uploaded", format.ErrCorrupt, m.Object)
	}
	// The commit point.
	man := m.encode(magicManifest)
	if err := c.put(ctx, c.nameKey(ns, id), bytes.NewReader(man), int64(len(man)), map[string]string{"hcache-store": c.cfg.StoreID, "hcache-kind": "manifest"}); err != nil {
		return nil, err
	}
	return m, nil
}

func pad(b []byte, n int) []byte {
	if len(b) >= n {
		return b
	}
	return append(b, make([]byte, n-len(b))...)
}

// Lookup reads and checks the manifest of ns/id (ErrNotFound: none).
func (c *Client) Lookup(ctx context.Context, ns, id string) (*Manifest, error) {
	key := c.nameKey(ns, id)
	b, err := c.get(ctx, key, maxManifest)
	if err != nil {
		return nil, err
	}
	m, err := decodeManifest(b, magicManifest)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", key, err)
	}
	if m.Namespace != ns || m.ID != id {
		return nil, fmt.Errorf("%w: %s describes %s/%s", format.ErrCorrupt, key, m.Namespace, m.ID)
	}
	return m, nil
}

// Fetch reads the layers of m's context object and hands each to fn, in
// layer order, once its checksum passed (rows valid during the call only).
// Up to 2 x ahead layers are held in memory (0: as many as fit in
// 128 MiB, 1 to 4) and their ranged GETs (Config.RangeBytes each) go out in
// layer order through one window of 4 x Config.Parallel GETs in flight, so
// a slow range of one layer does not idle the connections while it
// finishes. A failure stops it: fn has then seen only verified layers,
// never the failed one.
func (c *Client) Fetch(ctx context.Context, m *Manifest, ahead int, fn func(layer int, rows []byte) error) error {
	if ahead <= 0 && len(m.Layers) > 0 {
		ahead = int(min(4, max(1, (64<<20)/max(1, m.Layers[0].Bytes))))
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	type res struct {
		buf []byte
		err error
	}
	type layerRead struct {
		buf  []byte
		left atomic.Int64
		mu   sync.Mutex
		err  error
		out  chan res
	}
	rb := int(c.cfg.RangeBytes)
	nr := 0
	for _, l := range m.Layers {
		nr += max(1, (int(l.Bytes)+rb-1)/rb)
	}
	type job struct {
		lr  *layerRead
		li  int
		p   []byte
		off int64
	}
	jobs := make(chan job, nr)
	var wg sync.WaitGroup
	defer func() {
		close(jobs)
		cancel()
		wg.Wait()
	}()
	for range 4 * c.cfg.Parallel {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := range jobs {
				err := ctx.Err()
				if err == nil {
					err = c.getRange(ctx, m.Object, j.p, j.off)
				}
				lr := j.lr
				if err != nil {
					lr.mu.Lock()
					if lr.err == nil {
						lr.err = err
					}
					lr.mu.Unlock()
				}
				if lr.left.Add(-1) != 0 {
					continue
				}
				lr.mu.Lock()
				err = lr.err
				lr.mu.Unlock()
				l := m.Layers[j.li]
				if err == nil {
					if got := crc32.Update(format.SliceSeed(m.Binding, wholeGroup, l.Layer), format.Castagnoli, lr.buf); got != l.CRC {
						err = fmt.Errorf("%w: %s/%s layer %d from %s: checksum mismatch", format.ErrCorrupt, m.Namespace, m.ID, l.Layer, m.Object)
					}
				}
				lr.out <- res{lr.buf, err}
			}
		}()
	}
	slots := make([]chan res, len(m.Layers))
	var free [][]byte
	start := func(i int) {
		l := m.Layers[i]
		var buf []byte
		if n := len(free); n > 0 {
			buf, free = free[n-1], free[:n-1]
		}
		if uint64(cap(buf)) < l.Bytes {
			buf = make([]byte, l.Bytes)
		}
		buf = buf[:l.Bytes]
		lr := &layerRead{buf: buf, out: make(chan res, 1)}
		slots[i] = lr.out
		n := max(1, (len(buf)+rb-1)/rb)
		lr.left.Store(int64(n))
		for k := range n {
			jobs <- job{lr: lr, li: i, p: buf[k*rb : min((k+1)*rb, len(buf))], off: int64(l.Off) + int64(k*rb)}
		}
	}
	next := 0
	for ; next < min(2*ahead, len(m.Layers)); next++ {
		start(next)
	}
	for i := range m.Layers {
		r := <-slots[i]
		if r.err != nil {
			return r.err
		}
		if err := fn(int(m.Layers[i].Layer), r.buf); err != nil {
			return err
		}
		free = append(free, r.buf)
		if next < len(m.Layers) {
			start(next)
			next++
		}
	}
	return nil
}

// ErrHaveNewer is returned by Import when the local store holds the
// context with at least as many tokens as the manifest.
var ErrHaveNewer = errors.New("remote: the local store holds the context already")

// Import restores ns/id from the bucket by name into the local store s (a
// promotion into the local tier). A named token-addressed context's form is
// its tip object (version 2) and the group objects its chain reaches; any
// other context's is its manifest and context object. Import reads both
// the tip object and the manifest and takes the one with more tokens (a
// conversation grows: more is newer; a tie goes to the tip), fetches and
// verifies everything it needs, and writes it as a new local context (a
// token-addressed one from a tip: its groups become local shared groups,
// those the store held already are not fetched). A local copy holding
// fewer tokens is replaced. A failure leaves no local context of that
// name (nothing partial is visible), only what was there. A tip object
// that is there but unreadable (corrupt, truncated, a group it reaches
// missing or corrupt) fails the import, whatever the manifest says. For a
// context imported from its tip object the Manifest returned describes it
// (names, identity, tokens) with Object the tip object's key and no
// layers.
func (c *Client) Import(ctx context.Context, s *chunk.Store, ns, id string) (*Manifest, error) {
	m, tc, err := c.lookupByName(ctx, s, ns, id)
	if err != nil {
		return m, err
	}
	if info, err := s.Context(ns, id); err == nil {
		if info.Tokens >= m.Tokens {
			return m, fmt.Errorf("%w: %s/%s has %d tokens, the bucket %d", ErrHaveNewer, ns, id, info.Tokens, m.Tokens)
		}
	}
	if tc != nil {
		if tc, err = c.loadTipContext(ctx, s, tc); err != nil {
			return m, err
		}
		return m, c.importTip(ctx, s, tc, 0, nil)
	}
	return m, c.importManifest(ctx, s, m, nil)
}

// lookupByName reads ns/id's manifest and tip object's description (at
// once) and picks the newer (see Import): tc is set when it is the tip
// object (to be read whole by loadTipContext), m describes the choice
// either way. ErrNotFound: neither is there.
func (c *Client) lookupByName(ctx context.Context, s *chunk.Store, ns, id string) (*Manifest, *tipContext, error) {
	var tc *tipContext
	var terr error
	done := make(chan struct{})
	go func() {
		defer close(done)
		tc, terr = c.readTipContext(ctx, s, ns, id)
	}()
	m, merr := c.Lookup(ctx, ns, id)
	<-done
	switch {
	case terr == nil:
		if merr == nil && m.Tokens > tc.t.tokens {
			return m, nil, nil
		}
		if merr != nil && !errors.Is(merr, ErrNotFound) {
			return nil, nil, merr
		}
		t := tc.t
		return &Manifest{Namespace: ns, ID: id, Identity: t.ident, Tokens: t.tokens, Object: c.tipKey(ns, id)}, tc, nil
	case errors.Is(terr, ErrNotFound) || errors.Is(terr, errTipV1):
		return m, nil, merr
	default:
		return nil, nil, terr
	}
}

// importManifest writes m's context into s; each verified layer is also
// handed to fn (a restore served while it is promoted), if not nil.
func (c *Client) importManifest(ctx context.Context, s *chunk.Store, m *Manifest, fn func(layer int, rows []byte) error) error {
	// Fetch everything before the local context changes: a replaced
	// older copy stays until the new one is whole.
	var w *chunk.Writer
	created := false
	err := c.Fetch(ctx, m, 0, func(layer int, rows []byte) error {
		if w == nil {
			if _, err := s.Context(m.Namespace, m.ID); err == nil {
				if err := s.Delete(m.Namespace, m.ID); err != nil {
					return err
				}
			}
			var err error
			if w, err = s.Create(m.Namespace, m.ID, m.Identity, chunk.CreateOptions{}); err != nil {
				return err
			}
			created = true
		}
		if err := w.AppendLayer(layer, rows); err != nil {
			return err
		}
		if fn != nil {
			return fn(layer, rows)
		}
		return nil
	})
	if err == nil && w != nil {
		err = w.Close()
	}
	if err != nil {
		if w != nil {
			w.Abandon()
		}
		if created {
			if derr := s.Delete(m.Namespace, m.ID); derr != nil && !errors.Is(derr, chunk.ErrNotFound) {
				err = fmt.Errorf("%w (and removing the partial import: %v)", err, derr)
			}
		}
		return err
	}
	return nil
}

// RestoreByName serves ns/id: from the local store when it holds at least
// minTokens tokens, else from the bucket (promoting it into the local
// store as it streams; see Import for which form is read). It reports
// where it came from.
func (c *Client) RestoreByName(ctx context.Context, s *chunk.Store, ns, id string, minTokens uint64, fn func(layer int, rows []byte) error) (from string, tokens int, err error) {
	if info, err := s.Context(ns, id); err == nil && info.Tokens >= max(minTokens, 1) {
		n, err := s.Restore(ns, id, info.Identity, fn)
		if err == nil || !errors.Is(err, format.ErrCorrupt) {
			return "local", n, err
		}
	}
	m, tc, err := c.lookupByName(ctx, s, ns, id)
	if err != nil {
		return "miss", 0, err
	}
	if m.Tokens < minTokens {
		return "miss", 0, fmt.Errorf("%w: %s/%s: the bucket holds %d tokens, %d wanted", ErrNotFound, ns, id, m.Tokens, minTokens)
	}
	if tc != nil {
		if tc, err = c.loadTipContext(ctx, s, tc); err == nil {
			err = c.importTip(ctx, s, tc, 0, fn)
		}
	} else {
		err = c.importManifest(ctx, s, m, fn)
	}
	if err != nil {
		return "remote", 0, err
	}
	return "remote", int(m.Tokens), nil
}
