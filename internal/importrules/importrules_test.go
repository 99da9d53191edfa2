package importrules

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

const module = "github.com/hcache/hcache"

// layers is the layering order, lowest first. A package may import (in its
// non-test files) only packages of this module in a strictly lower layer:
// nothing imports a package above it or beside it, so the order below is the
// order a reader can learn the tree in. Every package of the module is in
// exactly one layer; a new package must be placed here. A name ending in
// "/..." covers the folder and everything under it.
var layers = [][]string{
	// 0: leaves. What a state is (state), the wire API, platform profiles,
	// the io_uring engine, the fault-injecting vfs, the fio runner, and
	// internal/'s plumbing (fp16/bf16, float32 kernels, progress, medians,
	// test rows, byte sizes), and the store's on-disk encodings (chunk/format).
	{"internal/...", "state", "proto/hcache/v1", "profiles", "iouring", "fuzz/faultfs", "bench/fio", "chunk/format"},
	// 1: the model (configs, weights, reference forward pass), the index, the
	// shared-prefix workloads (token ids and their chain keys), and the row
	// codecs (state/codec: pure encode/decode of rows).
	{"model", "lsm", "bench/prefixwl", "state/codec"},
	// 2: the storage engine, and the projection backends' interface.
	{"chunk", "gpu"},
	// 3: the CUDA backend, planning, the Go client, the remote tier.
	{"gpu/cuda", "serve/sched", "clients/hcacheclient", "chunk/remote"},
	// 4: serving: restore pipelines over the engine and a backend.
	{"serve"},
	// 5: the store as a serve source (serve/chunksrc: chunk.Store behind
	// serve's interfaces).
	{"serve/chunksrc"},
	// 6: the daemon, the crash harness, benchmarks of one part.
	{"daemon", "fuzz/crash", "bench/peer", "bench/benchio", "bench/benchstore", "bench/profiler"},
	// 7: benchmarks that combine parts, and the demo.
	{"bench/compare", "bench/gpubench", "bench/benchpipe", "bench/benchsave", "bench/benchdaemon", "bench/benchfleet", "bench/benchprefix", "cmd/hcache/demo"},
	// 8: the commands and the fuzz targets.
	{"cmd/hcache", "cmd/hcached", "fuzz"},
}

// engine is the storage engine: a package that links any of these (directly
// or through another package) links Pebble and io_uring.
var engine = []string{module + "/chunk", module + "/lsm", module + "/iouring", "github.com/cockroachdb/pebble/v2"}

// mayLinkEngine lists the packages allowed to depend on the engine. Planning
// (serve/sched), the model, the projection backends, the clients and what a
// state is (state) must stay usable without it.
var mayLinkEngine = []string{
	"chunk", "lsm", "iouring", // the engine itself
	"chunk/remote", // the engine's remote tier
	"serve", "serve/chunksrc", "daemon", "cmd/...", "bench/...", "fuzz/...",
}

// mayLinkCUDA lists the packages allowed to depend on the CUDA backend:
// the binaries, which link it to register it with gpu.Select, and the
// benchmarks that drive it directly. serve and the daemon restore through
// the gpu package's interface and do not link it.
var mayLinkCUDA = []string{
	"gpu/cuda", "cmd/...", "bench/gpubench", "bench/profiler", "bench/benchpipe", "bench/benchdaemon",
}

// directImporters: the index and the io_uring engine are the engine's
// parts; outside it only these packages import them by name.
var directImporters = map[string][]string{
	"lsm":     {"chunk"},
	"iouring": {"chunk", "bench/benchio"},
}

type pkg struct {
	ImportPath string
	Name       string
	Imports    []string
	Deps       []string
}

func listModule(t *testing.T) []pkg {
	t.Helper()
	goBin, err := exec.LookPath("go")
	if err != nil {
		t.Fatalf("the go command is needed to list packages: %v", err)
	}
	gomod, err := exec.Command(goBin, "env", "GOMOD").Output()
	if err != nil || len(bytes.TrimSpace(gomod)) == 0 {
		t.Fatalf("go env GOMOD: %v (%q)", err, gomod)
	}
	cmd := exec.Command(goBin, "list", "-json=ImportPath,Name,Imports,Deps", "./...")
	cmd.Dir = filepath.Dir(string(bytes.TrimSpace(gomod)))
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("go list: %v\n%s", err, stderr.Bytes())
	}
	var pkgs []pkg
	dec := json.NewDecoder(bytes.NewReader(out))
	for dec.More() {
		var p pkg
		if err := dec.Decode(&p); err != nil {
			t.Fatalf("decoding go list output: %v", err)
		}
		pkgs = append(pkgs, p)
	}
	if len(pkgs) < 10 {
		t.Fatalf("go list returned %d packages of the module, expected the whole tree", len(pkgs))
	}
	return pkgs
}

// rel is a module package's path below the module ("" and false for others).
func rel(path string) (string, bool) {
	if path == module {
		return ".", true
	}
	r, ok := strings.CutPrefix(path, module+"/")
	return r, ok
}

// matches reports whether rel matches a pattern ("x" or "x/...").
func matches(rel, pattern string) bool {
	if dir, ok := strings.CutSuffix(pattern, "/..."); ok {
		return rel == dir || strings.HasPrefix(rel, dir+"/")
	}
	return rel == pattern
}

func matchesAny(rel string, patterns []string) bool {
	return slices.ContainsFunc(patterns, func(p string) bool { return matches(rel, p) })
}

// layerOf is the layer of a module package, -1 if none lists it.
func layerOf(rel string) int {
	for i, l := range layers {
		if matchesAny(rel, l) {
			return i
		}
	}
	return -1
}

// isVersionDir reports whether a package's folder is an API version
// (proto/hcache/v1 is package hcachev1, as protobuf Go packages are).
func isVersionDir(rel string) bool {
	base := rel[strings.LastIndex(rel, "/")+1:]
	return len(base) > 1 && base[0] == 'v' && strings.Trim(base[1:], "0123456789") == ""
}

// violations applies every rule to a listing and returns one line per broken
// rule, naming the package and what it may not do.
func violations(pkgs []pkg) []string {
	var bad []string
	for _, p := range pkgs {
		r, ok := rel(p.ImportPath)
		if !ok {
			continue
		}
		if base := r[strings.LastIndex(r, "/")+1:]; p.Name != "" && p.Name != base && p.Name != "main" && !isVersionDir(r) {
			bad = append(bad, fmt.Sprintf("%s is package %s: a package's name matches its folder", r, p.Name))
		}
		li := layerOf(r)
		if li < 0 {
			bad = append(bad, fmt.Sprintf("%s is in no layer: place it in layers (internal/importrules)", r))
			continue
		}
		for _, imp := range p.Imports {
			ir, ok := rel(imp)
			if !ok {
				continue
			}
			if strings.HasPrefix(r, "internal/") && !strings.HasPrefix(ir, "internal/") {
				bad = append(bad, fmt.Sprintf("%s imports %s: internal/ imports nothing of this module outside internal/", r, ir))
			}
			if il := layerOf(ir); il >= li {
				bad = append(bad, fmt.Sprintf("%s (layer %d) imports %s (layer %d): a package imports only lower layers", r, li, ir, il))
			}
			if allowed, ok := directImporters[ir]; ok && !matchesAny(r, allowed) {
				bad = append(bad, fmt.Sprintf("%s imports %s: only %v import it", r, ir, allowed))
			}
		}
		deps := append([]string{p.ImportPath}, p.Deps...)
		if !matchesAny(r, mayLinkEngine) {
			for _, e := range engine {
				if slices.Contains(deps, e) {
					bad = append(bad, fmt.Sprintf("%s links the storage engine (%s): only %v may", r, e, mayLinkEngine))
				}
			}
		}
		if !matchesAny(r, mayLinkCUDA) && slices.Contains(deps, module+"/gpu/cuda") {
			bad = append(bad, fmt.Sprintf("%s links the CUDA backend (gpu/cuda): only %v may", r, mayLinkCUDA))
		}
	}
	return bad
}

// TestImportRules checks the tree's non-test imports against the rules above.
// (Import cycles are refused by the go command itself.)
func TestImportRules(t *testing.T) {
	pkgs := listModule(t)
	for _, v := range violations(pkgs) {
		t.Error(v)
	}
	// The rules must be about packages that exist: a pattern that matches
	// nothing is a stale rule.
	var rels []string
	for _, p := range pkgs {
		if r, ok := rel(p.ImportPath); ok {
			rels = append(rels, r)
		}
	}
	var all []string
	for _, l := range layers {
		all = append(all, l...)
	}
	all = append(all, mayLinkEngine...)
	all = append(all, mayLinkCUDA...)
	for k, v := range directImporters {
		all = append(all, k)
		all = append(all, v...)
	}
	for _, pat := range all {
		if !slices.ContainsFunc(rels, func(r string) bool { return matches(r, pat) }) {
			t.Errorf("rule names %q, which matches no package of the module", pat)
		}
	}
}

// TestRulesCatchViolations feeds the rules listings that break each one and
// checks that each is reported, so that a rule cannot silently stop working.
func TestRulesCatchViolations(t *testing.T) {
	m := func(r string) string { return module + "/" + r }
	cases := []struct {
		name string
		pkg  pkg
		want string
	}{
		{"planning links the engine", pkg{ImportPath: m("serve/sched"), Imports: []string{m("state")}, Deps: []string{m("chunk"), m("lsm")}}, "serve/sched links the storage engine (" + m("chunk") + ")"},
		{"model links Pebble", pkg{ImportPath: m("model"), Deps: []string{"github.com/cockroachdb/pebble/v2"}}, "model links the storage engine (github.com/cockroachdb/pebble/v2)"},
		{"client links CUDA", pkg{ImportPath: m("clients/hcacheclient"), Deps: []string{m("gpu/cuda")}}, "clients/hcacheclient links the CUDA backend"},
		{"serve links CUDA", pkg{ImportPath: m("serve"), Deps: []string{m("gpu"), m("gpu/cuda")}}, "serve links the CUDA backend"},
		{"daemon links CUDA", pkg{ImportPath: m("daemon"), Deps: []string{m("serve"), m("gpu/cuda")}}, "daemon links the CUDA backend"},
		{"internal imports up", pkg{ImportPath: m("internal/demo"), Imports: []string{m("serve")}}, "internal/demo imports serve: internal/ imports nothing of this module outside internal/"},
		{"import of a higher layer", pkg{ImportPath: m("chunk"), Imports: []string{m("serve")}}, "chunk (layer 2) imports serve (layer 4)"},
		{"import beside", pkg{ImportPath: m("chunk"), Imports: []string{m("gpu")}}, "chunk (layer 2) imports gpu (layer 2)"},
		{"index imported outside the engine", pkg{ImportPath: m("daemon"), Imports: []string{m("lsm")}, Deps: []string{m("lsm")}}, "daemon imports lsm: only [chunk] import it"},
		{"unplaced package", pkg{ImportPath: m("newthing")}, "newthing is in no layer"},
		{"package name differs from its folder", pkg{ImportPath: m("bench/io"), Name: "benchio"}, "bench/io is package benchio"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got := violations([]pkg{c.pkg})
			if !slices.ContainsFunc(got, func(v string) bool { return strings.Contains(v, c.want) }) {
				t.Fatalf("violations = %q, want one containing %q", got, c.want)
			}
		})
	}
	if got := violations([]pkg{{ImportPath: m("serve/sched"), Imports: []string{m("state"), m("model")}, Deps: []string{m("state"), m("model")}}}); len(got) != 0 {
		t.Fatalf("a clean package reported: %q", got)
	}
}
