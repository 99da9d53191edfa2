package sched

import (
	"math"
	"testing"

	"github.com/hcache/hcache/model"
	"github.com/hcache/hcache/profiles"
	"github.com/hcache/hcache/state"
)

var allCodecs = []state.Codec{state.CodecNone, state.CodecFP8Token, state.CodecFP8Block}

// TestCostsCodec: codec none prices exactly as Costs; an fp8 codec moves
// its encoded bytes (about half of fp16's) and adds the decode of every
// value to the projection and the KV load.
func TestCostsCodec(t *testing.T) {
	p, _ := profiles.Load("h200-nvme")
	pl, _ := NewPlatform(p, "nvme")
	c, _ := model.Preset("llama2-7b")
	base, _ := pl.Costs(c, 4096)
	none, err := pl.CostsCodec(c, 4096, state.CodecNone)
	if err != nil || none != base {
		t.Fatalf("codec none: %+v, %v; Costs gives %+v", none, err, base)
	}
	fp8, err := pl.CostsCodec(c, 4096, state.CodecFP8Token)
	if err != nil {
		t.Fatal(err)
	}
	if r := fp8.HiddenIOMS / base.HiddenIOMS; math.Abs(r-4160.0/8192) > 1e-12 {
		t.Errorf("fp8 hidden I/O = %.4f x fp16's, want %.4f", r, 4160.0/8192)
	}
	if r := fp8.KVIOMS / base.KVIOMS; math.Abs(r-8256.0/16384) > 1e-12 {
		t.Errorf("fp8 KV I/O = %.4f x fp16's, want %.4f", r, 8256.0/16384)
	}
	// memory-bound decode: 4096 x 4096 values written as 2 bytes after a
	// 1-byte read at 4800 GB/s, i.e. 3200 GB/s of output
	want := 4096 * 8192 / (4800e9 * 2 / 3) * 1e3
	if d := fp8.DecodeHiddenMS; d < want*0.999 || d > want*1.001 || fp8.ProjectMS != base.ProjectMS+d {
		t.Errorf("decode of a hidden layer %.4f ms (projection %.4f, was %.4f), want %.4f ms added", d, fp8.ProjectMS, base.ProjectMS, want)
	}
	if _, err := pl.CostsCodec(c, 4096, state.Codec(9)); err == nil {
		t.Error("an unknown codec was priced")
	}
}

// TestChooseCodec: where restores are bound by the disk the fp8 codecs win
// and the plan's rows are the codec's; a decode that is slow enough makes
// codec none win again; GQA models choose KV layers in every codec; none
// is chosen when it is the only codec allowed.
func TestChooseCodec(t *testing.T) {
	p, _ := profiles.Load("h200-nvme")
	pl, _ := NewPlatform(p, "nvme")
	c, _ := model.Preset("llama2-7b")
	d, all, err := pl.ChooseCodec(c, 4096, allCodecs)
	if err != nil {
		t.Fatal(err)
	}
	if len(all) != 3 || d.Codec != state.CodecFP8Token {
		t.Fatalf("chose %s among %d codecs, want fp8 (the fewest bytes on a disk-bound tier)", d.CodecName, len(all))
	}
	if d.BytesPerToken >= all[0].BytesPerToken || d.PredictedMS >= all[0].PredictedMS {
		t.Errorf("fp8: %d B/token, %.1f ms; none: %d B/token, %.1f ms", d.BytesPerToken, d.PredictedMS, all[0].BytesPerToken, all[0].PredictedMS)
	}
	for _, lp := range d.Plan {
		if lp.Kind == state.LayerHidden && lp.RowBytes != 4160 || lp.Kind == state.LayerKV && lp.RowBytes != 8256 {
			t.Fatalf("fp8 plan has %s rows of %d bytes", lp.Kind, lp.RowBytes)
		}
	}
	if only, _, _ := pl.ChooseCodec(c, 4096, []state.Codec{state.CodecNone}); only.Codec != state.CodecNone || only.PredictedMS != all[0].PredictedMS {
		t.Errorf("with only none allowed: %s", only.CodecName)
	}
	slow := *p
	slow.DecodeGBps = &profiles.Figure{Value: 0.5, Source: "test"}
	spl, _ := NewPlatform(&slow, "nvme")
	if d, _, _ := spl.ChooseCodec(c, 4096, allCodecs); d.Codec != state.CodecNone {
		t.Errorf("with a 0.5 GB/s decode the scheduler chose %s, want none", d.CodecName)
	}
	for _, name := range []string{"llama3-8b", "qwen2.5-7b"} {
		g, _ := model.Preset(name)
		_, all, err := pl.ChooseCodec(g, 4096, allCodecs)
		if err != nil {
			t.Fatal(err)
		}
		for _, d := range all {
			if d.Split.Hidden != 0 || d.Split.KV == 0 {
				t.Errorf("%s/%s: split %v, want KV layers only (hidden rows are larger)", name, d.CodecName, d.Split)
			}
		}
	}
}

// TestPlanMLA: DeepSeek-V3 stores the latent (its KV rows: 512 + 64 values,
// two fp8 segments under a codec), never the 12x larger hidden state.
func TestPlanMLA(t *testing.T) {
	c, err := model.Preset("deepseek-v3")
	if err != nil {
		t.Fatal(err)
	}
	if HiddenAllowed(c) {
		t.Fatal("hidden layers allowed for MLA")
	}
	for _, name := range profiles.Names() {
		p, _ := profiles.Load(name)
		for _, tier := range p.Tiers {
			pl, _ := NewPlatform(p, tier.Name)
			for _, n := range []int{1024, 4096, 16384} {
				_, all, err := pl.ChooseCodec(c, n, allCodecs)
				if err != nil {
					t.Fatal(err)
				}
				for _, d := range all {
					if d.Split.Hidden != 0 || d.Split.KV == 0 {
						t.Fatalf("%s/%s/%d/%s: %v, want the latent stored", name, tier.Name, n, d.CodecName, d.Split)
					}
					// 512 + 4 + 64 + 4 and 512 + 16 + 64 + 4, padded to 64
					want := map[state.Codec]uint32{state.CodecNone: 1152, state.CodecFP8Token: 640, state.CodecFP8Block: 640}[d.Codec]
					for _, lp := range d.Plan {
						if lp.Kind == state.LayerKV && lp.RowBytes != want {
							t.Fatalf("%s: latent rows of %d bytes, want %d", d.CodecName, lp.RowBytes, want)
						}
					}
				}
			}
		}
	}
}
