package daemon_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"io"
	"math/rand"
	"net/http"
	"strconv"
	"strings"
	"testing"

	"github.com/hcache/hcache/chunk"
	"github.com/hcache/hcache/chunk/remote"
	hc "github.com/hcache/hcache/clients/hcacheclient"
	"github.com/hcache/hcache/internal/objstore"
	"github.com/hcache/hcache/internal/testseed"
	"github.com/hcache/hcache/state"
)

func metricsOf(t *testing.T, addr string) string {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}

// TestRemoteByTokens: a prompt saved by tokens on node A (prefill, then
// decode with ids) restores bit-exact on node B, which never saw it, by
// its tokens: B's lookup reports the bucket's groups past its local
// match, the restore promotes them into B's store (a token-addressed
// context, its groups local shared groups from then on) and serves them;
// a longer prompt sharing only A's first two groups gets those on C;
// another namespace or salt sees nothing; the object store down, lookups
// and restores answer from the local store.
func TestRemoteByTokens(t *testing.T) {
	seed := testseed.Seed(t)
	rng := rand.New(rand.NewSource(seed))
	srv := objstore.Start(t)
	a, _ := startNode(t, srv, "node-a")
	b, bMetrics := startNode(t, srv, "node-b")
	c, _ := startNode(t, srv, "node-c")
	ca, cb, cc := a.dial(), b.dial(), c.dial()
	ctx := context.Background()
	ct := a.store.ChunkTokens()
	salt := []byte("tenant-1")
	prompt, decode := randTokens(rng, 3*ct-2), randTokens(rng, 5)
	all := append(append([]uint32(nil), prompt...), decode...)
	saveTokens(t, ca, "chat", "p1", prompt, decode, salt)

	p := hc.Prefix{Namespace: "chat", Identity: ident, Tokens: all, Salt: salt}
	if n, _, err := cb.Lookup(ctx, p); err != nil || n != uint64(3*ct) {
		t.Fatalf("lookup on B: %d, %v; want %d (the bucket's groups)", n, err, 3*ct)
	}
	if cs := b.store.Contexts(); len(cs) != 0 {
		t.Fatalf("a lookup promoted %+v (it must only ask)", cs)
	}
	checkTokens(t, cb, "on B", p, all, 3*ct)
	cs := b.store.Contexts()
	if len(cs) != 1 || !strings.HasPrefix(cs[0].ID, "remote-prefix-") || !cs[0].TokenAddressed || cs[0].Tokens != uint64(3*ct) {
		t.Fatalf("after the restore B's store holds %+v, want one promoted context of %d tokens", cs, 3*ct)
	}
	if n, _ := b.store.Lookup(chunk.Prefix{Namespace: "chat", Salt: salt, Identity: cs[0].Identity, Tokens: all}); n != 3*ct {
		t.Fatalf("after the restore B's store holds %d tokens, want %d", n, 3*ct)
	}
	if m := metricsOf(t, bMetrics); !strings.Contains(m, `hcache_remote_token_lookups_total{result="promoted"} 1`) {
		t.Fatalf("B's metrics lack one promotion:\n%s", grepLines(m, "hcache_remote_token"))
	}
	checkTokens(t, cb, "on B again (local)", p, all, 3*ct)

	longer := append(append([]uint32(nil), prompt[:2*ct]...), randTokens(rng, 2*ct)...)
	checkTokens(t, cc, "a longer prompt on C", hc.Prefix{Namespace: "chat", Identity: ident, Tokens: longer, Salt: salt}, longer, 2*ct)
	for _, q := range []hc.Prefix{
		{Namespace: "other", Identity: ident, Tokens: all, Salt: salt},
		{Namespace: "chat", Identity: ident, Tokens: all, Salt: []byte("tenant-2")},
	} {
		if n, _, err := cc.Lookup(ctx, q); err != nil || n != 0 {
			t.Fatalf("namespace %q salt %q on C: lookup %d, %v; want 0", q.Namespace, q.Salt, n, err)
		}
		checkTokens(t, cc, "namespace "+q.Namespace+" salt "+string(q.Salt), q, all, 0)
	}

	// The object store down: local service goes on.
	srv.Kill()
	other := randTokens(rng, 2*ct)
	saveTokens(t, ca, "chat", "p2", other, nil, salt) // its publish fails, logged
	checkTokens(t, ca, "on A, store down", hc.Prefix{Namespace: "chat", Identity: ident, Tokens: other, Salt: salt}, other, 2*ct)
	checkTokens(t, cb, "on B, store down (promoted before)", p, all, 3*ct)
	if n, _, err := cc.Lookup(ctx, hc.Prefix{Namespace: "chat", Identity: ident, Tokens: other, Salt: salt}); err != nil || n != 0 {
		t.Fatalf("lookup on C, store down: %d, %v; want 0 (local only)", n, err)
	}
	checkTokens(t, cc, "on C, store down", hc.Prefix{Namespace: "chat", Identity: ident, Tokens: other, Salt: salt}, other, 0)
}

// TestRemoteForcedCollision: every chain key forced to depend on the
// position only (chunk.Options.ChainKeyFunc) on two nodes: B's lookup and
// restore by the tokens of another prompt than A's find and serve nothing
// from the bucket, and B's publish of its own prompt does not replace
// A's group objects (A's prompt still restores bit-exact on a third node).
func TestRemoteForcedCollision(t *testing.T) {
	seed := testseed.Seed(t)
	rng := rand.New(rand.NewSource(seed))
	srv := objstore.Start(t)
	pos := func(o *chunk.Options) {
		o.ChainKeyFunc = func(ch state.Chain, parent state.ChainKey, ids []uint32) state.ChainKey {
			root := ch.Root()
			h := sha256.New()
			h.Write(root[:])
			h.Write(parent[:])
			var n [4]byte
			binary.LittleEndian.PutUint32(n[:], uint32(len(ids)))
			h.Write(n[:])
			var k state.ChainKey
			h.Sum(k[:0])
			return k
		}
	}
	a, _ := startNode(t, srv, "node-a", pos)
	b, _ := startNode(t, srv, "node-b", pos)
	c, _ := startNode(t, srv, "node-c", pos)
	ca, cb, cc := a.dial(), b.dial(), c.dial()
	ctx := context.Background()
	ct := a.store.ChunkTokens()
	pa, pb := randTokens(rng, 2*ct), randTokens(rng, 2*ct)
	saveTokens(t, ca, "chat", "a", pa, nil, nil)
	q := hc.Prefix{Namespace: "chat", Identity: ident, Tokens: pb}
	if n, _, err := cb.Lookup(ctx, q); err != nil || n != 0 {
		t.Fatalf("colliding lookup on B: %d, %v; want 0", n, err)
	}
	checkTokens(t, cb, "colliding restore on B", q, pb, 0)
	if len(b.store.Contexts()) != 0 {
		t.Fatalf("the colliding restore left contexts on B: %+v", b.store.Contexts())
	}
	saveTokens(t, cb, "chat", "b", pb, nil, nil) // its publish by tokens fails (collision), logged
	checkTokens(t, cc, "A's prompt on C", hc.Prefix{Namespace: "chat", Identity: ident, Tokens: pa}, pa, 2*ct)
}

// TestRemoteTokensByName: a token-addressed context closed on node A is
// published as its new group objects and its tip object only (no by-name
// context object, no manifest), restores by name on node B bit-exact
// (imported from the tip object and the groups it reaches), and its next
// turn's publish uploads only the new groups, the tail and the tip.
func TestRemoteTokensByName(t *testing.T) {
	seed := testseed.Seed(t)
	rng := rand.New(rand.NewSource(seed))
	srv := objstore.Start(t)
	a, aMetrics := startNode(t, srv, "node-a")
	b, _ := startNode(t, srv, "node-b")
	ca, cb := a.dial(), b.dial()
	ctx := context.Background()
	ct := a.store.ChunkTokens()
	salt := []byte("tenant-1")
	prompt, decode := randTokens(rng, 4*ct+3), randTokens(rng, 4)
	all := append(append([]uint32(nil), prompt...), decode...)
	saveTokens(t, ca, "chat", "conv", prompt, decode, salt)
	if m := metricsOf(t, aMetrics); strings.Contains(m, `hcache_remote_publishes_total{result="error"}`) {
		t.Fatalf("publish failed on A:\n%s", grepLines(m, "hcache_remote_publish"))
	}
	putAfter1 := putBytes(t, aMetrics)
	cl, err := remote.New(remote.Config{Endpoint: srv.Endpoint, Bucket: "fleet", StoreID: "check", AccessKey: "k", SecretKey: "s"})
	if err != nil {
		t.Fatal(err)
	}
	if rep, err := cl.Check(ctx, true); err != nil || !rep.OK() || rep.Manifests != 0 || rep.Tips != 1 || rep.Groups != 4 {
		t.Fatalf("bucket after the close: %+v, %v; want 4 groups, 1 tip, no manifest", rep, err)
	}
	restoreByName := func(c *hc.Client, what string, tokens []uint32) {
		t.Helper()
		n, err := c.Restore(ctx, "chat", "conv", ident, func(layer int, rows []byte) error {
			rb := int(ident.Plan[layer].RowBytes)
			if !bytes.Equal(rows, tokRows(tokens, layer, 0, len(tokens), rb)) {
				return fmt.Errorf("layer %d differs", layer)
			}
			return nil
		})
		if err != nil || n != uint64(len(tokens)) {
			t.Fatalf("%s: restore by name: %d, %v; want %d tokens", what, n, err, len(tokens))
		}
	}
	restoreByName(cb, "on B", all)
	checkTokens(t, cb, "on B by tokens", hc.Prefix{Namespace: "chat", Identity: ident, Tokens: all, Salt: salt, ID: "conv"}, all, len(all))

	// The next turn on A: 2 more groups' worth of tokens.
	w, err := ca.Append(ctx, "chat", "conv", ident)
	if err != nil {
		t.Fatal(err)
	}
	more := randTokens(rng, 2*ct)
	all2 := append(append([]uint32(nil), all...), more...)
	for i := len(all); i < len(all2); i++ {
		if err := w.AppendTokenIDs(ctx, all2[i:i+1], tokRow(all2, i)); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Close(ctx); err != nil {
		t.Fatal(err)
	}
	rowBytes := 0
	for _, p := range ident.Plan {
		rowBytes += int(p.RowBytes)
	}
	put := putBytes(t, aMetrics) - putAfter1
	if lo, hi := 2*ct*rowBytes, (3*ct+7)*rowBytes+64<<10; put < float64(lo) || put > float64(hi) {
		t.Fatalf("the second turn's publish put %.0f bytes, want the new groups and the tail (%d to %d), not the whole context (%d)", put, lo, hi, len(all2)*rowBytes)
	}
	restoreByName(cb, "on B, second turn", all2)
}

func putBytes(t *testing.T, addr string) float64 {
	t.Helper()
	for _, l := range strings.Split(metricsOf(t, addr), "\n") {
		if v, ok := strings.CutPrefix(l, "hcache_remote_put_bytes_total "); ok {
			f, err := strconv.ParseFloat(v, 64)
			if err != nil {
				t.Fatal(err)
			}
			return f
		}
	}
	t.Fatal("no hcache_remote_put_bytes_total")
	return 0
}
