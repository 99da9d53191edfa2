package main

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/hcache/hcache/chunk"
	"github.com/hcache/hcache/chunk/remote"
	"github.com/hcache/hcache/internal/objstore"
)

// TestRemoteCommands: fsck reads a store whose segments the remote tier
// holds (through --remote-*) and refuses it without; remote check passes
// and remote gc deletes nothing referenced; both refuse a missing endpoint.
func TestRemoteCommands(t *testing.T) {
	srv := objstore.Start(t)
	t.Setenv("AWS_ACCESS_KEY_ID", "k")
	t.Setenv("AWS_SECRET_ACCESS_KEY", "s")
	cfg := remote.Config{Endpoint: srv.Endpoint, Bucket: "cli", StoreID: "node-c"}
	c, err := remote.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if err := c.EnsureBucket(ctx); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	st, err := chunk.Open(chunk.Options{Dir: dir, SegmentBytes: 1 << 20, GCInterval: -1, Providers: []chunk.ObjectProvider{c.Provider()}, Logf: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	ident := &chunk.Identity{Model: []byte("m"), Plan: []chunk.LayerPlan{{Kind: chunk.LayerKV, RowBytes: 4096}}}
	for i := 0; len(st.Segments()) < 3; i++ {
		w, err := st.Create("ns", fmt.Sprintf("c%d", i), ident, chunk.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if err := w.AppendLayer(0, make([]byte, 100*4096)); err != nil {
			t.Fatal(err)
		}
		if err := w.Close(); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := c.Publish(ctx, st, "ns", "c0"); err != nil {
		t.Fatal(err)
	}
	tier := remote.StartTier(st, c, remote.TierOptions{LocalBytes: -1, Interval: time.Hour})
	if err := tier.Sync(); err != nil {
		t.Fatal(err)
	}
	tier.Close()
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}
	rf := []string{"--remote-endpoint", srv.Endpoint, "--remote-bucket", "cli", "--remote-store-id", "node-c"}
	if code, out, errs := runCLI(append([]string{"fsck", "--dir", dir}, rf...)...); code != 0 || !strings.Contains(out, "clean") {
		t.Fatalf("fsck with the remote tier: exit %d\n%s\n%s", code, out, errs)
	}
	if code, _, errs := runCLI("fsck", "--dir", dir); code == 0 || !strings.Contains(errs, "s3://cli/") {
		t.Fatalf("fsck without the remote tier: exit %d, %s; want a refusal naming the location", code, errs)
	}
	if code, out, errs := runCLI(append([]string{"remote", "check", "--deep"}, rf...)...); code != 0 || !strings.Contains(out, "1 manifests checked, 1 layers verified, 0 tips read, 0 group objects verified, 0 errors") {
		t.Fatalf("remote check: exit %d\n%s\n%s", code, out, errs)
	}
	if code, out, errs := runCLI(append([]string{"remote", "gc", "--dir", dir, "--grace", "1ns"}, rf...)...); code != 0 || !strings.Contains(out, "deleted 0") {
		t.Fatalf("remote gc: exit %d\n%s\n%s", code, out, errs)
	}
	if code, out, errs := runCLI(append([]string{"fsck", "--dir", dir}, rf...)...); code != 0 || !strings.Contains(out, "clean") {
		t.Fatalf("fsck after remote gc: exit %d\n%s\n%s", code, out, errs)
	}
	for _, cmd := range []string{"gc", "check", "fetch-segments"} {
		if code, _, errs := runCLI("remote", cmd); code != 2 || !strings.Contains(errs, "--remote-endpoint") {
			t.Fatalf("remote %s without an endpoint: exit %d, %s", cmd, code, errs)
		}
	}
}
