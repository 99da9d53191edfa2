package remote

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/hcache/hcache/chunk"
	"github.com/hcache/hcache/chunk/format"
	"github.com/hcache/hcache/internal/objstore"
	"github.com/hcache/hcache/internal/testseed"
)

func testIdentity() *chunk.Identity {
	return &chunk.Identity{Model: []byte("remote-test-model"), Plan: []chunk.LayerPlan{
		{Kind: chunk.LayerHidden, RowBytes: 512}, {Kind: chunk.LayerKV, RowBytes: 1024},
		{Kind: chunk.LayerNone}, {Kind: chunk.LayerKV, RowBytes: 1024},
	}}
}

// convo is the rows of one context: layer -> rows of every token.
type convo map[int][]byte

func makeConvo(rng *rand.Rand, id *chunk.Identity, tokens int) convo {
	c := convo{}
	for l, p := range id.Plan {
		if p.Kind == chunk.LayerNone {
			continue
		}
		b := make([]byte, tokens*int(p.RowBytes))
		rng.Read(b)
		c[l] = b
	}
	return c
}

func writeConvo(t testing.TB, s *chunk.Store, ns, id string, ident *chunk.Identity, c convo) {
	t.Helper()
	w, err := s.Create(ns, id, ident, chunk.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for l := range ident.Plan {
		if rows, ok := c[l]; ok {
			if err := w.AppendLayer(l, rows); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
}

// checkConvo restores ns/id from s and compares every byte.
func checkConvo(t testing.TB, s *chunk.Store, ns, id string, ident *chunk.Identity, c convo) {
	t.Helper()
	seen := 0
	n, err := s.Restore(ns, id, ident, func(layer int, rows []byte) error {
		if !bytes.Equal(rows, c[layer]) {
			return fmt.Errorf("layer %d: %d bytes differ from the %d written", layer, len(rows), len(c[layer]))
		}
		seen++
		return nil
	})
	if err != nil {
		t.Fatalf("restore %s/%s: %v", ns, id, err)
	}
	if seen != len(c) || n*1024 != len(c[1]) {
		t.Fatalf("restore %s/%s: %d layers %d tokens", ns, id, seen, n)
	}
}

func openStore(t testing.TB, dir string, c *Client, mut ...func(*chunk.Options)) *chunk.Store {
	t.Helper()
	o := chunk.Options{Dir: dir, SegmentBytes: 1 << 20, GCInterval: -1, BallastBytes: -1, CapacityBytes: -1, Logf: t.Logf}
	if c != nil {
		o.Providers = []chunk.ObjectProvider{c.Provider()}
	}
	for _, f := range mut {
		f(&o)
	}
	s, err := chunk.Open(o)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func newClient(t testing.TB, endpoint, store string, mut ...func(*Config)) *Client {
	t.Helper()
	cfg := Config{Endpoint: endpoint, Bucket: "hcache-test", Prefix: "t/", StoreID: store,
		AccessKey: "any", SecretKey: "any", Timeout: 5 * time.Second, RangeBytes: 64 << 10}
	for _, f := range mut {
		f(&cfg)
	}
	c, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.EnsureBucket(context.Background()); err != nil {
		t.Fatal(err)
	}
	return c
}

// TestByName: a context saved on node A restores on node B, which never
// saw it, bit-exact by name (Import, then RestoreByName from the local
// tier); a third node restores it through RestoreByName straight from the
// bucket; a node holding fewer tokens takes the newer copy.
func TestByName(t *testing.T) {
	srv := objstore.Start(t)
	rng := rand.New(rand.NewSource(testseed.Seed(t)))
	ident := testIdentity()
	ctx := context.Background()
	a, b, c3 := newClient(t, srv.Endpoint, "node-a"), newClient(t, srv.Endpoint, "node-b"), newClient(t, srv.Endpoint, "node-c")
	sa := openStore(t, t.TempDir(), a)
	defer sa.Close()
	conv := makeConvo(rng, ident, 300)
	writeConvo(t, sa, "chat", "conv/1", ident, conv)
	if _, err := b.Lookup(ctx, "chat", "conv/1"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("lookup before publish: %v, want ErrNotFound", err)
	}
	m, err := a.Publish(ctx, sa, "chat", "conv/1")
	if err != nil {
		t.Fatal(err)
	}
	if m.Tokens != 300 {
		t.Fatalf("published %d tokens", m.Tokens)
	}
	sb := openStore(t, t.TempDir(), b)
	defer sb.Close()
	if _, err := b.Import(ctx, sb, "chat", "conv/1"); err != nil {
		t.Fatal(err)
	}
	checkConvo(t, sb, "chat", "conv/1", ident, conv)
	if _, err := b.Import(ctx, sb, "chat", "conv/1"); !errors.Is(err, ErrHaveNewer) {
		t.Fatalf("second import: %v, want ErrHaveNewer", err)
	}

	sc := openStore(t, t.TempDir(), c3)
	defer sc.Close()
	for i, want := range []string{"remote", "local"} {
		got := convo{}
		from, n, err := c3.RestoreByName(ctx, sc, "chat", "conv/1", 300, func(layer int, rows []byte) error {
			got[layer] = append([]byte(nil), rows...)
			return nil
		})
		if err != nil || from != want || n != 300 {
			t.Fatalf("restore %d: from %s, %d tokens, %v; want %s", i, from, n, err, want)
		}
		for l, rows := range conv {
			if !bytes.Equal(got[l], rows) {
				t.Fatalf("restore %d from %s: layer %d differs", i, from, l)
			}
		}
	}
	// The conversation grows on node A (a later turn): a node with the
	// older copy takes the newer one.
	more := makeConvo(rng, ident, 400)
	if err := sa.Delete("chat", "conv/1"); err != nil {
		t.Fatal(err)
	}
	writeConvo(t, sa, "chat", "conv/1", ident, more)
	if _, err := a.Publish(ctx, sa, "chat", "conv/1"); err != nil {
		t.Fatal(err)
	}
	if from, _, err := c3.RestoreByName(ctx, sc, "chat", "conv/1", 400, func(int, []byte) error { return nil }); err != nil || from != "remote" {
		t.Fatalf("restore of the grown conversation: from %s, %v", from, err)
	}
	checkConvo(t, sc, "chat", "conv/1", ident, more)
	if _, _, err := c3.RestoreByName(ctx, sc, "chat", "never", 1, func(int, []byte) error { return nil }); !errors.Is(err, ErrNotFound) {
		t.Fatalf("restore of an unknown name: %v, want ErrNotFound", err)
	}
}

// TestByNameCorrupt: a damaged manifest or context object is refused
// (ErrCorrupt naming what failed), no layer of a failed import is handed
// over unverified, and a failed import leaves no local context.
func TestByNameCorrupt(t *testing.T) {
	srv := objstore.Start(t)
	rng := rand.New(rand.NewSource(testseed.Seed(t)))
	ident := testIdentity()
	ctx := context.Background()
	a, b := newClient(t, srv.Endpoint, "node-a"), newClient(t, srv.Endpoint, "node-b")
	sa := openStore(t, t.TempDir(), a)
	defer sa.Close()
	conv := makeConvo(rng, ident, 200)
	writeConvo(t, sa, "ns", "x", ident, conv)
	m, err := a.Publish(ctx, sa, "ns", "x")
	if err != nil {
		t.Fatal(err)
	}
	sb := openStore(t, t.TempDir(), b)
	defer sb.Close()

	manKey := a.nameKey("ns", "x")
	good, err := a.get(ctx, manKey, maxManifest)
	if err != nil {
		t.Fatal(err)
	}
	putBytes := func(key string, v []byte) {
		t.Helper()
		if err := a.put(ctx, key, bytes.NewReader(v), int64(len(v)), nil); err != nil {
			t.Fatal(err)
		}
	}
	cases := []struct {
		name string
		mut  func([]byte) []byte
	}{
		{"flipped byte", func(p []byte) []byte { p[len(p)/2] ^= 1; return p }},
		{"truncated", func(p []byte) []byte { return p[:len(p)-9] }},
		{"wrong magic", func(p []byte) []byte { copy(p, "HCMANIF9"); return p }},
	}
	for _, tc := range cases {
		putBytes(manKey, tc.mut(append([]byte(nil), good...)))
		if _, err := b.Import(ctx, sb, "ns", "x"); !errors.Is(err, format.ErrCorrupt) {
			t.Fatalf("%s manifest: %v, want ErrCorrupt", tc.name, err)
		}
	}
	putBytes(manKey, good)

	// A flipped byte in layer 3's rows: layers before it may be handed
	// over (verified), layer 3 never; no local context remains.
	obj := make([]byte, m.ObjectBytes)
	if err := a.readRanges(ctx, m.Object, obj, 0); err != nil {
		t.Fatal(err)
	}
	bad := append([]byte(nil), obj...)
	bad[m.Layers[2].Off+17] ^= 0x40
	putBytes(m.Object, bad)
	var handed []int
	_, _, err = b.RestoreByName(ctx, sb, "ns", "x", 1, func(layer int, rows []byte) error {
		handed = append(handed, layer)
		return nil
	})
	if !errors.Is(err, format.ErrCorrupt) {
		t.Fatalf("restore of a damaged object: %v, want ErrCorrupt", err)
	}
	for _, l := range handed {
		if l == int(m.Layers[2].Layer) {
			t.Fatalf("the damaged layer %d was handed over", l)
		}
	}
	if _, err := sb.Context("ns", "x"); !errors.Is(err, chunk.ErrNotFound) {
		t.Fatalf("a failed import left a local context: %v", err)
	}
	// An object truncated under its manifest (in its last layer): refused,
	// nothing local.
	putBytes(m.Object, obj[:m.Layers[len(m.Layers)-1].Off+100])
	if _, err := b.Import(ctx, sb, "ns", "x"); err == nil {
		t.Fatal("import of a truncated object succeeded")
	}
	if _, err := sb.Context("ns", "x"); !errors.Is(err, chunk.ErrNotFound) {
		t.Fatalf("a failed import left a local context: %v", err)
	}
	putBytes(m.Object, obj)
	if _, err := b.Import(ctx, sb, "ns", "x"); err != nil {
		t.Fatal(err)
	}
	checkConvo(t, sb, "ns", "x", ident, conv)
}

// TestTierWriteBack: sealed segments are uploaded in the background,
// verified, and moved to the remote tier; their local files go; every
// context restores bit-exact from them, across a reopen, and fsck (with
// the provider) passes. Two stores in one bucket do not collide.
func TestTierWriteBack(t *testing.T) {
	srv := objstore.Start(t)
	rng := rand.New(rand.NewSource(testseed.Seed(t)))
	ident := testIdentity()
	for _, node := range []string{"node-a", "node-b"} {
		c := newClient(t, srv.Endpoint, node)
		dir := t.TempDir()
		s := openStore(t, dir, c)
		convs := map[string]convo{}
		for i := 0; len(s.Segments()) < 4; i++ {
			id := fmt.Sprintf("c%d", i)
			convs[id] = makeConvo(rng, ident, 64+rng.Intn(200))
			writeConvo(t, s, "ns", id, ident, convs[id])
		}
		tier := StartTier(s, c, TierOptions{LocalBytes: -1, Interval: time.Hour, Logf: t.Logf})
		if err := tier.Sync(); err != nil {
			t.Fatal(err)
		}
		tier.Close()
		st := tier.Stats()
		if st.RemoteSegments < 3 || st.Moves < 3 {
			t.Fatalf("%s: %+v: want every sealed segment moved", node, st)
		}
		local, _ := filepath.Glob(filepath.Join(dir, "segments", "*.hcs"))
		if len(local) != 1 {
			t.Fatalf("%s: local segment files %v, want only the active one", node, local)
		}
		for id, cv := range convs {
			checkConvo(t, s, "ns", id, ident, cv)
		}
		s.Close()
		s = openStore(t, dir, c)
		for id, cv := range convs {
			checkConvo(t, s, "ns", id, ident, cv)
		}
		if rep := s.Check(nil); !rep.OK() {
			t.Fatalf("fsck: %v", rep.Errors)
		}
		s.Close()
		if _, err := chunk.Open(chunk.Options{Dir: dir}); err == nil {
			t.Fatal("a store with remote segments opened without the provider")
		}
	}
}

func TestMain(m *testing.M) { os.Exit(m.Run()) }
