package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"math/rand"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	hc "github.com/hcache/hcache/clients/hcacheclient"
	"github.com/hcache/hcache/internal/testseed"
	"github.com/hcache/hcache/model"
)

// daemonProc is a real hcached process.
type daemonProc struct {
	t    *testing.T
	bin  string
	args []string
	sock string
	cmd  *exec.Cmd
	logs *syncBuffer
	done chan struct{} // closed when the process has exited
	err  error         // its exit status
}

// syncBuffer is the daemon's stderr: written by exec's copying goroutine
// while the test reads it (a bare bytes.Buffer raced there).
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

var (
	buildOnce sync.Once
	builtBin  string
	buildErr  error
)

// hcachedBinary builds cmd/hcached once per test run.
func hcachedBinary(t *testing.T) string {
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "hcached-bin")
		if err != nil {
			buildErr = err
			return
		}
		builtBin = filepath.Join(dir, "hcached")
		out, err := exec.Command("go", "build", "-o", builtBin, ".").CombinedOutput()
		if err != nil {
			buildErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return builtBin
}

func freePort(t *testing.T) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

func (d *daemonProc) start() {
	d.t.Helper()
	d.logs = &syncBuffer{}
	d.cmd = exec.Command(d.bin, d.args...)
	d.cmd.Stderr = d.logs
	if err := d.cmd.Start(); err != nil {
		d.t.Fatal(err)
	}
	d.done = make(chan struct{})
	go func() {
		d.err = d.cmd.Wait()
		close(d.done)
	}()
	deadline := time.Now().Add(30 * time.Second)
	for {
		c, err := hc.Dial("unix://" + d.sock)
		if err == nil {
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			_, err = c.Info(ctx)
			cancel()
			c.Close()
			if err == nil || status.Code(err) != codes.Unavailable {
				return
			}
		}
		select {
		case <-d.done:
			d.t.Fatalf("hcached exited (%v) before serving:\n%s", d.err, d.logs)
		default:
		}
		if time.Now().After(deadline) {
			d.t.Fatalf("hcached did not come up: %v\n%s", err, d.logs)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (d *daemonProc) signal(sig syscall.Signal) {
	d.t.Helper()
	d.cmd.Process.Signal(sig)
	<-d.done
	if d.err != nil && sig != syscall.SIGKILL {
		d.t.Fatalf("hcached exited with %v after %v\n%s", d.err, sig, d.logs)
	}
}

var e2eIdent = hc.Identity{Model: []byte("e2e-model"), Plan: []hc.LayerPlan{
	{Kind: hc.LayerHidden, RowBytes: 256}, {Kind: hc.LayerHidden, RowBytes: 256}, {Kind: hc.LayerNone}, {Kind: hc.LayerKV, RowBytes: 128}}}

// rowsOf is context-specific deterministic content for tokens [from, from+n) of a layer.
func rowsOf(seed int64, id string, layer, from, n int) []byte {
	rb := int(e2eIdent.Plan[layer].RowBytes)
	b := make([]byte, n*rb)
	h := seed
	for _, c := range id {
		h = h*31 + int64(c)
	}
	for i := range b {
		b[i] = byte(h>>8) ^ byte(layer*29) ^ byte((from+i/rb)*13) ^ byte(i%rb)
	}
	return b
}

func tokenRows(seed int64, id string, tok int) []byte {
	var b []byte
	for l, p := range e2eIdent.Plan {
		if p.RowBytes > 0 {
			b = append(b, rowsOf(seed, id, l, tok, 1)...)
		}
	}
	return b
}

// writeCtx saves a context: a prefill of pre tokens, then dec decode tokens
// (flushed every 7), then a final flush.
func writeCtx(ctx context.Context, c *hc.Client, seed int64, ns, id string, pre, dec int) error {
	w, err := c.Create(ctx, ns, id, e2eIdent, false)
	if err != nil {
		return err
	}
	for l, p := range e2eIdent.Plan {
		if p.RowBytes > 0 {
			if err := w.AppendLayer(ctx, l, rowsOf(seed, id, l, 0, pre)); err != nil {
				return err
			}
		}
	}
	for i := 0; i < dec; i++ {
		if err := w.AppendTokens(ctx, 1, tokenRows(seed, id, pre+i)); err != nil {
			return err
		}
		if i%7 == 6 {
			if err := w.Flush(ctx); err != nil {
				return err
			}
		}
	}
	return w.Close(ctx)
}

func verify(ctx context.Context, c *hc.Client, seed int64, ns, id string, n int) error {
	layers := 0
	tokens, err := c.Restore(ctx, ns, id, e2eIdent, func(l int, r []byte) error {
		layers++
		if !bytes.Equal(r, rowsOf(seed, id, l, 0, n)) {
			return fmt.Errorf("%s/%s layer %d: %d bytes differ from what was written (%d tokens expected)", ns, id, l, len(r), n)
		}
		return nil
	})
	if err != nil {
		return err
	}
	if int(tokens) != n || layers != 3 {
		return fmt.Errorf("%s/%s: %d tokens in %d layers, want %d in 3", ns, id, tokens, layers, n)
	}
	return nil
}

func TestDaemonEndToEnd(t *testing.T) {
	seed := testseed.Seed(t)
	rng := rand.New(rand.NewSource(seed))
	bin := hcachedBinary(t)
	sd, err := os.MkdirTemp("", "hcd")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(sd)
	dir := t.TempDir()
	tokA, tokB := "alpha-token-0123456789", "bravo-token-0123456789"
	tokFile := filepath.Join(sd, "tokens")
	if err := os.WriteFile(tokFile, []byte(fmt.Sprintf("# test tokens\n%s a\n%s b\n", tokA, tokB)), 0o600); err != nil {
		t.Fatal(err)
	}
	const tokenBytes = 256 + 256 + 128
	// B's quota: more than the 16 contexts below (at most 239 tokens each) hold.
	const quotaTokens = 4000
	sock := filepath.Join(sd, "s.sock")
	metricsAddr := freePort(t)
	d := &daemonProc{t: t, bin: bin, sock: sock, args: []string{"--dir", dir, "--listen", "unix://" + sock, "--metrics", metricsAddr,
		"--tokens", tokFile, "--quota", fmt.Sprintf("b=%d", quotaTokens*tokenBytes), "--gc-interval", "-1s", "--cache", "0"}}
	d.start()
	defer func() {
		select {
		case <-d.done:
		default:
			d.cmd.Process.Kill()
			<-d.done
		}
	}()
	ctx := context.Background()
	dial := func(tok string) *hc.Client {
		c, err := hc.Dial("unix://"+sock, hc.WithToken(tok))
		if err != nil {
			t.Fatal(err)
		}
		return c
	}

	// Concurrent writers and readers in two namespaces: each writer saves
	// contexts one after another; readers restore contexts already acknowledged.
	type saved struct {
		ns, id string
		n      int
	}
	var mu sync.Mutex
	var acked []saved
	var wg sync.WaitGroup
	errs := make(chan error, 64)
	sizes := make([][2]int, 16)
	for i := range sizes {
		sizes[i] = [2]int{1 + rng.Intn(200), rng.Intn(40)}
	}
	for wi := 0; wi < 4; wi++ {
		for _, nsTok := range [][2]string{{"a", tokA}, {"b", tokB}} {
			wg.Add(1)
			go func(wi int, ns, tok string) {
				defer wg.Done()
				c := dial(tok)
				defer c.Close()
				for k := 0; k < 4; k++ {
					id := fmt.Sprintf("w%d-c%d", wi, k)
					sz := sizes[wi*4+k]
					if err := writeCtx(ctx, c, seed, ns, id, sz[0], sz[1]); err != nil {
						errs <- fmt.Errorf("write %s/%s: %w", ns, id, err)
						return
					}
					mu.Lock()
					acked = append(acked, saved{ns, id, sz[0] + sz[1]})
					mu.Unlock()
				}
			}(wi, nsTok[0], nsTok[1])
		}
	}
	stopReaders := make(chan struct{})
	var rwg sync.WaitGroup
	var reads int
	for ri := 0; ri < 3; ri++ {
		rwg.Add(1)
		go func(ri int) {
			defer rwg.Done()
			ca, cb := dial(tokA), dial(tokB)
			defer ca.Close()
			defer cb.Close()
			r := rand.New(rand.NewSource(seed + int64(ri)))
			for {
				select {
				case <-stopReaders:
					return
				default:
				}
				mu.Lock()
				if len(acked) == 0 {
					mu.Unlock()
					time.Sleep(time.Millisecond)
					continue
				}
				s := acked[r.Intn(len(acked))]
				reads++
				mu.Unlock()
				c := ca
				if s.ns == "b" {
					c = cb
				}
				if err := verify(ctx, c, seed, s.ns, s.id, s.n); err != nil {
					errs <- fmt.Errorf("concurrent read: %w", err)
					return
				}
			}
		}(ri)
	}
	wg.Wait()
	close(stopReaders)
	rwg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	t.Logf("%d contexts written by 8 writers, %d concurrent restores verified", len(acked), reads)
	// The daemon's metrics saw them.
	body := httpGet(t, "http://"+metricsAddr+"/metrics")
	for _, want := range []string{fmt.Sprintf(`hcache_restore_requests_total{result="hit"} %d`, reads),
		fmt.Sprintf(`hcache_restore_seconds_count{stage="total"} %d`, reads), "hcache_contexts 32", "hcache_checksum_failures_total 0"} {
		if !strings.Contains(body, want) {
			t.Errorf("metrics lack %q", want)
		}
	}
	if h := httpGet(t, "http://"+metricsAddr+"/healthz"); h != "ok\n" {
		t.Errorf("healthz: %q", h)
	}

	// A writer in the middle of a turn (acknowledged prefix + unflushed rows)
	// when the daemon is SIGKILLed.
	ca := dial(tokA)
	w, err := ca.Create(ctx, "a", "inflight", e2eIdent, false)
	if err != nil {
		t.Fatal(err)
	}
	for l := range e2eIdent.Plan {
		if e2eIdent.Plan[l].RowBytes > 0 {
			if err := w.AppendLayer(ctx, l, rowsOf(seed, "inflight", l, 0, 100)); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := w.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	if err := w.AppendLayer(ctx, 0, rowsOf(seed, "inflight", 0, 100, 50)); err != nil {
		t.Fatal(err)
	}
	d.signal(syscall.SIGKILL)
	ca.Close()
	d.start()
	ca, cb := dial(tokA), dial(tokB)
	defer ca.Close()
	defer cb.Close()
	for _, s := range acked {
		c := ca
		if s.ns == "b" {
			c = cb
		}
		if err := verify(ctx, c, seed, s.ns, s.id, s.n); err != nil {
			t.Fatalf("after SIGKILL and restart: %v", err)
		}
	}
	if info, err := ca.Stat(ctx, "a", "inflight"); err != nil || info.GetTokens() != 100 {
		t.Fatalf("after SIGKILL: in-flight context %v tokens (%v), want the 100 acknowledged", info.GetTokens(), err)
	}
	if err := verify(ctx, ca, seed, "a", "inflight", 100); err != nil {
		t.Fatal(err)
	}

	// Namespace A cannot read, list or delete B's contexts.
	if _, err := ca.Restore(ctx, "b", "w0-c0", e2eIdent, func(int, []byte) error { return nil }); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("A restoring B's context: %v", err)
	}
	if _, err := ca.List(ctx, "b"); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("A listing B: %v", err)
	}
	if err := ca.Delete(ctx, "b", "w0-c0"); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("A deleting B's context: %v", err)
	}
	la, err := ca.List(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	for _, ci := range la {
		if ci.GetNamespace() != "a" {
			t.Fatalf("A's listing shows %s/%s", ci.GetNamespace(), ci.GetId())
		}
	}

	// B's quota: a context that would pass it is refused
	// mid-prefill, and B's data is intact.
	lb, err := cb.List(ctx, "b")
	if err != nil {
		t.Fatal(err)
	}
	used := 0
	for _, ci := range lb {
		used += int(ci.GetTokens())
	}
	wq, err := cb.Create(ctx, "b", "too-big", e2eIdent, false)
	if err != nil {
		t.Fatal(err)
	}
	var qerr error
	for l := range e2eIdent.Plan {
		if e2eIdent.Plan[l].RowBytes > 0 {
			if qerr = wq.AppendLayer(ctx, l, rowsOf(seed, "too-big", l, 0, quotaTokens-used+1)); qerr != nil {
				break
			}
		}
	}
	if status.Code(qerr) != codes.ResourceExhausted {
		t.Fatalf("B past its quota (%d tokens used): %v, want RESOURCE_EXHAUSTED", used, qerr)
	}
	// The layers that fit hold tokens the refused layer lacks: Close says
	// they are lost.
	if err := wq.Close(ctx); status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "tokens [0, ") {
		t.Fatalf("Close after the quota refusal: %v, want INVALID_ARGUMENT naming the lost tokens", err)
	}
	for _, s := range acked {
		if s.ns == "b" {
			if err := verify(ctx, cb, seed, s.ns, s.id, s.n); err != nil {
				t.Fatalf("after quota refusal: %v", err)
			}
		}
	}

	// SIGTERM with a writer holding unflushed rows: the daemon flushes it
	// before it exits, and a restart serves them.
	w2, err := ca.Create(ctx, "a", "graceful", e2eIdent, false)
	if err != nil {
		t.Fatal(err)
	}
	for l := range e2eIdent.Plan {
		if e2eIdent.Plan[l].RowBytes > 0 {
			if err := w2.AppendLayer(ctx, l, rowsOf(seed, "graceful", l, 0, 77)); err != nil {
				t.Fatal(err)
			}
		}
	}
	d.signal(syscall.SIGTERM)
	if !strings.Contains(d.logs.String(), `"msg":"flushed on stop"`) {
		t.Fatalf("no flush on stop in the logs:\n%s", d.logs)
	}
	d.start()
	c3 := dial(tokA)
	defer c3.Close()
	if err := verify(ctx, c3, seed, "a", "graceful", 77); err != nil {
		t.Fatalf("after SIGTERM and restart: %v", err)
	}
	d.signal(syscall.SIGTERM)
}

func httpGet(t *testing.T, url string) string {
	t.Helper()
	r, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Body.Close()
	b, err := io.ReadAll(r.Body)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// TestBadFlags: a bad setting is refused with a message naming it, before
// anything is served.
func TestBadFlags(t *testing.T) {
	bin := hcachedBinary(t)
	sd, err := os.MkdirTemp("", "hcd")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(sd)
	open := filepath.Join(sd, "tokens-open")
	os.WriteFile(open, []byte("a-token-of-enough-length ns\n"), 0o644)
	short := filepath.Join(sd, "tokens-short")
	os.WriteFile(short, []byte("short ns\n"), 0o600)
	good := filepath.Join(sd, "tokens-good")
	os.WriteFile(good, []byte("a-token-of-enough-length ns\n"), 0o600)
	dir := t.TempDir()
	mdir := t.TempDir()
	mc, _ := model.Preset("tiny-llama")
	if err := model.WriteModel(mdir, mc, model.Synthesize(mc, 1)); err != nil {
		t.Fatal(err)
	}
	sock := "unix://" + filepath.Join(sd, "s")
	cases := []struct {
		name string
		args []string
		code int
		msg  string
	}{
		{"no directory", []string{"--listen", sock}, 2, "usage: hcached --dir"},
		{"bad grant", []string{"--dir", dir, "--listen", sock, "--grant", "alice"}, 1, "want UID=NAMESPACE"},
		{"bad grant namespace", []string{"--dir", dir, "--listen", sock, "--grant", "1000=a\x01b"}, 1, "control character"},
		{"bad quota", []string{"--dir", dir, "--listen", sock, "--quota", "ns=lots"}, 2, "bad size"},
		{"quota without namespace", []string{"--dir", dir, "--listen", sock, "--quota", "5G"}, 1, "want NS=BYTES"},
		{"quota on namespace *", []string{"--dir", dir, "--listen", sock, "--quota", "*=5G"}, 1, "reserved"},
		{"grant of a namespace with control characters", []string{"--dir", dir, "--listen", sock, "--grant", "1000=a,\x7f"}, 1, "control character"},
		{"bad capacity", []string{"--dir", dir, "--listen", sock, "--capacity", "-2"}, 2, "bad size"},
		{"token file readable by others", []string{"--dir", dir, "--listen", sock, "--tokens", open}, 1, "chmod 600"},
		{"short token", []string{"--dir", dir, "--listen", sock, "--tokens", short}, 1, "shorter than 16"},
		{"tcp without tokens", []string{"--dir", dir, "--listen", sock, "--tcp", "127.0.0.1:0", "--metrics", ""}, 1, "needs a token file"},
		{"no connections per token", []string{"--dir", dir, "--listen", sock, "--max-conns-per-token", "0"}, 2, "--max-conns-per-token 0: want at least 1"},
		{"no restores per caller", []string{"--dir", dir, "--listen", sock, "--max-restores-per-caller", "0"}, 2, "--max-restores-per-caller 0: want at least 1"},
		{"no pending TCP connections", []string{"--dir", dir, "--listen", sock, "--max-tcp-pending", "0"}, 2, "--max-tcp-pending 0: want at least 1"},
		{"no TCP auth time", []string{"--dir", dir, "--listen", sock, "--tcp-auth-timeout", "0s"}, 2, "--tcp-auth-timeout 0s: want a positive duration"},
		{"negative connections per user", []string{"--dir", dir, "--listen", sock, "--max-conns", "-1"}, 2, "--max-conns -1: want at least 1"},
		{"missing TLS certificate", []string{"--dir", dir, "--listen", sock, "--tcp", "127.0.0.1:0", "--tokens", good, "--metrics", "",
			"--tls-cert", filepath.Join(sd, "none.pem"), "--tls-key", filepath.Join(sd, "none.key")}, 1, "TLS"},
		{"model without a config", []string{"--dir", dir, "--listen", sock, "--model", "m=" + dir}, 1, "--model m"},
		{"unknown backend", []string{"--dir", dir, "--listen", sock, "--model", "m=" + mdir, "--backend", "tpu"}, 1, `unknown backend \"tpu\"`},
		{"no restores", []string{"--dir", dir, "--listen", sock, "--model", "m=" + mdir, "--backend", "cuda", "--restores", "0"}, 2, "--restores 0: want how many restores run on the device at once, 1 to 64"},
		{"too many restores", []string{"--dir", dir, "--listen", sock, "--model", "m=" + mdir, "--restores", "65"}, 2, "1 to 64"},
		{"bad restore memory", []string{"--dir", dir, "--listen", sock, "--model", "m=" + mdir, "--backend", "cuda", "--restore-memory", "-1G"}, 2, "--restore-memory: bad size"},
		{"lanes on the cpu backend", []string{"--dir", dir, "--listen", sock, "--model", "m=" + mdir, "--backend", "cpu", "--restores", "2", "--restore-memory", "1G"}, 2,
			"--restore-memory, --restores: an option of the CUDA backend, not of --backend cpu"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			// A bad flag that is accepted would serve forever: bound it.
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			out, err := exec.CommandContext(ctx, bin, tc.args...).CombinedOutput()
			code := 0
			if ee, ok := err.(*exec.ExitError); ok {
				code = ee.ExitCode()
			} else if err != nil {
				t.Fatal(err)
			}
			if code != tc.code || !strings.Contains(string(out), tc.msg) {
				t.Fatalf("exit %d (want %d), output lacks %q:\n%s", code, tc.code, tc.msg, out)
			}
		})
	}
}
