// Package demo runs hcache end to end on the CPU: a multi-turn conversation
// with a (synthetic or Hugging Face-style) model, whose per-layer states are
// saved to an embedded store, evicted after every turn, and restored three
// four ways: under the bubble-free scheduler's plan for this model (a
// recomputed prefix of layers, then hidden states and/or KV, overlapped),
// hidden-state projection of every layer, KV load of every layer, and full
// recomputation. Every restored KV cache is compared bit for bit with one
// that was never evicted, and the conversation continues from the
// scheduled restore.
package demo

import (
	"errors"
	"fmt"
	"io"
	"math"
	"math/rand"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/hcache/hcache/chunk"
	"github.com/hcache/hcache/gpu"
	"github.com/hcache/hcache/model"
	"github.com/hcache/hcache/profiles"
	"github.com/hcache/hcache/serve"
	"github.com/hcache/hcache/serve/sched"
)

// Options of a demo run.
type Options struct {
	Model     string // preset name or model directory
	Dir       string // store directory; a temporary one when empty
	Turns     int
	Prompt    int // user tokens per turn
	Gen       int // generated tokens per turn
	Seed      int64
	MaxParams int64 // refuse larger synthetic presets (CPU reference speed)
	// Compression of the store ("none" or "lz4"); with lz4 the demo
	// reports the ratio lz4 reached on this model's states.
	Compression string
	// Profile is the platform profile the scheduler plans with (a shipped
	// name or a path); default a100-pm9a3x4.
	Profile string
	Out     io.Writer
}

// Turn is one turn's figures.
type Turn struct {
	Turn         int     `json:"turn"`
	Tokens       int     `json:"tokens"`
	ScheduledMS  float64 `json:"scheduled_restore_ms"`
	HiddenMS     float64 `json:"hidden_restore_ms"`
	KVMS         float64 `json:"kv_restore_ms"`
	RecomputeMS  float64 `json:"recompute_ms"`
	SchedBytes   int64   `json:"scheduled_bytes_stored"`
	HiddenBytes  int64   `json:"hidden_bytes_stored"`
	KVBytes      int64   `json:"kv_bytes_stored"`
	Lossless     bool    `json:"lossless"`
	TokensAgreed bool    `json:"tokens_agree"`
}

// ErrLossy is returned when a restored cache or a generated token differs.
var ErrLossy = errors.New("demo: a restored KV cache differs from the one never evicted")

// Run runs the demo and returns its turns.
func Run(o Options) ([]Turn, error) {
	if o.Turns <= 0 || o.Prompt <= 0 || o.Gen <= 0 {
		return nil, fmt.Errorf("demo: turns, prompt and gen must be positive")
	}
	if o.MaxParams == 0 {
		o.MaxParams = 50_000_000
	}
	// Check what can be checked before anything is written.
	switch o.Compression {
	case "", "none", "lz4":
	default:
		return nil, fmt.Errorf("demo: --compression %q: want none or lz4", o.Compression)
	}
	if _, err := model.Preset(o.Model); err != nil {
		if fi, serr := os.Stat(o.Model); serr != nil || !fi.IsDir() {
			return nil, fmt.Errorf("demo: --model %q is neither a preset (%s) nor a model directory (config.json + safetensors)", o.Model, strings.Join(model.PresetNames(), ", "))
		}
	}
	if o.Profile == "" {
		o.Profile = "a100-pm9a3x4"
	}
	if _, err := profiles.Load(o.Profile); err != nil {
		return nil, err
	}
	tmp, err := os.MkdirTemp("", "hcache-demo-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(tmp)
	mdir := o.Model
	if c, err := model.Preset(o.Model); err == nil {
		if n := c.ParamCount(); n > o.MaxParams {
			return nil, fmt.Errorf("demo: preset %s has %d parameters; the CPU reference forward pass is meant for small models (raise --max-params to try)", o.Model, n)
		}
		mdir = filepath.Join(tmp, "model")
		if err := model.WriteModel(mdir, c, model.Synthesize(c, o.Seed)); err != nil {
			return nil, err
		}
		fmt.Fprintf(o.Out, "synthetic %s (seed %d) written to %s\n", o.Model, o.Seed, mdir)
	}
	// The same loading code a real model goes through.
	c, err := model.LoadConfig(mdir)
	if err != nil {
		return nil, err
	}
	w, err := model.LoadWeights(mdir, c, model.WeightsAll)
	if err != nil {
		return nil, err
	}
	m, err := model.New(c, w)
	if err != nil {
		return nil, err
	}
	kvw, err := model.LoadWeights(mdir, c, model.WeightsKV)
	if err != nil {
		return nil, err
	}
	backend, err := gpu.NewCPU(c, kvw)
	if err != nil {
		return nil, err
	}
	if err := backend.LoadRecompute(w, c.Layers); err != nil {
		return nil, err
	}
	sdir := o.Dir
	if sdir == "" {
		sdir = filepath.Join(tmp, "store")
	}
	st, err := chunk.Open(chunk.Options{Dir: sdir, ChunkTokens: 64, SegmentBytes: 64 << 20, CacheBytes: 0, Compression: o.Compression, Logf: func(string, ...any) {}})
	if err != nil {
		return nil, err
	}
	defer st.Close()
	fmt.Fprintf(o.Out, "model %s: %d layers, hidden %d, %d/%d heads, %s; store %s (%s engine)\n",
		c.Arch, c.Layers, c.HiddenSize, c.Heads, c.KVHeads, c.DType, sdir, st.EngineName())

	planH, planKV := sched.PlanOf(c, chunk.LayerHidden), sched.PlanOf(c, chunk.LayerKV)
	identH, identKV := serve.Identity(c, w, planH), serve.Identity(c, w, planKV)
	// The scheduler's plan, fixed before the context is first saved, for
	// the length the conversation is expected to reach.
	if o.Profile == "" {
		o.Profile = "a100-pm9a3x4"
	}
	prof, err := profiles.Load(o.Profile)
	if err != nil {
		return nil, err
	}
	platform, err := sched.NewPlatform(prof, "")
	if err != nil {
		return nil, err
	}
	decision, err := platform.Choose(c, o.Turns*(o.Prompt+o.Gen))
	if err != nil {
		return nil, err
	}
	planS := decision.Plan
	identS := serve.Identity(c, w, planS)
	restorer := serve.NewRestorer(st, backend, serve.Settings{})
	fmt.Fprintf(o.Out, "scheduler plan on %s (%s) for %d tokens: %v (predicted restore %.3f ms there)\n",
		prof.Name, platform.Tier.Name, o.Turns*(o.Prompt+o.Gen), decision.Split, decision.PredictedMS)
	const ns = "demo"
	rng := rand.New(rand.NewSource(o.Seed))
	ref := model.NewKVCache(c)  // never evicted
	live := model.NewKVCache(c) // evicted and restored every turn
	var history []int           // every token fed so far
	var last []int              // last generated token, not yet fed
	var turns []Turn
	fmt.Fprintf(o.Out, "%-5s %7s %12s %12s %12s %14s %12s %14s %12s %s\n", "turn", "tokens", "sched_ms", "hidden_ms", "kv_load_ms", "recompute_ms", "sched_bytes", "hidden_bytes", "kv_bytes", "lossless")
	for t := 0; t < o.Turns; t++ {
		input := append([]int(nil), last...)
		for i := 0; i < o.Prompt; i++ {
			input = append(input, rng.Intn(c.Vocab))
		}
		var wh, wk, ws *chunk.Writer
		if t == 0 {
			wh, err = st.Create(ns, "conversation-hidden", identH, chunk.CreateOptions{})
			if err == nil {
				wk, err = st.Create(ns, "conversation-kv", identKV, chunk.CreateOptions{})
			}
			if err == nil {
				ws, err = st.Create(ns, "conversation-scheduled", identS, chunk.CreateOptions{})
			}
		} else {
			wh, err = st.Append(ns, "conversation-hidden", identH)
			if err == nil {
				wk, err = st.Append(ns, "conversation-kv", identKV)
			}
			if err == nil {
				ws, err = st.Append(ns, "conversation-scheduled", identS)
			}
		}
		if err != nil {
			return turns, err
		}
		sh, sk, ss := serve.NewSaver(c, planH, wh), serve.NewSaver(c, planKV, wk), serve.NewSaver(c, planS, ws)
		both := func(l int, h, k, v []float32) { sh.Trace(l, h, k, v); sk.Trace(l, h, k, v); ss.Trace(l, h, k, v) }
		got, err := m.Generate(live, input, o.Gen, both)
		if err != nil {
			return turns, err
		}
		if sh.Err() != nil || sk.Err() != nil || ss.Err() != nil {
			return turns, errors.Join(sh.Err(), sk.Err(), ss.Err())
		}
		want, err := m.Generate(ref, input, o.Gen, nil)
		if err != nil {
			return turns, err
		}
		if err := errors.Join(wh.Close(), wk.Close(), ws.Close()); err != nil {
			return turns, err
		}
		history = append(history, input...)
		history = append(history, got[:len(got)-1]...)
		last = got[len(got)-1:]
		tokens := live.Tokens
		live = nil // evicted

		tr := Turn{Turn: t + 1, Tokens: tokens, TokensAgreed: fmt.Sprint(got) == fmt.Sprint(want)}
		scheduled, ms, err := restoreWith(restorer, ns, "conversation-scheduled", identS, c, history, tokens)
		if err != nil {
			return turns, err
		}
		tr.ScheduledMS = ms
		restored, ms, err := restore(st, ns, "conversation-hidden", identH, c, backend, tokens)
		if err != nil {
			return turns, err
		}
		tr.HiddenMS = ms
		kvCache, ms, err := restore(st, ns, "conversation-kv", identKV, c, backend, tokens)
		if err != nil {
			return turns, err
		}
		tr.KVMS = ms
		start := time.Now()
		if _, err := m.Forward(history, model.NewKVCache(c), nil); err != nil {
			return turns, err
		}
		tr.RecomputeMS = float64(time.Since(start).Microseconds()) / 1000
		for _, ci := range st.Contexts() {
			switch ci.ID {
			case "conversation-hidden":
				tr.HiddenBytes = ci.LiveBytes
			case "conversation-kv":
				tr.KVBytes = ci.LiveBytes
			case "conversation-scheduled":
				tr.SchedBytes = ci.LiveBytes
			}
		}
		tr.Lossless = tr.TokensAgreed && sameCache(scheduled, ref) && sameCache(restored, ref) && sameCache(kvCache, ref)
		fmt.Fprintf(o.Out, "%-5d %7d %12.2f %12.2f %12.2f %14.2f %12d %14d %12d %v\n", tr.Turn, tr.Tokens, tr.ScheduledMS, tr.HiddenMS, tr.KVMS, tr.RecomputeMS, tr.SchedBytes, tr.HiddenBytes, tr.KVBytes, tr.Lossless)
		turns = append(turns, tr)
		if !tr.Lossless {
			return turns, fmt.Errorf("%w (turn %d)", ErrLossy, t+1)
		}
		live = scheduled // the conversation continues from the scheduled restore
	}
	if s := st.Stats(); s.CompressRawBytes > 0 {
		fmt.Fprintf(o.Out, "lz4 (byte-plane shuffled) on these states: ratio %.3f; stored ratio %.3f (a slice stays raw unless lz4 saves 1/8)\n",
			float64(s.CompressRawBytes)/float64(s.CompressLZ4), float64(s.CompressRawBytes)/float64(s.CompressStored))
	}
	fmt.Fprintf(o.Out, "lossless: true (%d turns; every restored KV cache (scheduled, hidden, KV) equals the never-evicted one bit for bit, and generation continued identically)\n", len(turns))
	return turns, nil
}

// restoreWith restores a context through a Restorer, which recomputes the
// plan's unstored prefix from the token ids.
func restoreWith(r *serve.Restorer, ns, id string, ident *chunk.Identity, c *model.Config, history []int, tokens int) (*model.KVCache, float64, error) {
	if len(history) != tokens {
		return nil, 0, fmt.Errorf("demo: %d token ids for a %d-token context", len(history), tokens)
	}
	paged, err := newPaged(c, tokens)
	if err != nil {
		return nil, 0, err
	}
	start := time.Now()
	rs, err := r.Restore(serve.Request{NS: ns, ID: id, Ident: ident, Tokens: history, Dst: gpu.HostCache(paged)})
	ms := float64(time.Since(start).Microseconds()) / 1000
	if err != nil {
		return nil, 0, err
	}
	if rs.Tokens != tokens {
		return nil, 0, fmt.Errorf("demo: restored %d tokens of %s, want %d", rs.Tokens, id, tokens)
	}
	kc, err := serve.PagedToCache(c, paged, tokens)
	return kc, ms, err
}

func newPaged(c *model.Config, tokens int) ([]*gpu.PagedKV, error) {
	const blockTokens = 16
	paged := make([]*gpu.PagedKV, c.Layers)
	for l := range paged {
		var err error
		if paged[l], err = gpu.NewPagedKV(c, blockTokens, (tokens+blockTokens-1)/blockTokens); err != nil {
			return nil, err
		}
	}
	return paged, nil
}

func restore(st *chunk.Store, ns, id string, ident *chunk.Identity, c *model.Config, b gpu.Backend, tokens int) (*model.KVCache, float64, error) {
	const blockTokens = 16
	paged := make([]*gpu.PagedKV, c.Layers)
	for l := range paged {
		var err error
		if paged[l], err = gpu.NewPagedKV(c, blockTokens, (tokens+blockTokens-1)/blockTokens); err != nil {
			return nil, 0, err
		}
	}
	start := time.Now()
	rs, err := serve.Restore(st, ns, id, ident, b, paged)
	ms := float64(time.Since(start).Microseconds()) / 1000
	if err != nil {
		return nil, 0, err
	}
	if rs.Tokens != tokens {
		return nil, 0, fmt.Errorf("demo: restored %d tokens of %s, want %d", rs.Tokens, id, tokens)
	}
	kc, err := serve.PagedToCache(c, paged, tokens)
	return kc, ms, err
}

func sameCache(a, b *model.KVCache) bool {
	if a.Tokens != b.Tokens {
		return false
	}
	for l := range a.K {
		if len(a.K[l]) != len(b.K[l]) || len(a.V[l]) != len(b.V[l]) {
			return false
		}
		for i := range a.K[l] {
			if math.Float32bits(a.K[l][i]) != math.Float32bits(b.K[l][i]) || math.Float32bits(a.V[l][i]) != math.Float32bits(b.V[l][i]) {
				return false
			}
		}
	}
	return true
}
