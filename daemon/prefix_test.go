package daemon_test

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"math/rand"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"

	"github.com/hcache/hcache/chunk"
	hc "github.com/hcache/hcache/clients/hcacheclient"
	"github.com/hcache/hcache/daemon"
	"github.com/hcache/hcache/internal/testseed"
	hcachev1 "github.com/hcache/hcache/proto/hcache/v1"
)

// tokRows are the rows of tokens [from, from+n) of a prompt on a layer: a
// function of the token ids and positions only, so that two prompts with a
// common prefix have the same rows there (as a model's states are).
func tokRows(tokens []uint32, layer, from, n, rb int) []byte {
	b := make([]byte, n*rb)
	for i := range b {
		pos := from + i/rb
		b[i] = byte(int(tokens[pos])*7 + pos*13 + layer*37 + (i%rb)*3)
	}
	return b
}

// tokRow is one token's rows of every stored layer (AppendTokens' layout).
func tokRow(tokens []uint32, pos int) []byte {
	var b []byte
	for l, p := range ident.Plan {
		if p.RowBytes > 0 {
			b = append(b, tokRows(tokens, l, pos, 1, int(p.RowBytes))...)
		}
	}
	return b
}

// saveTokens creates a context with tokens: prefill rows of prompt from
// where the daemon says it continues, then decode tokens one by one with
// their ids. It returns where the writer continued (the shared tokens).
func saveTokens(t *testing.T, c *hc.Client, ns, id string, prompt, decode []uint32, salt []byte) uint64 {
	t.Helper()
	ctx := context.Background()
	w, err := c.CreateTokens(ctx, ns, id, ident, prompt, salt, false)
	if err != nil {
		t.Fatalf("create %s/%s by tokens: %v", ns, id, err)
	}
	shared := w.Tokens
	if n := len(prompt) - int(shared); n > 0 {
		for l, p := range ident.Plan {
			if p.RowBytes > 0 {
				if err := w.AppendLayer(ctx, l, tokRows(prompt, l, int(shared), n, int(p.RowBytes))); err != nil {
					t.Fatalf("append %s/%s layer %d: %v", ns, id, l, err)
				}
			}
		}
	}
	all := append(append([]uint32(nil), prompt...), decode...)
	for i := len(prompt); i < len(all); i++ {
		if err := w.AppendTokenIDs(ctx, all[i:i+1], tokRow(all, i)); err != nil {
			t.Fatalf("decode %s/%s token %d: %v", ns, id, i, err)
		}
	}
	if err := w.Close(ctx); err != nil {
		t.Fatalf("close %s/%s: %v", ns, id, err)
	}
	return shared
}

// checkTokens restores p by tokens and compares every layer with the rows
// of tokens[:want] bit for bit.
func checkTokens(t *testing.T, c *hc.Client, what string, p hc.Prefix, tokens []uint32, want int) {
	t.Helper()
	got, err := c.RestoreTokens(context.Background(), p, func(layer int, rows []byte) error {
		rb := int(ident.Plan[layer].RowBytes)
		if !bytes.Equal(rows, tokRows(tokens, layer, 0, want, rb)) {
			return fmt.Errorf("layer %d: %d bytes differ from the saved rows of %d tokens", layer, len(rows), want)
		}
		return nil
	})
	if err != nil || got != uint64(want) {
		t.Fatalf("%s: restore by tokens: %d tokens, %v; want %d", what, got, err, want)
	}
}

func randTokens(rng *rand.Rand, n int) []uint32 {
	out := make([]uint32, n)
	for i := range out {
		out[i] = uint32(rng.Intn(50000))
	}
	return out
}

// TestPrefixThroughDaemon: state addressed by tokens through the daemon and
// the Go client. A is saved by tokens (prefill, then decode with ids); B
// shares A's first two groups and writes none of their bytes again (the
// store's counters); lookups report whole groups, plus a named context's
// tail; restores by tokens are bit-exact; a fork shares A's groups and
// continues with new ids; deleting A leaves B and the fork whole; another
// namespace and another salt never share or see A's groups; a caller
// cannot look up a namespace it is not granted.
func TestPrefixThroughDaemon(t *testing.T) {
	seed := testseed.Seed(t)
	rng := rand.New(rand.NewSource(seed))
	tokA, tokB := "token-for-namespace-a", "token-for-namespace-b"
	e := start(t, func(c *daemon.Config) {
		c.Grants.Tokens = map[string][]string{tokA: {"a"}, tokB: {"b"}}
	})
	ctx := context.Background()
	a, b := e.dial(hc.WithToken(tokA)), e.dial(hc.WithToken(tokB))
	info, err := a.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	ct := int(info.GetChunkTokens())

	promptA := randTokens(rng, 2*ct+ct/2)
	decodeA := randTokens(rng, 3)
	allA := append(append([]uint32(nil), promptA...), decodeA...)
	if shared := saveTokens(t, a, "a", "A", promptA, decodeA, nil); shared != 0 {
		t.Fatalf("A continued from %d, want 0 (nothing stored)", shared)
	}
	before := e.store.Stats()
	promptB := append(append([]uint32(nil), promptA[:2*ct]...), randTokens(rng, ct/3)...)
	promptB[2*ct] = promptA[2*ct] + 1 // B's tail differs from A's
	if shared := saveTokens(t, a, "a", "B", promptB, nil, nil); shared != uint64(2*ct) {
		t.Fatalf("B continued from %d, want the %d tokens of A's two groups", shared, 2*ct)
	}
	after := e.store.Stats()
	if after.GroupBytesWritten != before.GroupBytesWritten || after.GroupsWritten != before.GroupsWritten || after.Groups != 2 || before.GroupBytes != after.GroupBytes {
		t.Fatalf("saving B wrote %d groups (%d bytes), %d stored (%d bytes, %d before); want none written, the 2 of A",
			after.GroupsWritten-before.GroupsWritten, after.GroupBytesWritten-before.GroupBytesWritten, after.Groups, after.GroupBytes, before.GroupBytes)
	}

	lookups := []struct {
		name string
		p    hc.Prefix
		want uint64
	}{
		{"A's tokens", hc.Prefix{Namespace: "a", Identity: ident, Tokens: allA}, uint64(2 * ct)},
		{"A's tokens naming A", hc.Prefix{Namespace: "a", Identity: ident, Tokens: allA, ID: "A"}, uint64(len(allA))},
		{"B's tokens naming B", hc.Prefix{Namespace: "a", Identity: ident, Tokens: promptB, ID: "B"}, uint64(len(promptB))},
		{"B's tokens naming A", hc.Prefix{Namespace: "a", Identity: ident, Tokens: promptB, ID: "A"}, uint64(2 * ct)},
		{"a longer prompt", hc.Prefix{Namespace: "a", Identity: ident, Tokens: append(append([]uint32(nil), promptA...), randTokens(rng, 2*ct)...)}, uint64(2 * ct)},
		{"one group", hc.Prefix{Namespace: "a", Identity: ident, Tokens: promptA[:ct+1]}, uint64(ct)},
		{"first token differs", hc.Prefix{Namespace: "a", Identity: ident, Tokens: append([]uint32{promptA[0] + 1}, promptA[1:]...)}, 0},
		{"another salt", hc.Prefix{Namespace: "a", Identity: ident, Tokens: promptA, Salt: []byte("tenant-x")}, 0},
		{"another identity", hc.Prefix{Namespace: "a", Identity: hc.Identity{Model: []byte("other"), Plan: ident.Plan}, Tokens: promptA}, 0},
		{"namespace b", hc.Prefix{Namespace: "b", Identity: ident, Tokens: promptA}, 0},
	}
	for _, lc := range lookups {
		c := a
		if lc.p.Namespace == "b" {
			c = b
		}
		got, gotCT, err := c.Lookup(ctx, lc.p)
		if err != nil || got != lc.want || gotCT != ct {
			t.Fatalf("lookup of %s: %d tokens (chunk %d), %v; want %d", lc.name, got, gotCT, err, lc.want)
		}
	}

	checkTokens(t, a, "A by tokens", hc.Prefix{Namespace: "a", Identity: ident, Tokens: allA, ID: "A"}, allA, len(allA))
	checkTokens(t, a, "B by tokens", hc.Prefix{Namespace: "a", Identity: ident, Tokens: promptB, ID: "B"}, promptB, len(promptB))
	checkTokens(t, a, "the shared prefix", hc.Prefix{Namespace: "a", Identity: ident, Tokens: promptB}, promptB, 2*ct)
	if n, err := a.RestoreTokens(ctx, hc.Prefix{Namespace: "a", Identity: ident, Tokens: []uint32{promptA[0] + 1}}, func(int, []byte) error {
		return fmt.Errorf("a miss handed rows over")
	}); err != nil || n != 0 {
		t.Fatalf("restore of a miss: %d tokens, %v", n, err)
	}

	// Fork A at 2 groups + 5 tokens, then continue the fork with new ids.
	forkAt := 2*ct + 5
	if err := a.Fork(ctx, "a", "A", "A2", uint64(forkAt)); err != nil {
		t.Fatal(err)
	}
	if got := e.store.Stats().GroupBytesWritten; got != after.GroupBytesWritten {
		t.Fatalf("the fork wrote %d group bytes", got-after.GroupBytesWritten)
	}
	fork := append(append([]uint32(nil), allA[:forkAt]...), randTokens(rng, 4)...)
	w, err := a.AppendWithTokens(ctx, "a", "A2", ident, fork, nil)
	if err != nil || w.Tokens != uint64(forkAt) {
		t.Fatalf("append to the fork: continues from %v, %v; want %d", w, err, forkAt)
	}
	for i := forkAt; i < len(fork); i++ {
		if err := w.AppendTokens(ctx, 1, tokRow(fork, i)); err != nil { // ids given at open
			t.Fatal(err)
		}
	}
	if err := w.Close(ctx); err != nil {
		t.Fatal(err)
	}
	checkTokens(t, a, "the fork", hc.Prefix{Namespace: "a", Identity: ident, Tokens: fork, ID: "A2"}, fork, len(fork))
	checkTokens(t, a, "A after the fork", hc.Prefix{Namespace: "a", Identity: ident, Tokens: allA, ID: "A"}, allA, len(allA))

	// Delete A: B and the fork keep the shared groups.
	if err := a.Delete(ctx, "a", "A"); err != nil {
		t.Fatal(err)
	}
	checkTokens(t, a, "B after A's delete", hc.Prefix{Namespace: "a", Identity: ident, Tokens: promptB, ID: "B"}, promptB, len(promptB))
	checkTokens(t, a, "the fork after A's delete", hc.Prefix{Namespace: "a", Identity: ident, Tokens: fork, ID: "A2"}, fork, len(fork))
	check := func(what string, ns, id string, tokens []uint32) {
		t.Helper()
		n, err := a.Restore(ctx, ns, id, ident, func(layer int, rows []byte) error {
			if !bytes.Equal(rows, tokRows(tokens, layer, 0, len(tokens), int(ident.Plan[layer].RowBytes))) {
				return fmt.Errorf("layer %d differs", layer)
			}
			return nil
		})
		if err != nil || n != uint64(len(tokens)) {
			t.Fatalf("%s: restore by name: %d, %v", what, n, err)
		}
	}
	check("B by name", "a", "B", promptB)
	check("the fork by name", "a", "A2", fork)

	// Namespace b saves A's prompt: nothing shared with a; a's groups stay
	// a's, and neither sees the other's.
	st0 := e.store.Stats()
	if shared := saveTokens(t, b, "b", "A", promptA, nil, nil); shared != 0 {
		t.Fatalf("namespace b shared %d tokens of namespace a", shared)
	}
	if st := e.store.Stats(); st.Groups != st0.Groups+2 {
		t.Fatalf("namespace b's save stored %d new groups, want 2 of its own", st.Groups-st0.Groups)
	}
	wantCode(t, "a looks up in b", func() error {
		_, _, err := a.Lookup(ctx, hc.Prefix{Namespace: "b", Identity: ident, Tokens: promptA})
		return err
	}(), codes.PermissionDenied)
	wantCode(t, "a restores b by tokens", func() error {
		_, err := a.RestoreTokens(ctx, hc.Prefix{Namespace: "b", Identity: ident, Tokens: promptA}, func(int, []byte) error { return nil })
		return err
	}(), codes.PermissionDenied)
	wantCode(t, "a forks in b", a.Fork(ctx, "b", "A", "A3", 1), codes.PermissionDenied)
	// A salted save of the same prompt in a shares nothing either.
	if shared := saveTokens(t, a, "a", "salted", promptA, nil, []byte("tenant-x")); shared != 0 {
		t.Fatalf("a salted save shared %d tokens of the unsalted state", shared)
	}
	checkTokens(t, a, "salted", hc.Prefix{Namespace: "a", Identity: ident, Tokens: promptA, Salt: []byte("tenant-x")}, promptA, 2*ct)
}

// TestPrefixBadInput: requests by tokens that are wrong get a clear error
// with the right code, and leave the stored state as it was.
func TestPrefixBadInput(t *testing.T) {
	e := start(t, func(c *daemon.Config) { c.MaxRequestTokens = 1000 })
	ctx := context.Background()
	c := e.dial()
	info, _ := c.Info(ctx)
	ct := int(info.GetChunkTokens())
	rng := rand.New(rand.NewSource(1))
	prompt := randTokens(rng, ct+3)
	saveTokens(t, c, "ns", "tok", prompt, nil, nil)
	save(t, c, "ns", "legacy", 10)
	api := c.API
	pi := &hcachev1.Identity{Model: ident.Model}
	for _, l := range ident.Plan {
		pi.Plan = append(pi.Plan, &hcachev1.LayerPlan{Kind: hcachev1.LayerKind(l.Kind), RowBytes: l.RowBytes})
	}
	many := make([]uint32, 1001)
	cases := []struct {
		name string
		call func() error
		code codes.Code
	}{
		{"lookup without tokens", func() error {
			_, err := api.Lookup(ctx, &hcachev1.LookupRequest{Namespace: "ns", Identity: pi})
			return err
		}, codes.InvalidArgument},
		{"lookup of too many tokens", func() error {
			_, err := api.Lookup(ctx, &hcachev1.LookupRequest{Namespace: "ns", Identity: pi, Tokens: many})
			return err
		}, codes.InvalidArgument},
		{"lookup without identity", func() error {
			_, err := api.Lookup(ctx, &hcachev1.LookupRequest{Namespace: "ns", Tokens: prompt})
			return err
		}, codes.InvalidArgument},
		{"lookup in a bad namespace", func() error {
			_, err := api.Lookup(ctx, &hcachev1.LookupRequest{Namespace: "", Identity: pi, Tokens: prompt})
			return err
		}, codes.InvalidArgument},
		{"lookup with a bad context id", func() error {
			_, err := api.Lookup(ctx, &hcachev1.LookupRequest{Namespace: "ns", Identity: pi, Tokens: prompt, Id: "a\x01b"})
			return err
		}, codes.InvalidArgument},
		{"lookup with a huge salt", func() error {
			_, err := api.Lookup(ctx, &hcachev1.LookupRequest{Namespace: "ns", Identity: pi, Tokens: prompt, Salt: make([]byte, daemon.MaxSaltBytes+1)})
			return err
		}, codes.InvalidArgument},
		{"restore by tokens of a missing context", func() error {
			_, err := c.RestoreTokens(ctx, hc.Prefix{Namespace: "ns", Identity: ident, Tokens: prompt, ID: "nope"}, func(int, []byte) error { return nil })
			return err
		}, codes.NotFound},
		{"restore of too many tokens", func() error {
			_, err := c.RestoreTokens(ctx, hc.Prefix{Namespace: "ns", Identity: ident, Tokens: many}, func(int, []byte) error { return nil })
			return err
		}, codes.InvalidArgument},
		{"restore by name with a salt", func() error {
			_, err := c.RestoreTokens(ctx, hc.Prefix{Namespace: "ns", Identity: ident, ID: "tok", Salt: []byte("s")}, func(int, []byte) error { return nil })
			return err
		}, codes.InvalidArgument},
		{"create with too many tokens", func() error {
			_, err := c.CreateTokens(ctx, "ns", "big", ident, many, nil, false)
			return err
		}, codes.InvalidArgument},
		{"create with a salt and no tokens", func() error {
			_, err := c.CreateTokens(ctx, "ns", "salty", ident, nil, []byte("s"), false)
			return err
		}, codes.InvalidArgument},
		{"create by tokens over an existing context", func() error {
			_, err := c.CreateTokens(ctx, "ns", "tok", ident, prompt, nil, false)
			return err
		}, codes.AlreadyExists},
		{"append with tokens to a legacy context", func() error {
			_, err := c.AppendWithTokens(ctx, "ns", "legacy", ident, make([]uint32, 12), nil)
			return err
		}, codes.FailedPrecondition},
		{"append with other stored tokens", func() error {
			other := append([]uint32{prompt[0] + 1}, prompt[1:]...)
			_, err := c.AppendWithTokens(ctx, "ns", "tok", ident, other, nil)
			return err
		}, codes.FailedPrecondition},
		{"append with another salt", func() error {
			_, err := c.AppendWithTokens(ctx, "ns", "tok", ident, prompt, []byte("s"))
			return err
		}, codes.FailedPrecondition},
		{"append with fewer tokens than stored", func() error {
			_, err := c.AppendWithTokens(ctx, "ns", "tok", ident, prompt[:2], nil)
			return err
		}, codes.InvalidArgument},
		{"fork of a missing context", func() error { return c.Fork(ctx, "ns", "nope", "f", 1) }, codes.NotFound},
		{"fork of more tokens than stored", func() error { return c.Fork(ctx, "ns", "tok", "f", uint64(len(prompt)+1)) }, codes.InvalidArgument},
		{"fork of a legacy context", func() error { return c.Fork(ctx, "ns", "legacy", "f", 1) }, codes.FailedPrecondition},
		{"fork onto an existing context", func() error { return c.Fork(ctx, "ns", "tok", "legacy", 1) }, codes.AlreadyExists},
		{"fork onto itself", func() error { return c.Fork(ctx, "ns", "tok", "tok", 1) }, codes.InvalidArgument},
		{"fork to a bad id", func() error { return c.Fork(ctx, "ns", "tok", "", 1) }, codes.InvalidArgument},
	}
	for _, cs := range cases {
		wantCode(t, cs.name, cs.call(), cs.code)
	}
	// Appends with ids that do not fit.
	w, err := c.AppendWithTokens(ctx, "ns", "tok", ident, prompt, nil)
	if err != nil {
		t.Fatal(err)
	}
	wantCode(t, "token_ids not one per token", func() error {
		_, err := api.AppendTokens(ctx, &hcachev1.AppendTokensRequest{Ctx: &hcachev1.ContextRef{Namespace: "ns", Id: "tok"}, Count: 2,
			Rows: &hcachev1.Rows{Where: &hcachev1.Rows_Inline{Inline: make([]byte, 2*96)}}, TokenIds: []uint32{1}})
		return err
	}(), codes.InvalidArgument)
	wantCode(t, "a token without its id", w.AppendTokens(ctx, 1, make([]byte, 96)), codes.InvalidArgument)
	if err := w.Close(ctx); err != nil {
		t.Fatal(err)
	}
	checkTokens(t, c, "tok after the refusals", hc.Prefix{Namespace: "ns", Identity: ident, Tokens: prompt, ID: "tok"}, prompt, len(prompt))
}

// TestPrefixSharedMemoryAndMetrics: a restore by tokens into a shared
// region places the stored prefix's layers as the inline one sends them;
// /metrics counts lookups, their hit tokens and the shared groups' bytes.
func TestPrefixSharedMemoryAndMetrics(t *testing.T) {
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	addr := ln.Addr().String()
	ln.Close()
	e := start(t, func(c *daemon.Config) { c.Metrics = addr })
	ctx := context.Background()
	c := e.dial()
	info, _ := c.Info(ctx)
	ct := int(info.GetChunkTokens())
	prompt := randTokens(rand.New(rand.NewSource(3)), 2*ct+7)
	saveTokens(t, c, "ns", "p", prompt, nil, nil)
	g, err := c.NewRegion(ctx, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	p := hc.Prefix{Namespace: "ns", Identity: ident, Tokens: append(append([]uint32(nil), prompt...), 1, 2, 3)}
	n, err := c.RestoreTokensInto(ctx, p, g, 0, uint64(len(g.Mem)), func(layer int, rows []byte) error {
		if !bytes.Equal(rows, tokRows(prompt, layer, 0, 2*ct, int(ident.Plan[layer].RowBytes))) {
			return fmt.Errorf("layer %d differs in the region", layer)
		}
		return nil
	})
	if err != nil || n != uint64(2*ct) {
		t.Fatalf("restore by tokens into a region: %d, %v; want %d", n, err, 2*ct)
	}
	for _, q := range [][]uint32{prompt, {prompt[0] + 1}} {
		if _, _, err := c.Lookup(ctx, hc.Prefix{Namespace: "ns", Identity: ident, Tokens: q}); err != nil {
			t.Fatal(err)
		}
	}
	body := httpGet(t, "http://"+addr+"/metrics")
	for _, want := range []string{
		`hcache_lookups_total{result="hit"} 1`,
		`hcache_lookups_total{result="miss"} 1`,
		fmt.Sprintf("hcache_lookup_hit_tokens_total %d", 2*ct),
		"hcache_shared_groups 2",
		"hcache_shared_bytes ",
		"hcache_groups_written_total 2",
		"hcache_chain_collisions_total 0",
	} {
		if !strings.Contains(body, want) {
			t.Errorf("metrics lack %q", want)
		}
	}
	if strings.Contains(body, "hcache_shared_bytes 0\n") {
		t.Error("hcache_shared_bytes is 0 with two groups stored")
	}
}

// TestPrefixQuotaCountsSharedTokens: a namespace's quota counts the tokens
// a context shares as its own (logical rows, daemon doc "State addressed by
// its tokens"): a create by tokens whose shared prefix would pass the quota
// is refused before anything is created, as is a fork; one that fits is
// charged for its shared tokens, so its tail then passes the quota.
func TestPrefixQuotaCountsSharedTokens(t *testing.T) {
	const ct = 64 // the store's default chunk tokens
	row := int64(ident.TokenBytes())
	promptA := randTokens(rand.New(rand.NewSource(5)), 2*ct+8)
	promptB := append(append([]uint32(nil), promptA[:2*ct]...), randTokens(rand.New(rand.NewSource(6)), 8)...)
	for _, cs := range []struct {
		name  string
		quota int64
	}{
		{"shared prefix over the quota", row * int64(len(promptA)+2*ct-1)},
		{"tail over the quota", row * int64(len(promptA)+2*ct+4)},
	} {
		t.Run(cs.name, func(t *testing.T) {
			e := start(t, func(c *daemon.Config) { c.Quotas = map[string]int64{"q": cs.quota} })
			ctx := context.Background()
			c := e.dial()
			if info, _ := c.Info(ctx); info.GetChunkTokens() != ct {
				t.Fatalf("chunk tokens %d, the test assumes %d", info.GetChunkTokens(), ct)
			}
			saveTokens(t, c, "q", "A", promptA, nil, nil)
			w, err := c.CreateTokens(ctx, "q", "B", ident, promptB, nil, false)
			if cs.quota < row*int64(len(promptA)+2*ct) {
				wantCode(t, "create sharing past the quota", err, codes.ResourceExhausted)
				_, err := c.Stat(ctx, "q", "B")
				wantCode(t, "the refused context", err, codes.NotFound)
				wantCode(t, "fork past the quota", c.Fork(ctx, "q", "A", "A2", uint64(2*ct)), codes.ResourceExhausted)
				return
			}
			if err != nil || w.Tokens != 2*ct {
				t.Fatalf("create B: %v, %v", w, err)
			}
			wantCode(t, "B's tail past the quota", w.AppendLayer(ctx, 0, tokRows(promptB, 0, 2*ct, 8, 64)), codes.ResourceExhausted)
			w.Close(ctx)
		})
	}
}

// BenchmarkPrefixLookup128K: a Lookup RPC of a 128K-token prompt whose
// state is stored (2048 groups of 64), over the unix socket: the message of
// 512 KiB of ids, the chain walk and the reply.
func BenchmarkPrefixLookup128K(b *testing.B) {
	sd, err := os.MkdirTemp("", "hcd")
	if err != nil {
		b.Fatal(err)
	}
	defer os.RemoveAll(sd)
	st, err := chunk.Open(chunk.Options{Dir: b.TempDir(), GCInterval: -1, SegmentBytes: 64 << 20, Logf: func(string, ...any) {}})
	if err != nil {
		b.Fatal(err)
	}
	defer st.Close()
	srv, err := daemon.New(daemon.Config{Store: st, Listen: filepath.Join(sd, "s"), GCInterval: -1, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		b.Fatal(err)
	}
	defer srv.Stop()
	c, err := hc.Dial("unix://" + filepath.Join(sd, "s"))
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	ctx := context.Background()
	prompt := randTokens(rand.New(rand.NewSource(1)), 128<<10)
	w, err := c.CreateTokens(ctx, "ns", "long", ident, prompt, nil, false)
	if err != nil {
		b.Fatal(err)
	}
	for l, p := range ident.Plan {
		if p.RowBytes > 0 {
			if err := w.AppendLayer(ctx, l, make([]byte, len(prompt)*int(p.RowBytes))); err != nil {
				b.Fatal(err)
			}
		}
	}
	if err := w.Close(ctx); err != nil {
		b.Fatal(err)
	}
	p := hc.Prefix{Namespace: "ns", Identity: ident, Tokens: prompt}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		n, _, err := c.Lookup(ctx, p)
		if err != nil || n != uint64(len(prompt)) {
			b.Fatalf("lookup: %d, %v", n, err)
		}
	}
}
