package chunk

import (
	"fmt"
	"math/rand"
	"slices"
	"sync"
	"testing"
	"time"
)

// tokEvictEnv is a store with a caller-set clock and no capacity bound
// (tests drive eviction with EvictOne) that records what it evicts.
type tokEvictEnv struct {
	s       *Store
	ident   *Identity
	mu      sync.Mutex
	now     int64
	evicted []string
}

func newTokEvictEnv(t *testing.T, backend string, bonus time.Duration) *tokEvictEnv {
	te := &tokEvictEnv{now: 1_000_000_000, ident: testIdentity("m1")}
	e := newEnv(t, backend, func(o *Options) {
		o.CapacityBytes = -1
		o.GCInterval = -1
		o.EvictSharedBonus = bonus
		o.Now = func() int64 { te.mu.Lock(); defer te.mu.Unlock(); return te.now }
		o.OnEvict = func(ns, id string) { te.mu.Lock(); te.evicted = append(te.evicted, id); te.mu.Unlock() }
	})
	te.s = e.open()
	t.Cleanup(func() { te.s.Close() })
	return te
}

func (te *tokEvictEnv) tick() { te.mu.Lock(); te.now += int64(time.Second); te.mu.Unlock() }

// evictAll runs EvictOne until nothing is left to evict and returns the
// contexts in the order they went; check runs after each step.
func (te *tokEvictEnv) evictAll(t *testing.T, check func(gone []string)) []string {
	t.Helper()
	for {
		n, err := te.s.EvictOne()
		if err != nil {
			t.Fatalf("EvictOne: %v", err)
		}
		te.mu.Lock()
		gone := append([]string(nil), te.evicted...)
		te.mu.Unlock()
		if n == 0 {
			return gone
		}
		if check != nil {
			check(gone)
		}
	}
}

// TestRestoreByTokensKeepsWhatItServed: a restore by tokens that names no
// context (or names another one) counts as a use of the shared groups it
// served, so eviction keeps the context holding their last reference
// while an unused context goes first. A context that shares the restored
// groups with another is no more kept than before: evicting it frees none
// of them. The restores by tokens used to move only the named context's
// last use: the unnamed cases below evicted the restored prefix's holder
// first (it was created first).
func TestRestoreByTokensKeepsWhatItServed(t *testing.T) {
	const ct = 16
	sys := promptTokens(1, 4*ct) // a shared 4-group system prompt
	own := func(seed, n int) []uint32 { return promptTokens(100+seed, n) }
	type restore struct {
		tokens  []uint32
		context string
		want    int // tokens served
	}
	cases := []struct {
		name  string
		bonus time.Duration
		// ctxs are saved in this order, a second apart; restores follow,
		// a second apart; then eviction takes every context.
		ctxs     []string
		prompts  map[string][]uint32
		restores []restore
		later    []string // saved after the restores
		want     []string // eviction order
	}{
		{
			name: "unnamed restore of a context's whole chain", bonus: -1,
			ctxs:     []string{"a", "b"},
			prompts:  map[string][]uint32{"a": joinTokens(sys, own(1, ct/2)), "b": own(2, 4*ct+ct/2)},
			restores: []restore{{sys, "", 4 * ct}},
			want:     []string{"b", "a"},
		},
		{
			name: "unnamed restore of the first groups of a chain", bonus: -1,
			ctxs:     []string{"a", "b"},
			prompts:  map[string][]uint32{"a": joinTokens(sys, own(1, 2*ct)), "b": own(2, 6*ct)},
			restores: []restore{{joinTokens(sys[:2*ct], own(9, ct)), "", 2 * ct}},
			want:     []string{"b", "a"},
		},
		{
			name: "restore naming another context", bonus: -1,
			ctxs:     []string{"a", "b", "c"},
			prompts:  map[string][]uint32{"a": joinTokens(sys, own(1, ct)), "b": own(2, 5*ct), "c": own(3, 5*ct)},
			restores: []restore{{joinTokens(sys, own(1, ct)), "c", 5 * ct}},
			want:     []string{"b", "c", "a"},
		},
		{
			name: "named restore serving the context's tail", bonus: -1,
			ctxs:     []string{"a", "b"},
			prompts:  map[string][]uint32{"a": joinTokens(sys, own(1, ct/2)), "b": own(2, 4*ct+ct/2)},
			restores: []restore{{joinTokens(sys, own(1, ct/2)), "a", 4*ct + ct/2}},
			want:     []string{"b", "a"},
		},
		{
			// a and c share the restored groups: a (used least
			// recently) goes first, as it frees none of them; then c
			// holds their last reference and outlasts the unused b.
			name: "shared groups keep their last holder", bonus: -1,
			ctxs:     []string{"a", "c", "b"},
			prompts:  map[string][]uint32{"a": joinTokens(sys, own(1, ct)), "c": joinTokens(sys, own(3, ct)), "b": own(2, 5*ct)},
			restores: []restore{{sys, "", 4 * ct}},
			want:     []string{"a", "b", "c"},
		},
		{
			// The default bonus ranks the sharers a and c later than
			// the unshared b already; the restore keeps c over a.
			name: "with the default shared bonus", bonus: 0,
			ctxs:     []string{"a", "c", "b"},
			prompts:  map[string][]uint32{"a": joinTokens(sys, own(1, ct)), "c": joinTokens(sys, own(3, ct)), "b": own(2, 5*ct)},
			restores: []restore{{sys, "", 4 * ct}},
			want:     []string{"b", "a", "c"},
		},
		{
			name: "a restore before the other context's last use", bonus: -1,
			ctxs:     []string{"a"},
			prompts:  map[string][]uint32{"a": joinTokens(sys, own(1, ct)), "b": own(2, 5*ct)},
			restores: []restore{{sys, "", 4 * ct}},
			later:    []string{"b"},
			want:     []string{"a", "b"},
		},
		{
			name: "a restore that finds nothing", bonus: -1,
			ctxs:     []string{"a", "b"},
			prompts:  map[string][]uint32{"a": joinTokens(sys, own(1, ct)), "b": own(2, 5*ct)},
			restores: []restore{{own(7, 4*ct), "", 0}},
			want:     []string{"a", "b"},
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			te := newTokEvictEnv(t, "mem", tc.bonus)
			if te.s.ChunkTokens() != ct {
				t.Fatalf("chunk tokens %d, the cases assume %d", te.s.ChunkTokens(), ct)
			}
			save := func(ids []string) {
				for _, id := range ids {
					te.tick()
					saveTokens(t, te.s, "ns", id, te.ident, nil, tc.prompts[id])
				}
			}
			save(tc.ctxs)
			for _, r := range tc.restores {
				te.tick()
				verifyTokens(t, te.s, Prefix{Namespace: "ns", Identity: te.ident, Tokens: r.tokens, Context: r.context}, r.want)
			}
			save(tc.later)
			if got := te.evictAll(t, nil); !slices.Equal(got, tc.want) {
				t.Fatalf("evicted %v, want %v", got, tc.want)
			}
			if r := te.s.Check(nil); !r.OK() {
				t.Fatalf("fsck: %v", r.Errors)
			}
		})
	}
}

// TestRestoreByTokensHotPrefixOutlastsTheRest: a seeded workload of
// contexts sharing system prompts of random lengths, restored by tokens
// (named or not) in random order; the prefix served by the last restore
// (the most recent use of anything) stays stored, and restores whole, as
// long as a context whose chain does not reach it is left to evict.
func TestRestoreByTokensHotPrefixOutlastsTheRest(t *testing.T) {
	const ct = 16
	for _, seed := range []int64{1, 2, 3, 4} {
		t.Run(fmt.Sprint("seed ", seed), func(t *testing.T) {
			t.Logf("seed %d (replay: this subtest)", seed)
			rng := rand.New(rand.NewSource(seed))
			te := newTokEvictEnv(t, "mem", -1)
			prompts := map[string][]uint32{}
			var ids []string
			for i := 0; i < 12; i++ {
				te.tick()
				sys := promptTokens(rng.Intn(3), ct*(1+rng.Intn(4)))
				p := joinTokens(sys, promptTokens(1000+i, ct*rng.Intn(3)+rng.Intn(ct)))
				id := fmt.Sprintf("c%02d", i)
				saveTokens(t, te.s, "ns", id, te.ident, nil, p)
				prompts[id], ids = p, append(ids, id)
			}
			var hot []uint32
			for r := 0; r < 6 || len(hot) == 0; r++ {
				te.tick()
				p := prompts[ids[rng.Intn(len(ids))]]
				tokens := p[:rng.Intn(len(p)+1)]
				ctx := ""
				if rng.Intn(3) == 0 {
					ctx = ids[rng.Intn(len(ids))]
				}
				n, err := te.s.RestoreTokens(Prefix{Namespace: "ns", Identity: te.ident, Tokens: tokens, Context: ctx}, func(int, []byte) error { return nil })
				if err != nil {
					t.Fatalf("restore %d: %v", r, err)
				}
				hot = tokens[:n/ct*ct] // the shared groups it served
			}
			// The contexts whose chain reaches the hot prefix's groups.
			holds := map[string]bool{}
			for id, p := range prompts {
				holds[id] = len(p) >= len(hot) && slices.Equal(p[:len(hot)], hot)
			}
			hp := Prefix{Namespace: "ns", Identity: te.ident, Tokens: hot}
			gone := te.evictAll(t, func(gone []string) {
				othersLeft := false
				for _, id := range ids {
					othersLeft = othersLeft || !holds[id] && !slices.Contains(gone, id)
				}
				if n, err := te.s.Lookup(hp); othersLeft && (err != nil || n != len(hot)) {
					t.Fatalf("after evicting %v: the last restore's %d-token prefix looks up %d (%v), with contexts not holding it left", gone, len(hot), n, err)
				}
				if othersLeft {
					verifyTokens(t, te.s, hp, len(hot))
				}
			})
			held := 0
			for _, h := range holds {
				if h {
					held++
				}
			}
			t.Logf("hot prefix %d tokens, held by %d of %d contexts; eviction order %v", len(hot), held, len(ids), gone)
			if len(gone) != len(ids) {
				t.Fatalf("evicted %v, want all %d contexts", gone, len(ids))
			}
		})
	}
}

// readWorkload runs a seeded workload under a capacity bound: each step is
// either a new conversation saved by tokens (one of 8 system prompts of 4
// groups, picked evenly, then 1-2 groups and a tail of its own) or a
// reader (an engine restoring a system prompt by tokens without naming a
// context, picked with skew: half of them the first). It returns the
// share of the readers' tokens found stored. With restore false the
// readers only look up (a use eviction cannot see).
func readWorkload(t *testing.T, seed int64, restore bool) (hitRate float64, evictions uint64) {
	t.Helper()
	now := int64(1_000_000_000)
	s := clockedEvictStore(t, 40, -1, &now) // no shared bonus: plain LRU, what the restores add alone
	defer s.Close()
	ct := s.ChunkTokens()
	ident := testIdentity("m1")
	rng := rand.New(rand.NewSource(seed))
	var hit, total int
	for i := 0; i < 300; i++ {
		now += int64(time.Second)
		if rng.Intn(2) == 0 {
			prompt := joinTokens(promptTokens(rng.Intn(8), 4*ct), promptTokens(5000+i, ct*(1+rng.Intn(2))+rng.Intn(ct)))
			saveTokens(t, s, "ns", fmt.Sprintf("c%03d", i), ident, nil, prompt)
			continue
		}
		p := Prefix{Namespace: "ns", Identity: ident, Tokens: promptTokens([]int{0, 0, 0, 0, 1, 1, 2, 3}[rng.Intn(8)], 4*ct)}
		n, err := s.Lookup(p)
		if err != nil {
			t.Fatal(err)
		}
		if restore && n > 0 {
			if got, err := s.RestoreTokens(p, func(int, []byte) error { return nil }); err != nil || got != n {
				t.Fatalf("step %d: restore by tokens: %d, %v; the lookup found %d", i, got, err, n)
			}
		}
		hit += n
		total += len(p.Tokens)
	}
	return float64(hit) / float64(total), s.Stats().Evictions
}

// TestRestoreByTokensRaisesHitRate measures what counting restores by
// tokens as uses does on a seeded workload (fixed seeds, so it replays
// exactly): readers that restore popular system prompts by tokens keep
// them stored, and find more of them than readers whose use eviction
// cannot see (lookups only, which is what a restore by tokens was to
// eviction before).
func TestRestoreByTokensRaisesHitRate(t *testing.T) {
	var seen, unseen float64
	for _, seed := range []int64{1, 2, 3} {
		look, lookEv := readWorkload(t, seed, false)
		rest, restEv := readWorkload(t, seed, true)
		t.Logf("seed %d: readers' hit rate over 300 steps: lookups only %.3f (%d evictions), restores by tokens %.3f (%d evictions)", seed, look, lookEv, rest, restEv)
		if lookEv == 0 || restEv == 0 {
			t.Fatalf("seed %d: the workload did not evict (%d, %d): capacity too large for the test", seed, lookEv, restEv)
		}
		seen, unseen = seen+rest, unseen+look
	}
	if seen <= unseen {
		t.Fatalf("restores by tokens did not raise the hit rate: %.3f <= %.3f (sum over seeds)", seen, unseen)
	}
}
