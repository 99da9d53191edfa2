package daemon_test

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"math/rand"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	hc "github.com/hcache/hcache/clients/hcacheclient"
	"github.com/hcache/hcache/daemon"
	"github.com/hcache/hcache/internal/testseed"
	"github.com/hcache/hcache/model"
	hcachev1 "github.com/hcache/hcache/proto/hcache/v1"
	"github.com/hcache/hcache/state"
	"github.com/hcache/hcache/state/codec"
)

// codecCtx is a context saved through the daemon under one codec: the
// identity it was saved under and the rows appended per layer (encoded).
type codecCtx struct {
	id    hc.Identity
	rows  map[int][]byte
	vals  map[int][]float32 // the values encoded, per layer (segments back to back per token)
	segs  map[int]int
	nvals map[int]int
}

// codecIdentity is the identity of a loaded model's states under cd: every
// layer hidden but the last, which stores K|V, row sizes the codec's.
func codecIdentity(mc *model.Config, fp []byte, cd state.Codec) hc.Identity {
	id := hc.Identity{Model: fp, Codec: cd, Plan: make([]hc.LayerPlan, mc.Layers)}
	for l := range id.Plan {
		id.Plan[l] = hc.LayerPlan{Kind: hc.LayerHidden, RowBytes: uint32(codec.HiddenRowBytes(cd, mc.DType, mc.HiddenSize))}
		if l == mc.Layers-1 {
			id.Plan[l] = hc.LayerPlan{Kind: hc.LayerKV, RowBytes: uint32(codec.KVRowBytes(cd, mc.DType, mc.KVDim()))}
		}
	}
	return id
}

// saveCodec saves n tokens of seeded gaussian rows encoded under enc (the
// client encodes; enc is ident's codec but for an identity that has another
// codec's row sizes), by tokens when toks is set.
func saveCodec(t *testing.T, c *hc.Client, mc *model.Config, rng *rand.Rand, ns, name string, ident hc.Identity, enc state.Codec, toks []uint32) *codecCtx {
	t.Helper()
	ctx := context.Background()
	n := 100
	if toks != nil {
		n = len(toks)
	}
	var w *hc.Writer
	var err error
	if toks != nil {
		w, err = c.CreateTokens(ctx, ns, name, ident, toks, nil, false)
	} else {
		w, err = c.Create(ctx, ns, name, ident, false)
	}
	if err != nil {
		t.Fatalf("create %s under codec %s: %v", name, ident.Codec, err)
	}
	cc := &codecCtx{id: ident, rows: map[int][]byte{}, vals: map[int][]float32{}, segs: map[int]int{}, nvals: map[int]int{}}
	for l, p := range ident.Plan {
		segs, nv := 1, mc.HiddenSize
		if p.Kind == hc.LayerKV {
			segs, nv = 2, mc.KVDim()
		}
		vals := make([]float32, n*segs*nv)
		for i := range vals {
			vals[i] = float32(rng.NormFloat64())
		}
		rows := make([]byte, n*int(p.RowBytes))
		// A prefill from position 0 (int8: a group row for every whole
		// 64 tokens, token rows after).
		if err := codec.EncodeRows(enc, mc.DType, rows, segs, nv, 0, vals); err != nil {
			t.Fatal(err)
		}
		if err := w.AppendLayer(ctx, l, rows); err != nil {
			t.Fatalf("append %s layer %d: %v", name, l, err)
		}
		cc.rows[l], cc.vals[l], cc.segs[l], cc.nvals[l] = rows, vals, segs, nv
	}
	if err := w.Close(ctx); err != nil {
		t.Fatal(err)
	}
	return cc
}

// restoreAll restores through the raw API and returns each layer's rows,
// row size and the chunks' codec.
func restoreAll(c *hc.Client, req *hcachev1.RestoreRequest) (map[int][]byte, map[int]uint32, map[int]hcachev1.Codec, uint64, error) {
	st, err := c.API.Restore(context.Background(), req)
	if err != nil {
		return nil, nil, nil, 0, err
	}
	rows, rbs, cds := map[int][]byte{}, map[int]uint32{}, map[int]hcachev1.Codec{}
	var tokens uint64
	for {
		m, err := st.Recv()
		if err != nil {
			if err == io.EOF {
				return rows, rbs, cds, tokens, nil
			}
			return nil, nil, nil, 0, err
		}
		l := int(m.GetLayer())
		tokens = m.GetTokens()
		rows[l] = append(rows[l], m.GetInline()...)
		rbs[l], cds[l] = m.GetRowBytes(), m.GetCodec()
	}
}

// withCodec is id under another codec, nothing else changed.
func withCodec(id hc.Identity, cd state.Codec) hc.Identity {
	id.Codec = cd
	return id
}

func wireIdentity(id hc.Identity) *hcachev1.Identity {
	p := &hcachev1.Identity{Model: id.Model, Codec: hcachev1.Codec(id.Codec)}
	for _, l := range id.Plan {
		p.Plan = append(p.Plan, &hcachev1.LayerPlan{Kind: hcachev1.LayerKind(l.Kind), RowBytes: l.RowBytes})
	}
	return p
}

// TestCodecThroughDaemon: the codec travels in the identity and is bound
// into the stored one. A state saved under fp8 is refused to a consumer
// asking for codec none and the reverse (FAILED_PRECONDITION naming both
// codecs), with identities that differ in nothing but the codec, for a
// restore by id, an APPEND and a restore by tokens of a named context; a
// lookup or restore by tokens under another codec matches nothing. Rows come
// back as stored (the client's encoded bytes, chunks marked with the codec),
// or decoded on the daemon into the model dtype with decode (bit for bit
// state/codec's decode) or projected with project.
func TestCodecThroughDaemon(t *testing.T) {
	seed := testseed.Seed(t)
	rng := rand.New(rand.NewSource(seed))
	const preset = "tiny-gqa"
	mc, err := model.Preset(preset)
	if err != nil {
		t.Fatal(err)
	}
	mdir := t.TempDir()
	w := model.Synthesize(mc, 11)
	if err := model.WriteModel(mdir, mc, w); err != nil {
		t.Fatal(err)
	}
	lm, err := daemon.LoadModel(preset, mdir, "cpu")
	if err != nil {
		t.Fatal(err)
	}
	e := start(t, func(c *daemon.Config) { c.Models = []*daemon.Model{lm} })
	c := e.dial()
	ctx := context.Background()

	fp8 := codecIdentity(mc, lm.Fingerprint, state.CodecFP8Token)
	// The same plan (row sizes) under codec none: the identities differ in
	// their codec only, so only the codec can refuse them.
	none := fp8
	none.Codec = state.CodecNone
	block := codecIdentity(mc, lm.Fingerprint, state.CodecFP8Block)
	plain := codecIdentity(mc, lm.Fingerprint, state.CodecNone) // model-dtype rows
	int8id := codecIdentity(mc, lm.Fingerprint, state.CodecInt8Channel)

	toks := make([]uint32, 3*e.store.ChunkTokens()+5)
	for i := range toks {
		toks[i] = uint32(rng.Intn(1000))
	}
	saved := map[string]*codecCtx{
		"fp8":       saveCodec(t, c, mc, rng, "ns", "fp8", fp8, fp8.Codec, nil),
		"none":      saveCodec(t, c, mc, rng, "ns", "none", none, fp8.Codec, nil),
		"fp8-block": saveCodec(t, c, mc, rng, "ns", "fp8-block", block, block.Codec, nil),
		"plain":     saveCodec(t, c, mc, rng, "ns", "plain", plain, plain.Codec, nil),
		"int8":      saveCodec(t, c, mc, rng, "ns", "int8", int8id, int8id.Codec, nil),
		"fp8-toks":  saveCodec(t, c, mc, rng, "ns", "fp8-toks", fp8, fp8.Codec, toks),
		"int8-toks": saveCodec(t, c, mc, rng, "ns", "int8-toks", int8id, int8id.Codec, toks),
	}

	t.Run("refused", func(t *testing.T) {
		for _, tc := range []struct {
			name, ctxID string
			ident       hc.Identity
			stored, ask string
		}{
			{"fp8 state to a none consumer", "fp8", none, "fp8", "none"},
			{"none state to an fp8 consumer", "none", fp8, "none", "fp8"},
			{"fp8-block state to an fp8 consumer", "fp8-block", withCodec(block, state.CodecFP8Token), "fp8-block", "fp8"},
			{"token-addressed fp8 state to a none consumer", "fp8-toks", none, "fp8", "none"},
			{"int8 state to an fp8-block consumer", "int8", withCodec(int8id, state.CodecFP8Block), "int8", "fp8-block"},
		} {
			t.Run(tc.name, func(t *testing.T) {
				check := func(what string, err error) {
					t.Helper()
					wantCode(t, what, err, codes.FailedPrecondition)
					msg := status.Convert(err).Message()
					if !strings.Contains(msg, "stored under codec "+tc.stored) || !strings.Contains(msg, "has codec "+tc.ask) {
						t.Fatalf("%s: error %q does not name both codecs (%s stored, %s asked)", what, msg, tc.stored, tc.ask)
					}
				}
				_, err := c.Restore(ctx, "ns", tc.ctxID, tc.ident, func(int, []byte) error {
					t.Fatal("rows served under another codec")
					return nil
				})
				check("restore", err)
				_, err = c.RestoreDecoded(ctx, "ns", tc.ctxID, tc.ident, func(int, []byte) error {
					t.Fatal("rows served under another codec")
					return nil
				})
				check("decoded restore", err)
				_, err = c.Append(ctx, "ns", tc.ctxID, tc.ident)
				check("append", err)
				if tc.ctxID == "fp8-toks" {
					// By tokens, naming the context: its chain and its
					// tail are another identity's, so nothing matches
					// (a miss, not an error).
					p := hc.Prefix{Namespace: "ns", Identity: tc.ident, Tokens: toks, ID: tc.ctxID}
					n, err := c.RestoreTokens(ctx, p, func(int, []byte) error {
						t.Fatal("rows served under another codec")
						return nil
					})
					if err != nil || n != 0 {
						t.Fatalf("restore by tokens of the named context: %d tokens, %v; want 0", n, err)
					}
					if n, _, err := c.Lookup(ctx, p); err != nil || n != 0 {
						t.Fatalf("lookup naming the context: %d tokens, %v; want 0", n, err)
					}
				}
			})
		}
	})

	t.Run("tokens under another codec match nothing", func(t *testing.T) {
		full := len(toks) / e.store.ChunkTokens() * e.store.ChunkTokens()
		for _, tc := range []struct {
			name  string
			ident hc.Identity
			want  uint64
		}{
			{"fp8", fp8, uint64(full)},
			{"none, same row sizes", none, 0},
			{"fp8-block", withCodec(fp8, state.CodecFP8Block), 0},
		} {
			p := hc.Prefix{Namespace: "ns", Identity: tc.ident, Tokens: toks}
			n, _, err := c.Lookup(ctx, p)
			if err != nil || n != tc.want {
				t.Fatalf("%s: lookup %d tokens (%v), want %d", tc.name, n, err, tc.want)
			}
			layers := 0
			n, err = c.RestoreTokens(ctx, p, func(int, []byte) error { layers++; return nil })
			if err != nil || n != tc.want || (tc.want == 0) != (layers == 0) {
				t.Fatalf("%s: restore by tokens %d tokens, %d layers (%v), want %d tokens", tc.name, n, layers, err, tc.want)
			}
		}
	})

	t.Run("served", func(t *testing.T) {
		for _, tc := range []struct {
			name, ctxID string
			decode      bool
		}{
			{"fp8 as stored", "fp8", false},
			{"fp8 decoded", "fp8", true},
			{"fp8-block as stored", "fp8-block", false},
			{"fp8-block decoded", "fp8-block", true},
			{"int8 as stored", "int8", false},
			{"int8 decoded", "int8", true},
			{"none as stored", "plain", false},
			{"none with decode", "plain", true},
		} {
			t.Run(tc.name, func(t *testing.T) {
				cc := saved[tc.ctxID]
				rows, rbs, cds, n, err := restoreAll(c, &hcachev1.RestoreRequest{Ctx: &hcachev1.ContextRef{Namespace: "ns", Id: tc.ctxID},
					Identity: wireIdentity(cc.id), Decode: tc.decode})
				if err != nil || n != 100 || len(rows) != mc.Layers {
					t.Fatalf("restore: %d tokens, %d layers, %v", n, len(rows), err)
				}
				for l, p := range cc.id.Plan {
					want, wantRB, wantCd := cc.rows[l], p.RowBytes, hcachev1.Codec(cc.id.Codec)
					if tc.decode {
						wantCd = hcachev1.Codec_CODEC_NONE
						if cc.id.Codec != state.CodecNone {
							wantRB = uint32(mc.HiddenRowBytes())
							if p.Kind == hc.LayerKV {
								wantRB = uint32(mc.KVRowBytes())
							}
							want = make([]byte, 100*int(wantRB))
							if err := codec.TranscodeRows(cc.id.Codec, mc.DType, want, cc.rows[l], cc.segs[l], cc.nvals[l]); err != nil {
								t.Fatal(err)
							}
						}
					}
					if rbs[l] != wantRB || cds[l] != wantCd {
						t.Fatalf("layer %d: row bytes %d codec %v, want %d %v", l, rbs[l], cds[l], wantRB, wantCd)
					}
					if !bytes.Equal(rows[l], want) {
						t.Fatalf("layer %d: rows differ from the %s", l, map[bool]string{false: "appended bytes", true: "client-side decode"}[tc.decode])
					}
				}
			})
		}
		// Projected: every layer K|V rows in the model dtype, codec none.
		rows, rbs, cds, n, err := restoreAll(c, &hcachev1.RestoreRequest{Ctx: &hcachev1.ContextRef{Namespace: "ns", Id: "fp8"},
			Identity: wireIdentity(fp8), Project: true})
		if err != nil || n != 100 || len(rows) != mc.Layers {
			t.Fatalf("projected restore of fp8: %d tokens, %d layers, %v", n, len(rows), err)
		}
		for l := range rows {
			if rbs[l] != uint32(mc.KVRowBytes()) || cds[l] != hcachev1.Codec_CODEC_NONE || len(rows[l]) != 100*mc.KVRowBytes() {
				t.Fatalf("projected layer %d: row bytes %d codec %v, %d bytes", l, rbs[l], cds[l], len(rows[l]))
			}
		}
	})

	t.Run("int8 fork", func(t *testing.T) {
		// 197 tokens: whole groups 0..191, token rows 192..196.
		for _, tc := range []struct {
			name   string
			tokens uint64
			ok     bool
		}{
			{"inside a whole group", 100, false},
			{"inside the last whole group", 191, false},
			{"on a group boundary", 128, true},
			{"inside the partial last group", 195, true},
			{"everything", uint64(len(toks)), true},
		} {
			dst := fmt.Sprint("int8-fork-", tc.tokens)
			err := c.Fork(ctx, "ns", "int8-toks", dst, tc.tokens)
			if !tc.ok {
				wantCode(t, tc.name, err, codes.InvalidArgument)
				if msg := status.Convert(err).Message(); !strings.Contains(msg, "stored under codec int8") {
					t.Fatalf("%s: %q", tc.name, msg)
				}
				continue
			}
			if err != nil {
				t.Fatalf("%s: fork: %v", tc.name, err)
			}
			n, err := c.RestoreDecoded(ctx, "ns", dst, int8id, func(int, []byte) error { return nil })
			if err != nil || n != tc.tokens {
				t.Fatalf("%s: decoded restore of the fork: %d tokens, %v", tc.name, n, err)
			}
		}
	})

	t.Run("stat", func(t *testing.T) {
		ci, err := c.Stat(ctx, "ns", "fp8")
		if err != nil || ci.GetIdentity().GetCodec() != hcachev1.Codec_CODEC_FP8 {
			t.Fatalf("stat of fp8: codec %v, %v", ci.GetIdentity().GetCodec(), err)
		}
	})

	t.Run("bad input", func(t *testing.T) {
		// An unknown codec number, from a newer client.
		bad := wireIdentity(fp8)
		bad.Codec = 9
		_, err := c.API.OpenContext(ctx, &hcachev1.OpenContextRequest{Ctx: &hcachev1.ContextRef{Namespace: "ns", Id: "x"}, Identity: bad, Mode: hcachev1.OpenMode_CREATE})
		wantCode(t, "unknown codec", err, codes.InvalidArgument)
		if msg := status.Convert(err).Message(); !strings.Contains(msg, "unknown codec 9") {
			t.Fatalf("unknown codec: %q", msg)
		}
		bad.Codec = 256 + 1 // would wrap onto fp8 as a byte
		_, err = c.API.OpenContext(ctx, &hcachev1.OpenContextRequest{Ctx: &hcachev1.ContextRef{Namespace: "ns", Id: "x"}, Identity: bad, Mode: hcachev1.OpenMode_CREATE})
		wantCode(t, "codec 257", err, codes.InvalidArgument)
		// Decode needs the model: an fp8 identity of a model not loaded.
		other := fp8
		other.Model = []byte("not loaded")
		saveCodec(t, c, mc, rng, "ns", "other", other, other.Codec, nil)
		_, err = c.RestoreDecoded(ctx, "ns", "other", other, func(int, []byte) error { return nil })
		wantCode(t, "decode without the model", err, codes.FailedPrecondition)
		// ...and as stored it is served.
		if n, err := c.Restore(ctx, "ns", "other", other, func(int, []byte) error { return nil }); err != nil || n != 100 {
			t.Fatalf("restore as stored without the model: %d, %v", n, err)
		}
	})
}
