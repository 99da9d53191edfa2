package main

import (
	"bytes"
	"context"
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	hc "github.com/hcache/hcache/clients/hcacheclient"
)

// TestHelpAndCapacityNone: `hcached -h` prints the flags and exits 0;
// `--capacity -1` (its help says "-1: none") starts and serves.
func TestHelpAndCapacityNone(t *testing.T) {
	bin := hcachedBinary(t)
	for _, arg := range []string{"-h", "--help"} {
		out, err := exec.Command(bin, arg).CombinedOutput()
		if err != nil {
			t.Fatalf("hcached %s: %v\n%s", arg, err, out)
		}
		if !bytes.Contains(out, []byte("-max-contexts-per-namespace")) {
			t.Fatalf("hcached %s does not list the flags:\n%s", arg, out)
		}
	}
	sd, err := os.MkdirTemp("", "hcd")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(sd)
	sock := filepath.Join(sd, "s")
	d := &daemonProc{t: t, bin: bin, sock: sock, args: []string{"--dir", t.TempDir(), "--listen", "unix://" + sock, "--metrics", "", "--capacity", "-1"}}
	d.start()
	c, err := hc.Dial("unix://" + sock)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx := context.Background()
	if err := writeCtx(ctx, c, 1, "ns", "x", 100, 5); err != nil {
		t.Fatal(err)
	}
	if err := verify(ctx, c, 1, "ns", "x", 105); err != nil {
		t.Fatal(err)
	}
	d.signal(syscall.SIGTERM)
}

// TestFDExhaustingClient: a daemon with few file descriptors (RLIMIT_NOFILE
// 256) and a client opening far more side connections than that without
// registering. While they are held, another client saves and restores
// inline; once they are closed, it registers a shared region and restores
// into it. Before, the silent connections were each held 10 s, the daemon
// ran out of descriptors, and the side socket's accept loop returned on
// EMFILE: shared memory was gone for every tenant until a restart.
func TestFDExhaustingClient(t *testing.T) {
	bin := hcachedBinary(t)
	sd, err := os.MkdirTemp("", "hcd")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(sd)
	sock := filepath.Join(sd, "s")
	// sh's ulimit -n sets the soft and hard limits: Go cannot raise it.
	d := &daemonProc{t: t, bin: "/bin/sh", sock: sock, args: []string{"-c", `ulimit -n 256 && exec "$0" "$@"`, bin,
		"--dir", t.TempDir(), "--listen", "unix://" + sock, "--metrics", ""}}
	d.start()
	defer func() {
		if !t.Failed() {
			d.signal(syscall.SIGTERM)
		} else {
			d.signal(syscall.SIGKILL)
			t.Logf("daemon log:\n%s", d.logs)
		}
	}()
	// The attacker: 600 side connections, none registering, all held.
	var held []net.Conn
	defer func() {
		for _, c := range held {
			c.Close()
		}
	}()
	for i := 0; i < 600; i++ {
		c, err := net.DialTimeout("unix", sock+".shm", 5*time.Second)
		if err != nil {
			break // the daemon's backlog is full: as much as the attacker can do
		}
		held = append(held, c)
	}
	if len(held) < 300 {
		t.Fatalf("the attacker opened only %d side connections", len(held))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	c, err := hc.Dial("unix://" + sock)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := writeCtx(ctx, c, 2, "ns", "during", 100, 3); err != nil {
		t.Fatalf("save while side connections are held: %v", err)
	}
	if err := verify(ctx, c, 2, "ns", "during", 103); err != nil {
		t.Fatalf("restore while side connections are held: %v", err)
	}
	for _, h := range held {
		h.Close()
	}
	held = nil
	// The attacker is gone: a region registers (its slots free as the daemon
	// sees the closes, so retry until the context's deadline).
	var g *hc.Region
	for {
		rctx, rcancel := context.WithTimeout(ctx, 2*time.Second)
		g, err = c.NewRegion(rctx, 1<<20)
		rcancel()
		if err == nil {
			break
		}
		if ctx.Err() != nil {
			t.Fatalf("no shared region after the attacker left: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	defer g.Close()
	n, err := c.RestoreInto(ctx, "ns", "during", e2eIdent, g, 0, 1<<20, func(int, []byte) error { return nil })
	if err != nil || n != 103 {
		t.Fatalf("restore into the region: %d tokens, %v", n, err)
	}
	if !strings.Contains(d.logs.String(), "side connection refused") {
		t.Fatalf("the daemon refused no side connection:\n%s", d.logs)
	}
}

// TestStoreIOFlags: the store's I/O settings (--restore-queue,
// --write-bytes, --write-bytes-under-restores) reach the store, as the
// "store open" log line shows, and the daemon serves with them; a value
// the store has no meaning for exits 2 naming the flag, before anything
// is created.
func TestStoreIOFlags(t *testing.T) {
	bin := hcachedBinary(t)
	for _, tc := range []struct {
		args []string
		want string // in the error
	}{
		{[]string{"--write-bytes", "0"}, "--write-bytes 0: want at least 1 byte"},
		{[]string{"--write-bytes-under-restores", "0"}, "--write-bytes-under-restores 0: want at least 1 byte"},
		{[]string{"--write-bytes", "-5"}, "--write-bytes: bad size"},
		{[]string{"--restore-queue", "lots"}, "--restore-queue: bad size"},
	} {
		dir := filepath.Join(t.TempDir(), "store")
		args := append([]string{"--dir", dir, "--listen", "unix://" + filepath.Join(t.TempDir(), "s"), "--metrics", ""}, tc.args...)
		out, err := exec.Command(bin, args...).CombinedOutput()
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() != 2 {
			t.Fatalf("hcached %v: %v, want exit status 2\n%s", tc.args, err, out)
		}
		if !strings.Contains(string(out), tc.want) {
			t.Fatalf("hcached %v said %q, want it to contain %q", tc.args, out, tc.want)
		}
		if _, err := os.Stat(dir); !os.IsNotExist(err) {
			t.Fatalf("hcached %v: store directory created (%v)", tc.args, err)
		}
	}
	sd, err := os.MkdirTemp("", "hcd")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(sd)
	sock := filepath.Join(sd, "s")
	d := &daemonProc{t: t, bin: bin, sock: sock, args: []string{"--dir", t.TempDir(), "--listen", "unix://" + sock, "--metrics", "",
		"--restore-queue", "0", "--write-bytes", "1M", "--write-bytes-under-restores", "64M"}}
	d.start()
	c, err := hc.Dial("unix://" + sock)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx := context.Background()
	if err := writeCtx(ctx, c, 1, "ns", "x", 300, 5); err != nil {
		t.Fatal(err)
	}
	if err := verify(ctx, c, 1, "ns", "x", 305); err != nil {
		t.Fatal(err)
	}
	d.signal(syscall.SIGTERM)
	for _, want := range []string{`"restore_queue_bytes":-1`, `"write_bytes":1048576`, `"write_bytes_under_restores":67108864`} {
		if !strings.Contains(d.logs.String(), want) {
			t.Fatalf("the daemon's log lacks %q:\n%s", want, d.logs)
		}
	}
}

// TestMaxConnsPerToken: --max-conns-per-token reaches the daemon: with 1, a
// second TCP connection of a token is refused (RESOURCE_EXHAUSTED naming the
// flag, logged with the token's hash and namespaces, never the token), the
// other token's connection is served, and closing the first frees the slot.
func TestMaxConnsPerToken(t *testing.T) {
	bin := hcachedBinary(t)
	sd, err := os.MkdirTemp("", "hcd")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(sd)
	tokA, tokB := "alpha-token-0123456789", "bravo-token-0123456789"
	tokFile := filepath.Join(sd, "tokens")
	if err := os.WriteFile(tokFile, []byte(tokA+" a\n"+tokB+" b\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	sock, tcp := filepath.Join(sd, "s"), freePort(t)
	d := &daemonProc{t: t, bin: bin, sock: sock, args: []string{"--dir", t.TempDir(), "--listen", "unix://" + sock, "--metrics", "",
		"--tcp", tcp, "--tokens", tokFile, "--max-conns-per-token", "1"}}
	d.start()
	defer d.signal(syscall.SIGTERM)
	ctx := context.Background()
	dial := func(tok string) *hc.Client {
		c, err := hc.Dial(tcp, hc.WithToken(tok))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	a1 := dial(tokA)
	if _, err := a1.Info(ctx); err != nil {
		t.Fatal(err)
	}
	a2 := dial(tokA)
	_, err = a2.Info(ctx)
	if status.Code(err) != codes.ResourceExhausted || !strings.Contains(status.Convert(err).Message(), "--max-conns-per-token 1") {
		t.Fatalf("a second connection of token A: %v, want RESOURCE_EXHAUSTED naming --max-conns-per-token 1", err)
	}
	if _, err := dial(tokB).Info(ctx); err != nil {
		t.Fatalf("token B while A is at its limit: %v", err)
	}
	a1.Close()
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, err := a2.Info(ctx)
		if err == nil {
			break
		}
		if status.Code(err) != codes.ResourceExhausted || time.Now().After(deadline) {
			t.Fatalf("A's second connection after the first closed: %v", err)
		}
		time.Sleep(10 * time.Millisecond)
	}
	logs := d.logs.String()
	if !strings.Contains(logs, "its token holds too many TCP connections") || !strings.Contains(logs, `"namespaces":["a"]`) {
		t.Fatalf("no log line of the refusal:\n%s", logs)
	}
	if strings.Contains(logs, tokA) {
		t.Fatal("the log shows a token")
	}
}
