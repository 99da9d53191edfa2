package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"

	"github.com/hcache/hcache/chunk"
	hc "github.com/hcache/hcache/clients/hcacheclient"
	"github.com/hcache/hcache/model"
	hcachev1 "github.com/hcache/hcache/proto/hcache/v1"
	"github.com/hcache/hcache/serve"
	"github.com/hcache/hcache/serve/sched"
	"github.com/hcache/hcache/state"
)

// Commands on state addressed by its tokens (issue 19): lookup and fork,
// through hcached (--addr) or on a store directory (--dir).

func init() {
	register("lookup", "how many leading tokens of a prompt have stored state (--addr, or --dir read-only)", lookupCmd)
	register("fork", "start a context from the first tokens of another; shared groups are not copied (--addr or --dir)", forkCmd)
	examples["lookup"] = "hcache lookup --dir /var/lib/hcache --namespace chat --model tiny-llama --plan hidden --prompt-tokens 1,2,3   # or --tokens FILE, --like ID, --addr ADDR"
	examples["fork"] = "hcache fork --addr unix:///run/hcache/hcache.sock --ns chat --id conv-1 --to conv-1b --tokens 512"
}

// identityFlags say under which identity a lookup asks: that of a stored
// context (--like), or one built from a model and a plan as serve.Identity
// builds it (--model, --plan, --seed for a preset's synthetic weights).
type identityFlags struct {
	like, model, plan string
	seed              int64
}

func (f *identityFlags) resolve(like func(id string) (*state.Identity, error)) (*state.Identity, error) {
	switch {
	case f.like != "" && f.model != "":
		return nil, fmt.Errorf("give only one of --like and --model")
	case f.like != "":
		return like(f.like)
	case f.model == "":
		return nil, fmt.Errorf("missing --like ID (the identity of a stored context) or --model NAME|DIR with --plan")
	}
	c, err := resolveConfig(f.model)
	if err != nil {
		return nil, fmt.Errorf("--model: %w", err)
	}
	var w *model.Weights
	if _, perr := model.Preset(f.model); perr == nil {
		w = model.Synthesize(c, f.seed)
	} else if w, err = model.LoadWeights(f.model, c, model.WeightsKV); err != nil {
		return nil, fmt.Errorf("--model %s: %w", f.model, err)
	}
	var kind state.LayerKind
	switch f.plan {
	case "hidden":
		kind = state.LayerHidden
	case "kv":
		kind = state.LayerKV
	default:
		return nil, fmt.Errorf("--plan %q: want hidden or kv", f.plan)
	}
	if kind == state.LayerHidden && !sched.HiddenAllowed(c) {
		return nil, fmt.Errorf("--plan hidden: %s cannot store hidden states (grouped-query attention); use --plan kv", f.model)
	}
	return serve.Identity(c, w, sched.PlanOf(c, kind)), nil
}

// parseTokens reads token ids: comma- or space-separated integers, or a
// JSON array.
func parseTokens(what, s string) ([]uint32, error) {
	s = strings.TrimSpace(s)
	if strings.HasPrefix(s, "[") {
		var ids []uint32
		if err := json.Unmarshal([]byte(s), &ids); err != nil {
			return nil, fmt.Errorf("%s: not a JSON array of token ids (0..%d): %v", what, uint32(1<<32-1), err)
		}
		return ids, nil
	}
	fields := strings.FieldsFunc(s, func(r rune) bool { return r == ',' || r == ' ' || r == '\n' || r == '\t' || r == '\r' })
	ids := make([]uint32, 0, len(fields))
	for i, f := range fields {
		v, err := strconv.ParseUint(f, 10, 32)
		if err != nil {
			return nil, fmt.Errorf("%s: token %d is %q, not an id in 0..%d", what, i, f, uint32(1<<32-1))
		}
		ids = append(ids, uint32(v))
	}
	return ids, nil
}

type lookupRow struct {
	Namespace   string `json:"namespace"`
	ID          string `json:"id,omitempty"`
	Tokens      int    `json:"tokens"`
	Stored      uint64 `json:"stored_tokens"`
	ChunkTokens int    `json:"chunk_tokens"`
}

func lookupCmd(args []string, stdout, stderr io.Writer) error {
	fs := newTargetFlags("lookup", stderr)
	var ns, id, tokFile, prompt, salt string
	fs.StringVar(&ns, "namespace", "", "namespace (required; --ns is the same)")
	fs.StringVar(&ns, "ns", "", "namespace (same as --namespace)")
	fs.StringVar(&id, "id", "", "optional: a context created with tokens whose own partial tail counts too")
	fs.StringVar(&tokFile, "tokens", "", "file of the prompt's token ids (comma/space separated, or a JSON array; - for stdin)")
	fs.StringVar(&prompt, "prompt-tokens", "", "the prompt's token ids, comma separated (instead of --tokens)")
	fs.StringVar(&salt, "salt", "", "the salt the state was saved under (vLLM's cache_salt)")
	var idf identityFlags
	fs.StringVar(&idf.like, "like", "", "ask under the identity of this stored context of the namespace")
	fs.StringVar(&idf.model, "model", "", "ask under the identity of this model (preset name or model directory) and --plan")
	fs.StringVar(&idf.plan, "plan", "hidden", "with --model: hidden or kv (every layer)")
	fs.Int64Var(&idf.seed, "seed", 1, "with --model PRESET: the seed of its synthetic weights")
	t, err := fs.parse(args)
	if err != nil {
		return err
	}
	switch {
	case ns == "":
		return fs.usage("--namespace is required")
	case (tokFile == "") == (prompt == ""):
		return fs.usage("give one of --tokens FILE and --prompt-tokens 1,2,3")
	}
	var tokens []uint32
	if prompt != "" {
		tokens, err = parseTokens("--prompt-tokens", prompt)
	} else {
		var b []byte
		if tokFile == "-" {
			b, err = io.ReadAll(os.Stdin)
		} else {
			b, err = os.ReadFile(tokFile)
		}
		if err == nil {
			tokens, err = parseTokens("--tokens "+tokFile, string(b))
		}
	}
	if err != nil {
		return err
	}
	if len(tokens) == 0 {
		return fmt.Errorf("no token ids given")
	}
	row := lookupRow{Namespace: ns, ID: id, Tokens: len(tokens)}
	err = t.do(stderr, true, func(ctx context.Context, c *hc.Client) error {
		ident, err := idf.resolve(func(like string) (*state.Identity, error) {
			ci, err := c.Stat(ctx, ns, like)
			if err != nil {
				return nil, fmt.Errorf("--like %s: %w", like, err)
			}
			return identityOf(ci.GetIdentity()), nil
		})
		if err != nil {
			return err
		}
		row.Stored, row.ChunkTokens, err = c.Lookup(ctx, hc.Prefix{Namespace: ns, Identity: *ident, Tokens: tokens, Salt: []byte(salt), ID: id})
		return err
	}, func(st *chunk.Store) error {
		ident, err := idf.resolve(func(like string) (*state.Identity, error) {
			ci, err := st.Context(ns, like)
			if err != nil {
				return nil, fmt.Errorf("--like %s: %w", like, err)
			}
			return ci.Identity, nil
		})
		if err != nil {
			return err
		}
		n, err := st.Lookup(chunk.Prefix{Namespace: ns, Salt: []byte(salt), Identity: ident, Tokens: tokens, Context: id})
		row.Stored, row.ChunkTokens = uint64(n), st.ChunkTokens()
		return err
	})
	if err != nil {
		return err
	}
	if t.asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(row)
	}
	fmt.Fprintf(stdout, "%d of %d tokens stored in %s (chunk groups of %d tokens", row.Stored, row.Tokens, ns, row.ChunkTokens)
	if id != "" {
		fmt.Fprintf(stdout, ", plus %s's own tail", id)
	}
	fmt.Fprintln(stdout, ")")
	return nil
}

func forkCmd(args []string, stdout, stderr io.Writer) error {
	fs := newTargetFlags("fork", stderr).forContext()
	dst := fs.String("to", "", "the new context's id (required; in the same namespace)")
	n := fs.Uint64("tokens", 0, "how many leading tokens of --id the new context holds (required)")
	t, err := fs.parse(args)
	if err != nil {
		return err
	}
	if *dst == "" || *n == 0 {
		return fs.usage("--to and --tokens are required")
	}
	err = t.do(stderr, false, func(ctx context.Context, c *hc.Client) error {
		return c.Fork(ctx, t.ns, t.id, *dst, *n)
	}, func(st *chunk.Store) error {
		return st.Fork(t.ns, t.id, *dst, int(*n))
	})
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "forked %s/%s at %d tokens into %s\n", t.ns, t.id, *n, *dst)
	return nil
}

// identityOf is a context's identity as the daemon describes it.
func identityOf(p *hcachev1.Identity) *state.Identity {
	id := &state.Identity{Model: p.GetModel(), Plan: make([]state.LayerPlan, len(p.GetPlan())), Codec: state.Codec(p.GetCodec())}
	for i, l := range p.GetPlan() {
		id.Plan[i] = state.LayerPlan{Kind: state.LayerKind(l.GetKind()), RowBytes: l.GetRowBytes()}
	}
	return id
}
