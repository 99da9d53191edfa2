// Package codec encodes and decodes stored rows, with no I/O: the encodings
// a state's identity names (state.Codec). It is imported by the Saver (encode
// on save), by the restore path (decode into the consumer's dtype), by the
// GPU backends (the host reference of the dequantize kernel) and by clients.
//
// A row is one token's values of one layer, in segments: a hidden row is one
// segment of hidden_size values, a KV row two segments of kv_heads x head_dim
// values (K, then V). Each segment is encoded on its own:
//
//   - state.CodecNone: the model dtype (fp16 or bf16, 2 bytes; float32, 4),
//     little-endian: what every state stored before codecs holds.
//   - state.CodecFP8Token: n fp8 E4M3 codes (the OCP "e4m3fn" format: bias 7,
//     no infinities, 0x7f/0xff NaN, largest finite 448), then one float32
//     scale: scale = amax / 448 over the segment's values, code_i =
//     e4m3(x_i / scale) rounded to nearest even (float32 arithmetic), and a
//     value decodes as e4m3value(code_i) x scale. A segment of zeros has
//     scale 0. n + 4 bytes.
//   - state.CodecFP8Block: the same with one scale per block of BlockSize
//     values (the last block may be shorter): n codes, then ceil(n/BlockSize)
//     float32 scales. For head_dim 128 a block is one head.
//   - state.CodecInt8Channel: int8 codes with a bfloat16 scale per channel
//     per aligned group of 64 tokens, the scales spread over the group's
//     rows; a row encoded alone carries its own scales. Its rows are
//     encoded and decoded as rows (EncodeRows from a layer's position,
//     TranscodeRows and DecodeRows from position 0), not segments:
//     int8.go has the layout.
//
// Under an fp8 codec a stored row is its segments back to back, then zeros
// up to a multiple of RowAlign (64) bytes: the store reads a slice of 64
// tokens straight into the restore buffer only when it is whole 4 KiB
// blocks, and a 4100-byte row made every slice go through a bounce buffer
// and a copy (measured: the fp8 hidden restore took as long as the fp16 one
// with half the bytes). An fp8 hidden row of 4096 values is 4160 bytes.
//
// E4M3 keeps 3 mantissa bits: a value decodes within 2^-4 of itself
// (relative, half an ulp) when |x| >= 2^-6 x scale, and within 2^-10 x scale
// (absolute) below that; Bound returns this per value, and decoding into an
// fp16/bf16 consumer adds that dtype's own rounding. The lossless option is
// not a row codec (rows have a fixed size in the store): it is the store's
// byte-plane shuffle + lz4 of whole slices (chunk.Options.Compression), which
// restores the same bytes and so is not part of the identity.
package codec

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"

	"github.com/hcache/hcache/internal/half"
	"github.com/hcache/hcache/state"
)

// BlockSize is the values per scale of state.CodecFP8Block.
const BlockSize = 128

// E4M3Max is the largest finite fp8 E4M3 value.
const E4M3Max = 448

// ErrCodec is wrapped by every codec error: bad arguments, values that
// cannot be encoded (NaN, infinities) and encoded bytes that are not a
// valid encoding.
var ErrCodec = errors.New("codec: bad rows")

// elemBytes is the size of one value of a model dtype.
func elemBytes(dtype string) (int, error) {
	switch dtype {
	case "float16", "bfloat16":
		return 2, nil
	case "float32":
		return 4, nil
	}
	return 0, fmt.Errorf("%w: dtype %q (float16, bfloat16 or float32)", ErrCodec, dtype)
}

// SegmentBytes is the encoded size of a segment of n values of a model of
// dtype under codec c (0 for an unknown codec or dtype).
func SegmentBytes(c state.Codec, dtype string, n int) int {
	switch c {
	case state.CodecNone:
		eb, err := elemBytes(dtype)
		if err != nil {
			return 0
		}
		return n * eb
	case state.CodecFP8Token:
		return n + 4
	case state.CodecFP8Block:
		return n + 4*((n+BlockSize-1)/BlockSize)
	case state.CodecInt8Channel:
		return n // the codes; the row's scale area follows its segments (RowBytes)
	}
	return 0
}

// RowAlign is the multiple of bytes an fp8 row is padded to.
const RowAlign = 64

// AlignRow pads the bytes of a row's segments to the codec's row size: a
// multiple of RowAlign under an fp8 codec, unchanged under codec none (0
// stays 0).
func AlignRow(c state.Codec, b int) int {
	if c == state.CodecNone || b == 0 {
		return b
	}
	return (b + RowAlign - 1) / RowAlign * RowAlign
}

// RowBytes is the stored size of a row of segs segments of n values.
func RowBytes(c state.Codec, dtype string, segs, n int) int {
	if c == state.CodecInt8Channel {
		if _, err := elemBytes(dtype); err != nil {
			return 0
		}
		return int8RowBytes(segs, n)
	}
	return AlignRow(c, segs*SegmentBytes(c, dtype, n))
}

// HiddenRowBytes is the stored size of one hidden row (hidden values).
func HiddenRowBytes(c state.Codec, dtype string, hidden int) int {
	return RowBytes(c, dtype, 1, hidden)
}

// KVRowBytes is the stored size of one KV row: K and V segments of kvDim
// values each.
func KVRowBytes(c state.Codec, dtype string, kvDim int) int {
	return RowBytes(c, dtype, 2, kvDim)
}

// EncodeRow writes one row of segments (each len(segs[0]) values) into dst
// (RowBytes bytes), padding included.
func EncodeRow(c state.Codec, dtype string, dst []byte, segs ...[]float32) error {
	if len(segs) == 0 {
		return fmt.Errorf("%w: a row of no segments", ErrCodec)
	}
	n := len(segs[0])
	if want := RowBytes(c, dtype, len(segs), n); len(dst) != want || want == 0 {
		if _, err := elemBytes(dtype); err != nil {
			return err
		}
		return fmt.Errorf("%w: a %s row of %d segments of %d values needs %d bytes, got %d", ErrCodec, c, len(segs), n, want, len(dst))
	}
	sb := SegmentBytes(c, dtype, n)
	for j, seg := range segs {
		if len(seg) != n {
			return fmt.Errorf("%w: segment %d has %d values, segment 0 %d", ErrCodec, j, len(seg), n)
		}
		if c == state.CodecInt8Channel {
			for i, f := range seg {
				if math.IsNaN(float64(f)) || math.IsInf(float64(f), 0) {
					return fmt.Errorf("%w: value %d of segment %d is %v", ErrCodec, i, j, f)
				}
			}
			continue
		}
		if err := Encode(c, dtype, dst[j*sb:(j+1)*sb], seg); err != nil {
			return err
		}
	}
	if c == state.CodecInt8Channel {
		encodeInt8Token(dst, segs) // a row alone: a token row
		return nil
	}
	clear(dst[len(segs)*sb:])
	return nil
}

// scales returns how many scales a segment of n values has, and the values
// each covers.
func scales(c state.Codec, n int) (count, per int) {
	if c == state.CodecFP8Block {
		return (n + BlockSize - 1) / BlockSize, BlockSize
	}
	return 1, max(n, 1)
}

// Encode writes one segment of src's values into dst (SegmentBytes(c,
// dtype, len(src)) bytes). A NaN or infinite value is refused.
func Encode(c state.Codec, dtype string, dst []byte, src []float32) error {
	n := len(src)
	want := SegmentBytes(c, dtype, n)
	if want == 0 && n > 0 {
		if _, err := elemBytes(dtype); err != nil {
			return err
		}
		return fmt.Errorf("%w: unknown codec %d", ErrCodec, uint8(c))
	}
	if c == state.CodecInt8Channel {
		return errInt8Segment
	}
	if len(dst) != want {
		return fmt.Errorf("%w: %s segment of %d values needs %d bytes, got %d", ErrCodec, c, n, want, len(dst))
	}
	for i, f := range src {
		if math.IsNaN(float64(f)) || math.IsInf(float64(f), 0) {
			return fmt.Errorf("%w: value %d of the segment is %v", ErrCodec, i, f)
		}
	}
	if c == state.CodecNone {
		switch dtype {
		case "float32":
			for i, f := range src {
				binary.LittleEndian.PutUint32(dst[4*i:], math.Float32bits(f))
			}
		case "bfloat16":
			for i, f := range src {
				binary.LittleEndian.PutUint16(dst[2*i:], half.BF16FromFloat32(f))
			}
		default:
			half.Encode(dst, src)
		}
		return nil
	}
	ns, per := scales(c, n)
	for b := 0; b < ns; b++ {
		lo, hi := b*per, min(n, (b+1)*per)
		var amax float32
		for _, f := range src[lo:hi] {
			amax = max(amax, float32(math.Abs(float64(f))))
		}
		scale := amax / E4M3Max
		binary.LittleEndian.PutUint32(dst[n+4*b:], math.Float32bits(scale))
		if scale == 0 { // zeros (or values so small that amax/448 underflows)
			clear(dst[lo:hi])
			continue
		}
		for i := lo; i < hi; i++ {
			dst[i] = ToE4M3(src[i] / scale)
		}
	}
	return nil
}

// Decode reads one encoded segment (len(dst) values) into float32. A scale
// that is negative or not finite, or an fp8 NaN code, is refused: the
// encoder writes neither, so the bytes are not an encoding.
func Decode(c state.Codec, dtype string, dst []float32, src []byte) error {
	n := len(dst)
	if err := checkSrc(c, dtype, n, src); err != nil {
		return err
	}
	if c == state.CodecNone {
		switch dtype {
		case "float32":
			for i := range dst {
				dst[i] = math.Float32frombits(binary.LittleEndian.Uint32(src[4*i:]))
			}
		case "bfloat16":
			for i := range dst {
				dst[i] = half.BF16ToFloat32(binary.LittleEndian.Uint16(src[2*i:]))
			}
		default:
			half.Decode(dst, src)
		}
		return nil
	}
	ns, per := scales(c, n)
	for b := 0; b < ns; b++ {
		scale, err := scaleAt(src, n, b)
		if err != nil {
			return err
		}
		lo, hi := b*per, min(n, (b+1)*per)
		for i := lo; i < hi; i++ {
			q := src[i]
			if q&0x7f == 0x7f {
				return fmt.Errorf("%w: value %d is an fp8 NaN code (0x%02x)", ErrCodec, i, q)
			}
			dst[i] = e4m3Table[q] * scale
		}
	}
	return nil
}

// Transcode decodes one encoded segment of n values into the consumer's
// dtype (dst: n values of dtype, as CodecNone stores them): the restore
// path's decode. Under CodecNone it is a copy.
func Transcode(c state.Codec, dtype string, dst []byte, src []byte, n int) error {
	eb, err := elemBytes(dtype)
	if err != nil {
		return err
	}
	if len(dst) != n*eb {
		return fmt.Errorf("%w: %d values of %s need %d bytes, got %d", ErrCodec, n, dtype, n*eb, len(dst))
	}
	if err := checkSrc(c, dtype, n, src); err != nil {
		return err
	}
	if c == state.CodecNone {
		copy(dst, src)
		return nil
	}
	ns, per := scales(c, n)
	for b := 0; b < ns; b++ {
		scale, err := scaleAt(src, n, b)
		if err != nil {
			return err
		}
		lo, hi := b*per, min(n, (b+1)*per)
		for i := lo; i < hi; i++ {
			if src[i]&0x7f == 0x7f {
				return fmt.Errorf("%w: value %d is an fp8 NaN code (0x%02x)", ErrCodec, i, src[i])
			}
		}
		if eb == 2 && hi-lo >= 1024 {
			// Long segments: the 256 possible outputs of this scale,
			// then one lookup per value.
			var tab [256]uint16
			conv := half.FromFloat32
			if dtype == "bfloat16" {
				conv = half.BF16FromFloat32
			}
			for q := range tab {
				tab[q] = conv(e4m3Table[q] * scale)
			}
			out := dst[2*lo : 2*hi]
			for j, q := range src[lo:hi] {
				h := tab[q]
				out[2*j] = byte(h)
				out[2*j+1] = byte(h >> 8)
			}
			continue
		}
		for i := lo; i < hi; i++ {
			f := e4m3Table[src[i]] * scale
			switch dtype {
			case "float16":
				binary.LittleEndian.PutUint16(dst[2*i:], toF16(f))
			case "bfloat16":
				binary.LittleEndian.PutUint16(dst[2*i:], half.BF16FromFloat32(f))
			default:
				binary.LittleEndian.PutUint32(dst[4*i:], math.Float32bits(f))
			}
		}
	}
	return nil
}

// toF16 is half.FromFloat32 with a fast path for values that round to a
// finite normal fp16 (the same rounding: to nearest even).
func toF16(f float32) uint16 {
	b := math.Float32bits(f)
	a := b & 0x7fffffff
	if a >= 0x38800000 && a < 0x477ff000 { // [2^-14, 65520): normal, no overflow
		a += 0xfff + (a>>13)&1
		return uint16((b>>16)&0x8000 | (a-0x38000000)>>13)
	}
	return half.FromFloat32(f)
}

// TranscodeRows decodes rows of segs segments of n values each (a hidden
// layer: 1 segment of hidden_size; a KV layer: 2 of kv_dim), RowBytes each,
// from their stored form to the consumer's dtype. dst must hold
// len(src)/RowBytes rows of segs x n values.
func TranscodeRows(c state.Codec, dtype string, dst, src []byte, segs, n int) error {
	sb := SegmentBytes(c, dtype, n)
	eb, err := elemBytes(dtype)
	if err != nil {
		return err
	}
	if sb == 0 || segs <= 0 {
		return fmt.Errorf("%w: rows of %d segments of %d values under codec %s", ErrCodec, segs, n, c)
	}
	rb := RowBytes(c, dtype, segs, n)
	if len(src)%rb != 0 {
		return fmt.Errorf("%w: %d bytes are not whole %d-byte %s rows", ErrCodec, len(src), rb, c)
	}
	rows := len(src) / rb
	if len(dst) != rows*segs*n*eb {
		return fmt.Errorf("%w: %d rows decode into %d bytes, got %d", ErrCodec, rows, rows*segs*n*eb, len(dst))
	}
	if c == state.CodecInt8Channel {
		return transcodeInt8Rows(dtype, dst, src, segs, n)
	}
	for r := 0; r < rows; r++ {
		for j := 0; j < segs; j++ {
			s := r*segs + j
			if err := Transcode(c, dtype, dst[s*n*eb:(s+1)*n*eb], src[r*rb+j*sb:r*rb+(j+1)*sb], n); err != nil {
				return fmt.Errorf("row %d: %w", r, err)
			}
		}
	}
	return nil
}

// errInt8Segment: int8 rows share a scale area (and group rows their
// group's scales), so they are encoded and decoded as rows.
var errInt8Segment = fmt.Errorf("%w: codec int8 encodes and decodes whole rows (EncodeRows, EncodeRow, TranscodeRows, DecodeRows), not segments", ErrCodec)

func checkSrc(c state.Codec, dtype string, n int, src []byte) error {
	if _, err := elemBytes(dtype); err != nil {
		return err
	}
	if !c.Known() {
		return fmt.Errorf("%w: unknown codec %d", ErrCodec, uint8(c))
	}
	if c == state.CodecInt8Channel {
		return errInt8Segment
	}
	if want := SegmentBytes(c, dtype, n); len(src) != want {
		return fmt.Errorf("%w: %s segment of %d values is %d bytes, got %d", ErrCodec, c, n, want, len(src))
	}
	return nil
}

func scaleAt(src []byte, n, b int) (float32, error) {
	s := math.Float32frombits(binary.LittleEndian.Uint32(src[n+4*b:]))
	if !(s >= 0) || math.IsInf(float64(s), 0) {
		return 0, fmt.Errorf("%w: scale %d is %v (want a finite value >= 0)", ErrCodec, b, s)
	}
	return s, nil
}

// Bound is the most a value x of a segment with the given scale can move
// when encoded and decoded (before any rounding to the consumer's dtype):
// half an E4M3 ulp, 2^-4 |x| for normals and 2^-10 x scale for subnormals.
func Bound(x, scale float32) float64 {
	return max(math.Abs(float64(x))/16, float64(scale)/1024)
}

// ToE4M3 rounds f to the nearest fp8 E4M3 code (ties to even), saturating
// at +-448 (the encoder's values never exceed it by more than rounding).
// NaN is not handled: Encode refuses it before.
func ToE4M3(f float32) uint8 {
	b := math.Float32bits(f)
	sign := uint8(b>>24) & 0x80
	b &= 0x7fffffff
	if b >= 0x43e00000 { // >= 448
		return sign | 0x7e
	}
	if b < 0x3c800000 { // < 2^-6: subnormal codes m x 2^-9, m in 0..8
		a := math.Float32frombits(b) * 512
		return sign | uint8(math.RoundToEven(float64(a)))
	}
	// Round the float32 mantissa to 3 bits, to nearest even; a carry
	// moves into the exponent, as it must.
	b += 0x7ffff + (b>>20)&1
	code := b>>20 - 120<<3 // rebias the exponent from 127 to 7
	return sign | uint8(min(code, 0x7e))
}

// FromE4M3 is the value of an E4M3 code (NaN for 0x7f and 0xff).
func FromE4M3(q uint8) float32 { return e4m3Table[q] }

var e4m3Table = func() (t [256]float32) {
	for q := range 256 {
		e, m := (q>>3)&15, q&7
		var v float64
		switch {
		case e == 15 && m == 7:
			v = math.NaN()
		case e == 0:
			v = float64(m) / 512
		default:
			v = (1 + float64(m)/8) * math.Ldexp(1, e-7)
		}
		if q&0x80 != 0 {
			v = -v
		}
		t[q] = float32(v)
	}
	return t
}()
