package remote

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand"
	"testing"

	"github.com/hcache/hcache/chunk"
	"github.com/hcache/hcache/chunk/format"
	"github.com/hcache/hcache/internal/objstore"
	"github.com/hcache/hcache/internal/testseed"
)

// publishTok publishes a token-addressed context as the daemon does at its
// close: the groups the bucket lacks, then the tip object (no by-name
// context object).
func publishTok(t *testing.T, c *Client, s *chunk.Store, id string, p chunk.Prefix) PublishReport {
	t.Helper()
	rep, err := c.PublishTokens(context.Background(), s, p, 4)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.PublishTip(context.Background(), s, id, p); err != nil {
		t.Fatal(err)
	}
	return rep
}

// TestByNameFromTip: a token-addressed context published as groups + tip
// (no manifest, no context object) restores by name on a node that never
// saw it, bit-exact, tail included; a grown context's publish uploads only
// its new groups, its tail and its tip; the newer of tip and manifest wins;
// a version-1 tip with a manifest (the old form) still imports.
func TestByNameFromTip(t *testing.T) {
	srv := objstore.Start(t)
	rng := rand.New(rand.NewSource(testseed.Seed(t)))
	ident := testIdentity()
	ctx := context.Background()
	a, b := newClient(t, srv.Endpoint, "node-a"), newClient(t, srv.Endpoint, "node-b")
	sa := tokStore(t)
	salt := []byte("tenant-1")
	full := randTokens(rng, 5*testCT+7)
	conv := makeConvo(rng, ident, len(full))
	turn1 := full[:3*testCT+5]
	saveTok(t, sa, "chat", "conv/1", ident, salt, turn1, prefixConvo(ident, conv, len(turn1)))
	p1 := chunk.Prefix{Namespace: "chat", Salt: salt, Identity: ident, Tokens: turn1}
	publishTok(t, a, sa, "conv/1", p1)
	for _, sub := range []string{"name/", "ctx/"} {
		if objs, err := a.list(ctx, sub); err != nil || len(objs) != 0 {
			t.Fatalf("%s objects after a publish by tokens: %d, %v; want none", sub, len(objs), err)
		}
	}

	sb := tokStore(t)
	m, err := b.Import(ctx, sb, "chat", "conv/1")
	if err != nil || m.Tokens != uint64(len(turn1)) {
		t.Fatalf("import from the tip: %+v, %v", m, err)
	}
	checkConvo(t, sb, "chat", "conv/1", ident, prefixConvo(ident, conv, len(turn1)))
	restoreTok(t, sb, chunk.Prefix{Namespace: "chat", Salt: salt, Identity: ident, Tokens: turn1, Context: "conv/1"}, conv, len(turn1))
	got0 := b.Stats().GetBytes
	if _, err := b.Import(ctx, sb, "chat", "conv/1"); !errors.Is(err, ErrHaveNewer) {
		t.Fatalf("second import: %v, want ErrHaveNewer", err)
	}
	// Deciding that the local copy is current reads the tip's description,
	// not its tail rows (every append and restore by name asks).
	if got, tail := b.Stats().GetBytes-got0, int64(5*(512+2*1024)); got >= tail {
		t.Fatalf("an import finding the local copy current read %d bytes, the tail's rows alone are %d", got, tail)
	}

	// The next turn: the context grows to 5 groups and a tail; its publish
	// uploads 2 new groups (and group 3, which was the tail), not the rest.
	if err := sa.Delete("chat", "conv/1"); err != nil {
		t.Fatal(err)
	}
	saveTok(t, sa, "chat", "conv/1", ident, salt, full, conv)
	p2 := chunk.Prefix{Namespace: "chat", Salt: salt, Identity: ident, Tokens: full}
	before := a.Stats().PutBytes
	rep := publishTok(t, a, sa, "conv/1", p2)
	put := a.Stats().PutBytes - before
	rowBytes := 0
	for _, pl := range ident.Plan {
		rowBytes += int(pl.RowBytes)
	}
	if rep.Uploaded != 2 || rep.Existing != 3 {
		t.Fatalf("second publish: %+v, want 2 uploaded and 3 existing", rep)
	}
	// 2 groups and the tail's rows, plus descriptions (a few KiB).
	if limit := int64((2*testCT+7)*rowBytes + 16<<10); put > limit || put < int64((2*testCT+7)*rowBytes) {
		t.Fatalf("second publish put %d bytes, want the 2 new groups and the tail (%d rows of %d B) only", put, 2*testCT+7, rowBytes)
	}
	sc := tokStore(t)
	from, n, err := b.RestoreByName(ctx, sc, "chat", "conv/1", uint64(len(full)), func(layer int, rows []byte) error {
		rb := int(ident.Plan[layer].RowBytes)
		if !bytes.Equal(rows, conv[layer][:len(full)*rb]) {
			return fmt.Errorf("layer %d differs", layer)
		}
		return nil
	})
	if err != nil || from != "remote" || n != len(full) {
		t.Fatalf("restore by name from the tip: %s %d, %v", from, n, err)
	}
	checkConvo(t, sc, "chat", "conv/1", ident, conv)
	// B holds turn 1: the import replaces it (the groups only the old copy
	// held go with it, so they are fetched again).
	if _, err := b.Import(ctx, sb, "chat", "conv/1"); err != nil {
		t.Fatal(err)
	}
	checkConvo(t, sb, "chat", "conv/1", ident, conv)

	// A manifest with more tokens than the tip wins (a legacy publish of
	// the same name, newer); a tie goes to the tip.
	sl := tokStore(t)
	longer := makeConvo(rng, ident, len(full)+3)
	writeConvo(t, sl, "chat", "conv/1", ident, longer)
	if _, err := a.Publish(ctx, sl, "chat", "conv/1"); err != nil {
		t.Fatal(err)
	}
	sd := tokStore(t)
	if m, err := b.Import(ctx, sd, "chat", "conv/1"); err != nil || m.Tokens != uint64(len(full)+3) || m.Object == a.tipKey("chat", "conv/1") {
		t.Fatalf("newer manifest: %+v, %v", m, err)
	}
	checkConvo(t, sd, "chat", "conv/1", ident, longer)

	// The old form: a version-1 tip and a manifest; Import uses the
	// manifest, LookupTip and gc read the version-1 tip.
	sv := tokStore(t)
	old := full[:2*testCT+3]
	oldConv := makeConvo(rng, ident, len(old))
	saveTok(t, sv, "chat", "old", ident, nil, old, oldConv)
	po := chunk.Prefix{Namespace: "chat", Identity: ident, Tokens: old}
	if _, err := a.PublishTokens(ctx, sv, po, 4); err != nil {
		t.Fatal(err)
	}
	gs, _ := groupsOf(sv, po)
	v1 := (&tipDesc{ns: "chat", id: "old", ident: ident, tokens: uint64(len(old)), tip: gs[1].key, tail: old[2*testCT:]}).encodeV1()
	if err := a.put(ctx, a.tipKey("chat", "old"), bytes.NewReader(v1), int64(len(v1)), nil); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Publish(ctx, sv, "chat", "old"); err != nil {
		t.Fatal(err)
	}
	if tip, _, tok, tail, err := b.LookupTip(ctx, "chat", "old"); err != nil || tip != gs[1].key || tok != uint64(len(old)) || !equalIDs(tail, old[2*testCT:]) {
		t.Fatalf("version-1 tip: %x %d %v, %v", tip[:4], tok, tail, err)
	}
	sw := tokStore(t)
	if m, err := b.Import(ctx, sw, "chat", "old"); err != nil || m.Tokens != uint64(len(old)) {
		t.Fatalf("import of the old form: %+v, %v", m, err)
	}
	checkConvo(t, sw, "chat", "old", ident, oldConv)
	if rep, err := b.Check(ctx, true); err != nil || !rep.OK() {
		t.Fatalf("deep check: %+v, %v", rep, err)
	}
}

// prefixConvo is conv's first n tokens.
func prefixConvo(ident *chunk.Identity, conv convo, n int) convo {
	out := convo{}
	for l, rows := range conv {
		out[l] = rows[:n*int(ident.Plan[l].RowBytes)]
	}
	return out
}

// TestByNameFromTipRefused: a tip object truncated, with a flipped tail
// byte or description byte, or naming a group the bucket lacks or holds
// corrupt, imports nothing: no local context appears, an older local copy
// stays as it was, and the deep check names what is wrong.
func TestByNameFromTipRefused(t *testing.T) {
	srv := objstore.Start(t)
	rng := rand.New(rand.NewSource(testseed.Seed(t)))
	ident := testIdentity()
	ctx := context.Background()
	a := newClient(t, srv.Endpoint, "node-a")
	sa := tokStore(t)
	tokens := randTokens(rng, 3*testCT+5)
	conv := makeConvo(rng, ident, len(tokens))
	saveTok(t, sa, "chat", "c", ident, nil, tokens, conv)
	p := chunk.Prefix{Namespace: "chat", Identity: ident, Tokens: tokens}
	publishTok(t, a, sa, "c", p)
	tipKey := a.tipKey("chat", "c")
	tip, err := a.get(ctx, tipKey, 1<<30)
	if err != nil {
		t.Fatal(err)
	}
	gs, _ := groupsOf(sa, p)
	gkey := a.groupKey("chat", gs[1].key)
	grp, err := a.get(ctx, gkey, 1<<30)
	if err != nil {
		t.Fatal(err)
	}
	gmeta := map[string]string{metaDigest: fmt.Sprintf("%x", gs[1].digest[:])}
	flip := func(b []byte, at int) []byte {
		c := append([]byte(nil), b...)
		c[at] ^= 0x10
		return c
	}
	for _, tc := range []struct {
		name          string
		tip, group    []byte // nil: the original
		dropGroup     bool
		wantInCheckOf string
	}{
		{name: "tip truncated", tip: tip[:len(tip)-10], wantInCheckOf: tipKey},
		{name: "tip tail byte flipped", tip: flip(tip, len(tip)-3), wantInCheckOf: tipKey},
		{name: "tip description byte flipped", tip: flip(tip, 12), wantInCheckOf: tipKey},
		{name: "group missing", dropGroup: true, wantInCheckOf: gkey},
		{name: "group row byte flipped", group: flip(grp, len(grp)-5), wantInCheckOf: gkey},
	} {
		t.Run(tc.name, func(t *testing.T) {
			body, gbody := tip, grp
			if tc.tip != nil {
				body = tc.tip
			}
			if tc.group != nil {
				gbody = tc.group
			}
			if err := a.put(ctx, tipKey, bytes.NewReader(body), int64(len(body)), nil); err != nil {
				t.Fatal(err)
			}
			if tc.dropGroup {
				if err := a.remove(ctx, gkey); err != nil {
					t.Fatal(err)
				}
			} else if err := a.put(ctx, gkey, bytes.NewReader(gbody), int64(len(gbody)), gmeta); err != nil {
				t.Fatal(err)
			}
			fresh := tokStore(t)
			if _, err := a.Import(ctx, fresh, "chat", "c"); err == nil {
				t.Fatal("import succeeded")
			} else if !tc.dropGroup && !errors.Is(err, format.ErrCorrupt) {
				t.Fatalf("import: %v, want ErrCorrupt", err)
			} else if tc.dropGroup && !errors.Is(err, ErrNotFound) {
				t.Fatalf("import: %v, want ErrNotFound", err)
			}
			if len(fresh.Contexts()) != 0 {
				t.Fatalf("the refused import left %d contexts", len(fresh.Contexts()))
			}
			// An older local copy (turn 1: 1 group + 3 tokens) stays.
			older := tokStore(t)
			saveTok(t, older, "chat", "c", ident, nil, tokens[:testCT+3], prefixConvo(ident, conv, testCT+3))
			if _, err := a.Import(ctx, older, "chat", "c"); err == nil {
				t.Fatal("import over the older copy succeeded")
			}
			checkConvo(t, older, "chat", "c", ident, prefixConvo(ident, conv, testCT+3))
			rep, err := a.Check(ctx, true)
			if err != nil || rep.OK() {
				t.Fatalf("deep check: %+v, %v; want errors", rep, err)
			}
			found := false
			for _, e := range rep.Errors {
				found = found || bytes.Contains([]byte(e), []byte(tc.wantInCheckOf))
			}
			if !found {
				t.Fatalf("deep check errors %q name no %s", rep.Errors, tc.wantInCheckOf)
			}
			// Restore the originals for the next case.
			if err := a.put(ctx, tipKey, bytes.NewReader(tip), int64(len(tip)), nil); err != nil {
				t.Fatal(err)
			}
			if err := a.put(ctx, gkey, bytes.NewReader(grp), int64(len(grp)), gmeta); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// TestPublishBatches: with PublishBatchBytes below a group's bytes a
// publish by tokens reads and uploads one group at a time (as many batches
// as groups), skips the groups the bucket holds, and what it uploaded
// restores bit-exact on another node.
func TestPublishBatches(t *testing.T) {
	srv := objstore.Start(t)
	rng := rand.New(rand.NewSource(testseed.Seed(t)))
	ident := testIdentity()
	ctx := context.Background()
	for i, tc := range []struct {
		name        string
		batch       int64
		first       int // groups published before (the bucket holds them)
		wantBatches int
	}{
		{"one group a batch", 1, 0, 5},
		{"one group a batch, 2 there", 1, 2, 3},
		{"all in one", 1 << 30, 1, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a := newClient(t, srv.Endpoint, "node-a", func(c *Config) { c.PublishBatchBytes = tc.batch; c.Prefix = fmt.Sprintf("b%d/", i) })
			sa := tokStore(t)
			tokens := randTokens(rng, 5*testCT+2)
			conv := makeConvo(rng, ident, len(tokens))
			saveTok(t, sa, "chat", "c", ident, nil, tokens, conv)
			p := chunk.Prefix{Namespace: "chat", Identity: ident, Tokens: tokens}
			if tc.first > 0 {
				if _, err := a.PublishTokens(ctx, sa, chunk.Prefix{Namespace: "chat", Identity: ident, Tokens: tokens[:tc.first*testCT]}, 4); err != nil {
					t.Fatal(err)
				}
			}
			rep, err := a.PublishTokens(ctx, sa, p, 4)
			if err != nil || rep.Uploaded != 5-tc.first || rep.Existing != tc.first || rep.Batches != tc.wantBatches {
				t.Fatalf("publish: %+v, %v; want %d uploaded in %d batches", rep, err, 5-tc.first, tc.wantBatches)
			}
			sb := tokStore(t)
			if n, err := a.PromoteTokens(ctx, sb, p, 4); err != nil || n != 5*testCT {
				t.Fatalf("promote: %d, %v", n, err)
			}
			restoreTok(t, sb, p, conv, 5*testCT)
		})
	}
}
