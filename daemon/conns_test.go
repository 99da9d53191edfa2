package daemon_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"log/slog"
	"math/rand"
	"net"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	hc "github.com/hcache/hcache/clients/hcacheclient"
	"github.com/hcache/hcache/daemon"
	"github.com/hcache/hcache/internal/testseed"
	hcachev1 "github.com/hcache/hcache/proto/hcache/v1"
)

// metricValue is the value of one series of a /metrics body ("name" or
// `name{label="v"}`); -1 when absent.
func metricValue(body, series string) float64 {
	for _, l := range strings.Split(body, "\n") {
		if v, ok := strings.CutPrefix(l, series+" "); ok {
			f, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
			if err != nil {
				return -1
			}
			return f
		}
	}
	return -1
}

func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// connEnv is a daemon with a unix socket, a TCP listener (with TLS when
// asked) and /metrics, and two tokens.
type connEnv struct {
	*env
	tcp, metrics string
	tlsCfg       *tls.Config
}

const (
	connTokA = "conn-token-tenant-a"
	connTokB = "conn-token-tenant-b"
)

func startConns(t *testing.T, withTLS bool, mod func(*daemon.Config)) *connEnv {
	ce := &connEnv{tcp: freeAddr(t), metrics: freeAddr(t)}
	var cert, key string
	if withTLS {
		c, k, p := selfSigned(t)
		cert, key, ce.tlsCfg = c, k, &tls.Config{RootCAs: p}
	}
	ce.env = start(t, func(c *daemon.Config) {
		c.TCP, c.Metrics = ce.tcp, ce.metrics
		c.TLSCertFile, c.TLSKeyFile = cert, key
		c.Grants.Tokens = map[string][]string{connTokA: {"a"}, connTokB: {"b"}}
		if mod != nil {
			mod(c)
		}
	})
	return ce
}

// client dials a new connection: over the unix socket ("" token: the
// daemon's own user) or TCP with a token.
func (ce *connEnv) client(t *testing.T, unix bool, tok string) *hc.Client {
	t.Helper()
	var opts []hc.Option
	if tok != "" {
		opts = append(opts, hc.WithToken(tok))
	}
	addr := "unix://" + ce.sock
	if !unix {
		addr = ce.tcp
		if ce.tlsCfg != nil {
			opts = append(opts, hc.WithTLS(ce.tlsCfg))
		}
	}
	c, err := hc.Dial(addr, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func (ce *connEnv) metric(t *testing.T, series string) float64 {
	return metricValue(httpGet(t, "http://"+ce.metrics+"/metrics"), series)
}

// waitMetric waits until a series has the value want: the daemon sees a
// closed connection only when its transport notices.
func (ce *connEnv) waitMetric(t *testing.T, series string, want float64) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		got := ce.metric(t, series)
		if got == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s = %v, want %v", series, got, want)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestCallerConnectionLimits: a caller's connections are bounded, unix ones
// per user (--max-conns, refused at the handshake: UNAVAILABLE) and TCP ones
// per bearer token (--max-conns-per-token: the request that would charge a
// connection past the limit is RESOURCE_EXHAUSTED naming the flag); one
// token at its limit leaves the other token's connections alone; a closed
// connection frees its slot (a refused TCP connection's next request then
// goes through), and the counts return to zero once every client closed.
// Before, TCP connections were not limited at all.
func TestCallerConnectionLimits(t *testing.T) {
	const limit = 3
	cases := []struct {
		name      string
		unix, tls bool
		listener  string
		code      codes.Code
		msg       string // in the refusal; "" when the client cannot see one
	}{
		{"unix per user", true, false, "unix", codes.Unavailable, ""},
		{"tcp per token", false, false, "tcp", codes.ResourceExhausted, fmt.Sprintf("--max-conns-per-token %d", limit)},
		{"tls per token", false, true, "tcp", codes.ResourceExhausted, fmt.Sprintf("--max-conns-per-token %d", limit)},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ce := startConns(t, tc.tls, func(c *daemon.Config) { c.MaxConnsPerUID, c.MaxConnsPerToken = limit, limit })
			ctx := context.Background()
			gauge := `hcache_caller_connections{listener="` + tc.listener + `"}`
			refused := `hcache_connections_refused_total{listener="` + tc.listener + `"}`
			tokA, tokB := connTokA, connTokB
			if tc.unix {
				tokA, tokB = "", ""
			}
			var as []*hc.Client
			for i := 0; i < limit; i++ {
				c := ce.client(t, tc.unix, tokA)
				if _, err := c.Info(ctx); err != nil {
					t.Fatalf("connection %d of %d: %v", i+1, limit, err)
				}
				as = append(as, c)
			}
			extra := ce.client(t, tc.unix, tokA)
			_, err := extra.Info(ctx)
			wantCode(t, "a connection past the limit", err, tc.code)
			if !strings.Contains(status.Convert(err).Message(), tc.msg) {
				t.Fatalf("refusal %q does not name %q", status.Convert(err).Message(), tc.msg)
			}
			if got := ce.metric(t, refused); got < 1 {
				t.Fatalf("%s = %v after a refusal", refused, got)
			}
			open := limit
			if !tc.unix {
				// The other token is not held back by A's.
				for i := 0; i < limit; i++ {
					b := ce.client(t, false, tokB)
					if _, err := b.Stat(ctx, "b", "none"); status.Code(err) != codes.NotFound {
						t.Fatalf("token B's connection %d while A is at its limit: %v, want NOT_FOUND", i+1, err)
					}
					defer b.Close()
				}
				open += limit
				// Requests on A's connections that hold a slot still go through.
				for i, c := range as {
					if _, err := c.Stat(ctx, "a", "none"); status.Code(err) != codes.NotFound {
						t.Fatalf("A's connection %d at the limit: %v, want NOT_FOUND", i, err)
					}
				}
			}
			ce.waitMetric(t, gauge, float64(open))
			as[0].Close()
			ce.waitMetric(t, gauge, float64(open-1))
			next := extra
			if tc.unix {
				next = ce.client(t, true, tokA) // the refused one was closed by the daemon
			}
			if _, err := next.Info(ctx); err != nil {
				t.Fatalf("a request after a slot was freed: %v", err)
			}
			ce.waitMetric(t, gauge, float64(open))
			for _, c := range as[1:] {
				c.Close()
			}
			next.Close()
			extra.Close()
			if !tc.unix {
				ce.waitMetric(t, gauge, limit) // B's
			}
		})
	}
}

// TestTokenConnectionsRandom opens and closes TCP connections of two tokens
// in a seeded random order against a model: a request is refused exactly
// when its token holds --max-conns-per-token other connections, and the
// daemon's count follows every close (it never drifts), back to zero.
func TestTokenConnectionsRandom(t *testing.T) {
	seed := testseed.Seed(t)
	rng := rand.New(rand.NewSource(seed))
	const limit = 3
	ce := startConns(t, false, func(c *daemon.Config) { c.MaxConnsPerToken = limit })
	ctx := context.Background()
	toks := []string{connTokA, connTokB}
	open := map[string][]*hc.Client{}
	total := func() int { return len(open[connTokA]) + len(open[connTokB]) }
	gauge := `hcache_caller_connections{listener="tcp"}`
	for step := 0; step < 40; step++ {
		tok := toks[rng.Intn(2)]
		if len(open[tok]) > 0 && rng.Intn(3) == 0 {
			i := rng.Intn(len(open[tok]))
			open[tok][i].Close()
			open[tok] = append(open[tok][:i], open[tok][i+1:]...)
			ce.waitMetric(t, gauge, float64(total()))
			continue
		}
		c := ce.client(t, false, tok)
		_, err := c.Info(ctx)
		if len(open[tok]) < limit {
			if err != nil {
				t.Fatalf("step %d: token %s holds %d connections: %v", step, tok, len(open[tok]), err)
			}
			open[tok] = append(open[tok], c)
		} else {
			wantCode(t, fmt.Sprintf("step %d: a token at its limit", step), err, codes.ResourceExhausted)
			c.Close()
		}
		ce.waitMetric(t, gauge, float64(total()))
	}
	for _, tok := range toks {
		for _, c := range open[tok] {
			c.Close()
		}
	}
	ce.waitMetric(t, gauge, 0)
}

// holdRestore starts a restore of ns/huge (saved by saveHuge) and reads
// only its first message: the stream stays open, its restore running (the
// rest is more than the transport's flow-control window lets through),
// until cancel.
func holdRestore(t *testing.T, c *hc.Client, ns string) (cancel func(), err error) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	st, err := c.API.Restore(ctx, &hcachev1.RestoreRequest{Ctx: &hcachev1.ContextRef{Namespace: ns, Id: "huge"},
		Identity: &hcachev1.Identity{Model: hugeIdent.Model, Plan: []*hcachev1.LayerPlan{{Kind: hcachev1.LayerKind_LAYER_HIDDEN, RowBytes: 64 << 10}}}})
	if err == nil {
		_, err = st.Recv()
	}
	if err != nil {
		cancel()
		return nil, err
	}
	return cancel, nil
}

var hugeIdent = hc.Identity{Model: []byte("huge"), Plan: []hc.LayerPlan{{Kind: hc.LayerHidden, RowBytes: 64 << 10}}}

func saveHuge(t *testing.T, c *hc.Client, ns string) {
	t.Helper()
	ctx := context.Background()
	w, err := c.Create(ctx, ns, "huge", hugeIdent, false)
	if err != nil {
		t.Fatal(err)
	}
	if err := w.AppendLayer(ctx, 0, make([]byte, 16*(64<<10))); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(ctx); err != nil {
		t.Fatal(err)
	}
}

// TestRestoresPerCaller: a caller (a unix user, a TCP bearer token) runs at
// most --max-restores-per-caller restores at once, over all its
// connections: one more is RESOURCE_EXHAUSTED naming the flag (counted in
// hcache_restore_requests_total{result="refused"}), another token's are not
// held back, and an ended restore frees its slot. Before, only the
// restores of one connection were bounded (--max-inflight), so a caller's
// grew with its connections.
func TestRestoresPerCaller(t *testing.T) {
	const limit = 2
	cases := []struct {
		name string
		unix bool
	}{{"unix user", true}, {"tcp token", false}}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ce := startConns(t, false, func(c *daemon.Config) { c.MaxRestoresPerCaller, c.RestorePieceBytes = limit, 64<<10 })
			tokA, tokB := connTokA, connTokB
			if tc.unix {
				tokA, tokB = "", ""
			}
			saveHuge(t, ce.client(t, tc.unix, tokA), "a")
			if !tc.unix {
				saveHuge(t, ce.client(t, false, tokB), "b")
			}
			// Each restore on a connection of its own: the bound is the
			// caller's, not a connection's (--max-inflight).
			var held []func()
			for i := 0; i < limit; i++ {
				cancel, err := holdRestore(t, ce.client(t, tc.unix, tokA), "a")
				if err != nil {
					t.Fatalf("restore %d of %d: %v", i+1, limit, err)
				}
				held = append(held, cancel)
			}
			_, err := holdRestore(t, ce.client(t, tc.unix, tokA), "a")
			wantCode(t, "a restore past the caller's limit", err, codes.ResourceExhausted)
			if msg := status.Convert(err).Message(); !strings.Contains(msg, fmt.Sprintf("--max-restores-per-caller %d", limit)) {
				t.Fatalf("refusal %q does not name --max-restores-per-caller %d", msg, limit)
			}
			if got := ce.metric(t, `hcache_restore_requests_total{result="refused"}`); got != 1 {
				t.Fatalf("refused restores counted %v, want 1", got)
			}
			if !tc.unix {
				cancel, err := holdRestore(t, ce.client(t, false, tokB), "b")
				if err != nil {
					t.Fatalf("token B's restore while A is at its limit: %v", err)
				}
				defer cancel()
			}
			held[0]()
			deadline := time.Now().Add(10 * time.Second)
			c := ce.client(t, tc.unix, tokA)
			for {
				cancel, err := holdRestore(t, c, "a")
				if err == nil {
					cancel()
					break
				}
				if status.Code(err) != codes.ResourceExhausted || time.Now().After(deadline) {
					t.Fatalf("a restore after one ended: %v", err)
				}
				time.Sleep(5 * time.Millisecond)
			}
			for _, cancel := range held[1:] {
				cancel()
			}
		})
	}
}

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// TestTCPPending: a TCP connection is pending until a request with a known
// token charges it; pending ones are bounded in all (--max-tcp-pending: a
// new one past it is closed at its handshake, UNAVAILABLE) and closed
// --tcp-auth-timeout after they were accepted, while charged ones stay.
// Before, a client that connected and never presented a token (or a
// refused one) held its descriptor for as long as it liked, outside any
// per-token count.
func TestTCPPending(t *testing.T) {
	cases := []struct {
		name    string
		pending int           // Config.MaxTCPPending
		timeout time.Duration // Config.TCPAuthTimeout
		silent  int           // raw connections that send nothing
	}{
		{"pending bound", 2, time.Hour, 2},
		{"auth timeout", 8, 300 * time.Millisecond, 1},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			logs := &lockedBuffer{}
			ce := startConns(t, false, func(c *daemon.Config) {
				c.MaxTCPPending, c.TCPAuthTimeout = tc.pending, tc.timeout
				c.Logger = slog.New(slog.NewTextHandler(logs, nil))
			})
			ctx := context.Background()
			pending := "hcache_tcp_pending_connections"
			charged := `hcache_caller_connections{listener="tcp"}`
			a := ce.client(t, false, connTokA)
			if _, err := a.Info(ctx); err != nil {
				t.Fatal(err)
			}
			var silent []net.Conn
			for i := 0; i < tc.silent; i++ {
				c, err := net.Dial("tcp", ce.tcp)
				if err != nil {
					t.Fatal(err)
				}
				defer c.Close()
				silent = append(silent, c)
			}
			if tc.silent < tc.pending {
				// Closed by the daemon once their time is up.
				for i, c := range silent {
					c.SetReadDeadline(time.Now().Add(30 * time.Second))
					if _, err := io.ReadAll(c); err != nil {
						t.Fatalf("silent connection %d not closed by the daemon: %v", i, err)
					}
				}
				ce.waitMetric(t, pending, 0)
				if n := strings.Count(logs.String(), "no request with a known bearer token in time"); n != tc.silent {
					t.Fatalf("%d connections closed for --tcp-auth-timeout, want %d (the silent ones only):\n%s", n, tc.silent, logs)
				}
			} else {
				ce.waitMetric(t, pending, float64(tc.silent))
				_, err := ce.client(t, false, connTokB).Info(ctx)
				wantCode(t, "a connection past --max-tcp-pending", err, codes.Unavailable)
				if got := ce.metric(t, `hcache_connections_refused_total{listener="tcp_pending"}`); got < 1 {
					t.Fatalf("refused pending connections counted %v", got)
				}
				silent[0].Close()
				ce.waitMetric(t, pending, float64(tc.silent-1))
				if _, err := ce.client(t, false, connTokB).Info(ctx); err != nil {
					t.Fatalf("B after a pending slot was freed: %v", err)
				}
			}
			// The charged connections were not touched.
			if _, err := a.Info(ctx); err != nil {
				t.Fatal(err)
			}
			for _, c := range silent {
				c.Close()
			}
			ce.waitMetric(t, pending, 0)
			if tc.silent < tc.pending {
				ce.waitMetric(t, charged, 1)
			} else {
				ce.waitMetric(t, charged, 2)
			}
		})
	}
}
