package prefixwl

import (
	"errors"
	"fmt"
	"math"
	"math/rand"
	"sort"
)

// Request is one request of a workload.
type Request struct {
	// Session is the conversation this request continues or starts (what a
	// store keyed by conversation id names it by).
	Session int `json:"session"`
	// Tokens is the prompt followed by the generated answer; all of it is
	// saved after the request.
	Tokens []uint32 `json:"-"`
	// Prompt is the prompt's length: Tokens[:Prompt] is prefilled.
	Prompt int `json:"prompt"`
}

// Params are the knobs of the three workloads; Source says where each
// default comes from (the package doc repeats it).
type Params struct {
	Name  string `json:"name"`
	Vocab int    `json:"vocab"`
	// chat
	SystemPrompts int     `json:"system_prompts,omitempty"`
	SystemMin     int     `json:"system_min,omitempty"`
	SystemMax     int     `json:"system_max,omitempty"`
	Conversations int     `json:"conversations,omitempty"`
	MeanTurns     float64 `json:"mean_turns,omitempty"`
	MaxTurns      int     `json:"max_turns,omitempty"`
	PromptMean    float64 `json:"prompt_mean,omitempty"`
	AnswerMean    float64 `json:"answer_mean,omitempty"`
	LogSigma      float64 `json:"log_sigma,omitempty"`
	MaxContext    int     `json:"max_context,omitempty"`
	// docqa
	Documents    int `json:"documents,omitempty"`
	DocTokens    int `json:"doc_tokens,omitempty"`
	Questions    int `json:"questions_per_doc,omitempty"`
	QuestionMin  int `json:"question_min,omitempty"`
	QuestionMax  int `json:"question_max,omitempty"`
	AnswerTokens int `json:"answer_tokens,omitempty"`
	// agent
	Traces         int `json:"traces,omitempty"`
	AgentSystem    int `json:"agent_system,omitempty"`
	TaskMin        int `json:"task_min,omitempty"`
	TaskMax        int `json:"task_max,omitempty"`
	Levels         int `json:"levels,omitempty"`
	Branches       int `json:"branches,omitempty"`
	InstructionMin int `json:"instruction_min,omitempty"`
	InstructionMax int `json:"instruction_max,omitempty"`
	AnswerMin      int `json:"answer_min,omitempty"`
	AnswerMax      int `json:"answer_max,omitempty"`

	Source string `json:"source"`
}

// Defaults are the three workloads' parameters.
var Defaults = map[string]Params{
	"chat": {Name: "chat", Vocab: 32000, SystemPrompts: 4, SystemMin: 256, SystemMax: 2048,
		Conversations: 400, MeanTurns: 4, MaxTurns: 20, PromptMean: 161, AnswerMean: 338, LogSigma: 1.0, MaxContext: 16384,
		Source: "turns: ShareGPT means 161/338 tokens as reported by the vLLM paper (Kwon et al., SOSP 2023, Fig. 11); " +
			"interleaving: SGLang benchmark/hicache/bench_multiturn.py (random ready queue); " +
			"4 system prompts of 256-2048 tokens with Zipf 1/(k+1) popularity, sigma 1.0, geometric turns (mean 4, max 20), 16K cap: assumptions"},
	"docqa": {Name: "docqa", Vocab: 32000, Documents: 8, DocTokens: 20000, Questions: 4, QuestionMin: 20, QuestionMax: 60, AnswerTokens: 100,
		Source: "LMCache benchmarks/long_doc_qa/long_doc_qa.py: 8 documents of 20000 tokens with an id prefix, 100 output tokens, " +
			"a warm-up round then random repeat order; 4 questions of 20-60 tokens per document: assumptions"},
	"agent": {Name: "agent", Vocab: 32000, Traces: 32, AgentSystem: 2048, TaskMin: 40, TaskMax: 120, Levels: 4, Branches: 2,
		InstructionMin: 20, InstructionMax: 60, AnswerMin: 64, AnswerMax: 256,
		Source: "SGLang benchmark/tree_of_thought_deep/bench_sglang.py: 4 levels, fixed instructions per level, 2 branches, max_tokens 256; " +
			"bench_multiturn.py: history plus answer plus next input; 2048-token agent system prompt, tasks of 40-120 tokens, " +
			"instructions of 20-60, answers uniform 64-256: assumptions"},
}

// Names lists the workloads, sorted.
func Names() []string {
	var n []string
	for k := range Defaults {
		n = append(n, k)
	}
	sort.Strings(n)
	return n
}

// ErrParams is wrapped by parameter errors.
var ErrParams = errors.New("prefixwl: bad parameters")

// Workload is a generated request stream.
type Workload struct {
	Params   Params    `json:"params"`
	Seed     int64     `json:"seed"`
	Sessions int       `json:"sessions"`
	Requests []Request `json:"-"`
}

// Scaled returns p with its number of sessions (conversations, documents or
// traces) multiplied by k (at least 1).
func (p Params) Scaled(k float64) Params {
	sc := func(n int) int {
		if n == 0 {
			return 0
		}
		return max(1, int(math.Round(float64(n)*k)))
	}
	p.Conversations, p.Documents, p.Traces = sc(p.Conversations), sc(p.Documents), sc(p.Traces)
	return p
}

func (p Params) check() error {
	pos := func(what string, v int) error {
		if v <= 0 {
			return fmt.Errorf("%w: %s %s is %d, want > 0", ErrParams, p.Name, what, v)
		}
		return nil
	}
	rng := func(what string, lo, hi int) error {
		if lo <= 0 || hi < lo {
			return fmt.Errorf("%w: %s %s range [%d, %d]", ErrParams, p.Name, what, lo, hi)
		}
		return nil
	}
	if err := pos("vocab", p.Vocab); err != nil {
		return err
	}
	var errs []error
	switch p.Name {
	case "chat":
		errs = append(errs, pos("system prompts", p.SystemPrompts), rng("system prompt", p.SystemMin, p.SystemMax),
			pos("conversations", p.Conversations), pos("max turns", p.MaxTurns), pos("max context", p.MaxContext))
		if p.MeanTurns < 1 || p.PromptMean <= 0 || p.AnswerMean <= 0 || p.LogSigma < 0 {
			errs = append(errs, fmt.Errorf("%w: chat mean turns %.2f (>= 1), prompt/answer means %.1f/%.1f (> 0), sigma %.2f (>= 0)",
				ErrParams, p.MeanTurns, p.PromptMean, p.AnswerMean, p.LogSigma))
		}
		if p.SystemMax+2 > p.MaxContext {
			errs = append(errs, fmt.Errorf("%w: chat system prompts up to %d tokens leave no room under max context %d", ErrParams, p.SystemMax, p.MaxContext))
		}
	case "docqa":
		errs = append(errs, pos("documents", p.Documents), pos("document tokens", p.DocTokens), pos("questions", p.Questions),
			rng("question", p.QuestionMin, p.QuestionMax), pos("answer tokens", p.AnswerTokens))
		if p.Vocab < p.Documents {
			errs = append(errs, fmt.Errorf("%w: docqa needs a distinct id token per document: %d documents, vocab %d", ErrParams, p.Documents, p.Vocab))
		}
	case "agent":
		errs = append(errs, pos("traces", p.Traces), pos("agent system prompt", p.AgentSystem), rng("task", p.TaskMin, p.TaskMax),
			pos("levels", p.Levels), pos("branches", p.Branches), rng("instruction", p.InstructionMin, p.InstructionMax),
			rng("answer", p.AnswerMin, p.AnswerMax))
		if p.Levels > 8 || p.Branches > 8 || math.Pow(float64(p.Branches), float64(p.Levels)) > 4096 {
			errs = append(errs, fmt.Errorf("%w: agent tree of %d levels x %d branches is too large (at most 4096 leaves)", ErrParams, p.Levels, p.Branches))
		}
	default:
		return fmt.Errorf("%w: unknown workload %q (want one of %v)", ErrParams, p.Name, Names())
	}
	return errors.Join(errs...)
}

// Generate draws the workload from seed; the same parameters and seed give
// the same requests, token for token.
func (p Params) Generate(seed int64) (*Workload, error) {
	if err := p.check(); err != nil {
		return nil, err
	}
	g := &gen{p: p, rng: rand.New(rand.NewSource(seed))}
	switch p.Name {
	case "chat":
		g.chat()
	case "docqa":
		g.docqa()
	case "agent":
		g.agent()
	}
	if len(g.out) == 0 {
		return nil, fmt.Errorf("%w: %s produced no requests", ErrParams, p.Name)
	}
	return &Workload{Params: p, Seed: seed, Sessions: g.sessions, Requests: g.out}, nil
}

type gen struct {
	p        Params
	rng      *rand.Rand
	out      []Request
	sessions int
}

// tokens draws n token ids.
func (g *gen) tokens(n int) []uint32 {
	t := make([]uint32, n)
	for i := range t {
		t[i] = uint32(g.rng.Intn(g.p.Vocab))
	}
	return t
}

// cat is a fresh slice holding the parts one after another (no aliasing
// between requests).
func cat(parts ...[]uint32) []uint32 {
	n := 0
	for _, p := range parts {
		n += len(p)
	}
	out := make([]uint32, 0, n)
	for _, p := range parts {
		out = append(out, p...)
	}
	return out
}

func (g *gen) session() int {
	g.sessions++
	return g.sessions - 1
}

func (g *gen) emit(session int, prompt, answer []uint32) []uint32 {
	t := cat(prompt, answer)
	g.out = append(g.out, Request{Session: session, Tokens: t, Prompt: len(prompt)})
	return t
}

func lognormal(rng *rand.Rand, mean, sigma float64) int {
	mu := math.Log(mean) - sigma*sigma/2
	return max(1, int(math.Round(math.Exp(mu+sigma*rng.NormFloat64()))))
}

func logUniform(rng *rand.Rand, lo, hi int) int {
	a, b := math.Log(float64(lo)), math.Log(float64(hi))
	return min(hi, max(lo, int(math.Exp(a+rng.Float64()*(b-a)))))
}

func uniform(rng *rand.Rand, lo, hi int) int { return lo + rng.Intn(hi-lo+1) }

func (g *gen) chat() {
	p := g.p
	systems := make([][]uint32, p.SystemPrompts)
	var weights []float64
	total := 0.0
	for k := range systems {
		systems[k] = g.tokens(logUniform(g.rng, p.SystemMin, p.SystemMax))
		weights = append(weights, 1/float64(k+1))
		total += 1 / float64(k+1)
	}
	type turn struct{ prompt, answer int }
	type conv struct {
		session int
		system  []uint32
		turns   []turn
		next    int
		history []uint32
	}
	convs := make([]*conv, p.Conversations)
	for c := range convs {
		x, k := g.rng.Float64()*total, 0
		for k < len(weights)-1 && x >= weights[k] {
			x -= weights[k]
			k++
		}
		turns := 1
		for turns < p.MaxTurns && g.rng.Float64() > 1/p.MeanTurns {
			turns++
		}
		cv := &conv{session: g.session(), system: systems[k]}
		ctx := len(cv.system)
		for t := 0; t < turns; t++ {
			pr, an := lognormal(g.rng, p.PromptMean, p.LogSigma), lognormal(g.rng, p.AnswerMean, p.LogSigma)
			if ctx+pr+an > p.MaxContext {
				break
			}
			cv.turns = append(cv.turns, turn{pr, an})
			ctx += pr + an
		}
		if len(cv.turns) == 0 { // the first turn alone overflows: keep a one-token turn
			cv.turns = append(cv.turns, turn{1, 1})
		}
		convs[c] = cv
	}
	// Interleave: pop a random ready conversation (bench_multiturn's
	// random ready queue), emit its next turn.
	ready := append([]*conv(nil), convs...)
	for len(ready) > 0 {
		i := g.rng.Intn(len(ready))
		cv := ready[i]
		tr := cv.turns[cv.next]
		base := cv.history
		if cv.next == 0 {
			base = cv.system
		}
		cv.history = g.emit(cv.session, cat(base, g.tokens(tr.prompt)), g.tokens(tr.answer))
		cv.next++
		if cv.next == len(cv.turns) {
			ready[i] = ready[len(ready)-1]
			ready = ready[:len(ready)-1]
		}
	}
}

func (g *gen) docqa() {
	p := g.p
	docs := make([][]uint32, p.Documents)
	ids := g.rng.Perm(p.Vocab)[:p.Documents] // a distinct first token per document
	for d := range docs {
		docs[d] = cat([]uint32{uint32(ids[d])}, g.tokens(p.DocTokens-1))
	}
	type q struct{ doc int }
	var rest []q
	for d := range docs {
		g.emit(g.session(), cat(docs[d], g.tokens(uniform(g.rng, p.QuestionMin, p.QuestionMax))), g.tokens(p.AnswerTokens))
		for k := 1; k < p.Questions; k++ {
			rest = append(rest, q{d})
		}
	}
	g.rng.Shuffle(len(rest), func(i, j int) { rest[i], rest[j] = rest[j], rest[i] })
	for _, x := range rest {
		g.emit(g.session(), cat(docs[x.doc], g.tokens(uniform(g.rng, p.QuestionMin, p.QuestionMax))), g.tokens(p.AnswerTokens))
	}
}

func (g *gen) agent() {
	p := g.p
	system := g.tokens(p.AgentSystem)
	instr := make([][]uint32, p.Levels)
	for l := range instr {
		instr[l] = g.tokens(uniform(g.rng, p.InstructionMin, p.InstructionMax))
	}
	type node struct {
		session int
		saved   []uint32
	}
	for t := 0; t < p.Traces; t++ {
		root := node{session: -1, saved: cat(system, g.tokens(uniform(g.rng, p.TaskMin, p.TaskMax)))}
		level := []node{root}
		for l := 0; l < p.Levels; l++ {
			var next []node
			for _, n := range level {
				prompt := cat(n.saved, instr[l])
				for b := 0; b < p.Branches; b++ {
					s := n.session
					if b > 0 || s < 0 {
						s = g.session()
					}
					saved := g.emit(s, prompt, g.tokens(uniform(g.rng, p.AnswerMin, p.AnswerMax)))
					next = append(next, node{session: s, saved: saved})
				}
			}
			level = next
		}
	}
}
