package chunk

import (
	"fmt"

	"github.com/pierrec/lz4/v4"

	"github.com/hcache/hcache/chunk/format"
	"github.com/hcache/hcache/lsm"
)

// Compression of slices (Options.Compression = "lz4"). fp16/bf16 rows are
// first split into byte planes (all low bytes, then all high bytes), so the
// slowly varying sign/exponent bytes sit together where lz4 finds repeats;
// the shuffled slice is then lz4-compressed as one block. A slice is stored
// compressed only when that saves at least 1/8 of its bytes.

// shuffle2 splits 2-byte elements of src into two planes in dst.
func shuffle2(dst, src []byte) {
	n := len(src) / 2
	lo, hi := dst[:n], dst[n:2*n]
	for i := 0; i < n; i++ {
		lo[i] = src[2*i]
		hi[i] = src[2*i+1]
	}
}

// unshuffle2 reverses shuffle2.
func unshuffle2(dst, src []byte) {
	n := len(src) / 2
	lo, hi := src[:n], src[n:2*n]
	for i := 0; i < n; i++ {
		dst[2*i] = lo[i]
		dst[2*i+1] = hi[i]
	}
}

// compressSlice returns the stored form of raw rows in dst (which must hold
// lz4.CompressBlockBound(len(raw))) and whether it is compressed.
// The third result is lz4's output size (len(raw) when lz4 gave up), kept
// for the statistics even when the slice is stored raw.
func compressSlice(c *lz4.Compressor, dst, tmp, raw []byte) (int, bool, int) {
	shuffle2(tmp, raw)
	n, err := c.CompressBlock(tmp[:len(raw)], dst)
	if err != nil || n == 0 {
		return copy(dst, raw), false, len(raw)
	}
	if n > len(raw)-len(raw)/8 {
		return copy(dst, raw), false, n
	}
	return n, true, n
}

// decompressSlice restores raw rows (len(raw) bytes) from a stored slice.
func decompressSlice(raw, tmp, stored []byte) error {
	n, err := lz4.UncompressBlock(stored, tmp[:len(raw)])
	if err != nil {
		return fmt.Errorf("%w: lz4: %v", ErrCorrupt, err)
	}
	if n != len(raw) {
		return fmt.Errorf("%w: lz4 slice decompressed to %d bytes, want %d", ErrCorrupt, n, len(raw))
	}
	unshuffle2(raw, tmp[:n])
	return nil
}

// packCompressed builds the payload of a compressed record into an aligned
// buffer and fills the job's slice table.
func (f *flusher) packCompressed(j *writeJob, binding Binding, stored []int, plan []LayerPlan, hb int) ([][]byte, error) {
	o := j.op
	total := 0
	maxRaw := 0
	for _, l := range stored {
		raw := o.tokens * int(plan[l].RowBytes)
		total += format.RoundUp(lz4.CompressBlockBound(raw))
		maxRaw = max(maxRaw, raw)
	}
	buf, err := f.s.scratch.get(total)
	if err != nil {
		return nil, err
	}
	j.packed = buf
	tmp := make([]byte, maxRaw)
	var comp lz4.Compressor
	out := buf.Bytes()
	pos := 0
	for i, l := range stored {
		raw := o.slab[o.layerOff[l] : o.layerOff[l]+o.tokens*int(plan[l].RowBytes)]
		n, compressed, tried := compressSlice(&comp, out[pos:], tmp, raw)
		f.s.stats.lz4Bytes.Add(uint64(tried))
		flags := uint16(0)
		if compressed {
			flags = lsm.SliceLZ4
		}
		j.chunk.Slices[i] = lsm.Slice{Layer: uint16(l), Flags: flags, Off: uint32(hb + pos), Stored: uint32(n), Raw: uint32(len(raw)),
			CRC: format.SliceCRC(binding, o.group, uint16(l), raw)}
		f.s.stats.rawBytes.Add(uint64(len(raw)))
		f.s.stats.storedBytes.Add(uint64(n))
		end := format.RoundUp(pos + n)
		clear(out[pos+n : end])
		pos = end
	}
	return [][]byte{out[:pos]}, nil
}
