package main

import (
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/hcache/hcache/model"
)

// synthModels writes the named presets under a temporary directory.
func synthModels(t *testing.T, presets ...string) string {
	t.Helper()
	dir := t.TempDir()
	for _, p := range presets {
		c, err := model.Preset(p)
		if err != nil {
			t.Fatal(err)
		}
		if err := model.WriteModel(filepath.Join(dir, p), c, model.Synthesize(c, 7)); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// startPrefixDaemon starts hcached with 16-token chunk groups (prompts of a
// few groups keep the Python runs short) and returns its unix address.
func startPrefixDaemon(t *testing.T) (string, func()) {
	t.Helper()
	bin := hcachedBinary(t)
	sd, err := os.MkdirTemp("", "hcd")
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(sd, "s.sock")
	d := &daemonProc{t: t, bin: bin, sock: sock, args: []string{"--dir", t.TempDir(), "--listen", "unix://" + sock, "--metrics", "",
		"--chunk-tokens", "16"}}
	d.start()
	return "unix://" + sock, func() {
		d.signal(syscall.SIGTERM)
		os.RemoveAll(sd)
	}
}

func pyScript(t *testing.T, name string) string {
	t.Helper()
	p, err := filepath.Abs(filepath.Join("..", "..", "clients", "python", name))
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// TestPythonConnectors runs clients/python/test_connectors.py: the
// vLLM-shaped connector driven through vLLM's stand-in objects, the paged
// torch engine, the client's token API and the SGLang-shaped storage. First
// against the in-memory seam of the daemon's token semantics, then against a
// real hcached, where nothing may skip.
func TestPythonConnectors(t *testing.T) {
	py := torchPython(t)
	mdir := synthModels(t, "tiny-gqa")
	script := pyScript(t, "test_connectors.py")
	run := func(t *testing.T, args ...string) string {
		out, err := exec.Command(py, append([]string{script, "--model", filepath.Join(mdir, "tiny-gqa")}, args...)...).CombinedOutput()
		if err != nil {
			t.Fatalf("test_connectors.py: %v\n%s", err, out)
		}
		if !bytes.Contains(out, []byte("\nOK")) {
			t.Fatalf("test_connectors.py did not pass:\n%s", out)
		}
		t.Logf("%s", out)
		return string(out)
	}
	t.Run("seam", func(t *testing.T) {
		out := run(t)
		// Without a daemon only the daemon-only classes skip.
		if n := strings.Count(out, "skipped 'no daemon address"); n != 3 {
			t.Fatalf("%d tests skipped for want of a daemon, want 3 (the client token API, errors and SGLang pages)", n)
		}
	})
	t.Run("hcached", func(t *testing.T) {
		addr, stop := startPrefixDaemon(t)
		defer stop()
		out := run(t, "--addr", addr)
		if strings.Contains(out, "skipped") {
			t.Fatalf("a test skipped against the daemon:\n%s", out)
		}
	})
}

// TestPythonPagedEngine runs torch_engine.py --mode paged against hcached:
// conversations under a shared system prompt, every turn a request carrying
// its whole history, the local prefix cache dropped between requests so that
// every reused prefix comes from hcache through the vLLM-shaped connector.
// The tokens must equal an uninterrupted run's, the loaded K/V rows must be
// those of the uninterrupted run bit for bit, and the hits must be the
// workload's: the second conversation loads the system prompt's two whole
// groups, the salted one nothing, every later turn its stored history.
func TestPythonPagedEngine(t *testing.T) {
	py := torchPython(t)
	mdir := synthModels(t, "tiny-gqa", "tiny-llama")
	addr, stop := startPrefixDaemon(t)
	defer stop()
	engine := pyScript(t, "torch_engine.py")
	cases := []struct{ preset, transport string }{{"tiny-gqa", "shm"}, {"tiny-llama", "inline"}}
	for i, tc := range cases {
		preset := tc.preset
		t.Run(preset+"/"+tc.transport, func(t *testing.T) {
			const system, prompt = 40, 12
			cmd := exec.Command(py, engine, "--mode", "paged", "--addr", addr, "--model", filepath.Join(mdir, preset),
				"--namespace", "paged-"+preset, "--transport", tc.transport, "--seed", strconv.Itoa(i+1), "--conversations", "3", "--salted", "1",
				"--turns", "3", "--system-len", strconv.Itoa(system), "--prompt", strconv.Itoa(prompt), "--gen", "6")
			var stderr bytes.Buffer
			cmd.Stderr = &stderr
			out, err := cmd.Output()
			if err != nil {
				t.Fatalf("torch_engine: %v\n%s\n%s", err, out, stderr.String())
			}
			var res struct {
				TokensEqual  bool    `json:"tokens_equal"`
				BlockSize    int     `json:"block_size"`
				Transport    string  `json:"transport"`
				MaxRowDiff   float64 `json:"max_loaded_row_diff"`
				LookupErrors int     `json:"lookup_errors"`
				Requests     []struct {
					Conversation string `json:"conversation"`
					Turn         int    `json:"turn"`
					Prompt       int    `json:"prompt"`
					ExternalHit  int    `json:"external_hit"`
					LocalHit     int    `json:"local_hit"`
				} `json:"requests"`
			}
			if err := json.Unmarshal(out, &res); err != nil {
				t.Fatalf("torch_engine output %q: %v", out, err)
			}
			t.Logf("%s", bytes.TrimSpace(out))
			if !res.TokensEqual || res.MaxRowDiff != 0 || res.LookupErrors != 0 || res.BlockSize != 16 || len(res.Requests) != 9 || res.Transport != tc.transport {
				t.Fatalf("tokens equal %v, loaded rows differ by %g, %d lookup errors, blocks of %d (want 16), %d requests (want 9), transport %q",
					res.TokensEqual, res.MaxRowDiff, res.LookupErrors, res.BlockSize, len(res.Requests), res.Transport)
			}
			for _, r := range res.Requests {
				// Stored before this request: the history up to the last
				// computed token (the last generated one never is).
				var want int
				switch {
				case r.Turn > 0:
					want = (r.Prompt - (prompt + 7*r.Turn) - 1) / 16 * 16
				case r.Conversation == "c1":
					want = system / 16 * 16
				}
				if r.LocalHit != 0 || r.ExternalHit != want {
					t.Errorf("%s turn %d: %d tokens loaded from hcache, %d locally; want %d and 0", r.Conversation, r.Turn, r.ExternalHit, r.LocalHit, want)
				}
			}
		})
	}
}
