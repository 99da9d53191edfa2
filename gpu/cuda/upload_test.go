package cuda

import (
	"bytes"
	"math"
	"math/rand"
	"testing"

	"github.com/hcache/hcache/model"
)

// TestEncodeParallelMatchesSerial: the parallel encoding of a tensor into
// the model dtype is c.EncodeRow's bytes, for fp16, bf16 and fp32, at sizes
// around the chunk (empty, one value, a chunk less one, a chunk, more than
// the workers take at once), with ordinary, tiny, huge and special values.
func TestEncodeParallelMatchesSerial(t *testing.T) {
	seed := int64(20261203)
	t.Logf("seed %d", seed)
	defer func(c int) { encodeChunk = c }(encodeChunk)
	for _, chunk := range []int{1 << 20, 1000, 1} {
		encodeChunk = chunk
		for _, dtype := range []string{"float16", "bfloat16", "float32"} {
			c := &model.Config{DType: dtype}
			for _, n := range []int{0, 1, chunk - 1, chunk, chunk + 1, 3*chunk + 7, 40*chunk + 3} {
				if n < 0 || (chunk == 1<<20 && n > 4*chunk) {
					continue
				}
				rng := rand.New(rand.NewSource(seed + int64(n)))
				src := make([]float32, n)
				for i := range src {
					switch rng.Intn(8) {
					case 0:
						src[i] = float32(rng.NormFloat64() * 1e-6) // fp16 subnormals
					case 1:
						src[i] = float32(rng.NormFloat64() * 1e5) // past fp16's range
					case 2:
						src[i] = []float32{0, float32(math.Copysign(0, -1)), float32(math.Inf(1)), float32(math.NaN())}[rng.Intn(4)]
					default:
						src[i] = float32(rng.NormFloat64())
					}
				}
				want := make([]byte, n*c.ElemBytes())
				c.EncodeRow(want, src)
				got := make([]byte, len(want))
				for i := range got {
					got[i] = 0xa5 // every byte must be written
				}
				encodeParallel(c, got, src)
				if !bytes.Equal(got, want) {
					i := 0
					for got[i] == want[i] {
						i++
					}
					t.Fatalf("chunk %d, %s, %d values: byte %d is %#x, the serial encoding %#x", chunk, dtype, n, i, got[i], want[i])
				}
			}
		}
	}
}

// TestUploadFwdWeightsBytes: what uploadFwdWeights puts on the device, with
// tensors split across the encoding goroutines (a small chunk), is each
// tensor's serial encoding (gate||up and k||v concatenated), for a Llama
// fp16 model, a bf16 GQA one and OPT (its positions and biases float32).
func TestUploadFwdWeightsBytes(t *testing.T) {
	defer func(c int) { encodeChunk = c }(encodeChunk)
	encodeChunk = 97
	for _, preset := range []string{"tiny-llama", "tiny-gqa", "tiny-opt"} {
		c := variant(t, preset, nil)
		w := model.Synthesize(c, 3)
		mem := newHostMem()
		layers := min(2, c.Layers)
		fw, err := uploadFwdWeights(mem, c, w, layers, 1<<40, nil, nil)
		if err != nil {
			t.Fatal(err)
		}
		enc := func(vs ...[]float32) []byte {
			var all []float32
			for _, v := range vs {
				all = append(all, v...)
			}
			b := make([]byte, len(all)*c.ElemBytes())
			c.EncodeRow(b, all)
			return b
		}
		check := func(what string, p uintptr, want []byte) {
			t.Helper()
			if p == 0 {
				t.Fatalf("%s %s: not uploaded", preset, what)
			}
			if got := mem.bytes(t, p, len(want)); !bytes.Equal(got, want) {
				t.Errorf("%s %s: the uploaded bytes differ from the serial encoding", preset, what)
			}
		}
		check("embed_tokens", fw.embed, enc(w.Embed))
		if c.Arch == model.ArchOPT {
			check("embed_positions", fw.posEmbed, enc(w.PosEmbed))
		}
		for l := 0; l < layers; l++ {
			lw, fl := &w.Layers[l], &fw.layers[l]
			check("q_proj", fl.wq, enc(lw.Wq))
			check("o_proj", fl.wo, enc(lw.Wo))
			check("k||v_proj", fl.wkv, enc(lw.Wk, lw.Wv))
			check("attention norm", fl.attnNormW, f32bytes(lw.AttnNormW))
			if c.Arch == model.ArchOPT {
				check("fc1", fl.w1, enc(lw.Fc1))
				check("fc2", fl.w2, enc(lw.Fc2))
				check("fc1 bias", fl.b1, f32bytes(lw.Fc1B))
			} else {
				check("gate||up", fl.w1, enc(lw.Wgate, lw.Wup))
				check("down_proj", fl.w2, enc(lw.Wdown))
			}
		}
		fw.release(mem)
	}
}
