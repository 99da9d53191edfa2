package daemon_test

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	hc "github.com/hcache/hcache/clients/hcacheclient"
	"github.com/hcache/hcache/daemon"
	hcachev1 "github.com/hcache/hcache/proto/hcache/v1"
)

// tokenRowsOf returns whole tokens [from, from+n) of ident's plan, as
// AppendTokens takes them; src makes the content a writer's own.
func tokenRowsOf(src string, from, n int) []byte {
	var b []byte
	for t := from; t < from+n; t++ {
		for l, p := range ident.Plan {
			if p.RowBytes > 0 {
				b = append(b, rows(src, l, t, 1, int(p.RowBytes))...)
			}
		}
	}
	return b
}

// TestContextsPerNamespace: a namespace past --max-contexts-per-namespace
// (empty contexts included) is refused with RESOURCE_EXHAUSTED naming the
// limit, the other namespace is not, and a delete frees a slot; the store's
// --max-contexts counts empty contexts too. The default is a fair share of
// --max-contexts over the namespaces the grants name.
func TestContextsPerNamespace(t *testing.T) {
	tokA, tokB := "token-for-namespace-a", "token-for-namespace-b"
	cases := []struct {
		name     string
		max, per int    // Config.MaxContexts, Config.MaxContextsPerNamespace
		fill     int    // empty contexts A creates before it is refused
		msg      string // in the refusal
		bFits    bool   // B can still create after A was refused
	}{
		{"fair share of 10 over 2 namespaces", 10, 0, 5, "--max-contexts-per-namespace 5", true},
		{"explicit per-namespace limit", 10, 3, 3, "--max-contexts-per-namespace 3", true},
		{"store limit counts empty contexts", 4, 100, 4, "--max-contexts 4", false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			e := start(t, func(c *daemon.Config) {
				c.Grants.Tokens = map[string][]string{tokA: {"a"}, tokB: {"b"}}
				c.MaxContexts, c.MaxContextsPerNamespace = tc.max, tc.per
			})
			ctx := context.Background()
			a, b := e.dial(hc.WithToken(tokA)), e.dial(hc.WithToken(tokB))
			for i := 0; i < tc.fill; i++ {
				w, err := a.Create(ctx, "a", fmt.Sprint("empty", i), ident, false)
				if err != nil {
					t.Fatalf("create %d: %v", i, err)
				}
				if err := w.Close(ctx); err != nil {
					t.Fatal(err)
				}
			}
			_, err := a.Create(ctx, "a", "one-more", ident, false)
			wantCode(t, "create past the limit", err, codes.ResourceExhausted)
			if !strings.Contains(status.Convert(err).Message(), tc.msg) {
				t.Fatalf("refusal %q does not name %q", status.Convert(err).Message(), tc.msg)
			}
			_, err = b.Create(ctx, "b", "other", ident, false)
			if tc.bFits && err != nil {
				t.Fatalf("B refused after A filled its share: %v", err)
			}
			if !tc.bFits {
				wantCode(t, "B in a full store", err, codes.ResourceExhausted)
			}
			if err := a.Delete(ctx, "a", "empty0"); err != nil {
				t.Fatal(err)
			}
			save(t, a, "a", "one-more", 10)
			check(t, a, "a", "one-more", 10)
		})
	}
}

// TestMetricsHideNamespaces: /metrics answers anyone who reaches it, so by
// default it names no namespace and shows no per-namespace bytes or quota;
// --metrics-namespaces turns those series on.
func TestMetricsHideNamespaces(t *testing.T) {
	for _, on := range []bool{false, true} {
		t.Run(fmt.Sprint("metrics-namespaces=", on), func(t *testing.T) {
			ln, _ := net.Listen("tcp", "127.0.0.1:0")
			addr := ln.Addr().String()
			ln.Close()
			e := start(t, func(c *daemon.Config) {
				c.Metrics, c.MetricsNamespaces = addr, on
				c.Quotas = map[string]int64{"secret-tenant": 1 << 20}
			})
			save(t, e.dial(), "secret-tenant", "conv", 10)
			body := httpGet(t, "http://"+addr+"/metrics")
			for _, s := range []string{"secret-tenant", "hcache_namespace_bytes", "hcache_namespace_quota_bytes"} {
				if strings.Contains(body, s) != on {
					t.Errorf("metrics contain %q: %v, want %v", s, !on, on)
				}
			}
			if !strings.Contains(body, "hcache_contexts 1") {
				t.Errorf("metrics lack the store's aggregate hcache_contexts 1")
			}
		})
	}
}

// TestNoTenantLeak: a client without a namespace's grant gets the same code
// and message whether or not a context exists there, from every call that
// names it; List shows it nothing.
func TestNoTenantLeak(t *testing.T) {
	tokA, tokB := "token-for-namespace-a", "token-for-namespace-b"
	e := start(t, func(c *daemon.Config) {
		c.Grants.Tokens = map[string][]string{tokA: {"a"}, tokB: {"b"}}
	})
	ctx := context.Background()
	a, b := e.dial(hc.WithToken(tokA)), e.dial(hc.WithToken(tokB))
	save(t, b, "b", "exists", 10)
	calls := []struct {
		name string
		call func(id string) error
	}{
		{"stat", func(id string) error { _, err := a.Stat(ctx, "b", id); return err }},
		{"restore", func(id string) error {
			_, err := a.Restore(ctx, "b", id, ident, func(int, []byte) error { return nil })
			return err
		}},
		{"delete", func(id string) error { return a.Delete(ctx, "b", id) }},
		{"pin", func(id string) error { return a.Pin(ctx, "b", id, true) }},
		{"append", func(id string) error { _, err := a.Append(ctx, "b", id, ident); return err }},
		{"create", func(id string) error { _, err := a.Create(ctx, "b", id, ident, false); return err }},
		{"flush", func(id string) error {
			_, err := a.API.Flush(ctx, &hcachev1.FlushRequest{Ctx: &hcachev1.ContextRef{Namespace: "b", Id: id}})
			return err
		}},
	}
	for _, c := range calls {
		t.Run(c.name, func(t *testing.T) {
			e1, e2 := c.call("exists"), c.call("missing")
			s1, s2 := status.Convert(e1), status.Convert(e2)
			if s1.Code() != codes.PermissionDenied || s1.Code() != s2.Code() ||
				strings.ReplaceAll(s1.Message(), "exists", "ID") != strings.ReplaceAll(s2.Message(), "missing", "ID") {
				t.Fatalf("an existing context answers %v, a missing one %v: they must not differ (PERMISSION_DENIED both)", e1, e2)
			}
		})
	}
	l, err := a.List(ctx, "")
	if err != nil || len(l) != 0 {
		t.Fatalf("A lists %v, %v; want nothing", l, err)
	}
	check(t, b, "b", "exists", 10)
}

// TestStarNamespaceRefused: "*" means every namespace in grants, quotas and
// token files, so no context may live in a namespace of that name.
func TestStarNamespaceRefused(t *testing.T) {
	e := start(t, nil)
	c := e.dial()
	ctx := context.Background()
	calls := map[string]func() error{
		"create": func() error { _, err := c.Create(ctx, "*", "x", ident, false); return err },
		"append": func() error { _, err := c.Append(ctx, "*", "x", ident); return err },
		"stat":   func() error { _, err := c.Stat(ctx, "*", "x"); return err },
		"list":   func() error { _, err := c.List(ctx, "*"); return err },
		"delete": func() error { return c.Delete(ctx, "*", "x") },
	}
	for name, call := range calls {
		err := call()
		wantCode(t, name+" in namespace *", err, codes.InvalidArgument)
		if !strings.Contains(status.Convert(err).Message(), "reserved") {
			t.Errorf("%s: %v does not say * is reserved", name, err)
		}
	}
	if err := daemon.ValidNamespace("*"); err == nil {
		t.Fatal("ValidNamespace accepts *")
	}
	if _, ns, err := daemon.ParseGrant("1000=*"); err != nil || len(ns) != 1 || ns[0] != "*" {
		t.Fatalf("--grant 1000=* (every namespace): %v, %v", ns, err)
	}
}

// TestSidePendingLimits: side connections that have not registered are
// limited per user; one past the limit is answered ERR at once, a silent one
// is cut off after the registration timeout, and a closed one frees its
// slot for a registration.
func TestSidePendingLimits(t *testing.T) {
	e := start(t, func(c *daemon.Config) {
		c.MaxSidePendingPerUID, c.MaxSidePending = 2, 10
		c.SideRegisterTimeout = 300 * time.Millisecond
	})
	var silent []net.Conn
	for i := 0; i < 2; i++ {
		c, err := net.Dial("unix", e.sock+".shm")
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		silent = append(silent, c)
	}
	third, err := net.Dial("unix", e.sock+".shm")
	if err != nil {
		t.Fatal(err)
	}
	defer third.Close()
	// The daemon accepts in order, so the third is past the limit.
	b, _ := io.ReadAll(third)
	if !bytes.HasPrefix(b, []byte("ERR")) || !bytes.Contains(b, []byte("--max-side-pending-per-uid")) {
		t.Fatalf("third silent connection got %q, want ERR naming --max-side-pending-per-uid", b)
	}
	// The silent ones are cut off by the registration timeout.
	for i, c := range silent {
		b, _ := io.ReadAll(c)
		if !bytes.HasPrefix(b, []byte("ERR")) {
			t.Fatalf("silent connection %d got %q, want ERR (timeout)", i, b)
		}
	}
	// Their slots are free again: a real registration succeeds.
	cl := e.dial()
	ctx := context.Background()
	var g *hc.Region
	deadline := time.Now().Add(10 * time.Second)
	for {
		g, err = cl.NewRegion(ctx, 1<<16)
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no registration after the silent connections ended: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	defer g.Close()
	save(t, cl, "ns", "r", 20)
	if _, err := cl.RestoreInto(ctx, "ns", "r", ident, g, 0, 1<<16, func(int, []byte) error { return nil }); err != nil {
		t.Fatal(err)
	}
}

// TestAbandonThenReopen: the interleaving of issue 16 through the daemon.
// A writer is abandoned while whole 64-token groups are still with the
// flusher, the context is reopened at once with APPEND, the new writer
// appends 36 tokens and closes; the restore must serve exactly the tokens
// the reopen reported plus the new 36, with the right bytes, also after a
// restart of the store.
func TestAbandonThenReopen(t *testing.T) {
	for _, abandon := range []string{"CloseContext", "connection dropped"} {
		t.Run(abandon, func(t *testing.T) {
			e := start(t, nil)
			ctx := context.Background()
			c1, err := hc.Dial("unix://" + e.sock)
			if err != nil {
				t.Fatal(err)
			}
			defer c1.Close()
			w, err := c1.Create(ctx, "ns", "conv", ident, false)
			if err != nil {
				t.Fatal(err)
			}
			if err := w.AppendTokens(ctx, 64, tokenRowsOf("first", 0, 64)); err != nil {
				t.Fatal(err)
			}
			if err := w.Flush(ctx); err != nil {
				t.Fatal(err)
			}
			if err := w.AppendTokens(ctx, 128, tokenRowsOf("first", 64, 128)); err != nil {
				t.Fatal(err)
			}
			ref := &hcachev1.ContextRef{Namespace: "ns", Id: "conv"}
			c2 := e.dial()
			if abandon == "CloseContext" {
				if _, err := c1.API.CloseContext(ctx, &hcachev1.CloseContextRequest{Ctx: ref, Abandon: true}); err != nil {
					t.Fatal(err)
				}
			} else {
				c1.Close()
			}
			var w2 *hc.Writer
			for {
				w2, err = c2.Append(ctx, "ns", "conv", ident)
				if err == nil {
					break
				}
				if status.Code(err) != codes.Aborted {
					t.Fatalf("reopen: %v", err)
				}
				time.Sleep(time.Millisecond) // the daemon has not seen the connection end yet
			}
			n := int(w2.Tokens)
			if n != 64 && n != 192 {
				t.Fatalf("reopen reports %d tokens, want 64 (flushed) or 192 (every whole group)", n)
			}
			if err := w2.AppendTokens(ctx, 36, tokenRowsOf("second", n, 36)); err != nil {
				t.Fatal(err)
			}
			if err := w2.Close(ctx); err != nil {
				t.Fatal(err)
			}
			verify := func(c *hc.Client) {
				got := map[int][]byte{}
				tokens, err := c.Restore(ctx, "ns", "conv", ident, func(l int, r []byte) error {
					got[l] = append([]byte(nil), r...)
					return nil
				})
				if err != nil {
					t.Fatalf("restore after abandon, reopen at %d and 36 more: %v", n, err)
				}
				if int(tokens) != n+36 {
					t.Fatalf("restored %d tokens, want %d (reopened at %d, then 36)", tokens, n+36, n)
				}
				for l, p := range ident.Plan {
					if p.RowBytes == 0 {
						continue
					}
					rb := int(p.RowBytes)
					want := append(rows("first", l, 0, n, rb), rows("second", l, n, 36, rb)...)
					if !bytes.Equal(got[l], want) {
						t.Fatalf("layer %d: restored bytes differ from the acknowledged ones", l)
					}
				}
			}
			verify(c2)
		})
	}
}
