package remote

import (
	"context"
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/hcache/hcache/chunk"
	"github.com/hcache/hcache/internal/faultproxy"
	"github.com/hcache/hcache/internal/objstore"
	"github.com/hcache/hcache/internal/testseed"
)

// TestRepairWithRemoteSegments: a store whose index is lost while the
// remote tier holds some of its segments is rebuilt by fetching those
// segments back (DownloadSegments, which writes nothing to the bucket) and
// running repair: every context restores bit-exact from local files.
func TestRepairWithRemoteSegments(t *testing.T) {
	srv := objstore.Start(t)
	rng := rand.New(rand.NewSource(testseed.Seed(t)))
	ident := testIdentity()
	c := newClient(t, srv.Endpoint, "node-r")
	dir := t.TempDir()
	s := openStore(t, dir, c)
	convs := map[string]convo{}
	for i := 0; len(s.Segments()) < 4; i++ {
		id := fmt.Sprintf("c%d", i)
		convs[id] = makeConvo(rng, ident, 100+rng.Intn(150))
		writeConvo(t, s, "ns", id, ident, convs[id])
	}
	tier := StartTier(s, c, TierOptions{LocalBytes: -1, Interval: time.Hour})
	if err := tier.Sync(); err != nil {
		t.Fatal(err)
	}
	tier.Close()
	if st := tier.Stats(); st.RemoteSegments == 0 {
		t.Fatalf("nothing moved: %+v", st)
	}
	s.Close()
	if err := os.RemoveAll(filepath.Join(dir, "index")); err != nil {
		t.Fatal(err)
	}
	puts := c.Stats().Puts
	got, err := c.DownloadSegments(context.Background(), dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) == 0 || c.Stats().Puts != puts || c.Stats().Deletes != 0 {
		t.Fatalf("fetched %v; the bucket saw %d puts, %d deletes", got, c.Stats().Puts-puts, c.Stats().Deletes)
	}
	if _, err := chunk.Repair(chunk.RepairOptions{Dir: dir, Logf: t.Logf}); err != nil {
		t.Fatal(err)
	}
	s = openStore(t, dir, nil)
	defer s.Close()
	for id, cv := range convs {
		checkConvo(t, s, "ns", id, ident, cv)
	}
}

// TestTierBackpressure: with a one-slot queue and uploads slowed by the
// proxy, the scan waits for room (counted) instead of queuing without
// bound, and every segment is uploaded in the end.
func TestTierBackpressure(t *testing.T) {
	srv := objstore.Start(t)
	rng := rand.New(rand.NewSource(testseed.Seed(t)))
	ident := testIdentity()
	px, err := faultproxy.Start(srv.Endpoint)
	if err != nil {
		t.Fatal(err)
	}
	defer px.Close()
	c := newClient(t, px.Addr(), "node-q")
	s := openStore(t, t.TempDir(), c)
	defer s.Close()
	for i := 0; len(s.Segments()) < 5; i++ {
		writeConvo(t, s, "ns", fmt.Sprintf("c%d", i), ident, makeConvo(rng, ident, 200))
	}
	px.Set(faultproxy.Faults{Delay: 5 * time.Millisecond})
	tier := StartTier(s, c, TierOptions{QueueLen: 1, Uploaders: 1, Interval: time.Hour})
	defer tier.Close()
	deadline := time.Now().Add(2 * time.Minute)
	for tier.Stats().Uploads < 4 {
		if time.Now().After(deadline) {
			t.Fatalf("uploads stalled: %+v", tier.Stats())
		}
		time.Sleep(20 * time.Millisecond)
	}
	if st := tier.Stats(); st.QueueFullWaits == 0 {
		t.Fatalf("the scan never waited for room: %+v", st)
	}
}
