package remote

import (
	"bytes"
	"context"
	"errors"
	"math/rand"
	"strings"
	"testing"
	"time"

	"github.com/hcache/hcache/internal/objstore"
	"github.com/hcache/hcache/internal/testseed"
)

// TestGCAndCheck: remote gc keeps what a manifest or a store's index
// refers to and everything younger than the grace, deletes the rest,
// finds nothing more on a second run; a reader holding a manifest whose
// object gc removed gets ErrNotFound (a miss), never other bytes. The
// read-only check passes on a clean bucket and names a damaged object.
func TestGCAndCheck(t *testing.T) {
	srv := objstore.Start(t)
	rng := rand.New(rand.NewSource(testseed.Seed(t)))
	ident := testIdentity()
	ctx := context.Background()
	a := newClient(t, srv.Endpoint, "node-a")
	sa := openStore(t, t.TempDir(), a)
	defer sa.Close()
	writeConvo(t, sa, "ns", "x", ident, makeConvo(rng, ident, 100))
	old, err := a.Publish(ctx, sa, "ns", "x")
	if err != nil {
		t.Fatal(err)
	}
	if err := sa.Delete("ns", "x"); err != nil {
		t.Fatal(err)
	}
	conv := makeConvo(rng, ident, 150)
	writeConvo(t, sa, "ns", "x", ident, conv)
	cur, err := a.Publish(ctx, sa, "ns", "x")
	if err != nil {
		t.Fatal(err)
	}
	if old.Object == cur.Object {
		t.Fatal("two generations share a context object")
	}
	for i := 0; len(sa.Segments()) < 3; i++ {
		writeConvo(t, sa, "ns", "fill"+string(rune('a'+i)), ident, makeConvo(rng, ident, 200))
	}
	tier := StartTier(sa, a, TierOptions{LocalBytes: -1, Interval: time.Hour})
	if err := tier.Sync(); err != nil {
		t.Fatal(err)
	}
	tier.Close()
	orphanSeg := a.segKey("node-a", 9999)
	otherSeg := a.segKey("node-b", 1)
	for _, k := range []string{orphanSeg, otherSeg} {
		if err := a.put(ctx, k, bytes.NewReader(make([]byte, 4096)), 4096, nil); err != nil {
			t.Fatal(err)
		}
	}
	if rep, err := a.Check(ctx, true); err != nil || !rep.OK() || rep.Layers != len(cur.Layers) {
		t.Fatalf("check of a clean bucket: %+v, %v", rep, err)
	}

	o := GCOptions{Stores: nil, StoreIDs: nil}
	o.Stores, o.StoreIDs = append(o.Stores, sa), append(o.StoreIDs, "node-a")
	rep, err := a.GC(ctx, o)
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Deleted) != 0 || rep.KeptYoung != 2 {
		t.Fatalf("gc within the grace: %+v, want nothing deleted, 2 kept young", rep)
	}
	o.Now = func() time.Time { return time.Now().Add(2 * DefaultGrace) }
	o.DryRun = true
	if rep, err = a.GC(ctx, o); err != nil || len(rep.Deleted) != 2 {
		t.Fatalf("dry run: %+v, %v", rep, err)
	}
	if _, err := a.stat(ctx, old.Object); err != nil {
		t.Fatalf("a dry run deleted: %v", err)
	}
	o.DryRun = false
	rep, err = a.GC(ctx, o)
	if err != nil {
		t.Fatal(err)
	}
	got := strings.Join(rep.Deleted, " ")
	if len(rep.Deleted) != 2 || !strings.Contains(got, old.Object) || !strings.Contains(got, orphanSeg) {
		t.Fatalf("gc deleted %v, want %s and %s", rep.Deleted, old.Object, orphanSeg)
	}
	if _, err := a.stat(ctx, otherSeg); err != nil {
		t.Fatalf("gc deleted another store's segment: %v", err)
	}
	if rep, err = a.GC(ctx, o); err != nil || len(rep.Deleted) != 0 {
		t.Fatalf("second gc: %+v, %v; want nothing more", rep, err)
	}
	// A reader that held the old manifest: a miss, nothing served.
	err = a.Fetch(ctx, old, 0, func(int, []byte) error { t.Fatal("a layer of a deleted object was served"); return nil })
	if !errors.Is(err, ErrNotFound) {
		t.Fatalf("fetch of a collected object: %v, want ErrNotFound", err)
	}
	// What is referenced still serves: the named context and the moved
	// segments.
	b := newClient(t, srv.Endpoint, "node-b")
	sb := openStore(t, t.TempDir(), b)
	defer sb.Close()
	if _, err := b.Import(ctx, sb, "ns", "x"); err != nil {
		t.Fatal(err)
	}
	checkConvo(t, sb, "ns", "x", ident, conv)
	if r := sa.Check(nil); !r.OK() {
		t.Fatalf("fsck after gc: %v", r.Errors)
	}
	// A damaged trailer: check names it, and writes nothing.
	obj := make([]byte, cur.ObjectBytes)
	if err := a.readRanges(ctx, cur.Object, obj, 0); err != nil {
		t.Fatal(err)
	}
	obj[len(obj)-int(cur.HeaderBytes)+20] ^= 1
	if err := a.put(ctx, cur.Object, bytes.NewReader(obj), int64(len(obj)), nil); err != nil {
		t.Fatal(err)
	}
	before := a.Stats().Puts
	rep2, err := a.Check(ctx, false)
	if err != nil || rep2.OK() || !strings.Contains(strings.Join(rep2.Errors, " "), cur.Object) {
		t.Fatalf("check of a damaged trailer: %+v, %v", rep2, err)
	}
	if a.Stats().Puts != before || a.Stats().Deletes != 2 {
		t.Fatalf("check wrote to the bucket: %+v", a.Stats())
	}
}
