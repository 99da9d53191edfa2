package main

import (
	"crypto/sha256"
	"encoding/hex"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
)

// digest maps every path under dir to a hash of its bytes (or "dir").
func digest(t *testing.T, dir string) map[string]string {
	t.Helper()
	out := map[string]string{}
	filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		if d.IsDir() {
			out[rel] = "dir"
			return nil
		}
		b, _ := os.ReadFile(p)
		s := sha256.Sum256(b)
		out[rel] = hex.EncodeToString(s[:8])
		return nil
	})
	return out
}

func sameTree(t *testing.T, what string, a, b map[string]string) {
	t.Helper()
	var d []string
	for k, v := range a {
		if b[k] != v {
			d = append(d, k+" changed or removed")
		}
	}
	for k := range b {
		if _, ok := a[k]; !ok {
			d = append(d, k+" created")
		}
	}
	sort.Strings(d)
	if len(d) > 0 {
		t.Fatalf("%s wrote to the directory: %v", what, d)
	}
}

// TestCheckersNeverWrite: fsck and stat leave a store (healthy or with a
// lost index), an ordinary directory and a plain file byte-identical; on a
// lost index fsck fails naming repair; repair brings every context back
// and fsck is clean again.
func TestCheckersNeverWrite(t *testing.T) {
	root := t.TempDir()
	dir := filepath.Join(root, "store")
	if code, _, errs := runCLI("stress", "--dir", dir, "--seed", "9", "--ops", "200"); code != 0 {
		t.Fatalf("stress: %s", errs)
	}
	code, statOut, errs := runCLI("stat", "--dir", dir)
	if code != 0 {
		t.Fatalf("stat: %d %s", code, errs)
	}
	other := filepath.Join(root, "other")
	os.MkdirAll(other, 0o755)
	os.WriteFile(filepath.Join(other, "notes"), []byte("not a store"), 0o644)
	plain := filepath.Join(root, "plain")
	os.WriteFile(plain, []byte("a file"), 0o644)

	before := digest(t, root)
	for _, c := range []struct {
		args []string
		code int
		msg  string
	}{
		{[]string{"fsck", "--dir", dir}, 0, "clean"},
		{[]string{"stat", "--dir", dir}, 0, "SEGMENT"},
		{[]string{"fsck", "--dir", other}, 1, "not an hcache store"},
		{[]string{"stat", "--dir", other}, 1, "not an hcache store"},
		{[]string{"fsck", "--dir", plain}, 1, "is a file"},
		{[]string{"stat", "--dir", plain}, 1, "is a file"},
	} {
		code, out, errs := runCLI(c.args...)
		if code != c.code || !strings.Contains(out+errs, c.msg) {
			t.Fatalf("%v: exit %d (want %d), output lacks %q:\n%s%s", c.args, code, c.code, c.msg, out, errs)
		}
		sameTree(t, strings.Join(c.args, " "), before, digest(t, root))
	}

	// The index is lost: the checkers refuse (naming repair) and still
	// write nothing.
	if err := os.RemoveAll(filepath.Join(dir, "index")); err != nil {
		t.Fatal(err)
	}
	before = digest(t, root)
	for _, cmd := range []string{"fsck", "stat"} {
		code, out, errs := runCLI(cmd, "--dir", dir)
		if code == 0 || !strings.Contains(out+errs, "hcache repair") {
			t.Fatalf("%s on a store without its index: exit %d\n%s%s", cmd, code, out, errs)
		}
		sameTree(t, cmd+" of a damaged store", before, digest(t, root))
	}
	code, out, errs := runCLI("repair", "--dir", dir)
	if code != 0 || !strings.Contains(out, "adopted") {
		t.Fatalf("repair: exit %d\n%s%s", code, out, errs)
	}
	code, out, errs = runCLI("fsck", "--dir", dir)
	if code != 0 || !strings.Contains(out, "clean") {
		t.Fatalf("fsck after repair: %d\n%s%s", code, out, errs)
	}
	// Every context that held tokens is back with the same token count
	// (stat's context lines), and no deleted one came back (tombstones).
	_, statAfter, _ := runCLI("stat", "--dir", dir)
	before, after := ctxLines(statOut), ctxLines(statAfter)
	for id, n := range before {
		if n != "0" && after[id] != n {
			t.Fatalf("context %s held %s tokens before the damage, %q after repair\n%s", id, n, after[id], statAfter)
		}
	}
	for id := range after {
		if _, ok := before[id]; !ok {
			t.Fatalf("repair brought back %s, deleted before the damage\n%s", id, statAfter)
		}
	}
}

// ctxLines maps stat's context ids to their token columns.
func ctxLines(out string) map[string]string {
	m := map[string]string{}
	for _, l := range strings.Split(out, "\n") {
		f := strings.Fields(l)
		if len(f) >= 4 && f[0] == "stress" {
			m[f[1]] = f[2]
		}
	}
	return m
}

// TestHelp: at every level of the command tree (hcache, each group such as
// "bench", each command), -h, --help and "help" exit 0 and print, on stdout,
// what the level does and an example ("hcache bench -h" printed unknown
// command and exited 2).
func TestHelp(t *testing.T) {
	if code, out, _ := runCLI("-h"); code != 0 || !strings.Contains(out, "repair") || !strings.Contains(out, "Example:") {
		t.Fatalf("hcache -h: exit %d\n%s", code, out)
	}
	levels := map[string]bool{}
	for name := range commands {
		levels[name] = true
		if group, _, ok := strings.Cut(name, " "); ok {
			levels[group] = true
		}
	}
	for name := range levels {
		for _, h := range []string{"-h", "--help"} {
			args := append(strings.Fields(name), h)
			code, out, errs := runCLI(args...)
			i := strings.Index(out, "Example:")
			// What it does (a description before the example), then an
			// example invocation of this command or group.
			if code != 0 || i < 40 || !strings.Contains(out[i:], "hcache "+name) {
				t.Errorf("hcache %s: exit %d, want 0 with a description and an example on stdout:\n%s\nstderr:\n%s", strings.Join(args, " "), code, out, errs)
			}
		}
	}
	// Sizes in human units.
	if code, out, _ := runCLI("bench", "io", "-h"); code != 0 || !strings.Contains(out, `(default 1G)`) {
		t.Errorf("hcache bench io -h: exit %d, sizes not in human units:\n%s", code, out)
	}
	if code, out, _ := runCLI("help", "bench", "io"); code != 0 || !strings.Contains(out, "hcache bench io --dir") {
		t.Errorf("hcache help bench io: exit %d\n%s", code, out)
	}
	// A group without a command is a usage error that lists the group.
	if code, _, errs := runCLI("bench"); code != 2 || !strings.Contains(errs, "bench io") {
		t.Errorf("hcache bench: exit %d, want 2 and the group's commands:\n%s", code, errs)
	}
}

// TestVersion: --version (and "version") print the build's commit.
func TestVersion(t *testing.T) {
	for _, a := range []string{"--version", "version"} {
		code, out, _ := runCLI(a)
		if code != 0 || !strings.HasPrefix(out, "hcache ") || !strings.Contains(out, "commit ") {
			t.Errorf("hcache %s: exit %d, %q", a, code, out)
		}
	}
}
