package compare

import (
	"fmt"
	"math"
	"math/rand"
)

// Request is one step of a workload on one context: restore its first
// Restore tokens (0: nothing to restore), then save tokens [From, To).
type Request struct {
	Ctx      string
	Restore  int
	From, To int
}

// Phase is a set of streams; each stream's requests run in order, streams
// run concurrently up to the concurrency, and a phase ends before the next
// starts.
type Phase struct {
	Name    string
	Streams [][]Request
}

// Workload is a seeded trace and the parameters it was drawn from.
type Workload struct {
	Name   string
	Seed   int64
	Phases []Phase
	Params []string // what was drawn and from which published figures
}

// ShareGPT-shaped chat. Published figures:
//   - turns per conversation: mean 3.51 (ShareGPT, 94,145 conversations,
//     330,239 turns: Yan et al., "ShareChat", arXiv 2512.17843, Table 1);
//   - prompt and answer lengths: means 161.31 and 337.99 tokens (ShareGPT:
//     Kwon et al., "Efficient Memory Management for Large Language Model
//     Serving with PagedAttention", SOSP 2023, Sec. 6.1).
//
// The shapes are ours: turns 1 + geometric (mean 3.51, at most ChatMaxTurns),
// lengths lognormal with those means and sigma ChatSigma, clipped to
// [ChatMinLen, ChatMaxLen].
const (
	ChatMeanTurns  = 3.51
	ChatMeanPrompt = 161.31
	ChatMeanAnswer = 337.99
	ChatSigma      = 1.0
	ChatMaxTurns   = 16
	ChatMinLen     = 4
	ChatMaxLen     = 2048
)

// L-Eval-shaped long documents: L-Eval (An et al., ACL 2024) has 508 long
// documents and over 2,000 questions (about 4 per document), 3K-200K
// tokens; here lengths are drawn uniformly from [minTok, maxTok] (4K-16K by
// default) and every question restores the whole document.
const LEvalQuestionsPerDoc = 4

func lognormal(rng *rand.Rand, mean, sigma float64, lo, hi int) int {
	mu := math.Log(mean) - sigma*sigma/2
	v := int(math.Round(math.Exp(mu + sigma*rng.NormFloat64())))
	return min(max(v, lo), hi)
}

// Chat draws conversations; each turn restores the context so far, then saves
// the turn's prompt and answer. A conversation ends at its drawn turn count
// or before its context would pass maxContext.
func Chat(seed int64, conversations, maxContext int) *Workload {
	rng := rand.New(rand.NewSource(seed))
	w := &Workload{Name: "chat", Seed: seed, Params: []string{
		fmt.Sprintf("ShareGPT-shaped chat, seed %d: %d conversations, context at most %d tokens", seed, conversations, maxContext),
		fmt.Sprintf("turns: 1 + geometric, mean %.2f, at most %d (ShareGPT mean 3.51: Yan et al., ShareChat, arXiv 2512.17843, Table 1)", ChatMeanTurns, ChatMaxTurns),
		fmt.Sprintf("prompt tokens: lognormal mean %.2f, answer tokens: lognormal mean %.2f, sigma %.1f, clipped to [%d, %d] (ShareGPT means: Kwon et al., vLLM/PagedAttention, SOSP 2023, Sec. 6.1; sigma is ours)",
			ChatMeanPrompt, ChatMeanAnswer, ChatSigma, ChatMinLen, ChatMaxLen),
		"every turn restores the whole context so far, then saves the turn's prompt and answer",
	}}
	ph := Phase{Name: "conversations"}
	for c := 0; c < conversations; c++ {
		turns := 1
		for turns < ChatMaxTurns && rng.Float64() > 1/ChatMeanTurns {
			turns++
		}
		id := fmt.Sprintf("conv-%04d", c)
		var s []Request
		ctx := 0
		for t := 0; t < turns; t++ {
			n := lognormal(rng, ChatMeanPrompt, ChatSigma, ChatMinLen, ChatMaxLen) + lognormal(rng, ChatMeanAnswer, ChatSigma, ChatMinLen, ChatMaxLen)
			if ctx+n > maxContext {
				break
			}
			s = append(s, Request{Ctx: id, Restore: ctx, From: ctx, To: ctx + n})
			ctx += n
		}
		if len(s) > 0 {
			ph.Streams = append(ph.Streams, s)
		}
	}
	w.Phases = []Phase{ph}
	return w
}

// Long draws documents: each is saved once (prefill), then every question
// restores the whole document (the questions and answers are not kept).
func Long(seed int64, docs, questions, minTok, maxTok int) *Workload {
	rng := rand.New(rand.NewSource(seed))
	w := &Workload{Name: "long", Seed: seed, Params: []string{
		fmt.Sprintf("L-Eval-shaped long documents, seed %d: %d documents of uniform [%d, %d] tokens, %d questions each", seed, docs, minTok, maxTok, questions),
		"L-Eval (An et al., ACL 2024): 508 documents, over 2,000 questions (about 4 per document), 3K-200K tokens",
		"each document is saved once; every question restores the whole document",
	}}
	ingest := Phase{Name: "ingest"}
	ask := Phase{Name: PhaseQuestions}
	for d := 0; d < docs; d++ {
		n := minTok + rng.Intn(maxTok-minTok+1)
		id := fmt.Sprintf("doc-%04d", d)
		ingest.Streams = append(ingest.Streams, []Request{{Ctx: id, From: 0, To: n}})
		for q := 0; q < questions; q++ {
			ask.Streams = append(ask.Streams, []Request{{Ctx: id, Restore: n}})
		}
	}
	// Questions arrive interleaved across documents.
	rng.Shuffle(len(ask.Streams), func(i, j int) { ask.Streams[i], ask.Streams[j] = ask.Streams[j], ask.Streams[i] })
	// The same questions again while as many new documents are saved
	// (one save among every `questions` questions): restores with saves in
	// the mix, against the phase before, where they ran alone.
	mixed := Phase{Name: PhaseMixed}
	qs := append([][]Request(nil), ask.Streams...)
	rng.Shuffle(len(qs), func(i, j int) { qs[i], qs[j] = qs[j], qs[i] })
	for d := 0; d < docs; d++ {
		n := minTok + rng.Intn(maxTok-minTok+1)
		mixed.Streams = append(mixed.Streams, []Request{{Ctx: fmt.Sprintf("new-%04d", d), From: 0, To: n}})
		mixed.Streams = append(mixed.Streams, qs[d*questions:(d+1)*questions]...)
	}
	// And once more alone, with the restore buffers as warm as in the
	// mixed phase, so that the two differ only in the saves.
	again := Phase{Name: PhaseAgain, Streams: append([][]Request(nil), ask.Streams...)}
	rng.Shuffle(len(again.Streams), func(i, j int) { again.Streams[i], again.Streams[j] = again.Streams[j], again.Streams[i] })
	w.Params = append(w.Params, fmt.Sprintf("then the same %d questions again while %d new documents are saved, one save among every %d questions (restores with saves in the mix), then the questions once more alone (restores alone, buffers as warm as with saves)", docs*questions, docs, questions))
	w.Phases = []Phase{ingest, ask, mixed, again}
	return w
}

// Phase names the report keeps apart: restores alone and with saves.
const (
	PhaseQuestions = "questions"
	PhaseMixed     = "questions with saves"
	PhaseAgain     = "questions again"
)

// Contexts returns each context's final token count.
func (w *Workload) Contexts() map[string]int {
	m := map[string]int{}
	for _, ph := range w.Phases {
		for _, s := range ph.Streams {
			for _, r := range s {
				m[r.Ctx] = max(m[r.Ctx], r.To)
			}
		}
	}
	return m
}
