package serve

import (
	"math/rand"
	"testing"

	"github.com/hcache/hcache/internal/testseed"
	"github.com/hcache/hcache/model"
	"github.com/hcache/hcache/state"
	"github.com/hcache/hcache/state/codec"
)

// TestMeasureCodec: the lossless path measures no error and full greedy
// agreement; fp8 KV layers stay within E4M3's rounding bound (2^-4 of the
// layer's largest value, plus the dtype's own rounding) and the errors are
// not zero (the codec did run); every figure is finite.
func TestMeasureCodec(t *testing.T) {
	seed := testseed.Seed(t)
	for _, preset := range []string{"tiny-llama", "tiny-gqa", "tiny-opt"} {
		c, _ := model.Preset(preset)
		w := model.Synthesize(c, seed)
		rng := rand.New(rand.NewSource(seed))
		prompt := make([]int, 40)
		for i := range prompt {
			prompt[i] = rng.Intn(c.Vocab)
		}
		for _, cd := range []state.Codec{state.CodecNone, state.CodecFP8Token, state.CodecFP8Block} {
			for _, kind := range []state.LayerKind{state.LayerHidden, state.LayerKV} {
				r, err := MeasureCodec(c, w, cd, kind, prompt, 16)
				if err != nil {
					t.Fatalf("%s/%s/%s: %v", preset, cd, kind, err)
				}
				t.Logf("%s/%s/%s: K max %.4f rms %.4f, V max %.4f rms %.4f, attn max %.4f rms %.4f, agree %d/%d, %d B/token (%d in the dtype)",
					preset, cd, kind, r.KMaxRel, r.KRMSRel, r.VMaxRel, r.VRMSRel, r.AttnMaxRel, r.AttnRMSRel, r.Agree, r.Steps, r.BytesPerToken, r.ModelBytesPerToken)
				if cd == state.CodecNone {
					if r.KMaxRel != 0 || r.VMaxRel != 0 || r.AttnMaxRel != 0 || r.Agree != 16 || r.BytesPerToken != r.ModelBytesPerToken {
						t.Fatalf("%s/none/%s: the lossless path measures %+v (seed %d)", preset, kind, r, seed)
					}
					continue
				}
				row := codec.HiddenRowBytes(cd, c.DType, c.HiddenSize)
				if kind == state.LayerKV {
					row = codec.KVRowBytes(cd, c.DType, c.KVDim())
				}
				if r.KMaxRel == 0 || r.VMaxRel == 0 || r.BytesPerToken != c.Layers*row {
					t.Fatalf("%s/%s/%s: no error measured, or %d bytes per token for %d-byte rows: %+v", preset, cd, kind, r.BytesPerToken, row, r)
				}
				// bf16 rounds the decoded value once more (2^-9 relative).
				if kind == state.LayerKV && (r.KMaxRel > r.FP8Bound+1.0/256 || r.VMaxRel > r.FP8Bound+1.0/256) {
					t.Fatalf("%s/%s/kv: K/V max relative error %.4f/%.4f over the fp8 bound %.4f (seed %d)", preset, cd, r.KMaxRel, r.VMaxRel, r.FP8Bound, seed)
				}
			}
		}
	}
}
