package daemon_test

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	crand "crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"math/big"
	"math/rand"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/status"

	"github.com/hcache/hcache/chunk"
	hc "github.com/hcache/hcache/clients/hcacheclient"
	"github.com/hcache/hcache/daemon"
	"github.com/hcache/hcache/gpu/cuda"
	"github.com/hcache/hcache/internal/testseed"
	"github.com/hcache/hcache/model"
	hcachev1 "github.com/hcache/hcache/proto/hcache/v1"
	"github.com/hcache/hcache/serve"
)

type env struct {
	t     *testing.T
	dir   string
	sock  string
	store *chunk.Store
	srv   *daemon.Server
}

// start runs a daemon on a fresh store in a temp directory.
func start(t *testing.T, mod func(*daemon.Config)) *env {
	t.Helper()
	// Socket paths are limited to 108 bytes: keep them short.
	sd, err := os.MkdirTemp("", "hcd")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(sd) })
	e := &env{t: t, dir: t.TempDir(), sock: filepath.Join(sd, "s")}
	e.store, err = chunk.Open(chunk.Options{Dir: e.dir, GCInterval: -1, SegmentBytes: 8 << 20, CacheBytes: 1 << 20, Logf: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	cfg := daemon.Config{Store: e.store, Listen: e.sock, Shm: e.sock + ".shm", GCInterval: -1,
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}
	if mod != nil {
		mod(&cfg)
	}
	e.srv, err = daemon.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		e.srv.Stop()
		e.store.Close()
	})
	return e
}

func (e *env) dial(opts ...hc.Option) *hc.Client {
	e.t.Helper()
	c, err := hc.Dial("unix://"+e.sock, opts...)
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { c.Close() })
	return c
}

var ident = hc.Identity{Model: []byte("test-model-v1"), Plan: []hc.LayerPlan{
	{Kind: hc.LayerHidden, RowBytes: 64}, {Kind: hc.LayerNone}, {Kind: hc.LayerKV, RowBytes: 32}}}

// rows returns deterministic rows for tokens [from, from+n) of a layer.
func rows(ctxID string, layer, from, n, rb int) []byte {
	b := make([]byte, n*rb)
	for i := range b {
		tok := from + i/rb
		b[i] = byte(len(ctxID)*131 + layer*37 + tok*7 + (i%rb)*3)
	}
	return b
}

// save creates a context with n tokens (prefill) and flushes.
func save(t *testing.T, c *hc.Client, ns, id string, n int) {
	t.Helper()
	ctx := context.Background()
	w, err := c.Create(ctx, ns, id, ident, false)
	if err != nil {
		t.Fatalf("create %s/%s: %v", ns, id, err)
	}
	for l, p := range ident.Plan {
		if p.RowBytes > 0 {
			if err := w.AppendLayer(ctx, l, rows(id, l, 0, n, int(p.RowBytes))); err != nil {
				t.Fatalf("append %s/%s layer %d: %v", ns, id, l, err)
			}
		}
	}
	if err := w.Close(ctx); err != nil {
		t.Fatal(err)
	}
}

// check restores a context and compares every layer's bytes.
func check(t *testing.T, c *hc.Client, ns, id string, n int) {
	t.Helper()
	got := map[int][]byte{}
	tokens, err := c.Restore(context.Background(), ns, id, ident, func(l int, r []byte) error {
		got[l] = append([]byte(nil), r...)
		return nil
	})
	if err != nil {
		t.Fatalf("restore %s/%s: %v", ns, id, err)
	}
	if int(tokens) != n {
		t.Fatalf("restore %s/%s: %d tokens, want %d", ns, id, tokens, n)
	}
	for l, p := range ident.Plan {
		if p.RowBytes == 0 {
			if _, ok := got[l]; ok {
				t.Fatalf("layer %d stores nothing but was restored", l)
			}
			continue
		}
		if !bytes.Equal(got[l], rows(id, l, 0, n, int(p.RowBytes))) {
			t.Fatalf("restore %s/%s layer %d: bytes differ", ns, id, l)
		}
	}
}

func wantCode(t *testing.T, what string, err error, code codes.Code) {
	t.Helper()
	if status.Code(err) != code {
		t.Fatalf("%s: got %v (%v), want %v", what, status.Code(err), err, code)
	}
}

// rawCodec sends bytes as they are, to deliver malformed messages.
type rawCodec struct{}

func (rawCodec) Marshal(v any) ([]byte, error)      { return v.([]byte), nil }
func (rawCodec) Unmarshal(data []byte, v any) error { *(v.(*[]byte)) = data; return nil }
func (rawCodec) Name() string                       { return "proto" }

var _ encoding.Codec = rawCodec{}

func TestBadInput(t *testing.T) {
	e := start(t, func(c *daemon.Config) {
		c.MaxMessageBytes = 1 << 20
		c.MaxTokensPerContext = 1000
		c.MaxContexts = 50
	})
	c := e.dial()
	ctx := context.Background()
	save(t, c, "ns", "good", 100)
	ref := func(ns, id string) *hcachev1.ContextRef { return &hcachev1.ContextRef{Namespace: ns, Id: id} }
	idp := func(id hc.Identity) *hcachev1.Identity {
		p := &hcachev1.Identity{Model: id.Model}
		for _, l := range id.Plan {
			p.Plan = append(p.Plan, &hcachev1.LayerPlan{Kind: hcachev1.LayerKind(l.Kind), RowBytes: l.RowBytes})
		}
		return p
	}
	other := hc.Identity{Model: []byte("another-model"), Plan: ident.Plan}
	restoreErr := func(st grpc.ServerStreamingClient[hcachev1.RestoreChunk], err error) error {
		if err != nil {
			return err
		}
		for {
			if _, err := st.Recv(); err != nil {
				if err == io.EOF {
					return nil
				}
				return err
			}
		}
	}
	// A writer held open by this connection for the cases that need one.
	w, err := c.Create(ctx, "ns", "open", ident, false)
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name string
		code codes.Code
		call func() error
	}{
		{"malformed protobuf", codes.Internal, func() error {
			conn, err := grpc.NewClient("unix://"+e.sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
			if err != nil {
				return err
			}
			defer conn.Close()
			var out []byte
			return conn.Invoke(ctx, "/hcache.v1.HCache/Stat", []byte{0x0a, 0xff, 0xff, 0xff}, &out, grpc.ForceCodec(rawCodec{}))
		}},
		{"missing context reference", codes.InvalidArgument, func() error {
			_, err := c.API.Stat(ctx, &hcachev1.StatRequest{})
			return err
		}},
		{"empty id", codes.InvalidArgument, func() error { _, err := c.Stat(ctx, "ns", ""); return err }},
		{"id with NUL", codes.InvalidArgument, func() error { _, err := c.Stat(ctx, "ns", "a\x00b"); return err }},
		{"id with a control character", codes.InvalidArgument, func() error { _, err := c.Stat(ctx, "ns", "a\nb"); return err }},
		{"id of 256 bytes", codes.InvalidArgument, func() error { _, err := c.Stat(ctx, "ns", strings.Repeat("x", 256)); return err }},
		{"empty namespace", codes.InvalidArgument, func() error { _, err := c.Stat(ctx, "", "x"); return err }},
		{"identity without a plan", codes.InvalidArgument, func() error {
			_, err := c.Create(ctx, "ns", "noplan", hc.Identity{Model: []byte("m")}, false)
			return err
		}},
		{"identity with an odd row size", codes.InvalidArgument, func() error {
			_, err := c.Create(ctx, "ns", "odd", hc.Identity{Model: []byte("m"), Plan: []hc.LayerPlan{{Kind: hc.LayerHidden, RowBytes: 3}}}, false)
			return err
		}},
		{"open without a mode", codes.InvalidArgument, func() error {
			_, err := c.API.OpenContext(ctx, &hcachev1.OpenContextRequest{Ctx: ref("ns", "m"), Identity: idp(ident)})
			return err
		}},
		{"unknown context: stat", codes.NotFound, func() error { _, err := c.Stat(ctx, "ns", "nope"); return err }},
		{"unknown context: restore", codes.NotFound, func() error {
			return restoreErr(c.API.Restore(ctx, &hcachev1.RestoreRequest{Ctx: ref("ns", "nope"), Identity: idp(ident)}))
		}},
		{"unknown context: append mode", codes.NotFound, func() error { _, err := c.Append(ctx, "ns", "nope", ident); return err }},
		{"unknown context: delete", codes.NotFound, func() error { return c.Delete(ctx, "ns", "nope") }},
		{"append without an open writer", codes.FailedPrecondition, func() error {
			_, err := c.API.AppendLayer(ctx, &hcachev1.AppendLayerRequest{Ctx: ref("ns", "good"), Rows: &hcachev1.Rows{Where: &hcachev1.Rows_Inline{Inline: make([]byte, 64)}}})
			return err
		}},
		{"wrong row size: layer", codes.InvalidArgument, func() error { return w.AppendLayer(ctx, 0, make([]byte, 65)) }},
		{"wrong row size: tokens", codes.InvalidArgument, func() error { return w.AppendTokens(ctx, 1, make([]byte, 95)) }},
		{"token count zero", codes.InvalidArgument, func() error { return w.AppendTokens(ctx, 0, nil) }},
		{"layer out of range", codes.InvalidArgument, func() error { return w.AppendLayer(ctx, 3, make([]byte, 64)) }},
		{"layer that stores nothing", codes.InvalidArgument, func() error { return w.AppendLayer(ctx, 1, make([]byte, 64)) }},
		{"rows missing", codes.InvalidArgument, func() error {
			_, err := c.API.AppendLayer(ctx, &hcachev1.AppendLayerRequest{Ctx: ref("ns", "open")})
			return err
		}},
		{"oversize message", codes.ResourceExhausted, func() error { return w.AppendLayer(ctx, 0, make([]byte, 64*20000)) }},
		{"tokens per context exceeded", codes.ResourceExhausted, func() error { return w.AppendLayer(ctx, 0, make([]byte, 64*1001)) }},
		{"identity mismatch: restore", codes.FailedPrecondition, func() error {
			return restoreErr(c.API.Restore(ctx, &hcachev1.RestoreRequest{Ctx: ref("ns", "good"), Identity: idp(other)}))
		}},
		{"identity mismatch: append", codes.FailedPrecondition, func() error { _, err := c.Append(ctx, "ns", "good", other); return err }},
		{"context exists", codes.AlreadyExists, func() error { _, err := c.Create(ctx, "ns", "good", ident, false); return err }},
		{"writer open on another connection", codes.Aborted, func() error {
			_, err := e.dial().Append(ctx, "ns", "open", ident)
			return err
		}},
		{"append on another connection's writer", codes.FailedPrecondition, func() error {
			_, err := e.dial().API.AppendLayer(ctx, &hcachev1.AppendLayerRequest{Ctx: ref("ns", "open"), Rows: &hcachev1.Rows{Where: &hcachev1.Rows_Inline{Inline: make([]byte, 64)}}})
			return err
		}},
		{"delete with an open writer", codes.FailedPrecondition, func() error { return c.Delete(ctx, "ns", "open") }},
		{"unknown shared region", codes.FailedPrecondition, func() error {
			_, err := c.API.AppendLayer(ctx, &hcachev1.AppendLayerRequest{Ctx: ref("ns", "open"), Rows: &hcachev1.Rows{Where: &hcachev1.Rows_Region{Region: &hcachev1.RegionSlice{Region: "deadbeef", Length: 64}}}})
			return err
		}},
		{"shared region slice out of range", codes.OutOfRange, func() error {
			g, err := c.NewRegion(ctx, 4096)
			if err != nil {
				return err
			}
			defer g.Close()
			return w.AppendLayerRegion(ctx, 0, g, 4096-64, 128)
		}},
		{"shared region unmapped early", codes.FailedPrecondition, func() error {
			g, err := c.NewRegion(ctx, 4096)
			if err != nil {
				return err
			}
			id := g.ID
			g.Close()
			// The daemon releases it when it sees the side connection close;
			// until then the 63 bytes (not a whole row) are refused without
			// being stored.
			var last error
			for i := 0; i < 100; i++ {
				_, last = c.API.AppendLayer(ctx, &hcachev1.AppendLayerRequest{Ctx: ref("ns", "open"), Rows: &hcachev1.Rows{Where: &hcachev1.Rows_Region{Region: &hcachev1.RegionSlice{Region: id, Length: 63}}}})
				if status.Code(last) == codes.FailedPrecondition {
					break
				}
				time.Sleep(10 * time.Millisecond)
			}
			return last
		}},
		{"restore region too small", codes.OutOfRange, func() error {
			g, err := c.NewRegion(ctx, 4096)
			if err != nil {
				return err
			}
			defer g.Close()
			_, err = c.RestoreInto(ctx, "ns", "good", ident, g, 0, 4096, func(int, []byte) error { return nil })
			return err
		}},
		{"fsck with a writer open", codes.FailedPrecondition, func() error {
			_, err := c.API.Fsck(ctx, &hcachev1.FsckRequest{})
			return err
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) { wantCode(t, tc.name, tc.call(), tc.code) })
	}
	// Nothing above changed the stored data or stopped the daemon.
	check(t, c, "ns", "good", 100)
	if err := w.AppendLayer(ctx, 0, rows("open", 0, 0, 10, 64)); err != nil {
		t.Fatal(err)
	}
	if err := w.AppendLayer(ctx, 2, rows("open", 2, 0, 10, 32)); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(ctx); err != nil {
		t.Fatal(err)
	}
	check(t, c, "ns", "open", 10)
}

func TestUnsealedRegionRefused(t *testing.T) {
	e := start(t, nil)
	fd, err := unix.MemfdCreate("x", unix.MFD_ALLOW_SEALING)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	unix.Ftruncate(fd, 4096)
	conn, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: e.sock + ".shm", Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if _, _, err := conn.WriteMsgUnix([]byte(daemon.ShmMagic), unix.UnixRights(fd), nil); err != nil {
		t.Fatal(err)
	}
	line, _ := io.ReadAll(conn)
	if !strings.HasPrefix(string(line), "ERR") || !strings.Contains(string(line), "F_SEAL_SHRINK") {
		t.Fatalf("unsealed memfd: daemon answered %q, want an ERR naming F_SEAL_SHRINK", line)
	}
}

func TestInflightLimit(t *testing.T) {
	e := start(t, func(c *daemon.Config) { c.MaxInflight = 1; c.RestorePieceBytes = 64 << 10 })
	c := e.dial()
	ctx := context.Background()
	save(t, c, "ns", "big", 100)
	big := hc.Identity{Model: []byte("big"), Plan: []hc.LayerPlan{{Kind: hc.LayerHidden, RowBytes: 64 << 10}}}
	w, err := c.Create(ctx, "ns", "huge", big, false)
	if err != nil {
		t.Fatal(err)
	}
	if err := w.AppendLayer(ctx, 0, make([]byte, 8*(64<<10))); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(ctx); err != nil {
		t.Fatal(err)
	}
	// A restore whose stream is not read stays in flight (8 x 64 KiB is
	// more than the transport's flow-control window lets through).
	sctx, cancel := context.WithCancel(ctx)
	st, err := c.API.Restore(sctx, &hcachev1.RestoreRequest{Ctx: &hcachev1.ContextRef{Namespace: "ns", Id: "huge"},
		Identity: &hcachev1.Identity{Model: big.Model, Plan: []*hcachev1.LayerPlan{{Kind: hcachev1.LayerKind_LAYER_HIDDEN, RowBytes: 64 << 10}}}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := st.Recv(); err != nil {
		t.Fatal(err)
	}
	_, err = c.Stat(ctx, "ns", "big")
	wantCode(t, "second request in flight", err, codes.ResourceExhausted)
	// Another connection is not limited by this one.
	if _, err := e.dial().Stat(ctx, "ns", "big"); err != nil {
		t.Fatal(err)
	}
	cancel()
	// Once the stream ends the connection admits requests again.
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, err := c.Stat(ctx, "ns", "big")
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("connection still refused after the stream ended: %v", err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestClientDiesMidAppend(t *testing.T) {
	e := start(t, nil)
	ctx := context.Background()
	c1, err := hc.Dial("unix://" + e.sock)
	if err != nil {
		t.Fatal(err)
	}
	w, err := c1.Create(ctx, "ns", "turn", ident, false)
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range []int{0, 2} {
		if err := w.AppendLayer(ctx, l, rows("turn", l, 0, 70, int(ident.Plan[l].RowBytes))); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	// More rows, not flushed; half a prefill (layer 0 only); then the client dies.
	if err := w.AppendLayer(ctx, 0, rows("turn", 0, 70, 30, 64)); err != nil {
		t.Fatal(err)
	}
	c1.Close()
	c2 := e.dial()
	// The daemon notices the connection end and abandons the writer.
	deadline := time.Now().Add(10 * time.Second)
	var w2 *hc.Writer
	for {
		w2, err = c2.Append(ctx, "ns", "turn", ident)
		if err == nil {
			break
		}
		if status.Code(err) != codes.Aborted || time.Now().After(deadline) {
			t.Fatalf("reopen after the client died: %v", err)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if w2.Tokens != 70 {
		t.Fatalf("reopened at %d tokens, want the 70 flushed", w2.Tokens)
	}
	if err := w2.Close(ctx); err != nil {
		t.Fatal(err)
	}
	check(t, c2, "ns", "turn", 70)
}

func TestTenancy(t *testing.T) {
	tokA, tokB := "token-for-namespace-a", "token-for-namespace-b"
	e := start(t, func(c *daemon.Config) {
		c.Grants.Tokens = map[string][]string{tokA: {"a"}, tokB: {"b"}}
		c.Quotas = map[string]int64{"b": 96 * 130}
	})
	ctx := context.Background()
	a, b := e.dial(hc.WithToken(tokA)), e.dial(hc.WithToken(tokB))
	save(t, a, "a", "x", 100)
	save(t, b, "b", "y", 100)
	wantCode(t, "A stats B", func() error { _, err := a.Stat(ctx, "b", "y"); return err }(), codes.PermissionDenied)
	wantCode(t, "A restores B", func() error {
		_, err := a.Restore(ctx, "b", "y", ident, func(int, []byte) error { return nil })
		return err
	}(), codes.PermissionDenied)
	wantCode(t, "A deletes B", a.Delete(ctx, "b", "y"), codes.PermissionDenied)
	wantCode(t, "A lists B", func() error { _, err := a.List(ctx, "b"); return err }(), codes.PermissionDenied)
	wantCode(t, "A creates in B", func() error { _, err := a.Create(ctx, "b", "z", ident, false); return err }(), codes.PermissionDenied)
	wantCode(t, "A runs gc", func() error { _, err := a.API.Gc(ctx, &hcachev1.GcRequest{}); return err }(), codes.PermissionDenied)
	wantCode(t, "unknown token", func() error { _, err := e.dial(hc.WithToken("no-such-token-xxxxxxxx")).Stat(ctx, "a", "x"); return err }(), codes.Unauthenticated)
	all, err := a.List(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	if len(all) != 1 || all[0].GetNamespace() != "a" {
		t.Fatalf("A lists %v, want only a/x", all)
	}
	// Quota: B holds 100 x 96 bytes of 130 x 96: 40 rows of layer 0 fit, 40 more of layer 2 do not.
	w, err := b.Create(ctx, "b", "more", ident, false)
	if err != nil {
		t.Fatal(err)
	}
	if err := w.AppendLayer(ctx, 0, rows("more", 0, 0, 40, 64)); err != nil {
		t.Fatal(err)
	}
	wantCode(t, "quota", w.AppendLayer(ctx, 2, rows("more", 2, 0, 40, 32)), codes.ResourceExhausted)
	// Layer 0's 40 tokens never got their layer 2: Close says they are lost.
	wantCode(t, "close with tokens in only some layers", w.Close(ctx), codes.InvalidArgument)
	check(t, b, "b", "y", 100)
	// Deleting frees quota.
	if err := b.Delete(ctx, "b", "y"); err != nil {
		t.Fatal(err)
	}
	save(t, b, "b", "z", 100)
	check(t, a, "a", "x", 100)
}

func TestTCPNeedsToken(t *testing.T) {
	tok := "tcp-token-0123456789"
	var addr string
	e := start(t, func(c *daemon.Config) {
		ln, _ := net.Listen("tcp", "127.0.0.1:0")
		addr = ln.Addr().String()
		ln.Close()
		c.TCP = addr
		c.Grants.Tokens = map[string][]string{tok: {"t"}}
	})
	_ = e
	ctx := context.Background()
	anon, err := hc.Dial(addr)
	if err != nil {
		t.Fatal(err)
	}
	defer anon.Close()
	wantCode(t, "TCP without a token", func() error { _, err := anon.Stat(ctx, "t", "x"); return err }(), codes.Unauthenticated)
	c, err := hc.Dial(addr, hc.WithToken(tok))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	save(t, c, "t", "x", 130)
	check(t, c, "t", "x", 130)
	if _, err := c.NewRegion(ctx, 4096); err == nil {
		t.Fatal("TCP client got a shared region")
	}
}

func TestSharedRegionRoundTrip(t *testing.T) {
	seed := testseed.Seed(t)
	rng := rand.New(rand.NewSource(seed))
	e := start(t, nil)
	c := e.dial()
	ctx := context.Background()
	n := 64 + rng.Intn(200)
	g, err := c.NewRegion(ctx, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	w, err := c.Create(ctx, "ns", "shm", ident, false)
	if err != nil {
		t.Fatal(err)
	}
	off := uint64(0)
	for _, l := range []int{0, 2} {
		r := rows("shm", l, 0, n, int(ident.Plan[l].RowBytes))
		copy(g.Mem[off:], r)
		if err := w.AppendLayerRegion(ctx, l, g, off, uint64(len(r))); err != nil {
			t.Fatal(err)
		}
		off += uint64(len(r))
	}
	// Decode tokens, inline.
	for i := 0; i < 5; i++ {
		tok := append(rows("shm", 0, n+i, 1, 64), rows("shm", 2, n+i, 1, 32)...)
		if err := w.AppendTokens(ctx, 1, tok); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Close(ctx); err != nil {
		t.Fatal(err)
	}
	clear(g.Mem)
	got := map[int][]byte{}
	tokens, err := c.RestoreInto(ctx, "ns", "shm", ident, g, 4096, uint64(len(g.Mem)-4096), func(l int, r []byte) error {
		got[l] = append([]byte(nil), r...)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if int(tokens) != n+5 {
		t.Fatalf("%d tokens, want %d", tokens, n+5)
	}
	for _, l := range []int{0, 2} {
		if want := rows("shm", l, 0, n+5, int(ident.Plan[l].RowBytes)); !bytes.Equal(got[l], want) {
			t.Fatalf("layer %d differs", l)
		}
	}
	if !bytes.Equal(g.Mem[4096:4096+len(got[0])], got[0]) {
		t.Fatal("layer 0 not placed at the requested offset")
	}
}

func TestMetrics(t *testing.T) {
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	addr := ln.Addr().String()
	ln.Close()
	e := start(t, func(c *daemon.Config) { c.Metrics = addr })
	c := e.dial()
	save(t, c, "ns", "m", 100)
	check(t, c, "ns", "m", 100)
	c.Stat(context.Background(), "ns", "missing")
	body := httpGet(t, "http://"+addr+"/metrics")
	for _, want := range []string{
		`hcache_restore_requests_total{result="hit"} 1`,
		`hcache_restore_seconds_count{stage="total"} 1`,
		`hcache_rpcs_total{code="NotFound",method="/hcache.v1.HCache/Stat"} 1`,
		"hcache_live_bytes ", "hcache_dead_bytes ", "hcache_bytes_written_total ", "hcache_checksum_failures_total 0",
		"hcache_gc_segments_total ", "hcache_evictions_total ", "hcache_io_errors_total 0",
		fmt.Sprintf("hcache_appended_bytes_total %d", 100*96),
	} {
		if !strings.Contains(body, want) {
			t.Errorf("metrics lack %q", want)
		}
	}
	if h := httpGet(t, "http://"+addr+"/healthz"); h != "ok\n" {
		t.Fatalf("healthz: %q", h)
	}
}

func TestChecksumFailureIsDataLoss(t *testing.T) {
	e := start(t, nil)
	c := e.dial()
	save(t, c, "ns", "victim", 100)
	save(t, c, "ns", "bystander", 100)
	// Reopen without the DRAM tier, so the restore reads the flipped byte.
	e.srv.Stop()
	if err := e.store.Close(); err != nil {
		t.Fatal(err)
	}
	segs, err := filepath.Glob(filepath.Join(e.dir, "segments", "*.hcs"))
	if err != nil || len(segs) != 1 {
		t.Fatalf("segments: %v %v", segs, err)
	}
	f, err := os.OpenFile(segs[0], os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	// The first record (the victim's group 0) starts at 4096: its header
	// block, then the first slice at 8192.
	b := make([]byte, 1)
	f.ReadAt(b, 8192+100)
	b[0] ^= 0x40
	f.WriteAt(b, 8192+100)
	f.Close()
	e.store, err = chunk.Open(chunk.Options{Dir: e.dir, GCInterval: -1, SegmentBytes: 8 << 20, CacheBytes: 0, Logf: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	os.Remove(e.sock)
	os.Remove(e.sock + ".shm")
	e.srv, err = daemon.New(daemon.Config{Store: e.store, Listen: e.sock, GCInterval: -1, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	c = e.dial()
	ctx := context.Background()
	for i, what := range []string{"checksum failure", "damaged context"} {
		_, err := c.Restore(ctx, "ns", "victim", ident, func(int, []byte) error { return nil })
		wantCode(t, what, err, codes.DataLoss)
		if i == 0 && !strings.Contains(err.Error(), "checksum") {
			t.Fatalf("first restore: %v, want it to name the checksum", err)
		}
	}
	check(t, c, "ns", "bystander", 100)
}

// TestProjectedRestore saves a forward pass's hidden states (and one KV
// layer) and restores them projected on the daemon's CPU backend: the K/V
// must equal the forward pass's cache bit for bit.
func TestProjectedRestore(t *testing.T) {
	for _, preset := range []string{"tiny-gqa", "tiny-qwen2"} {
		t.Run(preset, func(t *testing.T) { projectedRestore(t, preset, "cpu") })
	}
}

// TestProjectedRestoreCUDA is the same through the CUDA backend, on a
// machine with a GPU (skipped elsewhere): K|V within the dtype's rounding of
// the CPU forward pass's.
func TestProjectedRestoreCUDA(t *testing.T) {
	for _, preset := range []string{"tiny-gqa", "tiny-llama"} {
		t.Run(preset, func(t *testing.T) { projectedRestore(t, preset, "cuda") })
	}
}

func projectedRestore(t *testing.T, preset, backend string) {
	mc, err := model.Preset(preset)
	if err != nil {
		t.Fatal(err)
	}
	mdir := t.TempDir()
	w := model.Synthesize(mc, 11)
	if err := model.WriteModel(mdir, mc, w); err != nil {
		t.Fatal(err)
	}
	lm, err := daemon.LoadModel(preset, mdir, backend)
	if errors.Is(err, cuda.ErrNoDevice) {
		t.Skipf("no CUDA device: %v", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("backend: %s", lm.Note)
	e := start(t, func(c *daemon.Config) { c.Models = []*daemon.Model{lm} })
	c := e.dial()
	ctx := context.Background()
	info, err := c.Info(ctx)
	if err != nil || len(info.GetModels()) != 1 || !bytes.Equal(info.GetModels()[0].GetFingerprint(), lm.Fingerprint) {
		t.Fatalf("Info models: %v %v", info.GetModels(), err)
	}
	plan := make([]hc.LayerPlan, mc.Layers)
	cplan := make([]chunk.LayerPlan, mc.Layers)
	for l := range plan {
		plan[l] = hc.LayerPlan{Kind: hc.LayerHidden, RowBytes: uint32(mc.HiddenRowBytes())}
		if l == mc.Layers-1 {
			plan[l] = hc.LayerPlan{Kind: hc.LayerKV, RowBytes: uint32(mc.KVRowBytes())}
		}
		cplan[l] = chunk.LayerPlan{Kind: chunk.LayerKind(plan[l].Kind), RowBytes: plan[l].RowBytes}
	}
	mident := hc.Identity{Model: serve.Identity(mc, w, cplan).Model, Plan: plan}
	if !bytes.Equal(mident.Model, lm.Fingerprint) {
		t.Fatal("the daemon's fingerprint differs from serve.Identity's")
	}
	m, err := model.New(mc, w)
	if err != nil {
		t.Fatal(err)
	}
	cache := model.NewKVCache(mc)
	toks := make([]int, 150)
	for i := range toks {
		toks[i] = (i*37 + 5) % mc.Vocab
	}
	wr, err := c.Create(ctx, "ns", "proj", mident, false)
	if err != nil {
		t.Fatal(err)
	}
	kvd := mc.KVDim()
	if _, err := m.Forward(toks, cache, func(l int, hidden, k, v []float32) {
		n := len(hidden) / mc.HiddenSize
		var rows []byte
		if plan[l].Kind == hc.LayerHidden {
			rows = make([]byte, n*mc.HiddenRowBytes())
			mc.EncodeRow(rows, hidden)
		} else {
			half := mc.KVRowBytes() / 2
			rows = make([]byte, n*2*half)
			for i := 0; i < n; i++ {
				mc.EncodeRow(rows[i*2*half:], k[i*kvd:(i+1)*kvd])
				mc.EncodeRow(rows[i*2*half+half:], v[i*kvd:(i+1)*kvd])
			}
		}
		if err := wr.AppendLayer(ctx, l, rows); err != nil {
			t.Error(err)
		}
	}); err != nil {
		t.Fatal(err)
	}
	if err := wr.Close(ctx); err != nil {
		t.Fatal(err)
	}
	layers := 0
	n, err := c.RestoreProjected(ctx, "ns", "proj", mident, func(l int, rows []byte) error {
		layers++
		half := mc.KVRowBytes() / 2
		want := make([]byte, len(toks)*2*half)
		for i := range toks {
			mc.EncodeRow(want[i*2*half:], cache.K[l][i*kvd:(i+1)*kvd])
			mc.EncodeRow(want[i*2*half+half:], cache.V[l][i*kvd:(i+1)*kvd])
		}
		if backend == "cpu" {
			if !bytes.Equal(rows, want) {
				return fmt.Errorf("layer %d: projected K|V differ from the forward pass's cache", l)
			}
			return nil
		}
		got, exp := make([]float32, len(rows)/mc.ElemBytes()), make([]float32, len(want)/mc.ElemBytes())
		mc.DecodeRow(got, rows)
		mc.DecodeRow(exp, want)
		scale, worst := 1e-6, 0.0
		for i := range exp {
			scale = max(scale, math.Abs(float64(exp[i])))
			worst = max(worst, math.Abs(float64(got[i]-exp[i])))
		}
		if worst/scale > 8e-3 {
			return fmt.Errorf("layer %d: %s K|V differ from the CPU forward pass by %g of the scale", l, backend, worst/scale)
		}
		return nil
	})
	if err != nil || int(n) != len(toks) || layers != mc.Layers {
		t.Fatalf("projected restore: %d tokens, %d layers, %v", n, layers, err)
	}
	// An identity the daemon has no model for cannot be projected.
	save(t, c, "ns", "plain", 10)
	_, err = c.RestoreProjected(ctx, "ns", "plain", ident, func(int, []byte) error { return nil })
	wantCode(t, "project without a model", err, codes.FailedPrecondition)
}

// TestEvictionFreesQuota: a context evicted for space no longer counts
// against its namespace's quota.
func TestEvictionFreesQuota(t *testing.T) {
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	addr := ln.Addr().String()
	ln.Close()
	sd, err := os.MkdirTemp("", "hcd")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(sd)
	var srv atomic.Pointer[daemon.Server]
	// One 100-token context of this plan is 2 groups of 12 KiB on disk:
	// the capacity holds one, so saving a second evicts the first.
	st, err := chunk.Open(chunk.Options{Dir: t.TempDir(), GCInterval: -1, CacheBytes: 0, CapacityBytes: 40 << 10, Logf: t.Logf,
		OnEvict: func(ns, id string) {
			if s := srv.Load(); s != nil {
				s.OnEvict(ns, id)
			}
		}})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	sock := filepath.Join(sd, "s")
	s, err := daemon.New(daemon.Config{Store: st, Listen: sock, Metrics: addr, MetricsNamespaces: true, GCInterval: -1, Quotas: map[string]int64{"q": 250 * 96},
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	srv.Store(s)
	defer s.Stop()
	c, err := hc.Dial("unix://" + sock)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx := context.Background()
	save(t, c, "q", "first", 100)
	save(t, c, "q", "second", 100)
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, err := c.Stat(ctx, "q", "first")
		body := httpGet(t, "http://"+addr+"/metrics")
		// The store counts the eviction just after the context is gone.
		if status.Code(err) == codes.NotFound && strings.Contains(body, `hcache_namespace_bytes{namespace="q"} 9600`) &&
			strings.Contains(body, "hcache_evictions_total 1") && strings.Contains(body, `hcache_namespace_quota_bytes{namespace="q"} 24000`) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("first context not evicted or usage not recounted: stat %v\n%s", err, body)
		}
		time.Sleep(20 * time.Millisecond)
	}
	// 9600 + 9600 fits the quota of 24000; without the recount it would not.
	save(t, c, "q", "third", 100)
	check(t, c, "q", "third", 100)
}

// TestStopLetsRequestsFinish: Stop lets a restore in progress finish (its
// client reads every byte), refuses new requests meanwhile, and flushes an
// open writer.
func TestStopLetsRequestsFinish(t *testing.T) {
	e := start(t, func(c *daemon.Config) { c.RestorePieceBytes = 64 << 10 })
	c := e.dial()
	ctx := context.Background()
	big := hc.Identity{Model: []byte("big"), Plan: []hc.LayerPlan{{Kind: hc.LayerHidden, RowBytes: 4096}, {Kind: hc.LayerHidden, RowBytes: 4096}}}
	want := make([]byte, 4000*4096) // 32 MiB in all: more than the transport buffers
	for i := range want {
		want[i] = byte(i * 7)
	}
	w, err := c.Create(ctx, "ns", "big", big, false)
	if err != nil {
		t.Fatal(err)
	}
	w.AppendLayer(ctx, 0, want)
	w.AppendLayer(ctx, 1, want)
	if err := w.Close(ctx); err != nil {
		t.Fatal(err)
	}
	// A writer with unflushed rows.
	w2, err := c.Create(ctx, "ns", "pending", ident, false)
	if err != nil {
		t.Fatal(err)
	}
	w2.AppendLayer(ctx, 0, rows("pending", 0, 0, 30, 64))
	w2.AppendLayer(ctx, 2, rows("pending", 2, 0, 30, 32))
	st, err := c.API.Restore(ctx, &hcachev1.RestoreRequest{Ctx: &hcachev1.ContextRef{Namespace: "ns", Id: "big"},
		Identity: &hcachev1.Identity{Model: big.Model, Plan: []*hcachev1.LayerPlan{{Kind: 1, RowBytes: 4096}, {Kind: 1, RowBytes: 4096}}}})
	if err != nil {
		t.Fatal(err)
	}
	first, err := st.Recv()
	if err != nil {
		t.Fatal(err)
	}
	stopped := make(chan struct{})
	go func() {
		e.srv.Stop()
		close(stopped)
	}()
	// New requests are refused while the stop waits for the stream.
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, err := e.dial().Stat(ctx, "ns", "big")
		if status.Code(err) == codes.Unavailable {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("a new request during the stop: %v, want UNAVAILABLE", err)
		}
		time.Sleep(10 * time.Millisecond)
	}
	select {
	case <-stopped:
		t.Fatal("Stop returned while a restore was still streaming")
	default:
	}
	got := map[uint32][]byte{0: first.GetInline()}
	for {
		m, err := st.Recv()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("restore cut by the stop: %v", err)
		}
		got[m.GetLayer()] = append(got[m.GetLayer()], m.GetInline()...)
	}
	if !bytes.Equal(got[0], want) || !bytes.Equal(got[1], want) {
		t.Fatal("restore finished with wrong bytes")
	}
	<-stopped
	// The open writer was flushed on the way out.
	if info, err := e.store.Context("ns", "pending"); err != nil || info.Tokens != 30 {
		t.Fatalf("pending writer after Stop: %+v %v, want 30 durable tokens", info, err)
	}
}

// selfSigned writes a certificate for 127.0.0.1 and its key; it returns
// their paths and a pool trusting the certificate.
func selfSigned(t *testing.T) (certFile, keyFile string, pool *x509.CertPool) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), crand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "hcached test"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}, KeyUsage: x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	der, err := x509.CreateCertificate(crand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kb, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	certFile, keyFile = filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600)
	os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kb}), 0o600)
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	pool = x509.NewCertPool()
	pool.AddCert(cert)
	return certFile, keyFile, pool
}

func TestTCPWithTLS(t *testing.T) {
	tok := "tls-token-0123456789"
	certFile, keyFile, pool := selfSigned(t)
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	addr := ln.Addr().String()
	ln.Close()
	e := start(t, func(c *daemon.Config) {
		c.TCP, c.TLSCertFile, c.TLSKeyFile = addr, certFile, keyFile
		c.Grants.Tokens = map[string][]string{tok: {"t"}}
	})
	ctx := context.Background()
	c, err := hc.Dial(addr, hc.WithToken(tok), hc.WithTLS(&tls.Config{RootCAs: pool}))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	save(t, c, "t", "x", 70)
	check(t, c, "t", "x", 70)
	// A plaintext client does not get through the TLS listener.
	plain, err := hc.Dial(addr, hc.WithToken(tok))
	if err != nil {
		t.Fatal(err)
	}
	defer plain.Close()
	if _, err := plain.Stat(ctx, "t", "x"); status.Code(err) != codes.Unavailable {
		t.Fatalf("plaintext client on the TLS listener: %v, want UNAVAILABLE", err)
	}
	// The unix socket still works with peer credentials.
	check(t, e.dial(), "t", "x", 70)
}

// TestSilentSideConnection: a side-socket client that never registers does
// not hold up Stop.
func TestSilentSideConnection(t *testing.T) {
	e := start(t, nil)
	conn, err := net.Dial("unix", e.sock+".shm")
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	time.Sleep(50 * time.Millisecond) // let the daemon accept it
	done := make(chan struct{})
	go func() {
		e.srv.Stop()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("Stop waits for a side connection that never registered")
	}
	if b, err := io.ReadAll(conn); err != nil || len(b) != 0 {
		t.Fatalf("the silent connection got %q, %v; want it closed", b, err)
	}
}

// TestConnectionLimit: a user's connections past --max-conns are refused,
// and a closed one frees its slot.
func TestConnectionLimit(t *testing.T) {
	e := start(t, func(c *daemon.Config) { c.MaxConnsPerUID = 2 })
	ctx := context.Background()
	var cs []*hc.Client
	for i := 0; i < 2; i++ {
		c, err := hc.Dial("unix://" + e.sock)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if _, err := c.Info(ctx); err != nil {
			t.Fatal(err)
		}
		cs = append(cs, c)
	}
	third := e.dial()
	_, err := third.Info(ctx)
	wantCode(t, "third connection", err, codes.Unavailable)
	cs[0].Close()
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, err := e.dial().Info(ctx)
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no connection slot after one was closed: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	// The connections still open were not disturbed.
	if _, err := cs[1].Info(ctx); err != nil {
		t.Fatal(err)
	}
}

// TestRestoreTimeout: a client that stops reading a restore is cut off after
// RestoreTimeout; the daemon keeps serving and stops cleanly.
func TestRestoreTimeout(t *testing.T) {
	e := start(t, func(c *daemon.Config) { c.RestoreTimeout = 300 * time.Millisecond; c.RestorePieceBytes = 64 << 10 })
	c := e.dial()
	ctx := context.Background()
	big := hc.Identity{Model: []byte("big"), Plan: []hc.LayerPlan{{Kind: hc.LayerHidden, RowBytes: 4096}, {Kind: hc.LayerHidden, RowBytes: 4096}}}
	w, err := c.Create(ctx, "ns", "big", big, false)
	if err != nil {
		t.Fatal(err)
	}
	rowsBig := make([]byte, 6000*4096) // 48 MiB in all: more than the transport buffers (at most 16 MiB a stream)
	w.AppendLayer(ctx, 0, rowsBig)
	w.AppendLayer(ctx, 1, rowsBig)
	if err := w.Close(ctx); err != nil {
		t.Fatal(err)
	}
	st, err := c.API.Restore(ctx, &hcachev1.RestoreRequest{Ctx: &hcachev1.ContextRef{Namespace: "ns", Id: "big"},
		Identity: &hcachev1.Identity{Model: big.Model, Plan: []*hcachev1.LayerPlan{{Kind: 1, RowBytes: 4096}, {Kind: 1, RowBytes: 4096}}}})
	if err != nil {
		t.Fatal(err)
	}
	// A client that does not read: the restore cannot finish, whatever the
	// machine's speed (more than the transport buffers), so it is cut off.
	time.Sleep(time.Second)
	for err == nil {
		_, err = st.Recv()
	}
	wantCode(t, "restore not read", err, codes.DeadlineExceeded)
	// The daemon serves on (and Stop, in the cleanup, does not wait for the
	// abandoned restore).
	if _, err := c.Stat(ctx, "ns", "big"); err != nil {
		t.Fatal(err)
	}
}
