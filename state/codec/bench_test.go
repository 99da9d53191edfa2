package codec

import (
	"math/rand"
	"testing"

	"github.com/hcache/hcache/state"
)

func benchRows(b *testing.B, c state.Codec, n int) ([]float32, []byte) {
	rng := rand.New(rand.NewSource(1))
	x := make([]float32, n)
	for i := range x {
		x[i] = float32(rng.NormFloat64())
	}
	enc := make([]byte, SegmentBytes(c, "float16", n))
	if err := Encode(c, "float16", enc, x); err != nil {
		b.Fatal(err)
	}
	b.SetBytes(int64(2 * n))
	return x, enc
}

func BenchmarkEncodeFP8Token4096(b *testing.B) {
	x, enc := benchRows(b, state.CodecFP8Token, 4096)
	for b.Loop() {
		Encode(state.CodecFP8Token, "float16", enc, x)
	}
}

func BenchmarkTranscodeFP8Token4096(b *testing.B) {
	_, enc := benchRows(b, state.CodecFP8Token, 4096)
	dst := make([]byte, 2*4096)
	for b.Loop() {
		Transcode(state.CodecFP8Token, "float16", dst, enc, 4096)
	}
}

func BenchmarkTranscodeFP8Block4096(b *testing.B) {
	_, enc := benchRows(b, state.CodecFP8Block, 4096)
	dst := make([]byte, 2*4096)
	for b.Loop() {
		Transcode(state.CodecFP8Block, "float16", dst, enc, 4096)
	}
}
