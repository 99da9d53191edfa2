package crash

import (
	"errors"
	"fmt"

	"github.com/hcache/hcache/chunk"
	"github.com/hcache/hcache/internal/rows"
)

// Identity is the plan the harness stores: a hidden layer, a KV layer, a
// layer stored as nothing, and another hidden layer.
func Identity() *chunk.Identity {
	return &chunk.Identity{Model: []byte("hcache crash harness model"), Plan: []chunk.LayerPlan{
		{Kind: chunk.LayerHidden, RowBytes: 64}, {Kind: chunk.LayerKV, RowBytes: 128},
		{Kind: chunk.LayerNone}, {Kind: chunk.LayerHidden, RowBytes: 64},
	}}
}

// Row is the deterministic content of (context, layer, token): any byte
// served from another context, layer, position or incarnation differs.
func Row(ctx string, layer, token, n int) []byte { return rows.Row(ctx, layer, token, n) }

// TokenRows returns rows of one token for every layer (nil where none).
func TokenRows(ident *chunk.Identity, ctx string, token int) [][]byte {
	rows := make([][]byte, len(ident.Plan))
	for l, p := range ident.Plan {
		if p.Kind != chunk.LayerNone {
			rows[l] = Row(ctx, l, token, int(p.RowBytes))
		}
	}
	return rows
}

// LayerRows returns the rows of tokens [from, to) of one layer.
func LayerRows(ident *chunk.Identity, ctx string, layer, from, to int) []byte {
	var out []byte
	for t := from; t < to; t++ {
		out = append(out, Row(ctx, layer, t, int(ident.Plan[layer].RowBytes))...)
	}
	return out
}

// Verdict is what checking one context found.
type Verdict int

// Verdicts.
const (
	OK       Verdict = iota
	Lost             // an acknowledged state is missing or shorter
	Torn             // bytes that are not a valid prefix were served
	Damaged          // the store refused it as corrupt
	BadError         // another error
)

// Expect is what a context may look like after a crash.
type Expect struct {
	MustExist bool // creation acknowledged and no delete started since
	MayExist  bool
	MinTokens int // acknowledged tokens
	MaxTokens int // appended tokens
}

// CheckContext restores one context and judges it.
func CheckContext(st *chunk.Store, ns, id string, ident *chunk.Identity, e Expect) (Verdict, string) {
	torn := ""
	n, err := st.Restore(ns, id, ident, func(layer int, rows []byte) error {
		t := len(rows) / int(ident.Plan[layer].RowBytes)
		if string(rows) != string(LayerRows(ident, id, layer, 0, t)) {
			torn = fmt.Sprintf("layer %d: %d tokens not what was appended", layer, t)
			return errTorn
		}
		return nil
	})
	switch {
	case errors.Is(err, chunk.ErrNotFound):
		if e.MustExist {
			return Lost, fmt.Sprintf("%s: acknowledged with %d tokens, not found", id, e.MinTokens)
		}
		return OK, ""
	case errors.Is(err, errTorn):
		return Torn, id + ": " + torn
	case errors.Is(err, chunk.ErrCorrupt) || errors.Is(err, chunk.ErrDamaged):
		return Damaged, fmt.Sprintf("%s: %v", id, err)
	case err != nil:
		return BadError, fmt.Sprintf("%s: %v", id, err)
	}
	if !e.MustExist && !e.MayExist {
		return Torn, fmt.Sprintf("%s: deleted, yet restored %d tokens", id, n)
	}
	if n < e.MinTokens {
		return Lost, fmt.Sprintf("%s: restored %d tokens, %d acknowledged", id, n, e.MinTokens)
	}
	if n > e.MaxTokens {
		return Torn, fmt.Sprintf("%s: restored %d tokens, only %d appended", id, n, e.MaxTokens)
	}
	return OK, ""
}

var errTorn = errors.New("torn")

// Report sums a harness run; the JSON field names are those of
// `hcache crashtest --json`.
type Report struct {
	Seed          int64 `json:"seed"`
	Cycles        int   `json:"cycles"`
	CrashPoints   int   `json:"crash_points"`
	KillCycles    int   `json:"kill_cycles"`
	AckedContexts int   `json:"acked_contexts"`
	LostAcked     int   `json:"lost_acked"`
	TornServed    int   `json:"torn_served"`
	FsckErrors    int   `json:"fsck_errors"`
	LiveRecounted int   `json:"live_recounted"` // stored segment live counts corrected on open (not data loss)
	RepairChecks  int   `json:"repair_checks"`  // crash points also checked after deleting the index and repairing
	// Mismatches counts cycles whose configurations ended with different
	// restored states (Metamorphic).
	Mismatches int `json:"metamorphic_mismatches,omitempty"`
	// With SimOptions.Prefix: token-addressed contexts created (saved by
	// tokens or forked), forks among them, and tokens a save by tokens
	// found stored already (shared prefixes referenced, not written).
	TokContexts  int `json:"tok_contexts,omitempty"`
	Forks        int `json:"forks,omitempty"`
	TokensShared int `json:"tokens_shared,omitempty"`
	// With SimOptions.Adversarial: the adversarial operations run (those
	// that found nothing to act on not counted).
	AdversarialOps int `json:"adversarial_ops,omitempty"`
	// Trace is a digest of the simulated run: every crash point (where,
	// operation, share of unsynced data kept) and what it found. The same
	// seed and options give the same trace.
	Trace    string   `json:"trace,omitempty"`
	Failures []string `json:"failures,omitempty"`

	finals [][]string // per simulated cycle: what the closed store restores (finalState)
}

// OK reports whether nothing was lost, torn or inconsistent.
func (r *Report) OK() bool {
	return r.LostAcked == 0 && r.TornServed == 0 && r.FsckErrors == 0 && r.Mismatches == 0
}

const maxFailuresKept = 20

func (r *Report) fail(format string, args ...any) {
	if len(r.Failures) < maxFailuresKept {
		r.Failures = append(r.Failures, fmt.Sprintf(format, args...))
	}
}

// tally counts a verdict.
func (r *Report) tally(v Verdict, msg, where string) {
	switch v {
	case OK:
		return
	case Lost:
		r.LostAcked++
	case Torn:
		r.TornServed++
	default:
		r.FsckErrors++
	}
	r.fail("%s: %s", where, msg)
}
