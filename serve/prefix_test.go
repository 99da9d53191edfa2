package serve

import (
	"errors"
	"fmt"
	"math/rand"
	"testing"

	"github.com/hcache/hcache/chunk"
	"github.com/hcache/hcache/internal/testseed"
	"github.com/hcache/hcache/model"
)

// skipRows is an Appender that drops the first skip tokens' rows of every
// layer: a prefill whose leading groups the store already holds (the
// writer of CreateTokens expects rows from its stored count on).
type skipRows struct {
	Appender
	plan []chunk.LayerPlan
	skip int
}

func (s skipRows) AppendLayer(layer int, rows []byte) error {
	return s.Appender.AppendLayer(layer, rows[s.skip*int(s.plan[layer].RowBytes):])
}

func ids32(tokens []int) []uint32 {
	out := make([]uint32, len(tokens))
	for i, t := range tokens {
		out[i] = uint32(t)
	}
	return out
}

// prefixCache is the first n tokens of kc.
func prefixCache(c *model.Config, kc *model.KVCache, n int) *model.KVCache {
	out := model.NewKVCache(c)
	d := c.KVDim()
	for l := range kc.K {
		out.K[l] = append([]float32(nil), kc.K[l][:n*d]...)
		out.V[l] = append([]float32(nil), kc.V[l][:n*d]...)
	}
	out.Tokens = n
	return out
}

// savePrompt saves prompt's prefill as token-addressed context id, writing
// only the rows past what the namespace already stores, and returns the
// stored count and the run's cache.
func savePrompt(t *testing.T, st *chunk.Store, m *model.Model, ident *chunk.Identity, id string, prompt []int) (int, *model.KVCache) {
	t.Helper()
	wr, stored, err := st.CreateTokens("test", id, ident, ids32(prompt), chunk.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	saver := NewSaver(m.Cfg, ident.Plan, skipRows{wr, ident.Plan, stored})
	live := model.NewKVCache(m.Cfg)
	if _, err := m.Forward(prompt, live, saver.Trace); err != nil || saver.Err() != nil {
		t.Fatal(err, saver.Err())
	}
	if err := wr.Close(); err != nil {
		t.Fatal(err)
	}
	return stored, live
}

// TestRestoreByTokens: for every plan the scheduler can emit (recomputed
// prefix, hidden, KV, mixed), a prompt saved by tokens restores by tokens
// through the restorer on the CPU backend: a second prompt sharing the
// first 40 tokens gets the 32 of its whole shared groups, bit for bit, and
// generation from there equals an uninterrupted run of the second prompt;
// naming the context adds its matching tail (all 45 tokens); a prompt with
// nothing stored restores nothing; Stream by tokens hands on the same
// count; a source that cannot restore by tokens is refused clearly.
func TestRestoreByTokens(t *testing.T) {
	seed := testseed.Seed(t)
	st, err := chunk.Open(chunk.Options{Dir: t.TempDir(), ChunkTokens: 16, SegmentBytes: 8 << 20, Logf: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	rng := rand.New(rand.NewSource(seed))
	for _, preset := range []string{"tiny-llama", "tiny-gqa"} {
		c, _ := model.Preset(preset)
		w := model.Synthesize(c, seed)
		m, err := model.New(c, w)
		if err != nil {
			t.Fatal(err)
		}
		rest := NewRestorer(tokenStore{st}, cpuFor(t, m), Settings{})
		for _, sp := range everySplit(c) {
			// A sample of the plans: all hidden, all KV, and a recomputed
			// prefix before mixed (or KV) layers.
			mixed := sp.Recompute == 1 && sp.KV == 1
			if !(sp.Recompute == 0 && (sp.Hidden == 0 || sp.KV == 0)) && !mixed {
				continue
			}
			name := fmt.Sprintf("%s-%d-%d-%d", preset, sp.Recompute, sp.Hidden, sp.KV)
			ident := Identity(c, w, sp.Plan(c))
			prompt := make([]int, 45)
			for i := range prompt {
				prompt[i] = rng.Intn(c.Vocab)
			}
			if stored, _ := savePrompt(t, st, m, ident, name, prompt); stored != 0 {
				t.Fatalf("%s: a new prompt found %d tokens stored", name, stored)
			}
			_, ref := savePrompt(t, st, m, ident, name+"-again", prompt)
			// Another prompt sharing the first 40 tokens.
			other := append(append([]int(nil), prompt[:40]...), make([]int, 10)...)
			for i := 40; i < len(other); i++ {
				other[i] = (prompt[min(i, len(prompt)-1)] + 1 + rng.Intn(c.Vocab-1)) % c.Vocab
			}
			paged := pagedFor(t, c, len(other))
			rs, err := rest.Restore(Request{NS: "test", Ident: ident, ByTokens: true, Tokens: other, Dst: paged})
			if err != nil || rs.Tokens != 32 {
				t.Fatalf("%s: restore by tokens: %d tokens, %v; want 32", name, rs.Tokens, err)
			}
			restored := sameKV(t, name+" shared groups", c, prefixCache(c, ref, 32), paged)
			got, err := m.Generate(restored, other[32:], 4, nil)
			if err != nil {
				t.Fatal(err)
			}
			want, err := m.Generate(model.NewKVCache(c), other, 4, nil)
			if err != nil {
				t.Fatal(err)
			}
			if fmt.Sprint(got) != fmt.Sprint(want) {
				t.Fatalf("%s: tokens after a prefix restore %v, an uninterrupted run %v", name, got, want)
			}
			// Naming the context adds its own tail.
			paged = pagedFor(t, c, len(prompt))
			if rs, err = rest.Restore(Request{NS: "test", ID: name, Ident: ident, ByTokens: true, Tokens: prompt, Dst: paged}); err != nil || rs.Tokens != len(prompt) {
				t.Fatalf("%s: restore by tokens of a named context: %d tokens, %v; want %d", name, rs.Tokens, err, len(prompt))
			}
			sameKV(t, name+" with its tail", c, ref, paged)
			// Nothing stored: nothing restored, no error.
			miss := append([]int{(prompt[0] + 1) % c.Vocab}, prompt[1:]...)
			if rs, err = rest.Restore(Request{NS: "test", Ident: ident, ByTokens: true, Tokens: miss, Dst: paged}); err != nil || rs.Tokens != 0 {
				t.Fatalf("%s: a miss restored %d tokens, %v", name, rs.Tokens, err)
			}
			// Stream by tokens: every stored layer, 32 tokens each.
			layers := 0
			rs, err = rest.Stream(StreamRequest{NS: "test", Ident: ident, ByTokens: true, Tokens: other}, func(l StreamLayer) error {
				if l.Tokens != 32 {
					return fmt.Errorf("layer %d streams %d tokens", l.Layer, l.Tokens)
				}
				layers++
				return nil
			})
			if err != nil || rs.Tokens != 32 || layers != c.Layers-sp.Recompute {
				t.Fatalf("%s: stream by tokens: %d tokens, %d layers, %v", name, rs.Tokens, layers, err)
			}
			// Projected (the daemon's Restore with project): the K|V rows
			// of the shared prefix are those of the context's first 32.
			if sp.Recompute == 0 {
				byName := map[int][]byte{}
				if _, err := rest.Stream(StreamRequest{NS: "test", ID: name, Ident: ident, Project: true}, func(l StreamLayer) error {
					byName[l.Layer] = append([]byte(nil), l.Rows[:32*l.RowBytes]...)
					return nil
				}); err != nil {
					t.Fatal(err)
				}
				if _, err := rest.Stream(StreamRequest{NS: "test", Ident: ident, Project: true, ByTokens: true, Tokens: other}, func(l StreamLayer) error {
					if l.Kind != chunk.LayerKV || l.Tokens != 32 || string(l.Rows) != string(byName[l.Layer]) {
						return fmt.Errorf("projected layer %d (%s, %d tokens) differs from the context's first 32 tokens", l.Layer, l.Kind, l.Tokens)
					}
					return nil
				}); err != nil {
					t.Fatalf("%s: projected stream by tokens: %v", name, err)
				}
			}
		}
	}
	// Bad requests by tokens.
	c, _ := model.Preset("tiny-llama")
	w := model.Synthesize(c, seed)
	m, _ := model.New(c, w)
	ident := Identity(c, w, everySplit(c)[0].Plan(c))
	cases := []struct {
		name string
		r    *Restorer
		req  Request
		want error
	}{
		{"no token ids", NewRestorer(tokenStore{st}, cpuFor(t, m), Settings{}), Request{NS: "test", Ident: ident, ByTokens: true, Dst: pagedFor(t, c, 4)}, ErrTokens},
		{"negative id", NewRestorer(tokenStore{st}, cpuFor(t, m), Settings{}), Request{NS: "test", Ident: ident, ByTokens: true, Tokens: []int{1, -2}, Dst: pagedFor(t, c, 4)}, ErrTokens},
		{"source without tokens", NewRestorer(nameOnly{st}, cpuFor(t, m), Settings{}), Request{NS: "test", Ident: ident, ByTokens: true, Tokens: []int{1}, Dst: pagedFor(t, c, 4)}, ErrNoPrefixSource},
	}
	for _, cs := range cases {
		if _, err := cs.r.Restore(cs.req); !errors.Is(err, cs.want) {
			t.Errorf("%s: %v, want %v", cs.name, err, cs.want)
		}
	}
}

// tokenStore is the test's PrefixSource over a store (what serve/chunksrc
// is; that package imports serve, so this package's tests cannot).
type tokenStore struct{ *chunk.Store }

func tcp(p Prefix) chunk.Prefix {
	return chunk.Prefix{Namespace: p.Namespace, Salt: p.Salt, Identity: p.Identity, Tokens: p.Tokens, Context: p.Context}
}

func (s tokenStore) LookupPrefix(p Prefix) (int, error) { return s.Store.Lookup(tcp(p)) }

func (s tokenStore) RestorePrefixOwned(p Prefix, ahead int, fn func(layer int, rows []byte, release func()) error) (int, error) {
	return s.Store.RestoreTokensOwned(tcp(p), ahead, fn)
}

// nameOnly is a Source that restores by name only.
type nameOnly struct{ st *chunk.Store }

func (n nameOnly) RestoreOwned(ns, id string, ident *chunk.Identity, ahead int, fn func(layer int, rows []byte, release func()) error) (int, error) {
	return n.st.RestoreOwned(ns, id, ident, ahead, fn)
}
