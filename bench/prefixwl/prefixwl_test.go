package prefixwl

import (
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"slices"
	"strings"
	"testing"

	"github.com/hcache/hcache/internal/testseed"
)

// trieCount counts the distinct prefix groups of the saved token lists
// without hashing: a trie whose nodes are (parent node, group's tokens).
func trieCount(w *Workload, group int) int64 {
	type edge struct {
		parent int
		tokens string
	}
	nodes := map[edge]int{}
	for _, r := range w.Requests {
		parent := 0
		for g := 0; (g+1)*group <= len(r.Tokens); g++ {
			b := make([]byte, 4*group)
			for i, t := range r.Tokens[g*group : (g+1)*group] {
				binary.LittleEndian.PutUint32(b[4*i:], t)
			}
			e := edge{parent, string(b)}
			n, ok := nodes[e]
			if !ok {
				n = len(nodes) + 1
				nodes[e] = n
			}
			parent = n
		}
	}
	return int64(len(nodes))
}

func seq(from, n uint32) []uint32 {
	s := make([]uint32, n)
	for i := range s {
		s[i] = from + uint32(i)
	}
	return s
}

// TestCountHandBuilt: workloads small enough to count by hand.
func TestCountHandBuilt(t *testing.T) {
	sys := seq(1000, 8) // a shared 8-token prefix
	cases := []struct {
		name   string
		reqs   []Request
		group  int
		unique int64
		logic  int64
		hits   []Hit
		tails  int64
	}{
		{"one request", []Request{{0, seq(1, 10), 6}}, 4, 2, 2, []Hit{{0, 0}}, 2},
		{"same prompt twice, other sessions", []Request{{0, seq(1, 12), 8}, {1, seq(1, 12), 8}}, 4, 3, 6, []Hit{{0, 0}, {8, 0}}, 0},
		{"hit capped by the prompt's full groups", []Request{{0, seq(1, 16), 16}, {1, seq(1, 16), 7}}, 4, 4, 8, []Hit{{0, 0}, {4, 0}}, 0},
		{"shared system prompt, diverging users", []Request{
			{0, append(slices.Clone(sys), seq(1, 8)...), 12},
			{1, append(slices.Clone(sys), seq(50, 8)...), 12},
		}, 4, 2 + 2 + 2, 8, []Hit{{0, 0}, {8, 0}}, 0},
		{"a conversation's second turn", []Request{
			{0, seq(1, 10), 5},
			{0, seq(1, 20), 14},
		}, 4, 5, 2 + 5, []Hit{{0, 0}, {8, 10}}, 0},
		{"group of one token", []Request{{0, []uint32{7, 7, 7}, 2}, {1, []uint32{7, 7, 8}, 3}}, 1, 4, 6, []Hit{{0, 0}, {2, 0}}, 0},
		{"same tokens at another offset do not share", []Request{{0, []uint32{1, 2, 3, 4}, 4}, {1, []uint32{9, 9, 1, 2, 3, 4}, 6}}, 2, 2 + 3, 5, []Hit{{0, 0}, {0, 0}}, 0},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			sessions := 0
			for _, r := range c.reqs {
				sessions = max(sessions, r.Session+1)
			}
			w := &Workload{Requests: c.reqs, Sessions: sessions}
			got, hits, err := w.Count(c.group)
			if err != nil {
				t.Fatal(err)
			}
			if got.UniqueGroups != c.unique || got.LogicalGroups != c.logic {
				t.Errorf("unique %d logical %d, want %d %d", got.UniqueGroups, got.LogicalGroups, c.unique, c.logic)
			}
			if got.Tails != c.tails {
				t.Errorf("tails %d, want %d", got.Tails, c.tails)
			}
			if tc := trieCount(w, c.group); tc != c.unique {
				t.Errorf("trie counts %d, want %d", tc, c.unique)
			}
			if !slices.Equal(hits, c.hits) {
				t.Errorf("hits %v, want %v", hits, c.hits)
			}
		})
	}
}

// TestCountRejects: a request that breaks its session's history, and a bad
// group size, are errors that name the problem.
func TestCountRejects(t *testing.T) {
	cases := []struct {
		name  string
		reqs  []Request
		group int
		want  string
	}{
		{"group 0", []Request{{0, seq(1, 4), 2}}, 0, "group of 0"},
		{"prompt past the tokens", []Request{{0, seq(1, 4), 5}}, 2, "prompt of 5 of 4"},
		{"empty prompt", []Request{{0, seq(1, 4), 0}}, 2, "prompt of 0"},
		{"session history rewritten", []Request{{0, seq(1, 4), 2}, {0, seq(2, 8), 6}}, 2, "does not extend its session 0"},
		{"history longer than the prompt", []Request{{0, seq(1, 8), 2}, {0, seq(1, 10), 6}}, 2, "does not extend"},
	}
	for _, c := range cases {
		w := &Workload{Requests: c.reqs, Sessions: 1}
		if _, _, err := w.Count(c.group); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: err %v, want one naming %q", c.name, err, c.want)
		}
	}
}

// small is each workload scaled down for the tests.
func small(name string) Params {
	p := Defaults[name]
	switch name {
	case "chat":
		p.Conversations = 60
	case "docqa":
		p.DocTokens = 3000
	case "agent":
		p.Traces = 5
	}
	return p
}

func digest(w *Workload) [32]byte {
	h := sha256.New()
	for _, r := range w.Requests {
		binary.Write(h, binary.LittleEndian, int64(r.Session))
		binary.Write(h, binary.LittleEndian, int64(r.Prompt))
		binary.Write(h, binary.LittleEndian, r.Tokens)
	}
	var d [32]byte
	h.Sum(d[:0])
	return d
}

// TestGenerateReplays: a seed gives the same requests token for token;
// another seed gives others.
func TestGenerateReplays(t *testing.T) {
	seed := testseed.Seed(t)
	for _, name := range Names() {
		p := small(name)
		a, err := p.Generate(seed)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := p.Generate(seed)
		c, _ := p.Generate(seed + 1)
		if digest(a) != digest(b) {
			t.Errorf("%s: seed %d does not replay", name, seed)
		}
		if digest(a) == digest(c) {
			t.Errorf("%s: seeds %d and %d give the same requests", name, seed, seed+1)
		}
	}
}

// TestUniqueMatchesTrie: on every workload and several group sizes, the
// chain-key count equals the trie count, and the counts are consistent.
func TestUniqueMatchesTrie(t *testing.T) {
	seed := testseed.Seed(t)
	for _, name := range Names() {
		w, err := small(name).Generate(seed)
		if err != nil {
			t.Fatal(err)
		}
		for _, g := range []int{1, 16, 64, 256} {
			c, hits, err := w.Count(g)
			if err != nil {
				t.Fatal(err)
			}
			if tc := trieCount(w, g); c.UniqueGroups != tc {
				t.Errorf("%s G=%d: %d chain keys, trie %d", name, g, c.UniqueGroups, tc)
			}
			if c.UniqueGroups > c.LogicalGroups || c.SharedHit > c.Prompt || c.BestHit < c.SharedHit || c.BestHit < c.SessionHit {
				t.Errorf("%s G=%d: inconsistent counts %+v", name, g, c)
			}
			if c.UniqueGroups*int64(g) > c.PerSession {
				// Every unique group is in some session's final tokens, so a
				// conversation-id store holds at least as much.
				t.Errorf("%s G=%d: unique %d groups exceed the per-session %d tokens", name, g, c.UniqueGroups, c.PerSession)
			}
			for i, h := range hits {
				if h.Shared%g != 0 || h.Shared > w.Requests[i].Prompt {
					t.Fatalf("%s G=%d: request %d hit %d of a %d-token prompt", name, g, i, h.Shared, w.Requests[i].Prompt)
				}
			}
		}
	}
}

// TestShapes checks what each workload is made of.
func TestShapes(t *testing.T) {
	seed := testseed.Seed(t)
	const G = 64
	cases := []struct {
		name  string
		check func(t *testing.T, p Params, w *Workload, c Counts, hits []Hit)
	}{
		{"chat", func(t *testing.T, p Params, w *Workload, c Counts, hits []Hit) {
			turns := map[int]int{}
			prefixes := map[uint32]bool{}
			for i, r := range w.Requests {
				if len(r.Tokens) > p.MaxContext {
					t.Fatalf("request %d saves %d tokens, cap %d", i, len(r.Tokens), p.MaxContext)
				}
				if turns[r.Session] > 0 && hits[i].Session == 0 {
					t.Fatalf("request %d, turn %d of session %d, restores nothing of its history", i, turns[r.Session], r.Session)
				}
				if turns[r.Session] == 0 {
					prefixes[r.Tokens[0]] = true
					if hits[i].Session != 0 {
						t.Fatalf("request %d opens session %d with a session hit", i, r.Session)
					}
				}
				turns[r.Session]++
			}
			if len(turns) != p.Conversations || w.Sessions != p.Conversations {
				t.Errorf("%d sessions, want %d", len(turns), p.Conversations)
			}
			for s, n := range turns {
				if n > p.MaxTurns {
					t.Errorf("session %d has %d turns (max %d)", s, n, p.MaxTurns)
				}
			}
			if len(prefixes) > p.SystemPrompts || len(prefixes) < 2 {
				t.Errorf("conversations open with %d distinct tokens, want 2..%d system prompts", len(prefixes), p.SystemPrompts)
			}
			// A conversation's first turn hits its system prompt once some
			// earlier conversation used it; sharing beats sessions.
			if c.SharedHit <= c.SessionHit/2 || c.UniqueGroups >= c.PerSession/G {
				t.Errorf("chat shares too little: %+v", c)
			}
		}},
		{"docqa", func(t *testing.T, p Params, w *Workload, c Counts, hits []Hit) {
			if len(w.Requests) != p.Documents*p.Questions || w.Sessions != len(w.Requests) {
				t.Fatalf("%d requests in %d sessions, want %d each", len(w.Requests), w.Sessions, p.Documents*p.Questions)
			}
			docs := map[uint32][]uint32{}
			for i, r := range w.Requests {
				q := r.Prompt - p.DocTokens
				if q < p.QuestionMin || q > p.QuestionMax || len(r.Tokens)-r.Prompt != p.AnswerTokens {
					t.Fatalf("request %d: question %d answer %d tokens", i, q, len(r.Tokens)-r.Prompt)
				}
				d, ok := docs[r.Tokens[0]]
				if i < p.Documents {
					if ok {
						t.Fatalf("warm-up request %d repeats a document", i)
					}
					docs[r.Tokens[0]] = r.Tokens[:p.DocTokens]
					if hits[i].Shared != 0 {
						t.Fatalf("warm-up request %d hits %d", i, hits[i].Shared)
					}
					continue
				}
				if !ok || !slices.Equal(d, r.Tokens[:p.DocTokens]) {
					t.Fatalf("request %d does not ask about a warm-up document", i)
				}
				if want := p.DocTokens / G * G; hits[i].Shared != want || hits[i].Session != 0 {
					t.Fatalf("request %d hits %+v, want the document's %d group-aligned tokens", i, hits[i], want)
				}
			}
			// Each document's groups once, plus each request's groups past
			// the last whole group of its document (its own tokens follow).
			want := int64(0)
			for i, r := range w.Requests {
				if i < p.Documents {
					want += int64(p.DocTokens / G)
				}
				want += int64(len(r.Tokens)/G - p.DocTokens/G)
			}
			if c.UniqueGroups != want {
				t.Errorf("unique %d groups, want %d", c.UniqueGroups, want)
			}
		}},
		{"agent", func(t *testing.T, p Params, w *Workload, c Counts, hits []Hit) {
			per := 0
			for l, n := 1, 1; l <= p.Levels; l++ {
				n *= p.Branches
				per += n
			}
			if len(w.Requests) != p.Traces*per {
				t.Fatalf("%d requests, want %d", len(w.Requests), p.Traces*per)
			}
			for i, r := range w.Requests {
				a := len(r.Tokens) - r.Prompt
				if a < p.AnswerMin || a > p.AnswerMax || !slices.Equal(r.Tokens[:16], w.Requests[0].Tokens[:16]) {
					t.Fatalf("request %d: answer of %d tokens, or another system prompt", i, a)
				}
				if i%p.Branches != 0 {
					// A later branch of a fork: the same prompt as the first.
					prev := w.Requests[i-1]
					if !slices.Equal(prev.Tokens[:prev.Prompt], r.Tokens[:r.Prompt]) {
						t.Fatalf("request %d is a fork but its prompt differs from its sibling's", i)
					}
					if want := r.Prompt / G * G; hits[i].Shared != want || hits[i].Session != 0 {
						t.Fatalf("fork %d hits %+v, want its whole %d group-aligned tokens and no session", i, hits[i], want)
					}
				}
			}
			if c.SharedHit <= c.SessionHit {
				t.Errorf("forks share no more than sessions: %+v", c)
			}
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			p := small(tc.name)
			w, err := p.Generate(seed)
			if err != nil {
				t.Fatal(err)
			}
			c, hits, err := w.Count(G)
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("%s: %+v", tc.name, c)
			tc.check(t, p, w, c, hits)
		})
	}
}

// TestParamsRejected: bad parameters are errors naming the knob.
func TestParamsRejected(t *testing.T) {
	mod := func(name string, f func(*Params)) Params {
		p := Defaults[name]
		f(&p)
		return p
	}
	cases := []struct {
		p    Params
		want string
	}{
		{Params{Name: "bursty", Vocab: 10}, "unknown workload \"bursty\""},
		{mod("chat", func(p *Params) { p.Vocab = 0 }), "vocab"},
		{mod("chat", func(p *Params) { p.Conversations = 0 }), "conversations"},
		{mod("chat", func(p *Params) { p.SystemMin, p.SystemMax = 300, 200 }), "system prompt range"},
		{mod("chat", func(p *Params) { p.MeanTurns = 0.5 }), "mean turns"},
		{mod("chat", func(p *Params) { p.SystemMax = p.MaxContext }), "no room"},
		{mod("docqa", func(p *Params) { p.DocTokens = 0 }), "document tokens"},
		{mod("docqa", func(p *Params) { p.Vocab = 4 }), "distinct id token"},
		{mod("docqa", func(p *Params) { p.QuestionMax = 1 }), "question range"},
		{mod("agent", func(p *Params) { p.Branches = 0 }), "branches"},
		{mod("agent", func(p *Params) { p.Levels, p.Branches = 8, 8 }), "too large"},
		{mod("agent", func(p *Params) { p.AnswerMin = 0 }), "answer range"},
	}
	for _, c := range cases {
		_, err := c.p.Generate(1)
		if !errors.Is(err, ErrParams) || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%+v: err %v, want ErrParams naming %q", c.p.Name, err, c.want)
		}
	}
}

// TestScaled multiplies the sessions of each workload.
func TestScaled(t *testing.T) {
	for _, c := range []struct {
		name string
		k    float64
		get  func(Params) int
		want int
	}{
		{"chat", 2, func(p Params) int { return p.Conversations }, 800},
		{"docqa", 0.5, func(p Params) int { return p.Documents }, 4},
		{"agent", 0.001, func(p Params) int { return p.Traces }, 1},
	} {
		p := Defaults[c.name].Scaled(c.k)
		if got := c.get(p); got != c.want {
			t.Errorf("%s x%g: %d sessions, want %d", c.name, c.k, got, c.want)
		}
		if p.Conversations+p.Documents+p.Traces != c.want {
			t.Errorf("%s x%g scaled a knob it does not have: %+v", c.name, c.k, p)
		}
	}
}
