package sched

import (
	"fmt"
	"math"
	"math/rand"
)

// Request is one restore of a workload: a context of Context tokens is
// restored, then Prompt new tokens are prefilled on top of it (the time to
// first token covers both).
type Request struct {
	Context int `json:"context"`
	Prompt  int `json:"prompt"`
}

// WorkloadParams are the knobs of a synthetic workload, with the source of
// each default written beside it (the package doc repeats them).
type WorkloadParams struct {
	Name string `json:"name"`
	// chat (ShareGPT-like multi-turn conversations)
	Conversations int     `json:"conversations,omitempty"`
	MeanTurns     float64 `json:"mean_turns,omitempty"`
	MaxTurns      int     `json:"max_turns,omitempty"`
	PromptMean    float64 `json:"prompt_mean,omitempty"`
	AnswerMean    float64 `json:"answer_mean,omitempty"`
	LogSigma      float64 `json:"log_sigma,omitempty"`
	// long (L-Eval-like long documents with several questions each)
	Documents    int `json:"documents,omitempty"`
	DocMin       int `json:"doc_min,omitempty"`
	DocMax       int `json:"doc_max,omitempty"`
	QuestionsMin int `json:"questions_min,omitempty"`
	QuestionsMax int `json:"questions_max,omitempty"`
	QuestionMin  int `json:"question_min,omitempty"`
	QuestionMax  int `json:"question_max,omitempty"`
	AnswerMin    int `json:"answer_min,omitempty"`
	AnswerMax    int `json:"answer_max,omitempty"`
	// MaxContext ends a conversation (or caps a document) at this length.
	MaxContext int `json:"max_context"`
	// Source says where each parameter comes from.
	Source string `json:"source"`
}

// Workloads are the built-in workload shapes.
var Workloads = map[string]WorkloadParams{
	// ShareGPT-like chat. Prompt and answer lengths are log-normal with
	// the means reported for ShareGPT by the vLLM paper (Kwon et al.,
	// SOSP 2023, Fig. 11: about 161 input and 338 output tokens); the
	// spread (sigma of the log 1.0), the geometric number of turns (mean
	// 4, at most 20) and the 16K cap are assumptions, not measurements.
	"chat": {Name: "chat", Conversations: 400, MeanTurns: 4, MaxTurns: 20, PromptMean: 161, AnswerMean: 338, LogSigma: 1.0, MaxContext: 16384,
		Source: "prompt/answer means 161/338 tokens: ShareGPT as reported by the vLLM paper (Kwon et al., SOSP 2023, Fig. 11); log-normal sigma 1.0, geometric turns with mean 4 (max 20) and the 16K cap: assumptions"},
	// L-Eval-like long documents: lengths log-uniform in 4K-16K tokens
	// (the range issue 12 takes from L-Eval; An et al., 2023), 3-6
	// questions per document of 20-60 tokens, answers of 50-200 tokens
	// (assumptions). The first question's prefill saves the document;
	// every later question restores document plus earlier turns.
	"long": {Name: "long", Documents: 120, DocMin: 4096, DocMax: 16384, QuestionsMin: 3, QuestionsMax: 6, QuestionMin: 20, QuestionMax: 60, AnswerMin: 50, AnswerMax: 200, MaxContext: 20480,
		Source: "documents log-uniform in 4K-16K tokens: the L-Eval range issue 12 takes (An et al., 2023); 3-6 questions of 20-60 tokens, answers of 50-200: assumptions"},
}

// lognormal draws a positive length with the given mean.
func lognormal(rng *rand.Rand, mean, sigma float64) int {
	mu := math.Log(mean) - sigma*sigma/2
	return max(1, int(math.Round(math.Exp(mu+sigma*rng.NormFloat64()))))
}

// Generate draws the workload's restores (seeded).
func (p WorkloadParams) Generate(seed int64) ([]Request, error) {
	rng := rand.New(rand.NewSource(seed))
	var out []Request
	switch p.Name {
	case "chat":
		for c := 0; c < p.Conversations; c++ {
			turns := 1
			for turns < p.MaxTurns && rng.Float64() > 1/p.MeanTurns {
				turns++
			}
			ctx := 0
			for t := 0; t < turns; t++ {
				prompt := lognormal(rng, p.PromptMean, p.LogSigma)
				answer := lognormal(rng, p.AnswerMean, p.LogSigma)
				if ctx+prompt+answer > p.MaxContext {
					break
				}
				if t > 0 {
					out = append(out, Request{Context: ctx, Prompt: prompt})
				}
				ctx += prompt + answer
			}
		}
	case "long":
		for d := 0; d < p.Documents; d++ {
			lo, hi := math.Log(float64(p.DocMin)), math.Log(float64(p.DocMax))
			ctx := int(math.Exp(lo + rng.Float64()*(hi-lo)))
			qs := p.QuestionsMin + rng.Intn(p.QuestionsMax-p.QuestionsMin+1)
			for q := 0; q < qs; q++ {
				question := p.QuestionMin + rng.Intn(p.QuestionMax-p.QuestionMin+1)
				answer := p.AnswerMin + rng.Intn(p.AnswerMax-p.AnswerMin+1)
				if ctx+question+answer > p.MaxContext {
					break
				}
				if q > 0 {
					out = append(out, Request{Context: ctx, Prompt: question})
				}
				ctx += question + answer
			}
		}
	default:
		return nil, fmt.Errorf("sched: unknown workload %q (chat or long)", p.Name)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("sched: workload %s produced no restores", p.Name)
	}
	return out, nil
}
