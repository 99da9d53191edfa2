package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"log/slog"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hcache/hcache/chunk"
	hc "github.com/hcache/hcache/clients/hcacheclient"
	"github.com/hcache/hcache/daemon"
	"github.com/hcache/hcache/model"
	"github.com/hcache/hcache/state"
	"github.com/hcache/hcache/state/codec"
)

// TestDaemonCommands drives ls, stat, pin, rm, fsck and gc against a running
// daemon (--addr), then the same commands on the directory once it stopped.
func TestDaemonCommands(t *testing.T) {
	sd, err := os.MkdirTemp("", "hcd")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(sd)
	dir := t.TempDir()
	sock := filepath.Join(sd, "s")
	st, err := chunk.Open(chunk.Options{Dir: dir, GCInterval: -1, Logf: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	srv, err := daemon.New(daemon.Config{Store: st, Listen: sock, GCInterval: -1, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	addr := "unix://" + sock
	c, err := hc.Dial(addr)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	ident := hc.Identity{Model: []byte("cli"), Plan: []hc.LayerPlan{{Kind: hc.LayerHidden, RowBytes: 128}}}
	for _, id := range []string{"one", "two"} {
		w, err := c.Create(ctx, "ns", id, ident, false)
		if err != nil {
			t.Fatal(err)
		}
		if err := w.AppendLayer(ctx, 0, make([]byte, 100*128)); err != nil {
			t.Fatal(err)
		}
		if err := w.Close(ctx); err != nil {
			t.Fatal(err)
		}
	}
	c.Close()
	lsJSON := func(where ...string) []ctxRow {
		t.Helper()
		code, out, errs := runCLI(append([]string{"ls", "--json"}, where...)...)
		if code != 0 {
			t.Fatalf("ls %v: exit %d: %s", where, code, errs)
		}
		var rows []ctxRow
		if err := json.Unmarshal([]byte(out), &rows); err != nil {
			t.Fatalf("ls --json output %q: %v", out, err)
		}
		return rows
	}
	rows := lsJSON("--addr", addr)
	if len(rows) != 2 || rows[0].ID != "one" || rows[0].Tokens != 100 || rows[1].ID != "two" {
		t.Fatalf("ls --addr: %+v", rows)
	}
	for _, args := range [][]string{
		{"pin", "--addr", sock, "--ns", "ns", "--id", "one"}, // a bare socket path, as hcached --listen takes it
		{"rm", "--addr", addr, "--ns", "ns", "--id", "two"},
		{"gc", "--addr", addr, "--json"},
	} {
		if code, out, errs := runCLI(args...); code != 0 {
			t.Fatalf("%v: exit %d\n%s\n%s", args, code, out, errs)
		}
	}
	rows = lsJSON("--addr", addr)
	if len(rows) != 1 || rows[0].ID != "one" || !rows[0].Pinned {
		t.Fatalf("after pin and rm: %+v", rows)
	}
	if code, out, errs := runCLI("fsck", "--addr", addr); code != 0 || !strings.Contains(out, "clean") {
		t.Fatalf("fsck --addr: exit %d\n%s\n%s", code, out, errs)
	}
	if code, out, errs := runCLI("stat", "--addr", addr, "--json"); code != 0 || !strings.Contains(out, `"contexts": 1`) {
		t.Fatalf("stat --addr: exit %d\n%s\n%s", code, out, errs)
	}
	if code, _, errs := runCLI("rm", "--addr", addr, "--ns", "ns", "--id", "missing"); code != 1 || !strings.Contains(errs, "NotFound") {
		t.Fatalf("rm of a missing context: exit %d, %s", code, errs)
	}
	if code, _, _ := runCLI("ls", "--addr", addr, "--dir", dir); code != 2 {
		t.Fatalf("ls with both --addr and --dir: exit %d, want 2", code)
	}
	// A pinned context is deleted only with --force.
	if code, _, errs := runCLI("rm", "--addr", addr, "--ns", "ns", "--id", "one"); code != 1 || !strings.Contains(errs, "pinned") || !strings.Contains(errs, "--force") {
		t.Fatalf("rm --addr of a pinned context: exit %d, %s; want 1 and a word about the pin and --force", code, errs)
	}
	// The store the daemon holds: --dir says to ask the daemon.
	for _, cmd := range []string{"stat", "gc"} {
		if code, _, errs := runCLI(cmd, "--dir", dir); code != 1 || !strings.Contains(errs, "--addr") {
			t.Fatalf("%s --dir on the daemon's store: exit %d, %s; want 1 and a hint to use --addr", cmd, code, errs)
		}
	}
	srv.Stop()
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}
	// No daemon: the same commands on the directory.
	rows = lsJSON("--dir", dir)
	if len(rows) != 1 || rows[0].ID != "one" || !rows[0].Pinned {
		t.Fatalf("ls --dir: %+v", rows)
	}
	for _, args := range [][]string{
		{"pin", "--dir", dir, "--ns", "ns", "--id", "one", "--unpin"},
		{"gc", "--dir", dir},
		{"fsck", "--dir", dir},
	} {
		if code, out, errs := runCLI(args...); code != 0 {
			t.Fatalf("%v: exit %d\n%s\n%s", args, code, out, errs)
		}
	}
	if rows = lsJSON("--dir", dir); len(rows) != 1 || rows[0].Pinned {
		t.Fatalf("after --unpin on the directory: %+v", rows)
	}
	if code, out, errs := runCLI("pin", "--dir", dir, "--ns", "ns", "--id", "one"); code != 0 {
		t.Fatalf("pin --dir: exit %d\n%s\n%s", code, out, errs)
	}
	if code, _, errs := runCLI("rm", "--dir", dir, "--ns", "ns", "--id", "one"); code != 1 || !strings.Contains(errs, "pinned") {
		t.Fatalf("rm --dir of a pinned context: exit %d, %s; want 1 and a word about the pin", code, errs)
	}
	if rows = lsJSON("--dir", dir); len(rows) != 1 {
		t.Fatalf("a refused rm deleted: %+v", rows)
	}
	if code, out, errs := runCLI("rm", "--dir", dir, "--ns", "ns", "--id", "one", "--force"); code != 0 {
		t.Fatalf("rm --dir --force: exit %d\n%s\n%s", code, out, errs)
	}
	if rows = lsJSON("--dir", dir); len(rows) != 0 {
		t.Fatalf("after rm --dir: %+v", rows)
	}
}

// TestBenchDaemonSmoke runs a tiny bench daemon and checks its JSON shape
// (the figures themselves are measured with `hcache bench daemon`).
func TestBenchDaemonSmoke(t *testing.T) {
	c, _ := model.Preset("tiny-llama")
	for _, tc := range []struct {
		codec    string
		rowBytes int // of the default plan's (hidden) rows
	}{
		{"none", c.HiddenRowBytes()},
		{"fp8", codec.HiddenRowBytes(state.CodecFP8Token, c.DType, c.HiddenSize)},
		{"fp8-block", codec.HiddenRowBytes(state.CodecFP8Block, c.DType, c.HiddenSize)},
	} {
		t.Run(tc.codec, func(t *testing.T) {
			code, out, errs := runCLI("bench", "daemon", "--dir", t.TempDir(), "--model", "tiny-llama", "--tokens", "100", "--contexts", "2", "--clients", "1,2", "--rounds", "1", "--codec", tc.codec, "--json")
			if code != 0 {
				t.Fatalf("exit %d\n%s", code, errs)
			}
			var res struct {
				Codec           string  `json:"codec"`
				BytesPerContext int     `json:"bytes_per_context"`
				EmbeddedGBps    float64 `json:"embedded_gbps"`
				DaemonGBps      float64 `json:"daemon_gbps"`
				Ratio           float64 `json:"ratio"`
				Rows            []struct {
					Clients       int     `json:"clients"`
					Restores      int     `json:"restores"`
					AggregateGBps float64 `json:"aggregate_gbps"`
					P99MS         float64 `json:"p99_ms"`
				} `json:"clients_rows"`
			}
			if err := json.Unmarshal([]byte(out), &res); err != nil {
				t.Fatalf("%q: %v", out, err)
			}
			if res.Codec != tc.codec || res.BytesPerContext != 100*c.Layers*tc.rowBytes {
				t.Fatalf("codec %q, %d bytes per context; want %q, %d", res.Codec, res.BytesPerContext, tc.codec, 100*c.Layers*tc.rowBytes)
			}
			if res.EmbeddedGBps <= 0 || res.DaemonGBps <= 0 || res.Ratio <= 0 || len(res.Rows) != 2 || res.Rows[1].Clients != 2 || res.Rows[1].Restores != 2 || res.Rows[1].P99MS <= 0 {
				t.Fatalf("bench daemon result: %s", out)
			}
		})
	}
}

// TestDaemonCommandsOverTLS: the --addr commands reach a TCP daemon with TLS
// (--tls-ca) and a bearer token (--token-file).
func TestDaemonCommandsOverTLS(t *testing.T) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "hcached"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kb, _ := x509.MarshalECPrivateKey(key)
	d := t.TempDir()
	certFile, keyFile, tokFile := filepath.Join(d, "cert.pem"), filepath.Join(d, "key.pem"), filepath.Join(d, "token")
	os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600)
	os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kb}), 0o600)
	tok := "cli-token-0123456789"
	os.WriteFile(tokFile, []byte(tok+"\n"), 0o600)
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	addr := ln.Addr().String()
	ln.Close()
	st, err := chunk.Open(chunk.Options{Dir: t.TempDir(), GCInterval: -1, Logf: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	srv, err := daemon.New(daemon.Config{Store: st, TCP: addr, TLSCertFile: certFile, TLSKeyFile: keyFile,
		Grants: daemon.Grants{Tokens: map[string][]string{tok: {"ns"}}}, GCInterval: -1, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Stop()
	if code, out, errs := runCLI("ls", "--addr", addr, "--tls-ca", certFile, "--token-file", tokFile, "--json"); code != 0 || strings.TrimSpace(out) != "[]" {
		t.Fatalf("ls over TLS: exit %d, %q, %s", code, out, errs)
	}
	if code, _, _ := runCLI("ls", "--addr", addr, "--token-file", tokFile); code != 1 {
		t.Fatalf("ls in plaintext against a TLS daemon: exit %d, want 1", code)
	}
}

// TestTargetFlagsUsage: the daemon subcommands share one flag set; each
// misuse is refused with exit 2 and says what is missing, before anything is
// dialled or opened.
func TestTargetFlagsUsage(t *testing.T) {
	dir := t.TempDir()
	cases := []struct {
		args []string
		want string
	}{
		{[]string{"ls"}, "missing --dir DIR (a store directory) or --addr ADDR"},
		{[]string{"gc", "--addr", "unix:///nonexistent", "--dir", dir}, "give only one of --addr and --dir"},
		{[]string{"rm", "--dir", dir, "--ns", "ns"}, "--ns and --id are required"},
		{[]string{"pin", "--dir", dir, "--id", "x", "--unpin"}, "--ns and --id are required"},
		{[]string{"rm", "--dir", dir}, "--ns and --id are required"},
		{[]string{"ls", "--dir", dir, "--id", "x"}, "flag provided but not defined: -id"},
		{[]string{"stat"}, "missing --dir DIR (a store directory) or --addr ADDR"},
		{[]string{"fsck"}, "missing --dir DIR (a store directory) or --addr ADDR"},
		{[]string{"fsck", "--addr", "unix:///nonexistent", "--dir", dir}, "give only one of --addr and --dir"},
	}
	for _, c := range cases {
		code, _, errs := runCLI(c.args...)
		if code != 2 || !strings.Contains(errs, c.want) {
			t.Errorf("%v: exit %d, stderr %q; want exit 2 and %q", c.args, code, errs, c.want)
		}
	}
}

// TestDirCommandsRefuseNonStore: the commands on --dir open an existing
// store and never make one: on an empty directory, a directory of other
// files and a missing path each fails, naming what is wrong, and leaves the
// path as it was ("hcache ls --dir EMPTYDIR" used to create a store there,
// with a 64 MiB reserve file).
func TestDirCommandsRefuseNonStore(t *testing.T) {
	cmds := [][]string{
		{"ls"}, {"stat"}, {"fsck"}, {"gc"},
		{"rm", "--ns", "ns", "--id", "x"}, {"pin", "--ns", "ns", "--id", "x"},
	}
	setups := []struct {
		name  string
		setup func(dir string) // dir does not exist yet
		want  string
	}{
		{"empty directory", func(d string) { os.Mkdir(d, 0o755) }, "not an hcache store"},
		{"directory of other files", func(d string) { os.Mkdir(d, 0o755); os.WriteFile(filepath.Join(d, "notes.txt"), []byte("mine"), 0o644) }, "not an hcache store"},
		{"missing path", func(string) {}, "no such file"},
	}
	for _, s := range setups {
		for _, c := range cmds {
			t.Run(s.name+"/"+c[0], func(t *testing.T) {
				dir := filepath.Join(t.TempDir(), "d")
				s.setup(dir)
				before := listTree(t, dir)
				code, out, errs := runCLI(append(c, "--dir", dir)...)
				if code != 1 || !strings.Contains(errs, s.want) {
					t.Fatalf("%s --dir %s: exit %d, stderr %q, stdout %q; want exit 1 and %q", c[0], s.name, code, errs, out, s.want)
				}
				if after := listTree(t, dir); after != before {
					t.Fatalf("%s --dir changed %s:\nbefore %s\nafter  %s", c[0], s.name, before, after)
				}
			})
		}
	}
}

// listTree names every path under dir with its size ("" when dir is missing).
func listTree(t *testing.T, dir string) string {
	t.Helper()
	var b strings.Builder
	filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
		if err == nil {
			fmt.Fprintf(&b, "%s:%d ", strings.TrimPrefix(p, dir), fi.Size())
		}
		return nil
	})
	return b.String()
}
