package serve

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand"
	"testing"

	"github.com/hcache/hcache/chunk"
	"github.com/hcache/hcache/gpu"
	"github.com/hcache/hcache/internal/testseed"
	"github.com/hcache/hcache/model"
	"github.com/hcache/hcache/serve/sched"
	"github.com/hcache/hcache/state"
	"github.com/hcache/hcache/state/codec"
)

// traced is every layer's hidden, K and V rows of a run, in token order.
type traced struct{ hidden, k, v [][]float32 }

func (tr *traced) trace(layer int, h, k, v []float32) {
	tr.hidden[layer] = append(tr.hidden[layer], h...)
	tr.k[layer] = append(tr.k[layer], k...)
	tr.v[layer] = append(tr.v[layer], v...)
}

func newTraced(c *model.Config) *traced {
	return &traced{hidden: make([][]float32, c.Layers), k: make([][]float32, c.Layers), v: make([][]float32, c.Layers)}
}

// roundTrip encodes every segment of n values of x under cd and decodes it
// into the model dtype: what a restore must hand the backend.
func roundTrip(t *testing.T, c *model.Config, cd state.Codec, x []float32, n int) []byte {
	t.Helper()
	sb := codec.SegmentBytes(cd, c.DType, n)
	out := make([]byte, len(x)*c.ElemBytes())
	enc := make([]byte, sb)
	for s := 0; s < len(x)/n; s++ {
		if err := codec.Encode(cd, c.DType, enc, x[s*n:(s+1)*n]); err != nil {
			t.Fatal(err)
		}
		if err := codec.Transcode(cd, c.DType, out[s*n*c.ElemBytes():(s+1)*n*c.ElemBytes()], enc, n); err != nil {
			t.Fatal(err)
		}
	}
	return out
}

// TestCodecRestore: contexts saved under each codec (prefill plus decode
// steps, every kind of layer: recomputed, hidden, KV) restore into exactly
// what decoding the codec's encoding of the never-evicted run's rows gives:
// KV layers the round-tripped K and V, hidden layers the projection of the
// round-tripped hidden rows, recomputed layers the run's own K and V. The
// expected values are computed here from state/codec and model.ProjectKV,
// not through the Saver or the Restorer.
func TestCodecRestore(t *testing.T) {
	seed := testseed.Seed(t)
	st, err := chunk.Open(chunk.Options{Dir: t.TempDir(), ChunkTokens: 16, SegmentBytes: 8 << 20, Logf: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	for _, preset := range []string{"tiny-llama", "tiny-gqa", "tiny-qwen2", "tiny-opt", "tiny-linear-rope"} {
		for _, cd := range []state.Codec{state.CodecNone, state.CodecFP8Token, state.CodecFP8Block} {
			t.Run(preset+"/"+cd.String(), func(t *testing.T) {
				c, _ := model.Preset(preset)
				w := model.Synthesize(c, seed)
				m, err := model.New(c, w)
				if err != nil {
					t.Fatal(err)
				}
				split := sched.Split{Recompute: 1, Hidden: (c.Layers - 1) / 2}
				split.KV = c.Layers - split.Recompute - split.Hidden
				plan := split.PlanCodec(c, cd)
				ident := IdentityCodec(c, w, plan, cd)
				id := fmt.Sprint(preset, "-", cd)
				wr, err := st.Create("test", id, ident, chunk.CreateOptions{})
				if err != nil {
					t.Fatal(err)
				}
				saver := NewCodecSaver(c, plan, cd, wr)
				tr := newTraced(c)
				rng := rand.New(rand.NewSource(seed))
				prompt := make([]int, 37)
				for i := range prompt {
					prompt[i] = rng.Intn(c.Vocab)
				}
				live := model.NewKVCache(c)
				got, err := m.Generate(live, prompt, 12, func(l int, h, k, v []float32) { saver.Trace(l, h, k, v); tr.trace(l, h, k, v) })
				if err != nil || saver.Err() != nil {
					t.Fatal(err, saver.Err())
				}
				if err := wr.Close(); err != nil {
					t.Fatal(err)
				}
				tokens := append(append([]int(nil), prompt...), got[:len(got)-1]...)
				n := live.Tokens
				dst := make(gpu.HostCache, c.Layers)
				for l := range dst {
					dst[l], _ = gpu.NewPagedKV(c, 16, (n+15)/16)
				}
				r := NewRestorer(st, cpuFor(t, m), Settings{})
				rs, err := r.Restore(Request{NS: "test", ID: id, Ident: ident, Tokens: tokens, Dst: dst})
				if err != nil {
					t.Fatal(err)
				}
				if cd != state.CodecNone && rs.DecodeDur <= 0 {
					t.Errorf("a %s restore reports no decode time", cd)
				}
				kvd, eb := c.KVDim(), c.ElemBytes()
				positions := make([]int, n)
				for i := range positions {
					positions[i] = i
				}
				for l, lp := range plan {
					var wantK, wantV []byte
					switch lp.Kind {
					case state.LayerNone:
						wantK, wantV = make([]byte, n*kvd*eb), make([]byte, n*kvd*eb)
						c.EncodeRow(wantK, live.K[l])
						c.EncodeRow(wantV, live.V[l])
					case state.LayerKV:
						wantK, wantV = roundTrip(t, c, cd, tr.k[l], kvd), roundTrip(t, c, cd, tr.v[l], kvd)
					case state.LayerHidden:
						hb := roundTrip(t, c, cd, tr.hidden[l], c.HiddenSize)
						h := make([]float32, n*c.HiddenSize)
						c.DecodeRow(h, hb)
						k, v := make([]float32, n*kvd), make([]float32, n*kvd)
						model.ProjectKV(c, c.InvFreq(), &w.Layers[l], h, positions, k, v)
						wantK, wantV = make([]byte, n*kvd*eb), make([]byte, n*kvd*eb)
						c.EncodeRow(wantK, k)
						c.EncodeRow(wantV, v)
					}
					for i := 0; i < n; i++ {
						gk, gv, err := dst[l].Token(i)
						if err != nil {
							t.Fatal(err)
						}
						if !bytes.Equal(gk, wantK[i*kvd*eb:(i+1)*kvd*eb]) || !bytes.Equal(gv, wantV[i*kvd*eb:(i+1)*kvd*eb]) {
							t.Fatalf("layer %d (%s) token %d: restored K/V differ from the %s round trip of the run's rows (seed %d)", l, lp.Kind, i, cd, seed)
						}
					}
				}
			})
		}
	}
}

// TestCodecIdentityRefused: a state saved under one codec is never served
// to a consumer expecting another (the store refuses it before any row),
// and a plan whose rows are not the codec's sizes is refused by the
// restorer.
func TestCodecIdentityRefused(t *testing.T) {
	st, err := chunk.Open(chunk.Options{Dir: t.TempDir(), ChunkTokens: 16, SegmentBytes: 8 << 20, Logf: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	c, _ := model.Preset("tiny-llama")
	w := model.Synthesize(c, 1)
	for _, saved := range []state.Codec{state.CodecNone, state.CodecFP8Token, state.CodecFP8Block} {
		plan := sched.PlanOfCodec(c, state.LayerKV, saved)
		ident := IdentityCodec(c, w, plan, saved)
		wr, err := st.Create("ns", saved.String(), ident, chunk.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		for l := range plan {
			if err := wr.AppendLayer(l, make([]byte, 3*int(plan[l].RowBytes))); err != nil {
				t.Fatal(err)
			}
		}
		if err := wr.Close(); err != nil {
			t.Fatal(err)
		}
		for _, want := range []state.Codec{state.CodecNone, state.CodecFP8Token, state.CodecFP8Block} {
			if want == saved {
				continue
			}
			// the consumer's identity: its own codec, with or without the
			// row sizes of the stored one
			for _, p := range [][]state.LayerPlan{sched.PlanOfCodec(c, state.LayerKV, want), plan} {
				_, err := st.Restore("ns", saved.String(), IdentityCodec(c, w, p, want), func(int, []byte) error {
					t.Fatalf("saved %s, expecting %s: a row was served", saved, want)
					return nil
				})
				if !errors.Is(err, chunk.ErrIdentityMismatch) && !errors.Is(err, state.ErrIdentity) {
					t.Fatalf("saved %s, expecting %s: %v, want ErrIdentityMismatch", saved, want, err)
				}
			}
		}
	}
	// A plan of model-dtype row sizes under codec fp8: the restorer refuses it.
	m, _ := model.New(c, w)
	bad := IdentityCodec(c, w, sched.PlanOf(c, state.LayerKV), state.CodecFP8Token)
	dst := make(gpu.HostCache, c.Layers)
	for l := range dst {
		dst[l], _ = gpu.NewPagedKV(c, 16, 1)
	}
	_, err = NewRestorer(st, cpuFor(t, m), Settings{}).Restore(Request{NS: "ns", ID: "fp8", Ident: bad, Dst: dst})
	if !errors.Is(err, ErrPlan) {
		t.Fatalf("fp8 identity with fp16 row sizes: %v, want ErrPlan", err)
	}
}

// TestCodecSurvivesReopen: the codec is in the identity the store persists
// (version 2 encoding in the index and the records): after a close and a
// reopen, and after a repair that rebuilds the index from the segments alone,
// the context restores under its codec and is refused under another.
func TestCodecSurvivesReopen(t *testing.T) {
	dir := t.TempDir()
	opts := chunk.Options{Dir: dir, ChunkTokens: 16, SegmentBytes: 8 << 20, Logf: t.Logf}
	st, err := chunk.Open(opts)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := model.Preset("tiny-gqa")
	w := model.Synthesize(c, 3)
	plan := sched.PlanOfCodec(c, state.LayerHidden, state.CodecFP8Block)
	ident := IdentityCodec(c, w, plan, state.CodecFP8Block)
	wr, err := st.Create("ns", "ctx", ident, chunk.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for l := range plan {
		if err := wr.AppendLayer(l, bytes.Repeat([]byte{byte(l + 1)}, 20*int(plan[l].RowBytes))); err != nil {
			t.Fatal(err)
		}
	}
	if err := wr.Close(); err != nil {
		t.Fatal(err)
	}
	check := func(when string) {
		t.Helper()
		n, err := st.Restore("ns", "ctx", ident, func(l int, rows []byte) error {
			if !bytes.Equal(rows, bytes.Repeat([]byte{byte(l + 1)}, len(rows))) {
				t.Fatalf("%s: layer %d rows changed", when, l)
			}
			return nil
		})
		if err != nil || n != 20 {
			t.Fatalf("%s: restore under its codec: %d tokens, %v", when, n, err)
		}
		other := IdentityCodec(c, w, plan, state.CodecFP8Token)
		if _, err := st.Restore("ns", "ctx", other, func(int, []byte) error { t.Fatalf("%s: a row was served under another codec", when); return nil }); !errors.Is(err, chunk.ErrIdentityMismatch) {
			t.Fatalf("%s: another codec: %v, want ErrIdentityMismatch", when, err)
		}
	}
	check("before close")
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}
	if st, err = chunk.Open(opts); err != nil {
		t.Fatal(err)
	}
	check("after reopen")
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := chunk.Repair(chunk.RepairOptions{Dir: dir, Logf: t.Logf}); err != nil {
		t.Fatal(err)
	}
	if st, err = chunk.Open(opts); err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	check("after repair")
}
