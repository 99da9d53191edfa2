package main

import (
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

func runCLI(args ...string) (int, string, string) {
	var out, errb bytes.Buffer
	code := run(args, &out, &errb)
	return code, out.String(), errb.String()
}

func TestDemoIsLossless(t *testing.T) {
	for _, m := range []string{"tiny-llama", "tiny-opt"} {
		code, out, errs := runCLI("demo", "--model", m, "--turns", "2", "--prompt", "24", "--gen", "6")
		if code != 0 || !strings.Contains(out, "lossless: true") {
			t.Fatalf("%s: exit %d\n%s\n%s", m, code, out, errs)
		}
	}
	// A model directory, as written by `hcache model synth`.
	dir := filepath.Join(t.TempDir(), "m")
	if code, out, errs := runCLI("model", "synth", "--config", "tiny-qwen2", "--seed", "5", "--out", dir); code != 0 {
		t.Fatalf("synth: %d %s %s", code, out, errs)
	}
	if code, out, errs := runCLI("demo", "--model", dir, "--turns", "2", "--prompt", "20", "--gen", "4"); code != 0 || !strings.Contains(out, "lossless: true") {
		t.Fatalf("demo --model DIR: exit %d\n%s\n%s", code, out, errs)
	}
}

func TestUsageErrors(t *testing.T) {
	cases := []struct {
		args []string
		code int
		msg  string
	}{
		{nil, 2, "usage"},
		{[]string{"nope"}, 2, "unknown command"},
		{[]string{"bench", "io", "--bs", "1000", "--no-fio"}, 1, "multiple of 4096"},
		{[]string{"bench", "io", "--size", "12Q"}, 2, "bad size"},
		{[]string{"fsck"}, 2, "-dir"},
		{[]string{"fsck", "--dir", "/definitely/not/here"}, 1, "no such file"},
		{[]string{"model", "synth", "--config", "llama2-7b", "--out", "/tmp/x"}, 1, "parameters"},
		{[]string{"demo", "--model", "llama2-7b"}, 1, "CPU reference"},
		{[]string{"demo", "--turns", "2", "extra"}, 2, "unexpected argument"},
		{[]string{"demo", "--model", "nosuch"}, 1, "neither a preset (demo-llama, "},
		{[]string{"demo", "--compression", "zstd"}, 1, `--compression "zstd": want none or lz4`},
		{[]string{"demo", "--profile", "nosuch"}, 1, "nosuch"},
	}
	for _, c := range cases {
		code, out, errs := runCLI(c.args...)
		if code != c.code || !strings.Contains(out+errs, c.msg) {
			t.Errorf("%v: exit %d (want %d), output %q lacks %q", c.args, code, c.code, out+errs, c.msg)
		}
		// A refused demo fails before it writes the synthetic model.
		if len(c.args) > 0 && c.args[0] == "demo" && strings.Contains(out, "written to") {
			t.Errorf("%v: wrote before failing:\n%s", c.args, out)
		}
	}
}

func TestBenchIOSmoke(t *testing.T) {
	args := []string{"bench", "io", "--dir", t.TempDir(), "--size", "32M", "--bs", "1M", "--qd", "8", "--json",
		"--sweep-size", "8M", "--sweep-bs", "256K,1M", "--sweep-qd", "2", "--sweep-runtime", "200ms"}
	keys := []string{"engine", "bs", "qd", "read_gbps", "write_gbps", "fio_read_gbps", "fio_write_gbps", "read_ratio", "write_ratio",
		"fio_best_read_gbps", "fio_best_write_gbps", "read_vs_best", "write_vs_best", "fio_sweep"}
	if _, err := exec.LookPath("fio"); err != nil {
		if os.Getenv("CI") != "" || os.Getenv("HCACHE_REQUIRE_FIO") != "" {
			t.Fatal("fio is not installed (.ci/run installs it; CI and HCACHE_REQUIRE_FIO=1 make its absence a failure)")
		}
		t.Log("fio not installed: measuring without the baseline")
		args = append(args, "--no-fio")
		keys = keys[:5]
	}
	for _, engine := range []string{"io_uring", "fallback"} {
		code, out, errs := runCLI(append(args, "--engine", engine)...)
		if code != 0 {
			t.Fatalf("%s: exit %d: %s", engine, code, errs)
		}
		var res map[string]any
		if err := json.Unmarshal([]byte(out), &res); err != nil {
			t.Fatalf("%s: output is not one JSON object: %v\n%s", engine, err, out)
		}
		for _, k := range keys {
			if _, ok := res[k]; !ok {
				t.Fatalf("%s: field %s missing", engine, k)
			}
		}
		if res["engine"] != engine || res["read_gbps"].(float64) <= 0 {
			t.Fatalf("%s: %v", engine, res)
		}
		if sw, ok := res["fio_sweep"].(map[string]any); ok {
			if pts := sw["points"].([]any); len(pts) != 4 {
				t.Fatalf("%s: %d sweep points, want 2 block sizes x 1 queue depth x read/write", engine, len(pts))
			}
			if got := res["read_gbps"].(float64) / res["fio_best_read_gbps"].(float64); got != res["read_vs_best"].(float64) {
				t.Fatalf("%s: read_vs_best %v, want %v", engine, res["read_vs_best"], got)
			}
		}
	}
}

func TestFsckAndStat(t *testing.T) {
	dir := t.TempDir()
	if code, _, errs := runCLI("crashtest", "--cycles", "1", "--ops", "30", "--seed", "3"); code != 0 {
		t.Fatalf("crashtest: %s", errs)
	}
	// Build a store with the stress writer, then check it.
	if code, _, errs := runCLI("stress", "--dir", dir, "--seed", "9", "--ops", "300"); code != 0 {
		t.Fatalf("stress: %s", errs)
	}
	code, out, errs := runCLI("fsck", "--dir", dir)
	if code != 0 || !strings.Contains(out, "clean") {
		t.Fatalf("fsck of a clean store: %d\n%s\n%s", code, out, errs)
	}
	code, out, _ = runCLI("stat", "--dir", dir)
	if code != 0 || !strings.Contains(out, "stress") || !strings.Contains(out, "SEGMENT") {
		t.Fatalf("stat: %d\n%s", code, out)
	}
	// Damage a segment: fsck must fail.
	segs, _ := filepath.Glob(filepath.Join(dir, "segments", "seg-*.hcs"))
	if len(segs) == 0 {
		t.Fatal("no segment written")
	}
	for _, seg := range segs {
		st, _ := os.Stat(seg)
		f, _ := os.OpenFile(seg, os.O_RDWR, 0)
		f.WriteAt(bytes.Repeat([]byte{0xee}, int(st.Size())-4096), 4096)
		f.Close()
	}
	code, out, _ = runCLI("fsck", "--dir", dir)
	if code == 0 || !strings.Contains(out, "error") {
		t.Fatalf("fsck of a damaged store exited %d:\n%s", code, out)
	}
}
