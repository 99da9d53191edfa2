package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// pipPython is torchPython's interpreter when it can also build and install
// a package offline (pip, setuptools and wheel from Debian); skipped without
// them unless HCACHE_REQUIRE_TORCH=1.
func pipPython(t *testing.T) string {
	t.Helper()
	py := torchPython(t)
	out, err := exec.Command(py, "-c", "import setuptools, wheel, pip").CombinedOutput()
	if err == nil {
		return py
	}
	if os.Getenv("HCACHE_REQUIRE_TORCH") == "1" {
		t.Fatalf("%s lacks pip, setuptools or wheel (apt-get install python3-pip python3-setuptools python3-wheel): %v\n%s", py, err, out)
	}
	t.Skipf("%s lacks pip, setuptools or wheel; set HCACHE_REQUIRE_TORCH=1 to make this a failure", py)
	return ""
}

// copyTree copies the regular files under src to dst (the package is built
// from a copy, so that the build leaves nothing in the source tree).
func copyTree(t *testing.T, src, dst string) {
	t.Helper()
	err := filepath.Walk(src, func(p string, fi os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(src, p)
		if err != nil {
			return err
		}
		name := fi.Name()
		if fi.IsDir() && (name == "build" || name == "__pycache__" || strings.HasSuffix(name, ".egg-info")) {
			return filepath.SkipDir
		}
		if fi.IsDir() {
			return os.MkdirAll(filepath.Join(dst, rel), 0o755)
		}
		if !fi.Mode().IsRegular() {
			return nil
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		return os.WriteFile(filepath.Join(dst, rel), b, 0o644)
	})
	if err != nil {
		t.Fatal(err)
	}
}

// TestPythonPackageInstall installs clients/python as a package (pip, no
// network, no build isolation) into a fresh target directory and imports it
// from there, outside the source tree: the package metadata's version must
// be the one written in hcache_client/_version.py, and the installed
// package must carry the generated protobuf module and the connectors.
func TestPythonPackageInstall(t *testing.T) {
	py := pipPython(t)
	src, err := filepath.Abs(filepath.Join("..", "..", "clients", "python"))
	if err != nil {
		t.Fatal(err)
	}
	vb, err := os.ReadFile(filepath.Join(src, "hcache_client", "_version.py"))
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^__version__ = "([^"]+)"$`).FindSubmatch(vb)
	if m == nil {
		t.Fatalf("no __version__ line in _version.py:\n%s", vb)
	}
	want := string(m[1])
	work := t.TempDir()
	pkg := filepath.Join(work, "src")
	copyTree(t, src, pkg)
	target := filepath.Join(work, "site")
	cmd := exec.Command(py, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "--disable-pip-version-check",
		"--no-cache-dir", "--target", target, pkg)
	cmd.Dir = work
	cmd.Env = append(os.Environ(), "PIP_NO_INPUT=1")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("pip install: %v\n%s", err, out)
	}
	check := `
import importlib.metadata as md, os, sys
import hcache_client, hcache_client.hcache_pb2 as pb
import hcache_client.vllm_connector, hcache_client.sglang_storage
assert os.path.realpath(hcache_client.__file__).startswith(os.path.realpath(sys.argv[1])), hcache_client.__file__
assert hasattr(pb, "LookupRequest") and hasattr(pb, "ForkRequest")
c = hcache_client.Client
assert all(hasattr(c, m) for m in ("lookup", "fork", "create", "restore", "restore_into"))
print(hcache_client.__version__, md.version("hcache-client"))
`
	run := exec.Command(py, "-c", check, target)
	run.Dir = work // not the source tree: the import must come from target
	run.Env = append(os.Environ(), "PYTHONPATH="+target, "PYTHONNOUSERSITE=1")
	out, err := run.CombinedOutput()
	if err != nil {
		t.Fatalf("import of the installed package: %v\n%s", err, out)
	}
	if got := strings.Fields(string(out)); len(got) != 2 || got[0] != want || got[1] != want {
		t.Fatalf("installed version %q, want %s (module and metadata)", strings.TrimSpace(string(out)), want)
	}
}
