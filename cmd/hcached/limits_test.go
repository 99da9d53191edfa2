package main

import (
	"bytes"
	"context"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

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
