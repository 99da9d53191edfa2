package remote

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand"
	"sync"
	"testing"
	"time"

	"github.com/hcache/hcache/chunk"
	"github.com/hcache/hcache/internal/faultproxy"
	"github.com/hcache/hcache/internal/objstore"
	"github.com/hcache/hcache/internal/testseed"
)

// TestFaults: with the object store behind a fault proxy (down, slow,
// cutting replies short), node B's restores by name fail cleanly or
// succeed bit-exact, never serve a wrong byte, never leave a partial
// local context or damage one; local restores go on; segment uploads
// fail (also cut mid-body, as by a node killed mid-upload) without leaving
// a partial object, and resume when the store is back; restores of moved
// segments fail without marking the context damaged and succeed after.
func TestFaults(t *testing.T) {
	srv := objstore.Start(t)
	rng := rand.New(rand.NewSource(testseed.Seed(t)))
	ident := testIdentity()
	ctx := context.Background()
	px, err := faultproxy.Start(srv.Endpoint)
	if err != nil {
		t.Fatal(err)
	}
	defer px.Close()
	a := newClient(t, srv.Endpoint, "node-a")
	b := newClient(t, px.Addr(), "node-b", func(c *Config) { c.Timeout = 2 * time.Second; c.MaxRetries = 1 })
	sa := openStore(t, t.TempDir(), a)
	defer sa.Close()
	conv := makeConvo(rng, ident, 256)
	writeConvo(t, sa, "ns", "shared", ident, conv)
	if _, err := a.Publish(ctx, sa, "ns", "shared"); err != nil {
		t.Fatal(err)
	}
	sb := openStore(t, t.TempDir(), b)
	defer sb.Close()
	// Node B's own contexts, enough to seal segments; half of them moved
	// to the remote tier before the faults.
	own := map[string]convo{}
	for i := 0; len(sb.Segments()) < 3; i++ {
		id := fmt.Sprintf("own%d", i)
		own[id] = makeConvo(rng, ident, 128+rng.Intn(128))
		writeConvo(t, sb, "ns", id, ident, own[id])
	}
	tier := StartTier(sb, b, TierOptions{LocalBytes: -1, Interval: time.Hour, Logf: t.Logf})
	defer tier.Close()
	if err := tier.Sync(); err != nil {
		t.Fatal(err)
	}
	for i := 0; len(sb.Segments()) < 5; i++ { // more sealed local segments, not uploaded
		id := fmt.Sprintf("late%d", i)
		own[id] = makeConvo(rng, ident, 128+rng.Intn(128))
		writeConvo(t, sb, "ns", id, ident, own[id])
	}
	cases := []struct {
		name   string
		f      faultproxy.Faults
		ok     bool // restores by name succeed
		upFail bool // uploads fail
	}{
		{"down", faultproxy.Faults{Drop: true}, false, true},
		{"cut replies", faultproxy.Faults{CutAfter: 40 << 10}, false, false},
		{"uploads cut mid-body", faultproxy.Faults{CutRequestAfter: 300 << 10}, true, true},
		{"slow", faultproxy.Faults{Delay: 2 * time.Millisecond}, true, false},
	}
	for ci, tc := range cases {
		// A newly sealed segment for the tier to upload under the fault.
		for i, n := 0, len(sb.Segments()); len(sb.Segments()) == n; i++ {
			id := fmt.Sprintf("case%d-%d", ci, i)
			own[id] = makeConvo(rng, ident, 128+rng.Intn(128))
			writeConvo(t, sb, "ns", id, ident, own[id])
		}
		px.Set(tc.f)
		got := convo{}
		from, _, err := b.RestoreByName(ctx, sb, "ns", "shared", 256, func(layer int, rows []byte) error {
			if !bytes.Equal(rows, conv[layer]) {
				t.Fatalf("%s: layer %d served with wrong bytes", tc.name, layer)
			}
			got[layer] = rows
			return nil
		})
		if tc.ok != (err == nil) {
			t.Fatalf("%s: restore by name from %s: %v", tc.name, from, err)
		}
		if err != nil {
			if _, err := sb.Context("ns", "shared"); !errors.Is(err, chunk.ErrNotFound) {
				t.Fatalf("%s: a failed restore by name left a local context: %v", tc.name, err)
			}
		} else {
			checkConvo(t, sb, "ns", "shared", ident, conv)
			if err := sb.Delete("ns", "shared"); err != nil {
				t.Fatal(err)
			}
		}
		// Node B's own contexts: local ones restore; those in moved
		// segments restore or fail, never with wrong bytes, never damaged.
		for id, cv := range own {
			_, err := sb.Restore("ns", id, ident, func(layer int, rows []byte) error {
				if !bytes.Equal(rows, cv[layer]) {
					t.Fatalf("%s: %s layer %d served with wrong bytes", tc.name, id, layer)
				}
				return nil
			})
			// Only a read of the remote tier may fail (a transport
			// error, ErrUnavailable); local segments serve on.
			if err != nil && !errors.Is(err, ErrUnavailable) {
				t.Fatalf("%s: restore of %s: %v", tc.name, id, err)
			}
			if info, _ := sb.Context("ns", id); info.Damaged {
				t.Fatalf("%s: %s marked damaged by a fault of the object store", tc.name, id)
			}
		}
		// Uploads fail while the store is down (small replies pass a cut
		// after 40 KiB) and resume once the fault is gone.
		err = tier.Sync()
		if tc.upFail && err == nil {
			t.Fatalf("%s: uploads succeeded through the fault", tc.name)
		}
		px.Set(faultproxy.Faults{})
		// Nothing partial is visible: every segment object in the bucket
		// is whole (its size is the segment's written bytes).
		written := map[uint32]uint64{}
		for _, sg := range sb.Segments() {
			written[sg.ID] = sg.Written
		}
		objs, err := a.list(ctx, "seg/node-b/")
		if err != nil {
			t.Fatal(err)
		}
		for _, oi := range objs {
			id, _ := segIDOfKey(oi.Key)
			if w, ok := written[id]; ok && uint64(oi.Size) != w {
				t.Fatalf("%s: %s holds %d bytes, the segment %d: a partial upload is visible", tc.name, oi.Key, oi.Size, w)
			}
		}
		if err := tier.Sync(); err != nil {
			t.Fatalf("%s: uploads did not resume: %v", tc.name, err)
		}
		for id, cv := range own {
			checkConvo(t, sb, "ns", id, ident, cv)
		}
	}
	if px.Cuts() == 0 {
		t.Fatal("the proxy cut no reply")
	}
	if rep := sb.Check(nil); !rep.OK() {
		t.Fatalf("fsck: %v", rep.Errors)
	}
}

// TestStoreRestart: the object store killed and restarted while node A
// publishes and node B restores by name: every context whose Publish
// returned (acknowledged) restores bit-exact afterwards, nothing wrong is
// served during the outage, and node A's local restores never stop.
func TestStoreRestart(t *testing.T) {
	srv := objstore.Start(t)
	seed := testseed.Seed(t)
	ident := testIdentity()
	ctx := context.Background()
	a := newClient(t, srv.Endpoint, "node-a", func(c *Config) { c.Timeout = 5 * time.Second })
	b := newClient(t, srv.Endpoint, "node-b", func(c *Config) { c.Timeout = 2 * time.Second; c.MaxRetries = 1 })
	sa := openStore(t, t.TempDir(), a)
	defer sa.Close()
	sb := openStore(t, t.TempDir(), b)
	defer sb.Close()
	convs := map[string]convo{}
	var mu sync.Mutex
	acked := map[string]bool{}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	var publishErrs, localRestores int
	go func() { // node A: write, restore locally, publish
		defer wg.Done()
		rng := rand.New(rand.NewSource(seed))
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			id := fmt.Sprintf("c%d", i)
			cv := makeConvo(rng, ident, 64+rng.Intn(128))
			mu.Lock()
			convs[id] = cv
			mu.Unlock()
			writeConvo(t, sa, "ns", id, ident, cv)
			checkConvo(t, sa, "ns", id, ident, cv) // local service goes on
			localRestores++
			if _, err := a.Publish(ctx, sa, "ns", id); err != nil {
				if publishErrs == 0 {
					t.Logf("first failed publish (%s): %v", id, err)
				}
				publishErrs++
				continue
			}
			mu.Lock()
			acked[id] = true
			mu.Unlock()
		}
	}()
	waitAcked := func(n int, what string) {
		t.Helper()
		deadline := time.Now().Add(90 * time.Second)
		for {
			mu.Lock()
			got := len(acked)
			mu.Unlock()
			if got >= n {
				return
			}
			if time.Now().After(deadline) {
				close(stop)
				wg.Wait()
				t.Fatalf("%s: %d publishes acknowledged in 90 s, want %d", what, got, n)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	waitAcked(2, "before the kill")
	srv.Kill()
	time.Sleep(1500 * time.Millisecond)
	mu.Lock()
	before := len(acked)
	mu.Unlock()
	srv.Restart()
	waitAcked(before+2, "after the restart")
	close(stop)
	wg.Wait()
	mu.Lock()
	defer mu.Unlock()
	t.Logf("%d contexts written and restored locally, %d publishes acknowledged, %d failed", localRestores, len(acked), publishErrs)
	if publishErrs == 0 {
		t.Fatal("no publish failed while the store was down")
	}
	if len(acked) == 0 {
		t.Fatal("no publish was acknowledged")
	}
	for id := range acked {
		if _, err := b.Import(ctx, sb, "ns", id); err != nil {
			t.Fatalf("acknowledged %s lost: %v", id, err)
		}
		checkConvo(t, sb, "ns", id, ident, convs[id])
	}
}
