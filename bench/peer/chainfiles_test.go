package peer

import (
	"bytes"
	"path/filepath"
	"strings"
	"testing"

	"github.com/hcache/hcache/bench/prefixwl"
	"github.com/hcache/hcache/internal/testseed"
	"github.com/hcache/hcache/state"
)

func testChain(t *testing.T, ns string) state.Chain {
	t.Helper()
	c, err := state.NewChain(ns, nil, &state.Identity{Model: []byte("peer test"), Plan: []state.LayerPlan{{Kind: state.LayerKV, RowBytes: 2}}})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func toks(from uint32, n int) []uint32 {
	s := make([]uint32, n)
	for i := range s {
		s[i] = from + uint32(i)
	}
	return s
}

// checkRestore restores the first n tokens of tokens (of conversation
// ctx) and compares every row with the PrefixRows of tokens.
func checkRestore(t *testing.T, s PrefixSystem, ctx string, src *Source, spec Spec, tokens []uint32, n int) {
	t.Helper()
	want := src.PrefixRows(tokens, spec.RowBytes)
	seen := make([][]bool, spec.Layers)
	for l := range seen {
		seen[l] = make([]bool, n)
	}
	err := s.RestoreTokens(ctx, tokens, n, func(l, first int, rows []byte) error {
		k := len(rows) / spec.RowBytes
		exp := want.Rows(l, first, first+k)
		if !bytes.Equal(rows, exp) {
			t.Errorf("layer %d tokens [%d, %d): restored rows differ", l, first, first+k)
		}
		for i := first; i < first+k; i++ {
			if seen[l][i] {
				t.Errorf("layer %d token %d delivered twice", l, i)
			}
			seen[l][i] = true
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	for l := range seen {
		for i, ok := range seen[l] {
			if !ok {
				t.Fatalf("layer %d token %d never delivered", l, i)
			}
		}
	}
}

// TestChainFilesDedup saves token lists that share prefixes and checks what
// is written, what a lookup answers, the bytes on disk and the restored rows.
func TestChainFilesDedup(t *testing.T) {
	sys := toks(1000, 40)
	cat := func(a, b []uint32) []uint32 { return append(append([]uint32(nil), a...), b...) }
	steps := []struct {
		name    string
		tokens  []uint32
		lookup  int // before the save
		written int
	}{
		{"first list: two whole chunks, a partial tail not saved", cat(sys, toks(1, 10)), 0, 3},
		{"same system prompt, other user: shares two chunks", cat(sys, toks(500, 30)), 32, 2},
		{"the first list again: all stored", cat(sys, toks(1, 10)), 48, 0},
		{"the first list extended: one more chunk", cat(cat(sys, toks(1, 10)), toks(9000, 20)), 48, 1},
		{"shorter than a chunk", toks(1000, 15), 0, 0},
		{"same tokens, other position", cat(toks(7, 1), sys), 0, 2},
	}
	for _, cfg := range []struct {
		name     string
		rowBytes int
		direct   bool
		fileSize int64 // bytes a chunk file takes on the disk
	}{
		{"block-aligned chunks (O_DIRECT)", 128, true, 2 * 16 * 128},
		{"unaligned chunks (buffered)", 96, false, 4096},
	} {
		t.Run(cfg.name, func(t *testing.T) {
			spec := Spec{Dir: filepath.Join(t.TempDir(), "p"), Layers: 2, RowBytes: cfg.rowBytes, ChunkTokens: 16}
			s, err := NewChainFiles(spec, testChain(t, "ns"))
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			src := NewSource(3)
			total := 0
			for _, st := range steps {
				n, err := s.Lookup("", st.tokens)
				if err != nil || n != st.lookup {
					t.Fatalf("%s: lookup %d (%v), want %d", st.name, n, err, st.lookup)
				}
				w, err := s.SaveTokens("", st.tokens, src.PrefixRows(st.tokens, spec.RowBytes).Rows)
				if err != nil || w != st.written {
					t.Fatalf("%s: wrote %d chunks (%v), want %d", st.name, w, err, st.written)
				}
				total += w
				full := len(st.tokens) / 16 * 16
				if n, _ := s.Lookup("", st.tokens); n != full {
					t.Fatalf("%s: lookup after the save %d, want %d", st.name, n, full)
				}
				checkRestore(t, s, "", src, spec, st.tokens, full)
			}
			if s.Chunks() != total {
				t.Errorf("%d chunks indexed, %d written", s.Chunks(), total)
			}
			if s.DirectIO() != cfg.direct {
				t.Errorf("direct I/O %v, want %v", s.DirectIO(), cfg.direct)
			}
			disk, err := s.BytesOnDisk()
			if err != nil || disk != int64(total)*cfg.fileSize {
				t.Errorf("%d bytes on disk (%v), want %d chunks of %d", disk, err, total, cfg.fileSize)
			}
		})
	}
}

// TestChainFilesNamespaces: the same tokens under another chain (another
// namespace) share nothing.
func TestChainFilesNamespaces(t *testing.T) {
	spec := Spec{Dir: filepath.Join(t.TempDir(), "p"), Layers: 1, RowBytes: 256, ChunkTokens: 16}
	a, err := NewChainFiles(spec, testChain(t, "tenant-a"))
	if err != nil {
		t.Fatal(err)
	}
	b, _ := NewChainFiles(spec, testChain(t, "tenant-b"))
	src := NewSource(1)
	tk := toks(5, 64)
	if _, err := a.SaveTokens("", tk, src.PrefixRows(tk, spec.RowBytes).Rows); err != nil {
		t.Fatal(err)
	}
	if n, _ := b.Lookup("", tk); n != 0 {
		t.Fatalf("tenant b sees %d tokens of tenant a's", n)
	}
	if w, _ := b.SaveTokens("", tk, src.PrefixRows(tk, spec.RowBytes).Rows); w != 4 {
		t.Fatalf("tenant b wrote %d chunks, want its own 4", w)
	}
}

// TestChainFilesRejects: restores of what is not stored, or of a partial
// chunk, and rows of the wrong size are errors naming the problem.
func TestChainFilesRejects(t *testing.T) {
	spec := Spec{Dir: filepath.Join(t.TempDir(), "p"), Layers: 1, RowBytes: 256, ChunkTokens: 16}
	s, err := NewChainFiles(spec, testChain(t, "ns"))
	if err != nil {
		t.Fatal(err)
	}
	src := NewSource(1)
	tk := toks(5, 32)
	if _, err := s.SaveTokens("", tk[:16], src.PrefixRows(tk, spec.RowBytes).Rows); err != nil {
		t.Fatal(err)
	}
	nop := func(int, int, []byte) error { return nil }
	cases := []struct {
		name string
		err  error
		want string
	}{
		{"past the stored chunks", s.RestoreTokens("", tk, 32, nop), "chunk 1"},
		{"a partial chunk", s.RestoreTokens("", tk, 8, nop), "whole chunks of 16"},
		{"more than the list", s.RestoreTokens("", tk[:16], 32, nop), "restore of 32 tokens of 16"},
	}
	_, short := s.SaveTokens("", toks(99, 16), func(int, int, int) []byte { return make([]byte, 10) })
	cases = append(cases, struct {
		name string
		err  error
		want string
	}{"short rows", short, "has 10 bytes of rows"})
	for _, c := range cases {
		if c.err == nil || !strings.Contains(c.err.Error(), c.want) {
			t.Errorf("%s: err %v, want one naming %q", c.name, c.err, c.want)
		}
	}
	if n, _ := s.Lookup("", toks(99, 16)); n != 0 {
		t.Errorf("a failed save left a chunk that lookups find (%d tokens)", n)
	}
	// An index-only chunk is found by lookups and refused by restores.
	if n, err := s.FillIndex(toks(300, 40)); n != 2 || err != nil {
		t.Fatalf("FillIndex added %d chunks (%v), want 2", n, err)
	}
	if n, _ := s.Lookup("", toks(300, 40)); n != 32 {
		t.Fatalf("lookup of index-only chunks: %d tokens, want 32", n)
	}
	if err := s.RestoreTokens("", toks(300, 40), 32, nop); err == nil || !strings.Contains(err.Error(), "chunk 0") {
		t.Fatalf("restore of index-only chunks: %v", err)
	}
}

// TestChainFilesWorkloads: on every shared-prefix workload, the peer writes
// exactly the workload's unique groups and its lookups equal the
// workload's own hits.
func TestChainFilesWorkloads(t *testing.T) {
	seed := testseed.Seed(t)
	const ct = 64
	for _, name := range prefixwl.Names() {
		t.Run(name, func(t *testing.T) {
			p := prefixwl.Defaults[name]
			p.Conversations, p.Documents, p.DocTokens, p.Traces = 20, 3, 1500, 2
			w, err := p.Generate(seed)
			if err != nil {
				t.Fatal(err)
			}
			want, hits, err := w.Count(ct)
			if err != nil {
				t.Fatal(err)
			}
			spec := Spec{Dir: filepath.Join(t.TempDir(), "p"), Layers: 1, RowBytes: 64, ChunkTokens: ct}
			s, err := NewChainFiles(spec, testChain(t, "ns"))
			if err != nil {
				t.Fatal(err)
			}
			src := NewSource(seed)
			for i, r := range w.Requests {
				n, err := s.Lookup("", r.Tokens[:r.Prompt])
				if err != nil || n != hits[i].Shared {
					t.Fatalf("request %d: lookup %d (%v), the workload says %d", i, n, err, hits[i].Shared)
				}
				if _, err := s.SaveTokens("", r.Tokens, src.PrefixRows(r.Tokens, spec.RowBytes).Rows); err != nil {
					t.Fatal(err)
				}
			}
			if int64(s.Chunks()) != want.UniqueGroups {
				t.Fatalf("%d chunks stored, the workload has %d unique groups", s.Chunks(), want.UniqueGroups)
			}
			last := w.Requests[len(w.Requests)-1]
			checkRestore(t, s, "", src, spec, last.Tokens, len(last.Tokens)/ct*ct)
		})
	}
}
