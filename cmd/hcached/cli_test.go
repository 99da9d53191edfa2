package main

import (
	"bytes"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// TestMain removes the hcached binary the tests build (34 MB a run was left
// in the system temp directory).
func TestMain(m *testing.M) {
	code := m.Run()
	if builtBin != "" {
		os.RemoveAll(filepath.Dir(builtBin))
	}
	os.Exit(code)
}

// TestHelpVersion: -h and --help exit 0 and print, on stdout, an example and
// the sizes in human units; --version prints the commit; a missing --dir is
// named.
func TestHelpVersion(t *testing.T) {
	bin := hcachedBinary(t)
	for _, arg := range []string{"-h", "--help"} {
		cmd := exec.Command(bin, arg)
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("hcached %s: %v\n%s%s", arg, err, out, stderr.Bytes())
		}
		for _, want := range []string{"Example:\n  hcached --dir", `(default "64G")`, `(default "256M")`, "-socket-mode", "-max-contexts-per-namespace"} {
			if !bytes.Contains(out, []byte(want)) {
				t.Errorf("hcached %s: stdout lacks %q:\n%s", arg, want, out)
			}
		}
	}
	out, err := exec.Command(bin, "--version").Output()
	if err != nil || !strings.HasPrefix(string(out), "hcached ") || !strings.Contains(string(out), "commit ") {
		t.Fatalf("hcached --version: %v, %q", err, out)
	}
	cmd := exec.Command(bin)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Run(); err == nil || cmd.ProcessState.ExitCode() != 2 || !strings.Contains(stderr.String(), "missing --dir") {
		t.Fatalf("hcached without flags: %v, %s; want exit 2 naming --dir", err, stderr.String())
	}
}

// TestSecondDaemonCreatesNothing: a daemon pointed at a socket another
// daemon answers on, or at the metrics address another holds, exits 1
// saying so, and creates no store directory (it used to create the store,
// then exit). --socket-mode sets the sockets' permission bits.
func TestSecondDaemonCreatesNothing(t *testing.T) {
	bin := hcachedBinary(t)
	sd, err := os.MkdirTemp("", "hcd")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(sd)
	sock := filepath.Join(sd, "s")
	metrics := freePort(t)
	if err := os.WriteFile(filepath.Join(sd, "plain"), []byte("not a socket"), 0o644); err != nil {
		t.Fatal(err)
	}
	first := &daemonProc{t: t, bin: bin, sock: sock, args: []string{"--dir", t.TempDir(), "--listen", sock, "--metrics", metrics, "--socket-mode", "0660"}}
	first.start()
	defer first.signal(syscall.SIGTERM)
	for _, p := range []string{sock, sock + ".shm"} {
		fi, err := os.Stat(p)
		if err != nil || fi.Mode().Perm() != 0o660 {
			t.Fatalf("%s: %v, mode %v; want 0660 from --socket-mode", p, err, fi.Mode().Perm())
		}
	}
	cases := []struct {
		name string
		args []string
		want string
	}{
		{"same socket", []string{"--listen", sock, "--metrics", ""}, "another daemon answers"},
		{"same socket as unix://", []string{"--listen", "unix://" + sock, "--metrics", ""}, "another daemon answers"},
		{"same metrics address", []string{"--listen", filepath.Join(sd, "other"), "--metrics", metrics}, "--metrics " + metrics},
		{"bad socket mode", []string{"--listen", filepath.Join(sd, "other"), "--socket-mode", "rw"}, "--socket-mode"},
		{"a file where the socket goes", []string{"--listen", filepath.Join(sd, "plain"), "--metrics", ""}, "is not a socket"},
	}
	for _, c := range cases {
		store := filepath.Join(t.TempDir(), "store")
		cmd := exec.Command(bin, append([]string{"--dir", store}, c.args...)...)
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		err := cmd.Run()
		if err == nil || !strings.Contains(stderr.String(), c.want) {
			t.Errorf("%s: %v\n%s\nwant a failure saying %q", c.name, err, stderr.String(), c.want)
		}
		if _, err := os.Stat(store); !os.IsNotExist(err) {
			t.Errorf("%s: the store directory was created (%v)", c.name, err)
		}
		if _, err := os.Stat(filepath.Join(sd, "other")); !os.IsNotExist(err) {
			t.Errorf("%s: the second socket was created (%v)", c.name, err)
		}
	}
	// The first daemon still serves.
	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatalf("the first daemon stopped answering: %v\n%s", err, first.logs)
	}
	c.Close()
}
