package main

import (
	"encoding/json"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/hcache/hcache/chunk"
	"github.com/hcache/hcache/daemon"
	"github.com/hcache/hcache/model"
	"github.com/hcache/hcache/serve"
	"github.com/hcache/hcache/serve/sched"
)

// saveByTokens stores a token-addressed context with zero rows.
func saveByTokens(t *testing.T, st *chunk.Store, ns, id string, ident *chunk.Identity, tokens []uint32) {
	t.Helper()
	w, stored, err := st.CreateTokens(ns, id, ident, tokens, chunk.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for l, p := range ident.Plan {
		if p.RowBytes > 0 {
			if err := w.AppendLayer(l, make([]byte, (len(tokens)-stored)*int(p.RowBytes))); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
}

// TestLookupCommand: hcache lookup on a store directory (read-only: the
// directory is unchanged) and through a daemon gives the stored prefix of
// a prompt under the identity of --model/--plan or of a stored context,
// from --prompt-tokens or a --tokens file; fork shares a context's groups;
// bad input is refused naming what is wrong.
func TestLookupCommand(t *testing.T) {
	dir := t.TempDir()
	st, err := chunk.Open(chunk.Options{Dir: dir, ChunkTokens: 16, GCInterval: -1, Logf: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	c, _ := model.Preset("tiny-llama")
	ident := serve.Identity(c, model.Synthesize(c, 1), sched.PlanOf(c, chunk.LayerHidden))
	prompt := make([]uint32, 40)
	for i := range prompt {
		prompt[i] = uint32(100 + i)
	}
	saveByTokens(t, st, "ns", "a", ident, prompt)
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, p := range prompt {
		ids = append(ids, strconv.FormatUint(uint64(p), 10))
	}
	csv := strings.Join(ids, ",")
	file := filepath.Join(t.TempDir(), "prompt.json")
	os.WriteFile(file, []byte("["+csv+"]"), 0o644)
	before := listTree(t, dir)
	cases := []struct {
		args []string
		want string
	}{
		{[]string{"--model", "tiny-llama", "--prompt-tokens", csv}, "32 of 40 tokens stored in ns"},
		{[]string{"--model", "tiny-llama", "--tokens", file, "--id", "a"}, "40 of 40 tokens stored in ns"},
		{[]string{"--like", "a", "--prompt-tokens", csv}, "32 of 40 tokens"},
		{[]string{"--model", "tiny-llama", "--seed", "2", "--prompt-tokens", csv}, "0 of 40 tokens"},
		{[]string{"--model", "tiny-llama", "--plan", "kv", "--prompt-tokens", csv}, "0 of 40 tokens"},
		{[]string{"--like", "a", "--salt", "x", "--prompt-tokens", csv}, "0 of 40 tokens"},
	}
	for _, cs := range cases {
		args := append([]string{"lookup", "--dir", dir, "--namespace", "ns"}, cs.args...)
		if code, out, errs := runCLI(args...); code != 0 || !strings.Contains(out, cs.want) {
			t.Errorf("%v: exit %d, %q (%s); want %q", args, code, out, errs, cs.want)
		}
	}
	if after := listTree(t, dir); after != before {
		t.Fatalf("lookup --dir changed the store directory:\n%s\n%s", before, after)
	}
	bad := []struct {
		args []string
		code int
		want string
	}{
		{[]string{"lookup", "--dir", dir, "--prompt-tokens", "1"}, 2, "--namespace is required"},
		{[]string{"lookup", "--dir", dir, "--ns", "ns", "--like", "a"}, 2, "give one of --tokens FILE and --prompt-tokens"},
		{[]string{"lookup", "--dir", dir, "--ns", "ns", "--like", "a", "--prompt-tokens", "1,x"}, 1, `token 1 is "x"`},
		{[]string{"lookup", "--dir", dir, "--ns", "ns", "--like", "a", "--prompt-tokens", "1,4294967296"}, 1, "not an id"},
		{[]string{"lookup", "--dir", dir, "--ns", "ns", "--like", "nope", "--prompt-tokens", "1"}, 1, "--like nope"},
		{[]string{"lookup", "--dir", dir, "--ns", "ns", "--prompt-tokens", "1"}, 1, "missing --like ID"},
		{[]string{"lookup", "--dir", dir, "--ns", "ns", "--model", "tiny-gqa", "--prompt-tokens", "1"}, 1, "use --plan kv"},
		{[]string{"fork", "--dir", dir, "--ns", "ns", "--id", "a"}, 2, "--to and --tokens are required"},
	}
	for _, cs := range bad {
		if code, out, errs := runCLI(cs.args...); code != cs.code || !strings.Contains(errs, cs.want) {
			t.Errorf("%v: exit %d, %q %q; want %d and %q", cs.args, code, out, errs, cs.code, cs.want)
		}
	}
	// Fork on the directory, then lookups through a daemon.
	if code, out, errs := runCLI("fork", "--dir", dir, "--ns", "ns", "--id", "a", "--to", "b", "--tokens", "20"); code != 0 {
		t.Fatalf("fork --dir: exit %d\n%s\n%s", code, out, errs)
	}
	st, err = chunk.Open(chunk.Options{Dir: dir, ChunkTokens: 16, GCInterval: -1, Logf: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	sd, err := os.MkdirTemp("", "hcd")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(sd)
	sock := filepath.Join(sd, "s")
	srv, err := daemon.New(daemon.Config{Store: st, Listen: sock, GCInterval: -1, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Stop()
	code, out, errs := runCLI("lookup", "--addr", "unix://"+sock, "--ns", "ns", "--like", "b", "--id", "b", "--prompt-tokens", csv, "--json")
	var row lookupRow
	if code != 0 || json.Unmarshal([]byte(out), &row) != nil || row.Stored != 32 || row.Tokens != 40 || row.ChunkTokens != 16 {
		t.Fatalf("lookup --addr of the fork: exit %d, %q (%s); want 32 of 40 stored (a's groups; b's chain ends before them)", code, out, errs)
	}
	if code, out, errs := runCLI("fork", "--addr", "unix://"+sock, "--ns", "ns", "--id", "a", "--to", "c", "--tokens", "33"); code != 0 {
		t.Fatalf("fork --addr: exit %d\n%s\n%s", code, out, errs)
	}
	if code, out, errs := runCLI("lookup", "--addr", "unix://"+sock, "--ns", "ns", "--like", "a", "--id", "c", "--prompt-tokens", csv); code != 0 || !strings.Contains(out, "33 of 40") {
		t.Fatalf("lookup --addr of the second fork: exit %d, %q (%s)", code, out, errs)
	}
	if code, _, errs := runCLI("fork", "--addr", "unix://"+sock, "--ns", "ns", "--id", "a", "--to", "d", "--tokens", "41"); code != 1 || !strings.Contains(errs, "which holds 40") {
		t.Fatalf("fork of too many tokens: exit %d, %s", code, errs)
	}
}
