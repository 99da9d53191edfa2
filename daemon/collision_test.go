package daemon_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"io"
	"log/slog"
	"math/rand"
	"os"
	"path/filepath"
	"testing"

	"github.com/hcache/hcache/chunk"
	hc "github.com/hcache/hcache/clients/hcacheclient"
	"github.com/hcache/hcache/daemon"
	"github.com/hcache/hcache/internal/testseed"
	"github.com/hcache/hcache/state"
)

// TestForcedCollisionServesNothing forces every chain key to depend only on
// the group's position (chunk.Options.ChainKeyFunc), so two different
// prompts collide on every key. Through the daemon: a lookup of the second
// prompt finds nothing, a restore by its tokens serves no row of the first
// prompt, saving it does not write over the first prompt's groups, and the
// first prompt still restores bit-exact by its own tokens.
func TestForcedCollisionServesNothing(t *testing.T) {
	seed := testseed.Seed(t)
	rng := rand.New(rand.NewSource(seed))
	sd, err := os.MkdirTemp("", "hcd")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(sd)
	sock := filepath.Join(sd, "s")
	st, err := chunk.Open(chunk.Options{Dir: t.TempDir(), GCInterval: -1, SegmentBytes: 8 << 20, CacheBytes: 0, Logf: t.Logf,
		ChainKeyFunc: func(ch state.Chain, parent state.ChainKey, ids []uint32) state.ChainKey {
			root := ch.Root()
			h := sha256.New()
			h.Write(root[:])
			h.Write(parent[:])
			var n [4]byte
			binary.LittleEndian.PutUint32(n[:], uint32(len(ids)))
			h.Write(n[:]) // the tokens are left out: every prompt of a length collides
			var k state.ChainKey
			h.Sum(k[:0])
			return k
		}})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	srv, err := daemon.New(daemon.Config{Store: st, Listen: sock, Shm: sock + ".shm", GCInterval: -1,
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Stop()
	c, err := hc.Dial("unix://" + sock)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx := context.Background()
	ct := st.ChunkTokens()
	p := randTokens(rng, 3*ct)
	q := randTokens(rng, 3*ct)
	q[0] = p[0] + 1 // q differs from p in every group
	saveTokens(t, c, "ns", "a", p, nil, nil)
	checkTokens(t, c, "p before", hc.Prefix{Namespace: "ns", Identity: ident, Tokens: p}, p, 3*ct)

	if n, _, err := c.Lookup(ctx, hc.Prefix{Namespace: "ns", Identity: ident, Tokens: q}); err == nil && n != 0 {
		t.Fatalf("lookup of a colliding prompt: %d tokens, want 0 (or an error)", n)
	}
	served := 0
	got, err := c.RestoreTokens(ctx, hc.Prefix{Namespace: "ns", Identity: ident, Tokens: q}, func(layer int, rows []byte) error {
		served += len(rows)
		if len(rows) > 0 && bytes.Equal(rows, tokRows(p, layer, 0, len(rows)/int(ident.Plan[layer].RowBytes), int(ident.Plan[layer].RowBytes))) {
			t.Errorf("layer %d: a restore by q's tokens served p's rows", layer)
		}
		return nil
	})
	if got != 0 || served != 0 {
		t.Fatalf("restore by a colliding prompt's tokens: %d tokens, %d bytes, %v; want nothing served", got, served, err)
	}
	if s := st.Stats(); s.Collisions == 0 {
		t.Errorf("store counted no collision")
	}
	// Saving q writes its own state (or refuses): p's groups stay p's.
	if w, err := c.CreateTokens(ctx, "ns", "b", ident, q, nil, false); err == nil {
		if w.Tokens != 0 {
			t.Fatalf("create by q's tokens continues from %d, want 0 (q shares nothing with p)", w.Tokens)
		}
		w.Close(ctx)
	}
	checkTokens(t, c, "p after", hc.Prefix{Namespace: "ns", Identity: ident, Tokens: p}, p, 3*ct)
}
