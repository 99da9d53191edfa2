package daemon_test

import (
	"context"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"

	"github.com/hcache/hcache/chunk"
	"github.com/hcache/hcache/chunk/remote"
	"github.com/hcache/hcache/daemon"
	"github.com/hcache/hcache/internal/objstore"
)

// startNode runs a daemon whose store has the remote tier of store id node
// in the server's bucket, publishing synchronously.
func startNode(t *testing.T, srv *objstore.TestServer, node string, mut ...func(*chunk.Options)) (*env, string) {
	t.Helper()
	c, err := remote.New(remote.Config{Endpoint: srv.Endpoint, Bucket: "fleet", StoreID: node, AccessKey: "k", SecretKey: "s", Timeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	if err := c.EnsureBucket(context.Background()); err != nil {
		t.Fatal(err)
	}
	sd, err := os.MkdirTemp("", "hcd")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(sd) })
	e := &env{t: t, dir: t.TempDir(), sock: filepath.Join(sd, "s")}
	o := chunk.Options{Dir: e.dir, GCInterval: -1, SegmentBytes: 8 << 20, Logf: t.Logf,
		Providers: []chunk.ObjectProvider{c.Provider()}}
	for _, f := range mut {
		f(&o)
	}
	e.store, err = chunk.Open(o)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	metrics := ln.Addr().String()
	ln.Close()
	cfg := daemon.Config{Store: e.store, Listen: e.sock, GCInterval: -1, Metrics: metrics,
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
		Remote: &daemon.RemoteConfig{Client: c, PublishSync: true, PublishTimeout: 10 * time.Second}}
	e.srv, err = daemon.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		e.srv.Stop()
		e.store.Close()
	})
	return e, metrics
}

// TestRemoteTwoNodes: a conversation saved on node A restores on node B
// (which never saw it) bit-exact by name; its next turn appended on B
// restores on A, which takes the newer copy over its own older one; the
// metrics count the remote hits.
func TestRemoteTwoNodes(t *testing.T) {
	srv := objstore.Start(t)
	a, aMetrics := startNode(t, srv, "node-a")
	b, _ := startNode(t, srv, "node-b")
	ca, cb := a.dial(), b.dial()
	save(t, ca, "chat", "conv-1", 100)
	check(t, cb, "chat", "conv-1", 100) // a remote hit on B
	// The next turn on B: append 50 tokens.
	ctx := context.Background()
	w, err := cb.Append(ctx, "chat", "conv-1", ident)
	if err != nil {
		t.Fatal(err)
	}
	for l, p := range ident.Plan {
		if p.RowBytes > 0 {
			if err := w.AppendLayer(ctx, l, rows("conv-1", l, 100, 50, int(p.RowBytes))); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := w.Close(ctx); err != nil {
		t.Fatal(err)
	}
	check(t, ca, "chat", "conv-1", 150) // A replaces its 100-token copy
	if info, err := a.store.Context("chat", "conv-1"); err != nil || info.Tokens != 150 {
		t.Fatalf("node A's local copy: %+v, %v", info, err)
	}
	resp, err := http.Get("http://" + aMetrics + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if !strings.Contains(string(body), `hcache_remote_lookups_total{result="remote_hit"} 1`) {
		t.Fatalf("metrics lack one remote hit on node A:\n%s", grepLines(string(body), "hcache_remote"))
	}
	// The object store down: local service goes on (saves, restores);
	// what only the bucket held is a miss.
	srv.Kill()
	save(t, ca, "chat", "conv-2", 40) // its publish fails, logged; the close succeeds
	check(t, ca, "chat", "conv-2", 40)
	check(t, ca, "chat", "conv-1", 150)
	_, err = cb.Restore(ctx, "chat", "conv-2", ident, func(int, []byte) error { return nil })
	wantCode(t, "restore on B of a context only A holds, store down", err, codes.NotFound)
}

func grepLines(s, sub string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}
