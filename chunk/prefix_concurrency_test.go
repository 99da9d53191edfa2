package chunk

import (
	"errors"
	"fmt"
	"math/rand"
	"sync"
	"testing"

	"github.com/hcache/hcache/internal/testseed"
)

// TestPrefixConcurrent runs savers of shared prompts, deleters, forks,
// lookups and restores by tokens at once (run it with -race): every restore
// serves the request's own rows or nothing, and the store ends consistent
// (fsck, reference counts equal after a reopen).
func TestPrefixConcurrent(t *testing.T) {
	seed := testseed.Seed(t)
	e := newEnv(t, "mem", func(o *Options) { o.GCInterval = -1; o.CacheBytes = 1 << 20 })
	s := e.open()
	ct := s.ChunkTokens()
	ident := testIdentity("m1")
	var wg sync.WaitGroup
	errc := make(chan error, 16)
	for g := 0; g < 4; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			rng := rand.New(rand.NewSource(seed + int64(g)))
			for i := 0; i < 25; i++ {
				id := fmt.Sprintf("g%dc%d", g, i)
				tok := joinTokens(promptTokens(rng.Intn(3), 3*ct), promptTokens(1000*g+i, rng.Intn(2*ct)))
				w, stored, err := s.CreateTokens("ns", id, ident, tok, CreateOptions{})
				if err != nil {
					errc <- err
					return
				}
				for l, p := range ident.Plan {
					if p.Kind != LayerNone && stored < len(tok) {
						if err := w.AppendLayer(l, prefixLayer(tok, l, stored, len(tok), int(p.RowBytes))); err != nil {
							errc <- err
							return
						}
					}
				}
				if err := w.Close(); err != nil {
					errc <- err
					return
				}
				switch rng.Intn(4) {
				case 0:
					if err := s.Delete("ns", id); err != nil {
						errc <- err
						return
					}
				case 1:
					if err := s.Fork("ns", id, id+"f", rng.Intn(len(tok)+1)); err != nil && !errors.Is(err, ErrNotFound) {
						errc <- err
						return
					}
				}
				q := Prefix{Namespace: "ns", Identity: ident, Tokens: tok}
				_, err = s.RestoreTokens(q, func(layer int, rows []byte) error {
					n := len(rows) / int(ident.Plan[layer].RowBytes)
					check, _ := checkRows(tok, ident, n)
					return check(layer, rows)
				})
				if err != nil && !errors.Is(err, ErrNotFound) {
					errc <- fmt.Errorf("restore by tokens of %s: %w", id, err)
					return
				}
			}
		}(g)
	}
	wg.Wait()
	close(errc)
	for err := range errc {
		t.Fatal(err)
	}
	if r := s.Check(nil); !r.OK() {
		t.Fatalf("fsck: %v", r.Errors)
	}
	want := groupRefs(s)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s = e.open()
	defer s.Close()
	if got := groupRefs(s); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("refs after reopen differ")
	}
}
