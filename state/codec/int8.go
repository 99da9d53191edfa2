package codec

import (
	"encoding/binary"
	"fmt"
	"math"

	"github.com/hcache/hcache/internal/half"
	"github.com/hcache/hcache/state"
)

// state.CodecInt8Channel: int8 codes with per-channel scales over a group of
// Int8Group tokens.
//
// A row of segs segments of n values (a hidden row: 1 x hidden_size; a KV
// row: K then V, 2 x kv_dim) is segs x n int8 codes (two's complement,
// -127..127; -128 is never written and refused), then a scale area of S
// little-endian uint16 slots, S = max(ceil(segs x n / Int8Group), 1 + 2 x
// segs), then zeros up to a multiple of RowAlign. A row is one of two kinds:
//
//   - a group row: the tokens at positions [64k, 64k+64) of a layer,
//     encoded together (a prefill, or 64 buffered decode steps). Channel c
//     (c indexes the row's segs x n values) has one scale over the group's
//     tokens, scale_c = amax_c / 127 rounded up to a bfloat16 (so no code
//     exceeds 127), and row i of the group carries the scales of channels
//     [i x C, (i+1) x C), C = ceil(segs x n / Int8Group), in its first C
//     slots (bfloat16 bits, sign clear). A value decodes as code x scale_c.
//     Decoding a group row needs all 64 rows of its group.
//   - a token row: a row encoded alone (a decode step, or the tokens of a
//     partial group at the end of an append). Slot 0 is 0xffff (a sign bit
//     no group scale has), then one float32 scale per segment (amax / 127
//     over the segment's values, two slots each). It decodes by itself.
//
// Groups are aligned to positions: an append from position p encodes the
// whole aligned groups it covers as group rows and the rest as token rows, so
// an encoder holds at most one group (64 tokens) of a layer, never the
// context. Every restore hands a layer's rows from position 0, and the store
// serves whole chunk groups plus a context's tail past its last whole chunk
// group; with chunk groups of 64 tokens (the store's default) that tail is
// token rows, so a restore never holds part of a group. With another chunk
// size (or a fork at a count inside a group, which the daemon refuses), a
// restore can hold a group's first rows without the rest: their decode
// fails (ErrCodec), it never yields other values.
//
// Error: a group row's value moves by at most half a step, scale_c / 2 <=
// amax_c / 254 x (1 + 2^-7); a token row's by amax_segment / 254. Unlike fp8
// the bound is absolute within a channel (or segment): small values of a
// channel with large ones lose relative precision.

// Int8Group is the tokens of an int8 group (their per-channel scales are
// shared).
const Int8Group = 64

// int8TokenMark is slot 0 of a token row.
const int8TokenMark = 0xffff

// int8Slots is the scale slots of a row of v values in segs segments.
func int8Slots(segs, v int) int {
	return max((v+Int8Group-1)/Int8Group, 1+2*segs)
}

// int8RowBytes is the stored size of an int8 row.
func int8RowBytes(segs, n int) int {
	if segs <= 0 || n <= 0 {
		return 0
	}
	return AlignRow(state.CodecInt8Channel, segs*n+2*int8Slots(segs, segs*n))
}

// roundUpBF16 is the smallest bfloat16 >= f (f finite, >= 0).
func roundUpBF16(f float32) uint16 {
	b := math.Float32bits(f)
	h := uint16(b >> 16)
	if b&0xffff != 0 {
		h++
	}
	return h
}

// quant8 rounds a quotient x / scale to the nearest code (ties to even),
// clamped to +-127.
func quant8(x float32) int8 {
	q := math.RoundToEven(float64(x))
	return int8(max(-127, min(127, q)))
}

// EncodeRows encodes rows of segs segments of n values (vals: the rows back
// to back, each its segments back to back) into dst (len(vals)/(segs x n)
// rows of RowBytes), the first row being the token at position first of
// its layer. Under CodecInt8Channel, whole aligned groups become group rows
// and the rest token rows; under the other codecs each row is EncodeRow's.
func EncodeRows(c state.Codec, dtype string, dst []byte, segs, n, first int, vals []float32) error {
	if segs <= 0 || n <= 0 || first < 0 {
		return fmt.Errorf("%w: rows of %d segments of %d values from position %d", ErrCodec, segs, n, first)
	}
	rb := RowBytes(c, dtype, segs, n)
	if rb == 0 {
		if _, err := elemBytes(dtype); err != nil {
			return err
		}
		return fmt.Errorf("%w: unknown codec %d", ErrCodec, uint8(c))
	}
	v := segs * n
	if len(vals)%v != 0 || len(dst) != len(vals)/v*rb {
		return fmt.Errorf("%w: %d values are not whole rows of %d, or %d bytes are not their %d-byte %s rows", ErrCodec, len(vals), v, len(dst), rb, c)
	}
	rows := len(vals) / v
	for i, f := range vals {
		if math.IsNaN(float64(f)) || math.IsInf(float64(f), 0) {
			return fmt.Errorf("%w: value %d of row %d is %v", ErrCodec, i%v, i/v, f)
		}
	}
	seg := make([][]float32, segs)
	for r := 0; r < rows; {
		pos := first + r
		if c == state.CodecInt8Channel && pos%Int8Group == 0 && rows-r >= Int8Group {
			encodeInt8Group(dst[r*rb:(r+Int8Group)*rb], rb, segs, n, vals[r*v:(r+Int8Group)*v])
			r += Int8Group
			continue
		}
		for j := range seg {
			seg[j] = vals[r*v+j*n : r*v+(j+1)*n]
		}
		if err := EncodeRow(c, dtype, dst[r*rb:(r+1)*rb], seg...); err != nil {
			return fmt.Errorf("row %d: %w", r, err)
		}
		r++
	}
	return nil
}

// encodeInt8Group writes one whole group (Int8Group rows of v = segs x n
// values, finite) as group rows.
func encodeInt8Group(dst []byte, rb, segs, n int, vals []float32) {
	v := segs * n
	scales := make([]uint16, v)
	sf := make([]float32, v)
	for ch := 0; ch < v; ch++ {
		var amax float32
		for t := 0; t < Int8Group; t++ {
			amax = max(amax, float32(math.Abs(float64(vals[t*v+ch]))))
		}
		scales[ch] = roundUpBF16(amax / 127)
		sf[ch] = half.BF16ToFloat32(scales[ch])
	}
	per := (v + Int8Group - 1) / Int8Group
	for t := 0; t < Int8Group; t++ {
		row := dst[t*rb : (t+1)*rb]
		clear(row)
		for ch, x := range vals[t*v : (t+1)*v] {
			if sf[ch] > 0 {
				row[ch] = byte(quant8(x / sf[ch]))
			}
		}
		for k := 0; k < per; k++ {
			if ch := t*per + k; ch < v {
				binary.LittleEndian.PutUint16(row[v+2*k:], scales[ch])
			}
		}
	}
}

// encodeInt8Token writes one token row of segs (finite values).
func encodeInt8Token(dst []byte, segs [][]float32) {
	clear(dst)
	n := len(segs[0])
	v := len(segs) * n
	binary.LittleEndian.PutUint16(dst[v:], int8TokenMark)
	for j, s := range segs {
		var amax float32
		for _, x := range s {
			amax = max(amax, float32(math.Abs(float64(x))))
		}
		scale := amax / 127
		binary.LittleEndian.PutUint32(dst[v+2+4*j:], math.Float32bits(scale))
		if scale == 0 {
			continue
		}
		for i, x := range s {
			dst[j*n+i] = byte(quant8(x / scale))
		}
	}
}

// decodeInt8Rows decodes rows (from position 0 of a layer, or a multiple of
// Int8Group) of segs segments of n values into out (float32 per value, the
// rows' values back to back).
func decodeInt8Rows(out []float32, src []byte, segs, n int) error {
	rb := int8RowBytes(segs, n)
	v := segs * n
	rows := len(src) / rb
	per := (v + Int8Group - 1) / Int8Group
	scales := make([]float32, v)
	for g := 0; g < rows; g += Int8Group {
		end := min(rows, g+Int8Group)
		group := binary.LittleEndian.Uint16(src[g*rb+v:]) != int8TokenMark
		if group {
			if end-g < Int8Group {
				return fmt.Errorf("%w: rows %d..%d are the first %d rows of an int8 group of %d: the rest is missing (a restore or fork cut the group)", ErrCodec, g, end-1, end-g, Int8Group)
			}
			for t := g; t < end; t++ {
				row := src[t*rb : (t+1)*rb]
				if binary.LittleEndian.Uint16(row[v:]) == int8TokenMark {
					return fmt.Errorf("%w: row %d is a token row inside the int8 group of rows %d..%d", ErrCodec, t, g, end-1)
				}
				for k := 0; k < per; k++ {
					ch := (t-g)*per + k
					if ch >= v {
						break
					}
					s := half.BF16ToFloat32(binary.LittleEndian.Uint16(row[v+2*k:]))
					if !(s >= 0) || math.IsInf(float64(s), 0) {
						return fmt.Errorf("%w: row %d: channel %d's scale is %v (want a finite value >= 0)", ErrCodec, t, ch, s)
					}
					scales[ch] = s
				}
			}
		}
		for t := g; t < end; t++ {
			row := src[t*rb : (t+1)*rb]
			o := out[t*v : (t+1)*v]
			if !group {
				if binary.LittleEndian.Uint16(row[v:]) != int8TokenMark {
					return fmt.Errorf("%w: row %d is a group row after token rows in the int8 group of rows %d..%d", ErrCodec, t, g, end-1)
				}
				for j := 0; j < segs; j++ {
					s := math.Float32frombits(binary.LittleEndian.Uint32(row[v+2+4*j:]))
					if !(s >= 0) || math.IsInf(float64(s), 0) {
						return fmt.Errorf("%w: row %d: segment %d's scale is %v (want a finite value >= 0)", ErrCodec, t, j, s)
					}
					for i := j * n; i < (j+1)*n; i++ {
						scales[i] = s
					}
				}
			}
			for i, q := range row[:v] {
				if q == 0x80 {
					return fmt.Errorf("%w: row %d value %d is the int8 code -128, which the encoder never writes", ErrCodec, t, i)
				}
				o[i] = float32(int8(q)) * scales[i]
			}
		}
	}
	return nil
}

// DecodeRows decodes rows of segs segments of n values stored under codec
// c (a layer's rows from position 0) into float32, the rows' values back to
// back: the reference every other decode of these rows is checked against.
func DecodeRows(c state.Codec, dtype string, dst []float32, src []byte, segs, n int) error {
	rb := RowBytes(c, dtype, segs, n)
	if rb == 0 || segs <= 0 || n <= 0 {
		if _, err := elemBytes(dtype); err != nil {
			return err
		}
		return fmt.Errorf("%w: rows of %d segments of %d values under codec %s", ErrCodec, segs, n, c)
	}
	if len(src)%rb != 0 || len(dst) != len(src)/rb*segs*n {
		return fmt.Errorf("%w: %d bytes are not whole %d-byte %s rows, or %d values are not theirs", ErrCodec, len(src), rb, c, len(dst))
	}
	if c == state.CodecInt8Channel {
		return decodeInt8Rows(dst, src, segs, n)
	}
	sb := SegmentBytes(c, dtype, n)
	for r := 0; r < len(src)/rb; r++ {
		for j := 0; j < segs; j++ {
			s := r*segs + j
			if err := Decode(c, dtype, dst[s*n:(s+1)*n], src[r*rb+j*sb:r*rb+(j+1)*sb]); err != nil {
				return fmt.Errorf("row %d: %w", r, err)
			}
		}
	}
	return nil
}

// transcodeInt8Rows is TranscodeRows under CodecInt8Channel.
func transcodeInt8Rows(dtype string, dst, src []byte, segs, n int) error {
	rb := int8RowBytes(segs, n)
	rows := len(src) / rb
	v := segs * n
	eb := len(dst) / max(1, rows*v)
	// A group at a time (its values stay in cache between the decode and
	// the conversion); each block starts on a group boundary.
	vals := make([]float32, min(rows, Int8Group)*v)
	for g := 0; g < rows; g += Int8Group {
		end := min(rows, g+Int8Group)
		blk := vals[:(end-g)*v]
		if err := decodeInt8Rows(blk, src[g*rb:end*rb], segs, n); err != nil {
			if g > 0 {
				return fmt.Errorf("rows from %d: %w", g, err)
			}
			return err
		}
		out := dst[g*v*eb : end*v*eb]
		switch dtype {
		case "float16":
			for i, f := range blk {
				binary.LittleEndian.PutUint16(out[2*i:], toF16(f))
			}
		case "bfloat16":
			for i, f := range blk {
				binary.LittleEndian.PutUint16(out[2*i:], half.BF16FromFloat32(f))
			}
		default:
			for i, f := range blk {
				binary.LittleEndian.PutUint32(out[4*i:], math.Float32bits(f))
			}
		}
	}
	return nil
}
