package main

import (
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/hcache/hcache/model"
)

// torchPython is Debian's python3 when it has torch, numpy and grpc (the
// packages .ci/run installs). Without them the test is skipped, unless
// HCACHE_REQUIRE_TORCH=1 (set by .ci/run) makes that a failure.
func torchPython(t *testing.T) string {
	t.Helper()
	py := "/usr/bin/python3"
	if p := os.Getenv("HCACHE_TORCH_PYTHON"); p != "" {
		py = p
	}
	out, err := exec.Command(py, "-c", "import torch, numpy, grpc, google.protobuf").CombinedOutput()
	if err == nil {
		return py
	}
	if os.Getenv("HCACHE_REQUIRE_TORCH") == "1" {
		t.Fatalf("%s lacks torch, numpy or grpc (apt-get install python3-torch python3-numpy python3-grpcio python3-protobuf): %v\n%s", py, err, out)
	}
	t.Skipf("%s lacks torch, numpy or grpc; set HCACHE_REQUIRE_TORCH=1 to make this a failure", py)
	return ""
}

// TestPythonTorchEngine runs the PyTorch serving loop of clients/python
// against the real hcached: multi-turn conversations that save every layer
// through the Python client, drop their KV cache between turns, restore
// through the daemon and must generate the same tokens as an uninterrupted
// run, over shared memory and inline transfers.
func TestPythonTorchEngine(t *testing.T) {
	py := torchPython(t)
	bin := hcachedBinary(t)
	mdir := t.TempDir()
	for _, preset := range []string{"tiny-gqa", "tiny-llama"} {
		c, err := model.Preset(preset)
		if err != nil {
			t.Fatal(err)
		}
		if err := model.WriteModel(filepath.Join(mdir, preset), c, model.Synthesize(c, 7)); err != nil {
			t.Fatal(err)
		}
	}
	sd, err := os.MkdirTemp("", "hcd")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(sd)
	sock := filepath.Join(sd, "s.sock")
	d := &daemonProc{t: t, bin: bin, sock: sock, args: []string{"--dir", t.TempDir(), "--listen", "unix://" + sock, "--metrics", "", "--cache", "0",
		"--model", "tiny-gqa=" + filepath.Join(mdir, "tiny-gqa")}}
	d.start()
	defer d.signal(syscall.SIGTERM)
	engine, err := filepath.Abs(filepath.Join("..", "..", "clients", "python", "torch_engine.py"))
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		preset, transport, seed string
		project                 bool // the daemon projects the hidden states
	}{
		{"tiny-gqa", "shm", "1", false},
		{"tiny-gqa", "inline", "2", false},
		{"tiny-llama", "shm", "3", false},
		{"tiny-gqa", "shm", "4", true},
	}
	for _, tc := range cases {
		name := tc.preset + "/" + tc.transport
		if tc.project {
			name += "/projected"
		}
		t.Run(name, func(t *testing.T) {
			args := []string{engine, "--addr", "unix://" + sock, "--model", filepath.Join(mdir, tc.preset),
				"--transport", tc.transport, "--seed", tc.seed, "--conversations", "2", "--turns", "3", "--prompt", "70", "--gen", "10"}
			if tc.project {
				args = append(args, "--project", tc.preset)
			}
			cmd := exec.Command(py, args...)
			var stderr bytes.Buffer
			cmd.Stderr = &stderr
			out, err := cmd.Output()
			if err != nil {
				t.Fatalf("torch_engine: %v\n%s\n%s", err, out, stderr.String())
			}
			var res struct {
				TokensEqual    bool              `json:"tokens_equal"`
				Restores       int               `json:"restores"`
				RestoredTokens []int             `json:"restored_tokens"`
				StoredTokens   map[string]uint64 `json:"stored_tokens"`
				Generated      int               `json:"generated"`
				Projected      bool              `json:"projected_by_daemon"`
				MaxProjDiff    float64           `json:"max_projection_diff"`
			}
			if err := json.Unmarshal(out, &res); err != nil {
				t.Fatalf("torch_engine output %q: %v", out, err)
			}
			t.Logf("%s", bytes.TrimSpace(out))
			// 2 conversations x 3 turns: the 2nd and 3rd turns restore.
			if !res.TokensEqual || res.Restores != 4 || res.Generated != 60 {
				t.Fatalf("tokens equal %v, %d restores (want 4), %d tokens generated (want 60)", res.TokensEqual, res.Restores, res.Generated)
			}
			// The daemon's Go projection against the engine's torch one: within
			// bf16 rounding (2^-8) of the K/V scale.
			if res.Projected != tc.project || res.MaxProjDiff > 8e-3 {
				t.Fatalf("projected by the daemon %v (want %v), max difference from torch's projection %g of the scale", res.Projected, tc.project, res.MaxProjDiff)
			}
			// Every turn feeds its prompt (70, 77, 84 tokens, plus the previous
			// turn's last token) and 9 of its 10 generated tokens.
			want := uint64(70+9) + uint64(1+77+9) + uint64(1+84+9)
			for conv, n := range res.StoredTokens {
				if n != want {
					t.Fatalf("%s: daemon holds %d tokens, want %d", conv, n, want)
				}
			}
		})
	}
}

// TestPythonClient runs clients/python/test_client.py (round trips inline and
// through a shared region, decode appends, error codes, TCP with a token)
// against the real hcached.
func TestPythonClient(t *testing.T) {
	py := torchPython(t)
	bin := hcachedBinary(t)
	sd, err := os.MkdirTemp("", "hcd")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(sd)
	sock := filepath.Join(sd, "s.sock")
	tok := "python-tcp-token-0123456789"
	tokFile := filepath.Join(sd, "tokens")
	if err := os.WriteFile(tokFile, []byte(tok+" py\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	tcp := freePort(t)
	d := &daemonProc{t: t, bin: bin, sock: sock, args: []string{"--dir", t.TempDir(), "--listen", "unix://" + sock, "--metrics", "",
		"--tcp", tcp, "--tokens", tokFile}}
	d.start()
	defer d.signal(syscall.SIGTERM)
	script, err := filepath.Abs(filepath.Join("..", "..", "clients", "python", "test_client.py"))
	if err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(py, script, "unix://"+sock, tcp, tok).CombinedOutput()
	if err != nil {
		t.Fatalf("test_client.py: %v\n%s", err, out)
	}
	if !bytes.Contains(out, []byte("Ran 5 tests")) || !bytes.Contains(out, []byte("\nOK")) || bytes.Contains(out, []byte("skipped")) {
		t.Fatalf("test_client.py did not run its 5 tests:\n%s", out)
	}
}
