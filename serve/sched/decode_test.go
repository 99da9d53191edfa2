package sched

import (
	"fmt"
	"math"
	"math/rand"
	"slices"
	"strings"
	"testing"

	"github.com/hcache/hcache/internal/testseed"
	"github.com/hcache/hcache/model"
	"github.com/hcache/hcache/profiles"
	"github.com/hcache/hcache/state"
	"github.com/hcache/hcache/state/codec"
)

// withRates is profile p with measured decode rates (GB/s; 0: none given).
func withRates(p *profiles.Profile, fp8, block, int8 float64) *profiles.Profile {
	q := *p
	q.DecodeGBps, q.CodecDecodeGBps = nil, nil
	if fp8 > 0 {
		q.DecodeGBps = &profiles.Figure{Value: fp8, Source: "test fp8"}
	}
	for name, v := range map[string]float64{"fp8-block": block, "int8": int8} {
		if v > 0 {
			if q.CodecDecodeGBps == nil {
				q.CodecDecodeGBps = map[string]profiles.Figure{}
			}
			q.CodecDecodeGBps[name] = profiles.Figure{Value: v, Source: "test " + name}
		}
	}
	return &q
}

// TestDecodeCodecNames: the codecs a profile names are state's codecs with
// a decode, all of them.
func TestDecodeCodecNames(t *testing.T) {
	var want []string
	for c := state.CodecNone + 1; c.Known(); c++ {
		want = append(want, c.String())
	}
	if !slices.Equal(profiles.DecodeCodecs, want) {
		t.Fatalf("profiles.DecodeCodecs %v, state's codecs with a decode %v", profiles.DecodeCodecs, want)
	}
}

// TestDecodeRateByCodec: each codec is priced at its own measured rate; a
// codec without one at its estimate (memory-bound; int8 through float32 on
// the host), never faster than a rate the profile measured; the source
// says which.
func TestDecodeRateByCodec(t *testing.T) {
	h200, _ := profiles.Load("h200-nvme") // mem 4800, h2d 55
	c, _ := model.Preset("llama2-7b")     // float16
	memBound := 4800.0 * 2 / 3
	int8Est := 55.0 * 2 / 11
	fp8, blk, i8 := state.CodecFP8Token, state.CodecFP8Block, state.CodecInt8Channel
	cases := []struct {
		name             string
		fp8, block, int8 float64 // measured; 0: none
		cd               state.Codec
		want             float64
		source           string
	}{
		{"no rates: fp8 memory-bound", 0, 0, 0, fp8, memBound, "fp8 estimate: memory-bound"},
		{"no rates: fp8-block memory-bound", 0, 0, 0, blk, memBound, "fp8-block estimate: memory-bound"},
		{"no rates: int8 host through float32", 0, 0, 0, i8, int8Est, "int8 estimate: host decode through float32"},
		{"old profile: fp8 measured", 1.5, 0, 0, fp8, 1.5, "fp8 measured: test fp8"},
		{"old profile: fp8-block no faster than fp8", 1.5, 0, 0, blk, 1.5, "capped at the slowest measured decode (fp8's"},
		{"old profile: int8 no faster than fp8", 1.5, 0, 0, i8, 1.5, "capped at the slowest measured decode (fp8's"},
		{"old profile, fast fp8: int8 its estimate", 100, 0, 0, i8, int8Est, "int8 estimate"},
		{"all measured: fp8", 1.5, 0.7, 0.4, fp8, 1.5, "fp8 measured"},
		{"all measured: fp8-block", 1.5, 0.7, 0.4, blk, 0.7, "fp8-block measured: test fp8-block"},
		{"all measured: int8", 1.5, 0.7, 0.4, i8, 0.4, "int8 measured: test int8"},
		{"int8 faster than fp8: its own", 1.5, 0, 30, i8, 30, "int8 measured"},
		{"only int8 measured: fp8 capped", 0, 0, 0.4, fp8, 0.4, "capped at the slowest measured decode (int8's"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			pl, err := NewPlatform(withRates(h200, tc.fp8, tc.block, tc.int8), "nvme")
			if err != nil {
				t.Fatal(err)
			}
			got, src := pl.DecodeGBps(c, tc.cd)
			if math.Abs(got-tc.want) > 1e-9*tc.want || !strings.Contains(src, tc.source) {
				t.Fatalf("%s decodes at %v GB/s (%s), want %v (%q)", tc.cd, got, src, tc.want, tc.source)
			}
			cs, err := pl.CostsCodec(c, 4096, tc.cd)
			if err != nil {
				t.Fatal(err)
			}
			want := 4096 * float64(c.HiddenRowBytes()) / (tc.want * 1e9) * 1e3
			if math.Abs(cs.DecodeHiddenMS-want) > 1e-9*want || cs.DecodeSource != src {
				t.Fatalf("costs decode a hidden layer in %v ms (%s), want %v ms at the codec's rate", cs.DecodeHiddenMS, cs.DecodeSource, want)
			}
		})
	}
}

// TestChooseCodecByCodecRate: the codec's own decode rate decides. A slow
// int8 decode makes int8 lose where the fp8 rate alone (the one figure every
// codec was priced at before) made it win, and a fast one makes it win where
// fp8's rate made it lose.
func TestChooseCodecByCodecRate(t *testing.T) {
	h200, _ := profiles.Load("h200-nvme")
	c, _ := model.Preset("llama2-7b")
	none, fp8, i8 := state.CodecNone, state.CodecFP8Token, state.CodecInt8Channel
	cases := []struct {
		name      string
		fp8, int8 float64 // measured; 0: none
		allowed   []state.Codec
		want      state.Codec
	}{
		{"int8 at fp8's fast rate (the old pricing): int8 pays on a slow disk", 100, 100, []state.Codec{none, i8}, i8},
		{"slow int8 decode: none", 100, 0.3, []state.Codec{none, i8}, none},
		{"int8 unmeasured beside a fast fp8: its own estimate, none", 100, 0, []state.Codec{none, i8}, none},
		{"fp8 rate alone, slow: none", 1, 0, []state.Codec{none, fp8, i8}, none},
		{"fast int8 decode beats slow fp8", 1, 50, []state.Codec{none, fp8, i8}, i8},
		{"fast fp8 beats int8 (fewer bytes)", 50, 50, []state.Codec{none, fp8, i8}, fp8},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			pl, _ := NewPlatform(withRates(h200, tc.fp8, 0, tc.int8), "nvme")
			d, all, err := pl.ChooseCodec(c, 4096, tc.allowed)
			if err != nil {
				t.Fatal(err)
			}
			if d.Codec != tc.want {
				var s []string
				for _, a := range all {
					s = append(s, fmt.Sprintf("%s %.1f ms (%s)", a.CodecName, a.PredictedMS, a.Costs.DecodeSource))
				}
				t.Fatalf("chose %s, want %s: %s", d.CodecName, tc.want, strings.Join(s, "; "))
			}
		})
	}
}

// TestOldProfilesChooseAsBefore: a profile with no decode rate, or only the
// old decode_gbps, chooses among the codecs fp8 is allowed with exactly as
// when one figure (decode_gbps, else memory-bound) priced every codec: the
// old pricing is replayed by giving every codec that one figure.
func TestOldProfilesChooseAsBefore(t *testing.T) {
	sets := [][]state.Codec{
		{state.CodecNone, state.CodecFP8Token},
		{state.CodecNone, state.CodecFP8Token, state.CodecFP8Block},
		{state.CodecNone, state.CodecFP8Token, state.CodecFP8Block, state.CodecInt8Channel},
		{state.CodecFP8Block, state.CodecFP8Token},
	}
	n := 0
	for _, name := range profiles.Names() {
		shipped, _ := profiles.Load(name)
		for _, old := range []float64{0, 0.5, 1.5, 20} {
			p := withRates(shipped, old, 0, 0)
			for _, tier := range p.Tiers {
				pl, _ := NewPlatform(p, tier.Name)
				for _, mn := range []string{"llama2-7b", "llama3-8b", "opt-30b", "deepseek-v3"} {
					c, err := model.Preset(mn)
					if err != nil {
						t.Fatal(err)
					}
					one := old
					if one == 0 {
						eb := float64(c.ElemBytes())
						one = p.MemGBps.Value * eb / (1 + eb)
					}
					before, _ := NewPlatform(withRates(p, one, one, one), tier.Name)
					for _, tokens := range []int{512, 4096, 32768} {
						for _, set := range sets {
							d, _, err := pl.ChooseCodec(c, tokens, set)
							if err != nil {
								t.Fatal(err)
							}
							w, _, _ := before.ChooseCodec(c, tokens, set)
							if d.Codec != w.Codec || d.Split != w.Split || d.PredictedMS != w.PredictedMS {
								t.Fatalf("%s/%s decode_gbps %v, %s at %d tokens among %v: %s %v %.3f ms, before %s %v %.3f ms",
									name, tier.Name, old, mn, tokens, set, d.CodecName, d.Split, d.PredictedMS, w.CodecName, w.Split, w.PredictedMS)
							}
							n++
						}
					}
				}
			}
		}
	}
	t.Logf("%d choices as before", n)
}

// TestMLAInt8RowIsTheEncoders: the plan's int8 row of an MLA model is the
// size the int8 encoder takes for such a row (found by asking EncodeRows,
// not from RowBytes), scale area included, and a group plus token rows of
// it round-trip.
func TestMLAInt8RowIsTheEncoders(t *testing.T) {
	seed := testseed.Seed(t)
	rng := rand.New(rand.NewSource(seed))
	ds, err := model.Preset("deepseek-v3")
	if err != nil {
		t.Fatal(err)
	}
	shape := func(latent, rope int, dtype string) *model.Config {
		c := *ds
		m := *ds.MLA
		m.KVLoraRank, m.QKRopeDim = latent, rope
		c.MLA, c.DType = &m, dtype
		return &c
	}
	cases := []struct {
		name string
		c    *model.Config
	}{
		{"deepseek-v3", ds},
		{"latent 256 rope 64 fp16", shape(256, 64, "float16")},
		{"latent 500 rope 36", shape(500, 36, "bfloat16")},
		{"latent 4032 rope 64 float32", shape(4032, 64, "float32")},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := tc.c
			lp := LayerPlanOfCodec(c, state.LayerKV, state.CodecInt8Channel)
			segs, n := mlaInt8Row(c.MLA)
			v := segs * n
			if v != c.MLA.KVLoraRank+c.MLA.QKRopeDim {
				t.Fatalf("an int8 MLA row of %d x %d values, want latent + rope = %d", segs, n, c.MLA.KVLoraRank+c.MLA.QKRopeDim)
			}
			vals := make([]float32, v)
			enc := 0
			for l := 1; l <= 8*v && enc == 0; l++ {
				if codec.EncodeRows(state.CodecInt8Channel, c.DType, make([]byte, l), segs, n, 0, vals) == nil {
					enc = l
				}
			}
			if enc == 0 || int(lp.RowBytes) != enc {
				t.Fatalf("plan row %d bytes, the int8 encoder takes %d for a row of %d values", lp.RowBytes, enc, v)
			}
			if cs, _ := (&Platform{Profile: withRates(mustLoad(t, "h200-nvme"), 0, 0, 0), Tier: &profiles.Tier{ReadGBps: profiles.Figure{Value: 2}}}).CostsCodec(c, 1000, state.CodecInt8Channel); math.Abs(cs.KVIOMS-1000*float64(enc)/2e9*1e3) > 1e-9 {
				t.Fatalf("int8 KV I/O %v ms does not move %d-byte rows", cs.KVIOMS, enc)
			}
			// A group and three token rows: the group's scales lie past
			// the codes, inside the row, and everything decodes back.
			rows := codec.Int8Group + 3
			x := make([]float32, rows*v)
			for i := range x {
				x[i] = float32(rng.NormFloat64())
			}
			buf := make([]byte, rows*enc)
			if err := codec.EncodeRows(state.CodecInt8Channel, c.DType, buf, segs, n, 0, x); err != nil {
				t.Fatalf("seed %d: %v", seed, err)
			}
			scaleArea := false
			for _, b := range buf[v : v+2*((v+codec.Int8Group-1)/codec.Int8Group)] {
				scaleArea = scaleArea || b != 0
			}
			if !scaleArea {
				t.Fatalf("no scales after the codes of the group's first row")
			}
			y := make([]float32, len(x))
			if err := codec.DecodeRows(state.CodecInt8Channel, c.DType, y, buf, segs, n); err != nil {
				t.Fatalf("seed %d: %v", seed, err)
			}
			for i := range x {
				if d := math.Abs(float64(x[i] - y[i])); d > 0.05 {
					t.Fatalf("seed %d: value %d of row %d: %v decodes as %v", seed, i%v, i/v, x[i], y[i])
				}
			}
		})
	}
}

func mustLoad(t *testing.T, name string) *profiles.Profile {
	t.Helper()
	p, err := profiles.Load(name)
	if err != nil {
		t.Fatal(err)
	}
	return p
}
