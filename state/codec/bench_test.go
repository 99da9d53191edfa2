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

// int8Layer64 is 64 Llama2-7B hidden rows encoded as one int8 group.
func int8Layer64(b *testing.B) ([]float32, []byte) {
	rng := rand.New(rand.NewSource(1))
	x := make([]float32, Int8Group*4096)
	for i := range x {
		x[i] = float32(rng.NormFloat64())
	}
	enc := make([]byte, Int8Group*RowBytes(state.CodecInt8Channel, "float16", 1, 4096))
	if err := EncodeRows(state.CodecInt8Channel, "float16", enc, 1, 4096, 0, x); err != nil {
		b.Fatal(err)
	}
	b.SetBytes(int64(2 * len(x)))
	return x, enc
}

func BenchmarkEncodeInt8Group4096(b *testing.B) {
	x, enc := int8Layer64(b)
	for b.Loop() {
		EncodeRows(state.CodecInt8Channel, "float16", enc, 1, 4096, 0, x)
	}
}

func BenchmarkTranscodeInt8Group4096(b *testing.B) {
	x, enc := int8Layer64(b)
	dst := make([]byte, 2*len(x))
	for b.Loop() {
		if err := TranscodeRows(state.CodecInt8Channel, "float16", dst, enc, 1, 4096); err != nil {
			b.Fatal(err)
		}
	}
}
