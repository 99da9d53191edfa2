package chunk

import (
	"bytes"
	"errors"
	"fmt"
	"hash/fnv"
	"testing"

	"github.com/hcache/hcache/internal/rows"
	"github.com/hcache/hcache/state"
)

// Rows of token-addressed state are a function of the tokens up to and
// including each position (as a model's are): two prompts that share a
// prefix have the same rows there.

// prefixRow is the row of token position t of prompt tokens in a layer.
func prefixRow(tokens []uint32, layer, t, rb int) []byte {
	h := fnv.New64a()
	var b [4]byte
	for _, tok := range tokens[:t+1] {
		b[0], b[1], b[2], b[3] = byte(tok), byte(tok>>8), byte(tok>>16), byte(tok>>24)
		h.Write(b[:])
	}
	return rows.Row(fmt.Sprintf("p%x", h.Sum64()), layer, t, rb)
}

// prefixLayer is the rows of tokens [from, to) of a layer.
func prefixLayer(tokens []uint32, layer, from, to, rb int) []byte {
	var out []byte
	for t := from; t < to; t++ {
		out = append(out, prefixRow(tokens, layer, t, rb)...)
	}
	return out
}

// promptTokens is a prompt: n token ids from a seed (prompts with the same
// seed and different lengths share a prefix).
func promptTokens(seed, n int) []uint32 {
	out := make([]uint32, n)
	for i := range out {
		out[i] = uint32(seed*1_000_003+i*7919) % 50_000
	}
	return out
}

// joinTokens concatenates prompts.
func joinTokens(parts ...[]uint32) []uint32 {
	var out []uint32
	for _, p := range parts {
		out = append(out, p...)
	}
	return out
}

// saveTokens stores tokens as token-addressed context (ns, id) by prefill
// and returns what CreateTokens reported stored.
func saveTokens(t *testing.T, s *Store, ns, id string, ident *Identity, salt []byte, tokens []uint32) int {
	t.Helper()
	w, stored, err := s.CreateTokens(ns, id, ident, tokens, CreateOptions{Salt: salt})
	if err != nil {
		t.Fatalf("CreateTokens %s/%s: %v", ns, id, err)
	}
	for l, p := range ident.Plan {
		if p.Kind == LayerNone || stored == len(tokens) {
			continue
		}
		if err := w.AppendLayer(l, prefixLayer(tokens, l, stored, len(tokens), int(p.RowBytes))); err != nil {
			t.Fatalf("AppendLayer %s/%s layer %d: %v", ns, id, l, err)
		}
	}
	if err := w.Close(); err != nil {
		t.Fatalf("Close %s/%s: %v", ns, id, err)
	}
	return stored
}

// checkRestored checks that fn's layers hold the rows of tokens [0, n).
func checkRows(tokens []uint32, ident *Identity, n int) (func(layer int, rows []byte) error, func() error) {
	seen := map[int]bool{}
	fn := func(layer int, got []byte) error {
		seen[layer] = true
		rb := int(ident.Plan[layer].RowBytes)
		if want := prefixLayer(tokens, layer, 0, n, rb); !bytes.Equal(got, want) {
			return fmt.Errorf("layer %d: %d restored bytes differ from the %d saved", layer, len(got), len(want))
		}
		return nil
	}
	done := func() error {
		for l, p := range ident.Plan {
			if (p.Kind != LayerNone) != seen[l] {
				return fmt.Errorf("layer %d (%s) delivered = %v", l, p.Kind, seen[l])
			}
		}
		return nil
	}
	return fn, done
}

// verifyName restores (ns, id) by name and checks it holds tokens[:n].
func verifyName(t *testing.T, s *Store, ns, id string, ident *Identity, tokens []uint32, n int) {
	t.Helper()
	fn, done := checkRows(tokens, ident, n)
	got, err := s.Restore(ns, id, ident, fn)
	if err == nil {
		err = done()
	}
	if err != nil || got != n {
		t.Fatalf("Restore %s/%s: %d tokens, %v; want %d", ns, id, got, err, n)
	}
}

// verifyTokens restores by tokens and checks that n tokens came back, equal
// to what was saved.
func verifyTokens(t *testing.T, s *Store, p Prefix, n int) {
	t.Helper()
	if got, err := s.Lookup(p); err != nil || got != n {
		t.Fatalf("Lookup %s (%d tokens, context %q): %d, %v; want %d", p.Namespace, len(p.Tokens), p.Context, got, err, n)
	}
	fn, done := checkRows(p.Tokens, p.Identity, n)
	calls := 0
	got, err := s.RestoreTokens(p, func(layer int, rows []byte) error { calls++; return fn(layer, rows) })
	if err == nil && n > 0 {
		err = done()
	}
	if err != nil || got != n || (n == 0 && calls != 0) {
		t.Fatalf("RestoreTokens %s: %d tokens (%d calls), %v; want %d", p.Namespace, got, calls, err, n)
	}
}

// groupRefs is the table's reference counts, by key (for comparisons).
func groupRefs(s *Store) map[string]int {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := map[string]int{}
	for k, e := range s.groups {
		if e.committed {
			out[fmt.Sprintf("%s/%x", k.ns, k.key[:])] = e.refs
		}
	}
	return out
}

func TestPrefixSaveDedupLookupRestore(t *testing.T) {
	for _, backend := range []string{"mem", "disk", "mem+cache"} {
		t.Run(backend, func(t *testing.T) {
			cache := backend == "mem+cache"
			if cache {
				backend = "mem"
			}
			e := newEnv(t, backend, func(o *Options) {
				if cache {
					o.CacheBytes = 8 << 20
				}
			})
			s := e.open()
			defer s.Close()
			ct := s.ChunkTokens()
			ident := testIdentity("m1")
			sys := promptTokens(1, 5*ct)                  // a system prompt: 5 groups
			a := joinTokens(sys, promptTokens(2, 2*ct+3)) // 7 groups + 3
			b := joinTokens(sys, promptTokens(3, ct+5))   // 6 groups + 5, shares 5
			if got := saveTokens(t, s, "ns", "a", ident, nil, a); got != 0 {
				t.Fatalf("first save: stored %d, want 0", got)
			}
			st := s.Stats()
			if st.GroupsWritten != 7 || st.Groups != 7 {
				t.Fatalf("after a: %d groups written, %d stored; want 7", st.GroupsWritten, st.Groups)
			}
			// Same prompt again: nothing new written.
			if got := saveTokens(t, s, "ns", "a2", ident, nil, a); got != 7*ct {
				t.Fatalf("second save of the same prompt: stored %d, want %d", got, 7*ct)
			}
			st2 := s.Stats()
			if st2.GroupBytesWritten != st.GroupBytesWritten || st2.GroupsWritten != 7 || st2.GroupBytes != st.GroupBytes {
				t.Fatalf("second save wrote group bytes: %d -> %d (%d groups), stored %d -> %d", st.GroupBytesWritten, st2.GroupBytesWritten, st2.GroupsWritten, st.GroupBytes, st2.GroupBytes)
			}
			// A prompt sharing the system prompt: only its own groups.
			if got := saveTokens(t, s, "ns", "b", ident, nil, b); got != 5*ct {
				t.Fatalf("save of b: stored %d, want %d", got, 5*ct)
			}
			if st := s.Stats(); st.GroupsWritten != 8 || st.Groups != 8 {
				t.Fatalf("after b: %d groups written, %d stored; want 8", st.GroupsWritten, st.Groups)
			}
			verifyName(t, s, "ns", "a", ident, a, len(a))
			verifyName(t, s, "ns", "a2", ident, a, len(a))
			verifyName(t, s, "ns", "b", ident, b, len(b))

			other := testIdentity("m2")
			unrelated := promptTokens(9, 4*ct)
			for _, tc := range []struct {
				name string
				p    Prefix
				want int
			}{
				{"nothing stored", Prefix{Namespace: "ns", Identity: ident, Tokens: unrelated}, 0},
				{"shorter than a group", Prefix{Namespace: "ns", Identity: ident, Tokens: sys[:ct-1]}, 0},
				{"partial: the system prompt then other tokens", Prefix{Namespace: "ns", Identity: ident, Tokens: joinTokens(sys, unrelated)}, 5 * ct},
				{"mid-group end", Prefix{Namespace: "ns", Identity: ident, Tokens: a[:6*ct+4]}, 6 * ct},
				{"full groups of a", Prefix{Namespace: "ns", Identity: ident, Tokens: a}, 7 * ct},
				{"a's tail with its name", Prefix{Namespace: "ns", Identity: ident, Tokens: a, Context: "a"}, len(a)},
				{"a's tail partly, with its name", Prefix{Namespace: "ns", Identity: ident, Tokens: joinTokens(a[:7*ct+2], []uint32{77777}), Context: "a"}, 7*ct + 2},
				{"a's tokens named b", Prefix{Namespace: "ns", Identity: ident, Tokens: a, Context: "b"}, 7 * ct},
				{"a's tokens, an unknown name", Prefix{Namespace: "ns", Identity: ident, Tokens: a, Context: "zz"}, 7 * ct},
				{"other namespace", Prefix{Namespace: "ns2", Identity: ident, Tokens: a}, 0},
				{"other identity", Prefix{Namespace: "ns", Identity: other, Tokens: a}, 0},
				{"other salt", Prefix{Namespace: "ns", Salt: []byte("tenant"), Identity: ident, Tokens: a}, 0},
			} {
				t.Run(tc.name, func(t *testing.T) { verifyTokens(t, s, tc.p, tc.want) })
			}
			if hits := s.Stats().CacheHits; cache != (hits > 0) {
				t.Fatalf("%d DRAM-tier hits with the cache %v", hits, cache)
			}
		})
	}
}

func TestPrefixAppendExtendsChain(t *testing.T) {
	e := newEnv(t, "mem", nil)
	s := e.open()
	defer s.Close()
	ct := s.ChunkTokens()
	ident := testIdentity("m1")
	turn1 := promptTokens(1, 2*ct+5)
	saveTokens(t, s, "ns", "c", ident, nil, turn1)
	// Turn 2: decode tokens with their ids, then a prefill of known ids.
	all := joinTokens(turn1, promptTokens(2, 3*ct))
	w, err := s.Append("ns", "c", ident)
	if err != nil {
		t.Fatal(err)
	}
	rowsOf := func(tok int) [][]byte {
		r := make([][]byte, len(ident.Plan))
		for l, p := range ident.Plan {
			if p.Kind != LayerNone {
				r[l] = prefixRow(all, l, tok, int(p.RowBytes))
			}
		}
		return r
	}
	// Rows without an id are refused.
	if err := w.AppendToken(rowsOf(len(turn1))); !errors.Is(err, ErrTokens) {
		t.Fatalf("AppendToken without an id: %v, want ErrTokens", err)
	}
	mid := len(turn1) + ct
	for tok := len(turn1); tok < mid; tok++ {
		if err := w.AppendTokenID(all[tok], rowsOf(tok)); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.ExtendTokens(all[mid:]); err != nil {
		t.Fatal(err)
	}
	for l, p := range ident.Plan {
		if p.Kind != LayerNone {
			if err := w.AppendLayer(l, prefixLayer(all, l, mid, len(all), int(p.RowBytes))); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	verifyName(t, s, "ns", "c", ident, all, len(all))
	verifyTokens(t, s, Prefix{Namespace: "ns", Identity: ident, Tokens: all}, len(all)/ct*ct)
	verifyTokens(t, s, Prefix{Namespace: "ns", Identity: ident, Tokens: all, Context: "c"}, len(all))
	// The old tail's record was superseded: the chain now covers it.
	if st := s.Stats(); st.Groups != len(all)/ct {
		t.Fatalf("%d groups stored, want %d", st.Groups, len(all)/ct)
	}
}

func TestPrefixForkAndDeletes(t *testing.T) {
	for _, tc := range []struct {
		name     string
		forkAt   func(ct int) int
		delFirst string
	}{
		{"group-aligned, delete source", func(ct int) int { return 3 * ct }, "src"},
		{"mid-group, delete source", func(ct int) int { return 2*ct + 7 }, "src"},
		{"inside the tail, delete fork", func(ct int) int { return 4*ct + 2 }, "dst"},
		{"everything, delete fork", func(ct int) int { return 4*ct + 5 }, "dst"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, "mem", nil)
			s := e.open()
			defer s.Close()
			ct := s.ChunkTokens()
			ident := testIdentity("m1")
			src := promptTokens(4, 4*ct+5)
			saveTokens(t, s, "ns", "src", ident, nil, src)
			before := s.Stats()
			n := tc.forkAt(ct)
			if err := s.Fork("ns", "src", "dst", n); err != nil {
				t.Fatal(err)
			}
			after := s.Stats()
			if after.GroupsWritten != before.GroupsWritten {
				t.Fatalf("fork wrote %d groups", after.GroupsWritten-before.GroupsWritten)
			}
			verifyName(t, s, "ns", "dst", ident, src, n)
			verifyTokens(t, s, Prefix{Namespace: "ns", Identity: ident, Tokens: src[:n], Context: "dst"}, n)
			other := map[string]string{"src": "dst", "dst": "src"}[tc.delFirst]
			keep := map[string]int{"src": len(src), "dst": n}[other]
			if err := s.Delete("ns", tc.delFirst); err != nil {
				t.Fatal(err)
			}
			verifyName(t, s, "ns", other, ident, src, keep)
			verifyTokens(t, s, Prefix{Namespace: "ns", Identity: ident, Tokens: src[:keep], Context: other}, keep)
			if err := s.Delete("ns", other); err != nil {
				t.Fatal(err)
			}
			if st := s.Stats(); st.Groups != 0 || st.GroupBytes != 0 || st.LiveBytes != 0 {
				t.Fatalf("after deleting both: %d groups, %d group bytes, %d live bytes", st.Groups, st.GroupBytes, st.LiveBytes)
			}
			verifyTokens(t, s, Prefix{Namespace: "ns", Identity: ident, Tokens: src}, 0)
		})
	}
}

func TestPrefixNamespacesNeverShare(t *testing.T) {
	e := newEnv(t, "mem", nil)
	s := e.open()
	defer s.Close()
	ct := s.ChunkTokens()
	ident := testIdentity("m1")
	tok := promptTokens(5, 3*ct+1)
	saveTokens(t, s, "t1", "c", ident, nil, tok)
	if got := saveTokens(t, s, "t2", "c", ident, nil, tok); got != 0 {
		t.Fatalf("second namespace found %d tokens stored", got)
	}
	if st := s.Stats(); st.Groups != 6 || st.GroupsWritten != 6 {
		t.Fatalf("%d groups stored (%d written), want two copies of 3", st.Groups, st.GroupsWritten)
	}
	if err := s.Delete("t1", "c"); err != nil {
		t.Fatal(err)
	}
	verifyTokens(t, s, Prefix{Namespace: "t1", Identity: ident, Tokens: tok}, 0)
	verifyTokens(t, s, Prefix{Namespace: "t2", Identity: ident, Tokens: tok, Context: "c"}, len(tok))
	verifyName(t, s, "t2", "c", ident, tok, len(tok))
}

func TestPrefixReopenKeepsRefcounts(t *testing.T) {
	for _, backend := range backends {
		t.Run(backend, func(t *testing.T) {
			e := newEnv(t, backend, nil)
			s := e.open()
			ct := s.ChunkTokens()
			ident := testIdentity("m1")
			sys := promptTokens(1, 3*ct)
			for i := 0; i < 4; i++ {
				saveTokens(t, s, "ns", fmt.Sprintf("c%d", i), ident, nil, joinTokens(sys, promptTokens(10+i, ct+i)))
			}
			if err := s.Fork("ns", "c1", "f", 3*ct+2); err != nil {
				t.Fatal(err)
			}
			if err := s.Delete("ns", "c0"); err != nil {
				t.Fatal(err)
			}
			want := groupRefs(s)
			wantStats := s.Stats()
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			s = e.open()
			defer s.Close()
			if got := groupRefs(s); fmt.Sprint(got) != fmt.Sprint(want) {
				t.Fatalf("refs after reopen %v, before %v", got, want)
			}
			if st := s.Stats(); st.Groups != wantStats.Groups || st.GroupBytes != wantStats.GroupBytes || st.LiveBytes != wantStats.LiveBytes {
				t.Fatalf("after reopen %d groups / %d bytes / %d live; before %d / %d / %d", st.Groups, st.GroupBytes, st.LiveBytes, wantStats.Groups, wantStats.GroupBytes, wantStats.LiveBytes)
			}
			for i := 1; i < 4; i++ {
				tok := joinTokens(sys, promptTokens(10+i, ct+i))
				verifyName(t, s, "ns", fmt.Sprintf("c%d", i), ident, tok, len(tok))
			}
			verifyName(t, s, "ns", "f", ident, joinTokens(sys, promptTokens(11, ct+1)), 3*ct+2)
		})
	}
}

// TestPrefixForcedCollision: a key function that maps every group after
// the first to one key makes a later prompt's group collide with a stored
// one; nothing of the colliding group (or after it) is served or written
// over, and the stored state stays intact.
func TestPrefixForcedCollision(t *testing.T) {
	e := newEnv(t, "mem", nil)
	s := e.open()
	defer s.Close()
	ct := s.ChunkTokens()
	s.keyFunc = func(ch state.Chain, parent ChainKey, ids []uint32) ChainKey {
		if parent.IsZero() {
			return ch.Next(parent, ids[:1]) // group 0's key: its first token only
		}
		return ch.Next(parent, ids)
	}
	ident := testIdentity("m1")
	a := promptTokens(6, 2*ct)
	saveTokens(t, s, "ns", "a", ident, nil, a)
	b := append([]uint32(nil), a...)
	b[3]++ // same first token: group 0's key collides
	if got, err := s.Lookup(Prefix{Namespace: "ns", Identity: ident, Tokens: b}); err != nil || got != 0 {
		t.Fatalf("Lookup of the colliding prompt: %d, %v; want 0", got, err)
	}
	n, err := s.RestoreTokens(Prefix{Namespace: "ns", Identity: ident, Tokens: b}, func(int, []byte) error {
		t.Fatal("a colliding group was served")
		return nil
	})
	if err != nil || n != 0 {
		t.Fatalf("RestoreTokens of the colliding prompt: %d, %v", n, err)
	}
	// Saving it does not reference (or overwrite) the colliding group.
	w, stored, err := s.CreateTokens("ns", "b", ident, b, CreateOptions{})
	if err != nil || stored != 0 {
		t.Fatalf("CreateTokens of the colliding prompt: stored %d, %v", stored, err)
	}
	for l, p := range ident.Plan {
		if p.Kind != LayerNone {
			if err := w.AppendLayer(l, prefixLayer(b, l, 0, len(b), int(p.RowBytes))); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := w.Close(); !errors.Is(err, ErrCollision) {
		t.Fatalf("Close of the colliding writer: %v, want ErrCollision", err)
	}
	if s.Stats().Collisions == 0 {
		t.Fatal("no collision counted")
	}
	verifyName(t, s, "ns", "a", ident, a, len(a))
	verifyTokens(t, s, Prefix{Namespace: "ns", Identity: ident, Tokens: a}, len(a))
}

// prefixWorkload stores a small shared-prefix workload: contexts under one
// system prompt (some with tails, some group-aligned), an appended turn, a
// fork, and a deleted sharer. It returns each live context's tokens.
func prefixWorkload(t *testing.T, s *Store, ident *Identity) map[string][]uint32 {
	t.Helper()
	ct := s.ChunkTokens()
	sys := promptTokens(1, 3*ct)
	live := map[string][]uint32{}
	for i, extra := range []int{ct + 3, 2 * ct, 5, 0} {
		id := fmt.Sprintf("c%d", i)
		live[id] = joinTokens(sys, promptTokens(20+i, extra))
		saveTokens(t, s, "ns", id, ident, nil, live[id])
	}
	// A second turn on c1 completes a group and leaves a tail.
	all := joinTokens(live["c1"], promptTokens(30, ct+4))
	w, err := s.Append("ns", "c1", ident)
	if err != nil {
		t.Fatal(err)
	}
	if err := w.ExtendTokens(all[len(live["c1"]):]); err != nil {
		t.Fatal(err)
	}
	for l, p := range ident.Plan {
		if p.Kind != LayerNone {
			if err := w.AppendLayer(l, prefixLayer(all, l, len(live["c1"]), len(all), int(p.RowBytes))); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	live["c1"] = all
	if err := s.Fork("ns", "c0", "f", 3*ct+2); err != nil {
		t.Fatal(err)
	}
	live["f"] = live["c0"][:3*ct+2]
	if err := s.Delete("ns", "c2"); err != nil {
		t.Fatal(err)
	}
	delete(live, "c2")
	// Another namespace with the same tokens.
	saveTokens(t, s, "other", "c0", ident, nil, live["c0"])
	return live
}

// checkWorkload checks every live context by name and by tokens.
func checkWorkload(t *testing.T, s *Store, ident *Identity, live map[string][]uint32) {
	t.Helper()
	ct := s.ChunkTokens()
	for id, tok := range live {
		verifyName(t, s, "ns", id, ident, tok, len(tok))
		verifyTokens(t, s, Prefix{Namespace: "ns", Identity: ident, Tokens: tok, Context: id}, len(tok))
		verifyTokens(t, s, Prefix{Namespace: "ns", Identity: ident, Tokens: tok}, len(tok)/ct*ct)
	}
	verifyName(t, s, "other", "c0", ident, live["c0"], len(live["c0"]))
}

func TestPrefixRepairRebuildsGroupsAndRefs(t *testing.T) {
	for _, gc := range []bool{false, true} {
		t.Run(fmt.Sprintf("gc=%v", gc), func(t *testing.T) {
			e := newEnv(t, "mem", func(o *Options) { o.GCInterval = -1; o.SegmentBytes = 1 << 20 })
			s := e.open()
			ident := testIdentity("m1")
			live := prefixWorkload(t, s, ident)
			if gc {
				s.opts.GCLiveRatio = 1 // compact every sealed segment
				if res := s.GC(); res.Err != nil {
					t.Fatal(res.Err)
				}
			}
			checkWorkload(t, s, ident, live)
			if r := s.Check(nil); !r.OK() {
				t.Fatalf("fsck before repair: %v", r.Errors)
			}
			wantRefs, wantStats := groupRefs(s), s.Stats()
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			loseIndexAndRepair(t, e.opts)
			s = e.open()
			defer s.Close()
			if got := groupRefs(s); fmt.Sprint(got) != fmt.Sprint(wantRefs) {
				t.Fatalf("refs after repair %v, before %v", got, wantRefs)
			}
			if st := s.Stats(); st.Groups != wantStats.Groups || st.GroupBytes != wantStats.GroupBytes {
				t.Fatalf("after repair %d groups / %d bytes; before %d / %d", st.Groups, st.GroupBytes, wantStats.Groups, wantStats.GroupBytes)
			}
			if got := len(s.Contexts()); got != len(live)+1 {
				t.Fatalf("%d contexts after repair, want %d", got, len(live)+1)
			}
			checkWorkload(t, s, ident, live)
			if r := s.Check(nil); !r.OK() {
				t.Fatalf("fsck after repair: %v", r.Errors)
			}
		})
	}
}

// TestPrefixGCMovesGroups: GC compacts segments holding shared group
// records: the live ones move and their entries follow, the dropped ones'
// bytes are reclaimed, and every sharer still restores by name and by
// tokens (fsck clean, and the same after a reopen).
func TestPrefixGCMovesGroups(t *testing.T) {
	e := newEnv(t, "mem", func(o *Options) { o.GCInterval = -1; o.SegmentBytes = 1 << 20; o.CacheBytes = 4 << 20 })
	s := e.open()
	ct := s.ChunkTokens()
	ident := testIdentity("m1")
	sys := promptTokens(1, 2*ct)
	live := map[string][]uint32{}
	for i := 0; i < 40; i++ {
		id := fmt.Sprintf("c%02d", i)
		tok := joinTokens(sys, promptTokens(100+i, 2*ct+i%5))
		saveTokens(t, s, "ns", id, ident, nil, tok)
		if i%4 == 0 {
			live[id] = tok
		}
	}
	for i := 0; i < 40; i++ {
		if id := fmt.Sprintf("c%02d", i); live[id] == nil {
			if err := s.Delete("ns", id); err != nil {
				t.Fatal(err)
			}
		}
	}
	before := s.Stats()
	segOf := map[gid]uint32{}
	s.mu.Lock()
	for k, g := range s.groups {
		segOf[k] = g.seg
	}
	s.mu.Unlock()
	res := s.GC()
	if res.Err != nil || res.Segments == 0 || res.MovedRecords == 0 {
		t.Fatalf("GC: %+v (want segments compacted and records moved)", res)
	}
	after := s.Stats()
	if after.GroupBytes != before.GroupBytes || after.Groups != before.Groups {
		t.Fatalf("GC changed the shared groups: %d/%d -> %d/%d", before.Groups, before.GroupBytes, after.Groups, after.GroupBytes)
	}
	var moved int
	s.mu.Lock()
	for k, g := range s.groups {
		if g.seg != segOf[k] {
			moved++
		}
	}
	s.mu.Unlock()
	if moved == 0 {
		t.Fatal("GC moved no group record")
	}
	t.Logf("GC: %d segments, %d records moved, %d of them shared groups", res.Segments, res.MovedRecords, moved)
	check := func(s *Store) {
		for id, tok := range live {
			verifyName(t, s, "ns", id, ident, tok, len(tok))
			verifyTokens(t, s, Prefix{Namespace: "ns", Identity: ident, Tokens: tok, Context: id}, len(tok))
		}
		if r := s.Check(nil); !r.OK() {
			t.Fatalf("fsck: %v", r.Errors)
		}
	}
	check(s)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s = e.open()
	defer s.Close()
	check(s)
}

// TestPrefixDedupAtHandOff: two writers of the same new prompt, both
// created before either wrote (so neither found it stored), write each
// group once between them: the second hands over groups whose keys are
// stored or in flight, and references them.
func TestPrefixDedupAtHandOff(t *testing.T) {
	for _, backend := range backends {
		t.Run(backend, func(t *testing.T) {
			e := newEnv(t, backend, nil)
			s := e.open()
			defer s.Close()
			ct := s.ChunkTokens()
			ident := testIdentity("m1")
			tok := promptTokens(3, 4*ct+2)
			var ws []*Writer
			for _, id := range []string{"x", "y"} {
				w, stored, err := s.CreateTokens("ns", id, ident, tok, CreateOptions{})
				if err != nil || stored != 0 {
					t.Fatalf("CreateTokens %s: stored %d, %v", id, stored, err)
				}
				ws = append(ws, w)
			}
			for l, p := range ident.Plan {
				for _, w := range ws { // interleaved: x's layer, then y's
					if p.Kind != LayerNone {
						if err := w.AppendLayer(l, prefixLayer(tok, l, 0, len(tok), int(p.RowBytes))); err != nil {
							t.Fatal(err)
						}
					}
				}
			}
			for _, w := range ws {
				if err := w.Close(); err != nil {
					t.Fatal(err)
				}
			}
			if st := s.Stats(); st.GroupsWritten != 4 || st.GroupsDeduped != 4 || st.Groups != 4 {
				t.Fatalf("%d groups written, %d deduped, %d stored; want 4, 4, 4", st.GroupsWritten, st.GroupsDeduped, st.Groups)
			}
			verifyName(t, s, "ns", "x", ident, tok, len(tok))
			verifyName(t, s, "ns", "y", ident, tok, len(tok))
			if err := s.Delete("ns", "x"); err != nil {
				t.Fatal(err)
			}
			verifyName(t, s, "ns", "y", ident, tok, len(tok))
			if r := s.Check(nil); !r.OK() {
				t.Fatalf("fsck: %v", r.Errors)
			}
		})
	}
}
