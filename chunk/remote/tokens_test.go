package remote

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand"
	"strings"
	"testing"
	"time"

	"github.com/hcache/hcache/chunk"
	"github.com/hcache/hcache/chunk/format"
	"github.com/hcache/hcache/internal/objstore"
	"github.com/hcache/hcache/internal/testseed"
	"github.com/hcache/hcache/state"
)

const testCT = 16 // ChunkTokens of the by-tokens tests

func tokStore(t *testing.T, mut ...func(*chunk.Options)) *chunk.Store {
	t.Helper()
	s := openStore(t, t.TempDir(), nil, append([]func(*chunk.Options){func(o *chunk.Options) { o.ChunkTokens = testCT }}, mut...)...)
	t.Cleanup(func() { s.Close() })
	return s
}

func randTokens(rng *rand.Rand, n int) []uint32 {
	out := make([]uint32, n)
	for i := range out {
		out[i] = uint32(rng.Intn(32000))
	}
	return out
}

// saveTok saves a token-addressed context of tokens with rows conv.
func saveTok(t *testing.T, s *chunk.Store, ns, id string, ident *chunk.Identity, salt []byte, tokens []uint32, conv convo) {
	t.Helper()
	w, stored, err := s.CreateTokens(ns, id, ident, tokens, chunk.CreateOptions{Salt: salt})
	if err != nil {
		t.Fatal(err)
	}
	for l, p := range ident.Plan {
		if p.Kind == chunk.LayerNone {
			continue
		}
		if err := w.AppendLayer(l, conv[l][stored*int(p.RowBytes):]); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
}

// restoreTok restores p from s and checks it holds want tokens, each row
// equal to conv's (bit-exact).
func restoreTok(t *testing.T, s *chunk.Store, p chunk.Prefix, conv convo, want int) {
	t.Helper()
	seen := 0
	n, err := s.RestoreTokens(p, func(layer int, rows []byte) error {
		rb := int(p.Identity.Plan[layer].RowBytes)
		if !bytes.Equal(rows, conv[layer][:want*rb]) {
			return fmt.Errorf("layer %d: %d bytes differ from the %d saved", layer, len(rows), want*rb)
		}
		seen++
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if n != want || (want > 0 && seen != len(conv)) {
		t.Fatalf("restore by tokens: %d tokens %d layers, want %d tokens", n, seen, want)
	}
}

// TestByTokens: a prompt saved on node A and published by tokens restores
// bit-exact on node B, which never saw it, by its tokens (promotion into
// B's store as shared groups); a longer prompt sharing only a prefix gets
// only the shared groups; a second publish uploads nothing; other
// namespaces and salts see nothing; the tip object names the chain.
func TestByTokens(t *testing.T) {
	srv := objstore.Start(t)
	rng := rand.New(rand.NewSource(testseed.Seed(t)))
	ident := testIdentity()
	ctx := context.Background()
	a, b := newClient(t, srv.Endpoint, "node-a"), newClient(t, srv.Endpoint, "node-b")
	sa, sb, sc := tokStore(t), tokStore(t), tokStore(t)
	salt := []byte("tenant-1")
	prompt := randTokens(rng, 3*testCT+5)
	conv := makeConvo(rng, ident, len(prompt))
	saveTok(t, sa, "chat", "conv/1", ident, salt, prompt, conv)
	p := chunk.Prefix{Namespace: "chat", Salt: salt, Identity: ident, Tokens: prompt}

	rep, err := a.PublishTokens(ctx, sa, p, 4)
	if err != nil {
		t.Fatal(err)
	}
	if rep != (PublishReport{Groups: 3, Uploaded: 3, Batches: 1}) {
		t.Fatalf("first publish: %+v", rep)
	}
	if rep, err = a.PublishTokens(ctx, sa, p, 4); err != nil || rep != (PublishReport{Groups: 3, Existing: 3}) {
		t.Fatalf("second publish: %+v, %v (want nothing uploaded)", rep, err)
	}
	if err := a.PublishTip(ctx, sa, "conv/1", p); err != nil {
		t.Fatal(err)
	}
	tip, tsalt, ttok, tail, err := b.LookupTip(ctx, "chat", "conv/1")
	keys, _ := sa.ChainKeys("chat", salt, ident, prompt)
	if err != nil || tip != keys[2] || string(tsalt) != string(salt) || ttok != uint64(len(prompt)) || !equalIDs(tail, prompt[3*testCT:]) {
		t.Fatalf("tip: %x %q %d %v, %v", tip[:4], tsalt, ttok, tail, err)
	}

	if n, _ := sb.Lookup(p); n != 0 {
		t.Fatalf("node B holds %d tokens before any promotion", n)
	}
	if n, err := b.LookupTokens(ctx, sb, p, 0, 2); err != nil || n != 3*testCT {
		t.Fatalf("remote lookup on B: %d, %v; want %d", n, err, 3*testCT)
	}
	got, err := b.PromoteTokens(ctx, sb, p, 2)
	if err != nil || got != 3*testCT {
		t.Fatalf("promote on B: %d, %v", got, err)
	}
	if n, _ := sb.Lookup(p); n != 3*testCT {
		t.Fatalf("after promotion B's store holds %d tokens", n)
	}
	restoreTok(t, sb, p, conv, 3*testCT)
	if got, err := b.PromoteTokens(ctx, sb, p, 2); err != nil || got != 0 {
		t.Fatalf("second promote: %d, %v (want nothing more)", got, err)
	}

	// A longer prompt sharing the first 2 groups only.
	longer := append(append([]uint32(nil), prompt[:2*testCT]...), randTokens(rng, 3*testCT)...)
	lp := chunk.Prefix{Namespace: "chat", Salt: salt, Identity: ident, Tokens: longer}
	if got, err := b.PromoteTokens(ctx, sc, lp, 2); err != nil || got != 2*testCT {
		t.Fatalf("promote of the longer prompt on C: %d, %v; want %d", got, err, 2*testCT)
	}
	restoreTok(t, sc, lp, conv, 2*testCT)
	if rep, err := b.Check(ctx, true); err != nil || !rep.OK() || rep.Groups != 3 || rep.Tips != 1 {
		t.Fatalf("deep check: %+v, %v; want 3 groups and 1 tip, no errors", rep, err)
	}

	for _, q := range []chunk.Prefix{
		{Namespace: "other", Salt: salt, Identity: ident, Tokens: prompt},
		{Namespace: "chat", Salt: []byte("tenant-2"), Identity: ident, Tokens: prompt},
		{Namespace: "chat", Identity: ident, Tokens: prompt},
	} {
		s := tokStore(t)
		if n, err := b.LookupTokens(ctx, s, q, 0, 4); err != nil || n != 0 {
			t.Fatalf("namespace %q salt %q: remote lookup %d, %v; want 0", q.Namespace, q.Salt, n, err)
		}
		if n, err := b.PromoteTokens(ctx, s, q, 4); err != nil || n != 0 || len(s.Contexts()) != 0 {
			t.Fatalf("namespace %q salt %q: promoted %d, %v", q.Namespace, q.Salt, n, err)
		}
	}
}

// TestByTokensRefused: a group object truncated or with a flipped byte,
// or a forced chain key collision, promotes and serves nothing (no context
// is left behind); the object store down answers ErrUnavailable while the
// local store serves on.
func TestByTokensRefused(t *testing.T) {
	srv := objstore.Start(t)
	rng := rand.New(rand.NewSource(testseed.Seed(t)))
	ident := testIdentity()
	ctx := context.Background()
	a := newClient(t, srv.Endpoint, "node-a")
	sa := tokStore(t)
	prompt := randTokens(rng, 2*testCT)
	conv := makeConvo(rng, ident, len(prompt))
	saveTok(t, sa, "chat", "c", ident, nil, prompt, conv)
	p := chunk.Prefix{Namespace: "chat", Identity: ident, Tokens: prompt}
	if _, err := a.PublishTokens(ctx, sa, p, 4); err != nil {
		t.Fatal(err)
	}
	gs, err := groupsOf(sa, p)
	if err != nil {
		t.Fatal(err)
	}
	key := a.groupKey("chat", gs[1].key)
	orig, err := a.get(ctx, key, 1<<30)
	if err != nil {
		t.Fatal(err)
	}
	meta := map[string]string{metaDigest: fmt.Sprintf("%x", gs[1].digest[:])}
	flipped := append([]byte(nil), orig...)
	flipped[len(flipped)-7] ^= 0x20
	desc := append([]byte(nil), orig...)
	desc[20] ^= 1 // inside the description (the index)
	for _, tc := range []struct {
		name string
		body []byte
	}{
		{"truncated", orig[:len(orig)-100]},
		{"row byte flipped", flipped},
		{"description byte flipped", desc},
		{"empty", nil},
	} {
		if err := a.put(ctx, key, bytes.NewReader(tc.body), int64(len(tc.body)), meta); err != nil {
			t.Fatal(err)
		}
		s := tokStore(t)
		n, err := a.PromoteTokens(ctx, s, p, 4)
		if !errors.Is(err, format.ErrCorrupt) || n != 0 {
			t.Fatalf("%s: promote %d, %v; want ErrCorrupt", tc.name, n, err)
		}
		if l, _ := s.Lookup(p); l != 0 || len(s.Contexts()) != 0 {
			t.Fatalf("%s: the refused promotion left %d tokens, %d contexts", tc.name, l, len(s.Contexts()))
		}
		if rep, err := a.Check(ctx, true); err != nil || len(rep.Errors) != 1 || !strings.Contains(rep.Errors[0], key) {
			t.Fatalf("%s: deep check %+v, %v; want one error naming %s", tc.name, rep, err, key)
		}
	}
	if err := a.put(ctx, key, bytes.NewReader(orig), int64(len(orig)), meta); err != nil {
		t.Fatal(err)
	}

	// A forced collision: keys that depend on the position only.
	pos := func(o *chunk.Options) {
		o.ChainKeyFunc = func(ch state.Chain, parent state.ChainKey, ids []uint32) state.ChainKey {
			return ch.Next(parent, []uint32{uint32(len(ids))})
		}
	}
	sx, sy := tokStore(t, pos), tokStore(t, pos)
	saveTok(t, sx, "chat", "x", ident, nil, prompt, conv)
	if _, err := a.PublishTokens(ctx, sx, p, 4); err != nil {
		t.Fatal(err)
	}
	other := randTokens(rng, 2*testCT)
	op := chunk.Prefix{Namespace: "chat", Identity: ident, Tokens: other}
	if n, err := a.LookupTokens(ctx, sy, op, 0, 4); err != nil || n != 0 {
		t.Fatalf("collision: remote lookup %d, %v; want 0", n, err)
	}
	if n, err := a.PromoteTokens(ctx, sy, op, 4); err != nil || n != 0 || len(sy.Contexts()) != 0 {
		t.Fatalf("collision: promoted %d, %v", n, err)
	}
	ogs, _ := groupsOf(sy, op)
	if _, err := a.fetchGroup(ctx, ogs[0]); !errors.Is(err, ErrCollision) {
		t.Fatalf("collision: fetch of the colliding group: %v, want ErrCollision", err)
	}
	// Its publish refuses to write over the other tokens' object.
	saveTok(t, sy, "chat", "y", ident, nil, other, makeConvo(rng, ident, len(other)))
	if _, err := a.PublishTokens(ctx, sy, op, 4); !errors.Is(err, ErrCollision) {
		t.Fatalf("collision: publish %v, want ErrCollision", err)
	}
	if n, err := a.PromoteTokens(ctx, tokStore(t, pos), p, 4); err != nil || n != 2*testCT {
		t.Fatalf("after the refused publish the first prompt's groups: %d, %v", n, err)
	}

	// The object store down: errors, never a local failure.
	srv.Kill()
	quick := newClientNoBucket(t, srv.Endpoint)
	s := tokStore(t)
	saveTok(t, s, "chat", "local", ident, nil, prompt, conv)
	if _, err := quick.LookupTokens(ctx, s, p, 0, 4); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("store down: lookup %v, want ErrUnavailable", err)
	}
	if n, err := quick.PromoteTokens(ctx, s, p, 4); err != nil || n != 0 {
		t.Fatalf("store down, all local: promote %d, %v", n, err)
	}
	restoreTok(t, s, p, conv, 2*testCT)
	if n, err := quick.PromoteTokens(ctx, tokStore(t), p, 4); !errors.Is(err, ErrUnavailable) || n != 0 {
		t.Fatalf("store down: promote %d, %v; want ErrUnavailable", n, err)
	}
}

func newClientNoBucket(t *testing.T, endpoint string) *Client {
	c, err := New(Config{Endpoint: endpoint, Bucket: "hcache-test", Prefix: "t/", StoreID: "down",
		AccessKey: "any", SecretKey: "any", Timeout: time.Second, RangeBytes: 64 << 10})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// TestGCGroups: remote gc keeps the group objects a tip's chain reaches
// and removes, past the grace, those no tip reaches.
func TestGCGroups(t *testing.T) {
	srv := objstore.Start(t)
	rng := rand.New(rand.NewSource(testseed.Seed(t)))
	ident := testIdentity()
	ctx := context.Background()
	a := newClient(t, srv.Endpoint, "node-a")
	sa := tokStore(t)
	named := randTokens(rng, 2*testCT+3)
	orphan := append(append([]uint32(nil), named[:testCT]...), randTokens(rng, 2*testCT)...)
	saveTok(t, sa, "chat", "named", ident, nil, named, makeConvo(rng, ident, len(named)))
	saveTok(t, sa, "chat", "orphan", ident, nil, orphan, makeConvo(rng, ident, len(orphan)))
	pn := chunk.Prefix{Namespace: "chat", Identity: ident, Tokens: named}
	po := chunk.Prefix{Namespace: "chat", Identity: ident, Tokens: orphan}
	for _, p := range []chunk.Prefix{pn, po} {
		if _, err := a.PublishTokens(ctx, sa, p, 4); err != nil {
			t.Fatal(err)
		}
	}
	if err := a.PublishTip(ctx, sa, "named", pn); err != nil {
		t.Fatal(err)
	}
	young, err := a.GC(ctx, GCOptions{})
	if err != nil || len(young.Deleted) != 0 || young.GroupObjects != 4 || young.KeptYoung != 2 || young.Tips != 1 {
		t.Fatalf("gc within the grace: %+v, %v", young, err)
	}
	later := func() time.Time { return time.Now().Add(2 * DefaultGrace) }
	rep, err := a.GC(ctx, GCOptions{Now: later})
	if err != nil {
		t.Fatal(err)
	}
	go2, _ := groupsOf(sa, po)
	want := map[string]bool{a.groupKey("chat", go2[1].key): true, a.groupKey("chat", go2[2].key): true}
	if len(rep.Deleted) != 2 || !want[rep.Deleted[0]] || !want[rep.Deleted[1]] {
		t.Fatalf("gc deleted %v, want only the orphan's own groups (its first is the named prompt's)", rep.Deleted)
	}
	if n, err := a.LookupTokens(ctx, tokStore(t), pn, 0, 4); err != nil || n != 2*testCT {
		t.Fatalf("after gc the named prompt: %d, %v", n, err)
	}
	if rep, err = a.GC(ctx, GCOptions{Now: later}); err != nil || len(rep.Deleted) != 0 {
		t.Fatalf("second gc: %+v, %v (want idempotent)", rep, err)
	}
}
