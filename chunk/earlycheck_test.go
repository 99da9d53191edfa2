package chunk

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math/rand"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/hcache/hcache/internal/testseed"
	"github.com/hcache/hcache/iouring"
)

// reorderEngine performs each batch of reads itself, one read at a time in
// a seeded random order with a pause after each completion, so that the
// bytes of a later item land before an earlier item's rounded-up read
// writes past its own end: the seam that tests the early checker's order
// (fetch.go, verifyEarly). Other requests go to the real engine.
type reorderEngine struct {
	iouring.Engine
	mu  sync.Mutex
	rng *rand.Rand
	wg  sync.WaitGroup
}

func (e *reorderEngine) Submit(reqs []*iouring.Request, done func(*iouring.Request)) error {
	if reqs[0].Op != iouring.OpRead {
		return e.Engine.Submit(reqs, done)
	}
	e.mu.Lock()
	order := e.rng.Perm(len(reqs))
	e.mu.Unlock()
	e.wg.Add(1)
	go func() {
		defer e.wg.Done()
		for _, i := range order {
			r := reqs[i]
			n, err := unix.Pread(r.Fd, r.Buf, r.Off)
			r.N = n
			switch {
			case err != nil:
				r.Err = err
			case n < len(r.Buf):
				r.Err = io.ErrUnexpectedEOF
			}
			done(r)
			time.Sleep(20 * time.Microsecond) // let the checker run between landings
		}
	}()
	return nil
}

// TestEarlyChecksInAnyLandingOrder: a restore checks each slice of a layer
// as the reads it needs land, in whatever order they land. Slices whose rows
// are not whole blocks are read through bounce buffers and copied into a
// layer buffer that an earlier slice's direct read, rounded up to a block,
// writes past its own end into; a copy made before that read lands would be
// overwritten after its check. Cases cross row sizes (aligned direct reads,
// unaligned ones), LZ4 slices and DRAM-tier hits; each restores every
// context exactly, then a byte flipped in one group's slice is reported for
// that layer and group, the first damaged one in order.
func TestEarlyChecksInAnyLandingOrder(t *testing.T) {
	seed := testseed.Seed(t)
	cases := []struct {
		name     string
		rowBytes uint32
		lz4      bool
		cache    int64
	}{
		{"whole blocks, direct reads", 256, false, 0},
		{"part blocks, bounce copies over rounded reads", 64, false, 0},
		{"odd rows", 100, false, 0},
		{"lz4 slices", 64, true, 0},
		{"dram hits between reads", 64, false, 1 << 20},
	}
	for ci, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			rng := rand.New(rand.NewSource(seed + int64(ci)))
			real, err := iouring.New(iouring.Config{})
			if err != nil {
				t.Fatal(err)
			}
			eng := &reorderEngine{Engine: real, rng: rand.New(rand.NewSource(seed + 100 + int64(ci)))}
			e := newEnv(t, "disk", func(o *Options) {
				o.Engine, o.CacheBytes = eng, c.cache
				if c.lz4 {
					o.Compression = "lz4"
				}
			})
			s := e.open()
			defer func() {
				s.Close()
				eng.wg.Wait()
				real.Close()
			}()
			ident := &Identity{Model: []byte("early check"), Plan: []LayerPlan{{Kind: LayerHidden, RowBytes: c.rowBytes}, {Kind: LayerKV, RowBytes: 2 * c.rowBytes}}}
			tokens := map[string]int{}
			for i := 0; i < 3; i++ {
				id := fmt.Sprintf("c%d", i)
				tokens[id] = 16*(3+rng.Intn(6)) + rng.Intn(16) // 3 to 8 groups, a partial tail
				w, err := s.Create("ns", id, ident, CreateOptions{})
				if err != nil {
					t.Fatal(err)
				}
				for l, p := range ident.Plan {
					if err := w.AppendLayer(l, earlyRows(id, l, tokens[id], int(p.RowBytes), c.lz4)); err != nil {
						t.Fatal(err)
					}
				}
				if err := w.Close(); err != nil {
					t.Fatal(err)
				}
			}
			check := func(id string) {
				t.Helper()
				n, err := s.Restore("ns", id, ident, func(l int, got []byte) error {
					if want := earlyRows(id, l, tokens[id], int(ident.Plan[l].RowBytes), c.lz4); !bytes.Equal(got, want) {
						return fmt.Errorf("layer %d: %d bytes restored differ from the %d saved", l, len(got), len(want))
					}
					return nil
				})
				if err != nil || n != tokens[id] {
					t.Fatalf("restore %s: %d tokens, %v; want %d", id, n, err, tokens[id])
				}
			}
			for round := 0; round < 3; round++ {
				for _, id := range []string{"c0", "c1", "c2"} {
					check(id)
					if c.cache > 0 {
						// Keep in the DRAM tier every group but each fourth:
						// those are read, straight into the layer buffer at
						// a block boundary, rounded up over the hits after
						// them.
						s.cache.mu.Lock()
						for _, k := range s.cache.lru.Keys() {
							if k.group%4 == 0 {
								s.cache.lru.Remove(k)
							}
						}
						s.cache.mu.Unlock()
						check(id)
					}
				}
			}
			if c.cache > 0 && s.Stats().CacheHits == 0 {
				t.Fatal("no slice came from the DRAM tier: the case tests nothing")
			}
			if c.lz4 {
				if ch := chunkOf(t, s, "c0", 0); ch.Slices[0].Stored >= ch.Slices[0].Raw {
					t.Fatalf("group 0 stored %d of %d bytes: not compressed, the case tests nothing", ch.Slices[0].Stored, ch.Slices[0].Raw)
				}
			}
			// Damage one group past the first of c1's layer 0 (the early
			// checker, not finish, meets it) and one later group too: the
			// error names the first.
			groups := (tokens["c1"] + 15) / 16
			bad := 1 + rng.Intn(groups-1)
			for _, g := range []int{bad, groups - 1} {
				ch := chunkOf(t, s, "c1", uint32(g))
				sl := ch.Slices[0]
				f, err := os.OpenFile(filepath.Join(e.dir, "segments", segName(ch.Segment)), os.O_RDWR, 0)
				if err != nil {
					t.Fatal(err)
				}
				at := int64(ch.Offset) + int64(sl.Off) + int64(rng.Intn(int(sl.Stored)))
				b := []byte{0}
				f.ReadAt(b, at)
				b[0] ^= 0x5a
				f.WriteAt(b, at)
				f.Close()
			}
			// The DRAM tier may hold the undamaged slices: drop it.
			s.cache.mu.Lock()
			s.cache.lru.Purge()
			s.cache.mu.Unlock()
			_, err = s.Restore("ns", "c1", ident, func(int, []byte) error { return nil })
			if !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), fmt.Sprintf("layer 0 group %d:", bad)) {
				t.Fatalf("restore of c1 with group %d damaged: %v, want ErrCorrupt naming layer 0 group %d", bad, err, bad)
			}
			check("c0")
			check("c2")
		})
	}
}

// earlyRows is a layer's rows: rows.Row's bytes, or, to compress, the same
// with every other byte constant (as the high bytes of fp16 values near 1).
func earlyRows(id string, layer, tokens, rb int, compressible bool) []byte {
	out := expectLayer(id, layer, tokens, rb)
	if compressible {
		for i := 1; i < len(out); i += 2 {
			out[i] = 0x3c
		}
	}
	return out
}
