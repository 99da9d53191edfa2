package peer

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/hcache/hcache/chunk"
)

// turns are the saves of the round-trip test: they cross the 64-token
// groups of hcache and the 256-token chunks of the chunked peers, and one
// rewrites a partial chunk.
var turns = [][2]int{{0, 100}, {100, 300}, {300, 530}}

func open(t *testing.T, name string, spec Spec) System {
	t.Helper()
	var s System
	var err error
	switch name {
	case "hcache", "hcache-dram":
		plan := make([]chunk.LayerPlan, spec.Layers)
		for l := range plan {
			plan[l] = chunk.LayerPlan{Kind: chunk.LayerHidden, RowBytes: uint32(spec.RowBytes)}
		}
		var cache int64
		if name == "hcache-dram" {
			cache = 64 << 20
		}
		s, err = NewHcache(spec, HcacheOptions{Name: name, Model: []byte("test model"), Plan: plan, CacheBytes: cache})
	case "hcache-kv":
		plan := make([]chunk.LayerPlan, spec.Layers)
		for l := range plan {
			plan[l] = chunk.LayerPlan{Kind: chunk.LayerKV, RowBytes: uint32(spec.RowBytes)}
		}
		s, err = NewHcache(spec, HcacheOptions{Name: name, Model: []byte("test model"), Plan: plan})
	case "file-per-chunk":
		s, err = NewFilePerChunk(spec)
	case "pebble-blob":
		s, err = NewPebbleBlob(spec)
	case "redis":
		if _, lerr := exec.LookPath("redis-server"); lerr != nil {
			t.Fatal("redis-server is required (apt-get install redis-server; .ci/run installs it)")
		}
		s, err = NewRedis(spec, 4)
	}
	if err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// TestRoundTrip saves three turns of two contexts in every storing peer and
// checks that restores of several prefixes hand over exactly the saved
// bytes, every (layer, token) once.
func TestRoundTrip(t *testing.T) {
	const seed = 7
	t.Logf("seed %d", seed)
	src := NewSource(seed)
	for _, name := range []string{"hcache", "hcache-kv", "hcache-dram", "file-per-chunk", "pebble-blob", "redis"} {
		t.Run(name, func(t *testing.T) {
			spec := Spec{Dir: filepath.Join(t.TempDir(), "p"), Layers: 3, RowBytes: 512, ChunkTokens: 256}
			s := open(t, name, spec)
			ids := []string{"conv-a", "conv-b"}
			for _, tr := range turns {
				for _, id := range ids {
					k := CtxKey(id)
					rows := func(l, from, to int) []byte {
						if from < 0 || to > tr[1] || from >= to {
							t.Fatalf("%s asked rows [%d, %d) of a save of [%d, %d)", name, from, to, tr[0], tr[1])
						}
						b := make([]byte, (to-from)*spec.RowBytes)
						src.Fill(b, k, l, from, to, spec.RowBytes)
						return b
					}
					if err := s.Save(id, tr[0], tr[1], rows); err != nil {
						t.Fatalf("save %s %v: %v", id, tr, err)
					}
				}
			}
			for _, id := range ids {
				for _, n := range []int{530, 300, 256, 64, 1} {
					if cr, ok := s.(ColdReader); ok {
						if err := cr.DropCache(id); err != nil {
							t.Fatal(err)
						}
					}
					seen := make([][]bool, spec.Layers)
					for l := range seen {
						seen[l] = make([]bool, n)
					}
					want := make([]byte, spec.RowBytes)
					k := CtxKey(id)
					err := s.Restore(id, n, func(l, first int, rows []byte) error {
						if len(rows)%spec.RowBytes != 0 {
							return fmt.Errorf("layer %d: %d bytes is not whole rows", l, len(rows))
						}
						for i := 0; i < len(rows)/spec.RowBytes; i++ {
							tok := first + i
							if tok >= n || seen[l][tok] {
								return fmt.Errorf("layer %d token %d delivered twice or beyond %d", l, tok, n)
							}
							seen[l][tok] = true
							src.Row(want, k, l, tok)
							if !bytes.Equal(rows[i*spec.RowBytes:(i+1)*spec.RowBytes], want) {
								return fmt.Errorf("layer %d token %d: wrong bytes", l, tok)
							}
						}
						return nil
					})
					if err != nil {
						t.Fatalf("restore %s (%d tokens): %v", id, n, err)
					}
					for l := range seen {
						for tok, ok := range seen[l] {
							if !ok {
								t.Fatalf("restore %s (%d tokens): layer %d token %d never delivered", id, n, l, tok)
							}
						}
					}
				}
			}
			if err := s.Restore("never-saved", 10, func(int, int, []byte) error { return nil }); err == nil {
				t.Fatal("restore of a context never saved succeeded")
			}
			b, err := s.BytesOnDisk()
			if err != nil {
				t.Fatal(err)
			}
			raw := int64(2 * 530 * spec.Layers * spec.RowBytes)
			if name == "redis" {
				if b != 0 {
					t.Fatalf("redis reports %d bytes on disk with persistence off", b)
				}
				m, err := s.(MemoryUser).BytesInMemory()
				if err != nil || m < raw {
					t.Fatalf("redis memory %d (%v), want >= %d", m, err, raw)
				}
			} else if b < raw {
				t.Fatalf("%d bytes on disk for %d raw bytes", b, raw)
			}
		})
	}
}

// TestRecompute checks the recompute peer: restores are deterministic and
// causal (a prefix's K/V equal the first rows of a longer restore).
func TestRecompute(t *testing.T) {
	r, err := NewRecompute("tiny-llama", 64, 3)
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Save("c", 0, 40, nil); err != nil {
		t.Fatal(err)
	}
	if err := r.Save("c", 10, 50, nil); err == nil {
		t.Fatal("a save that does not continue the context was accepted")
	}
	get := func(n int) [][]byte {
		out := make([][]byte, r.Shape().Layers)
		if err := r.Restore("c", n, func(l, first int, rows []byte) error {
			if first != 0 || len(rows) != n*r.RowBytes() {
				return fmt.Errorf("layer %d: %d bytes from %d", l, len(rows), first)
			}
			out[l] = append([]byte(nil), rows...)
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		return out
	}
	a, b := get(40), get(17)
	for l := range a {
		if !bytes.Equal(a[l][:17*r.RowBytes()], b[l]) {
			t.Fatalf("layer %d: K/V of a 17-token prefix differ from the first 17 of a 40-token restore", l)
		}
	}
	if err := r.Restore("c", 41, func(int, int, []byte) error { return nil }); err == nil {
		t.Fatal("restore beyond the saved tokens succeeded")
	}
}

// TestDirBytes checks that dirBytes sums allocated bytes (a sparse file
// counts what it takes, not its length) and skips files and directories that
// vanish between the directory read and the stat, as Pebble's compactions
// delete tables while a benchmark measures (it failed with "lstat ...: no
// such file or directory").
func TestDirBytes(t *testing.T) {
	cases := []struct {
		name             string
		trigger, removed string // removed as dirBytes stats trigger
	}{
		{"steady", "", ""},
		{"file vanishes", "gone.sst", "gone.sst"},
		{"directory vanishes", "data", "sub"}, // before WalkDir reads it
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			// 64 KiB written, and a 1 GiB sparse file that takes (next to) nothing.
			if err := os.WriteFile(filepath.Join(dir, "data"), bytes.Repeat([]byte{1}, 64<<10), 0o644); err != nil {
				t.Fatal(err)
			}
			f, err := os.Create(filepath.Join(dir, "sparse"))
			if err != nil {
				t.Fatal(err)
			}
			if err := f.Truncate(1 << 30); err != nil {
				t.Fatal(err)
			}
			f.Close()
			if err := os.MkdirAll(filepath.Join(dir, "sub"), 0o755); err != nil {
				t.Fatal(err)
			}
			for _, n := range []string{"gone.sst", "sub/inner.sst"} {
				if err := os.WriteFile(filepath.Join(dir, n), []byte("x"), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			if c.trigger != "" {
				lstat = func(p string) (os.FileInfo, error) {
					if p == filepath.Join(dir, c.trigger) {
						if err := os.RemoveAll(filepath.Join(dir, c.removed)); err != nil {
							t.Fatal(err)
						}
					}
					return os.Lstat(p)
				}
				t.Cleanup(func() { lstat = os.Lstat })
			}
			n, err := dirBytes(dir)
			if err != nil {
				t.Fatalf("dirBytes: %v", err)
			}
			// The written file takes at least its 64 KiB; the sparse one
			// must not add its 1 GiB length; the two 1-byte files one block
			// each at most.
			if n < 64<<10 || n >= 1<<20 {
				t.Fatalf("dirBytes = %d; want the allocated bytes, 64 KiB to 1 MiB (not the sparse file's 1 GiB length)", n)
			}
		})
	}
}
