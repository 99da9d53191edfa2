package compare

import (
	"math"
	"reflect"
	"sync"
	"testing"
)

// TestChatShape checks the chat trace against the published means it is
// drawn from, and its invariants: each turn restores exactly what the
// conversation holds, contexts stay under the limit, the seed decides all.
func TestChatShape(t *testing.T) {
	const seed = 11
	t.Logf("seed %d", seed)
	w := Chat(seed, 4000, 1<<30)
	turns, tokens, n := 0, 0, 0
	for _, s := range w.Phases[0].Streams {
		turns += len(s)
		held := 0
		for _, r := range s {
			if r.Restore != held || r.From != held || r.To <= r.From {
				t.Fatalf("%s: turn restores %d, saves [%d, %d) while holding %d", r.Ctx, r.Restore, r.From, r.To, held)
			}
			held = r.To
			tokens += r.To - r.From
			n++
		}
	}
	if m := float64(turns) / 4000; math.Abs(m-ChatMeanTurns)/ChatMeanTurns > 0.06 {
		t.Errorf("mean turns %.2f, want about %.2f", m, ChatMeanTurns)
	}
	// Clipping to [4, 2048] trims the lognormals' means by a few percent.
	if m, want := float64(tokens)/float64(n), ChatMeanPrompt+ChatMeanAnswer; math.Abs(m-want)/want > 0.1 {
		t.Errorf("mean tokens per turn %.1f, want about %.1f", m, want)
	}
	small := Chat(seed, 50, 2000)
	for _, s := range small.Phases[0].Streams {
		if s[len(s)-1].To > 2000 {
			t.Fatalf("%s reaches %d tokens past the 2000 limit", s[0].Ctx, s[len(s)-1].To)
		}
	}
	if !reflect.DeepEqual(small, Chat(seed, 50, 2000)) {
		t.Error("the same seed drew two traces")
	}
	if reflect.DeepEqual(small.Phases, Chat(seed+1, 50, 2000).Phases) {
		t.Error("another seed drew the same trace")
	}
}

func TestLongShape(t *testing.T) {
	w := Long(3, 20, 4, 4096, 16384)
	if len(w.Phases) != 4 || len(w.Phases[0].Streams) != 20 || len(w.Phases[1].Streams) != 80 || len(w.Phases[2].Streams) != 100 || len(w.Phases[3].Streams) != 80 {
		t.Fatalf("phases %d, ingest %d, questions %d, mixed %d, again %d", len(w.Phases), len(w.Phases[0].Streams), len(w.Phases[1].Streams), len(w.Phases[2].Streams), len(w.Phases[3].Streams))
	}
	size := map[string]int{}
	for _, s := range w.Phases[0].Streams {
		r := s[0]
		if r.Restore != 0 || r.From != 0 || r.To < 4096 || r.To > 16384 {
			t.Fatalf("ingest %+v", r)
		}
		size[r.Ctx] = r.To
	}
	asked := map[string]int{}
	for _, s := range w.Phases[1].Streams {
		r := s[0]
		if r.Restore != size[r.Ctx] || r.To != r.From {
			t.Fatalf("question %+v on a document of %d tokens", r, size[r.Ctx])
		}
		asked[r.Ctx]++
	}
	for id, n := range asked {
		if n != 4 {
			t.Errorf("%s asked %d questions", id, n)
		}
	}
	// The mixed phase asks the same questions again, one new document
	// saved among every 4 of them.
	again, saves := map[string]int{}, 0
	for i, st := range w.Phases[2].Streams {
		r := st[0]
		if r.Restore == 0 {
			if r.From != 0 || r.To < 4096 || r.To > 16384 || size[r.Ctx] != 0 || i%5 != 0 {
				t.Fatalf("mixed stream %d: save %+v", i, r)
			}
			saves++
			continue
		}
		if r.Restore != size[r.Ctx] {
			t.Fatalf("mixed question %+v on a document of %d tokens", r, size[r.Ctx])
		}
		again[r.Ctx]++
	}
	if saves != 20 || !reflect.DeepEqual(again, asked) {
		t.Errorf("mixed phase: %d saves, questions %v, want 20 and %v", saves, again, asked)
	}
	last := map[string]int{}
	for _, st := range w.Phases[3].Streams {
		if r := st[0]; r.Restore != size[r.Ctx] || r.To != r.From {
			t.Fatalf("last question %+v on a document of %d tokens", r, size[r.Ctx])
		}
		last[st[0].Ctx]++
	}
	if !reflect.DeepEqual(last, asked) {
		t.Errorf("last phase asks %v, want %v", last, asked)
	}
}

// TestRunPhaseOrder checks that one worker advances streams round-robin and
// that every request runs once, in stream order, at any concurrency.
func TestRunPhaseOrder(t *testing.T) {
	ph := Phase{Streams: [][]Request{
		{{Ctx: "a", To: 1}, {Ctx: "a", To: 2}, {Ctx: "a", To: 3}},
		{{Ctx: "b", To: 1}},
		{{Ctx: "c", To: 1}, {Ctx: "c", To: 2}},
	}}
	var got []string
	var mu sync.Mutex
	run := func(c int) map[string][]int {
		seen := map[string][]int{}
		got = nil
		if err := runPhase(ph, c, func(_ *[]byte, r Request) error {
			mu.Lock()
			defer mu.Unlock()
			got = append(got, r.Ctx)
			seen[r.Ctx] = append(seen[r.Ctx], r.To)
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		return seen
	}
	run(1)
	if want := []string{"a", "b", "c", "a", "c", "a"}; !reflect.DeepEqual(got, want) {
		t.Errorf("one worker ran %v, want round-robin %v", got, want)
	}
	for _, c := range []int{2, 3, 16} {
		seen := run(c)
		want := map[string][]int{"a": {1, 2, 3}, "b": {1}, "c": {1, 2}}
		if !reflect.DeepEqual(seen, want) {
			t.Errorf("concurrency %d ran %v", c, seen)
		}
	}
}

func TestQuantile(t *testing.T) {
	cases := []struct {
		v    []float64
		q    float64
		want float64
	}{
		{nil, 0.5, 0},
		{[]float64{3}, 0.99, 3},
		{[]float64{5, 1, 3}, 0.5, 3},
		{[]float64{1, 2, 3, 4, 5, 6, 7, 8, 9, 100}, 0.99, 100},
		{[]float64{4, 1, 2, 3}, 0, 1},
	}
	for _, c := range cases {
		if got := quantile(c.v, c.q); got != c.want {
			t.Errorf("quantile(%v, %v) = %v, want %v", c.v, c.q, got, c.want)
		}
	}
}
