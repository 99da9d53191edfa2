package cuda

import (
	"bytes"
	_ "embed"
	"errors"
	"fmt"
	"runtime"
	"unsafe"

	"github.com/hcache/hcache/internal/stat"
	"github.com/hcache/hcache/state"
	"github.com/hcache/hcache/state/codec"
)

//go:generate sh -c "clang-19 -x cuda --cuda-device-only --cuda-gpu-arch=sm_80 -nocudainc -nocudalib -O3 -ffp-contract=off -S -o kernels/codec.ptx kernels/codec.cu"

//go:embed kernels/codec.ptx
var codecPTX []byte

// The fp8 codecs on the device: kernels/codec.cu's hc_fp8_dequant decodes
// rows stored under an fp8 codec into the model dtype after the copy has
// moved the fp8 bytes. Its arithmetic is checked on the host against
// state/codec (TestCodecKernelMatchesTranscode); on a GPU, CodecCopy checks
// its output against the same host decode before it reports a time. The
// restore pipeline calls it through Restore.Encoded (restore.go): serve
// hands fp8 layers to a CUDA restore as stored, the copy moves the encoded
// bytes into a staging slot, and the kernel decodes them into the lane's
// decode buffer on the compute stream before the GEMM or the scatter.

// CodecCopyResult is one CodecCopy measurement: device times (events on the
// copy stream) of copying one layer's rows in the model dtype, and of copying
// the same rows encoded under the codec plus the dequantize kernel.
type CodecCopyResult struct {
	Codec       string  `json:"codec"`
	Tokens      int     `json:"tokens"`
	RawBytes    int     `json:"raw_bytes"`
	StoredBytes int     `json:"stored_bytes"`
	CopyMS      float64 `json:"copy_ms"`        // model-dtype rows, median
	CodecMS     float64 `json:"codec_ms"`       // encoded rows + dequantize, median
	CodecCopyMS float64 `json:"codec_copy_ms"`  // encoded rows copy alone, median
	Ratio       float64 `json:"codec_vs_copy"`  // CodecMS / CopyMS
	Checked     bool    `json:"output_checked"` // the decoded bytes equal state/codec's
}

// CodecCopy times, on the device, reps copies of raw (one layer's rows in
// the model dtype, segs segments of vals values per token, pinned host
// memory) against reps copies of enc (the same rows under cd, pinned) each
// followed by the dequantize kernel, alternating, and checks the kernel's
// output against state/codec.TranscodeRows of enc. It refuses codec none and
// a dtype the kernel does not write.
func (b *Backend) CodecCopy(cd state.Codec, segs, vals int, raw, enc []byte, reps int) (*CodecCopyResult, error) {
	c := b.cfg
	if cd != state.CodecFP8Token && cd != state.CodecFP8Block {
		return nil, fmt.Errorf("cuda: no device decode for codec %s", cd)
	}
	sb := codec.SegmentBytes(cd, c.DType, vals)
	rb := codec.RowBytes(cd, c.DType, segs, vals)
	if segs <= 0 || vals <= 0 || len(enc) == 0 || len(enc)%rb != 0 {
		return nil, fmt.Errorf("cuda: %d encoded bytes are not whole rows of %d segments of %d values", len(enc), segs, vals)
	}
	nseg := len(enc) / rb * segs
	if len(raw) != nseg*vals*c.ElemBytes() {
		return nil, fmt.Errorf("cuda: %d raw bytes for %d segments of %d values", len(raw), nseg, vals)
	}
	want := make([]byte, len(raw))
	if err := codec.TranscodeRows(cd, c.DType, want, enc, segs, vals); err != nil {
		return nil, err
	}
	block := vals
	if cd == state.CodecFP8Block {
		block = codec.BlockSize
	}
	res := &CodecCopyResult{Codec: cd.String(), Tokens: len(enc) / rb, RawBytes: len(raw), StoredBytes: len(enc)}
	if b.d == nil {
		return nil, errors.New("cuda: CodecCopy needs a GPU")
	}
	done := b.exclusive() // no restore runs meanwhile
	defer done()
	err := b.with(func() error {
		d := b.d
		fn := b.fDeq
		b.mu.Lock()
		if len(b.idle) == 0 {
			b.mu.Unlock()
			return errors.New("cuda: no restore lane")
		}
		copyS := b.idle[0].copyS
		b.mu.Unlock()
		var bufs []uintptr
		defer func() {
			for _, p := range bufs {
				b.free(p)
			}
		}()
		alloc := func(n int) (uintptr, error) {
			p, err := b.alloc(n)
			if err == nil {
				bufs = append(bufs, p)
			}
			return p, err
		}
		dRaw, err := alloc(len(raw))
		if err != nil {
			return err
		}
		dSrc, err := alloc(len(enc))
		if err != nil {
			return err
		}
		dDst, err := alloc(len(raw))
		if err != nil {
			return err
		}
		dBad, err := alloc(4)
		if err != nil {
			return err
		}
		if err := b.htod(dBad, make([]byte, 4)); err != nil {
			return err
		}
		var ev [4]uintptr
		for i := range ev {
			if err := d.check("cuEventCreate", d.call("cuEventCreate", ptr(&ev[i]), 0)); err != nil {
				return err
			}
			defer d.call("cuEventDestroy_v2", ev[i])
		}
		a := struct {
			src, dst                                          uint64
			nseg, segs, vals, block, segBytes, rowBytes, dtyp int32
			bad                                               uint64
		}{uint64(dSrc), uint64(dDst), int32(nseg), int32(segs), int32(vals), int32(block), int32(sb), int32(rb), int32(b.dtype), uint64(dBad)}
		params := []unsafe.Pointer{unsafe.Pointer(&a.src), unsafe.Pointer(&a.dst), unsafe.Pointer(&a.nseg), unsafe.Pointer(&a.segs),
			unsafe.Pointer(&a.vals), unsafe.Pointer(&a.block), unsafe.Pointer(&a.segBytes), unsafe.Pointer(&a.rowBytes),
			unsafe.Pointer(&a.dtyp), unsafe.Pointer(&a.bad)}
		elapsed := func(e0, e1 uintptr) (float64, error) {
			if err := d.check("cuEventSynchronize", d.call("cuEventSynchronize", e1)); err != nil {
				return 0, err
			}
			var ms float32
			if err := d.check("cuEventElapsedTime", d.call("cuEventElapsedTime", ptr(&ms), e0, e1)); err != nil {
				return 0, err
			}
			return float64(ms), nil
		}
		var copyMS, codecMS, codecCopyMS []float64
		for r := 0; r < reps+1; r++ { // the first round warms up, untimed
			d.call("cuEventRecord", ev[0], copyS)
			if err := d.check("cuMemcpyHtoDAsync raw", d.call("cuMemcpyHtoDAsync_v2", dRaw, bptr(raw), uintptr(len(raw)), copyS)); err != nil {
				return err
			}
			d.call("cuEventRecord", ev[1], copyS)
			t1, err := elapsed(ev[0], ev[1])
			if err != nil {
				return err
			}
			d.call("cuEventRecord", ev[0], copyS)
			if err := d.check("cuMemcpyHtoDAsync fp8", d.call("cuMemcpyHtoDAsync_v2", dSrc, bptr(enc), uintptr(len(enc)), copyS)); err != nil {
				return err
			}
			d.call("cuEventRecord", ev[2], copyS)
			escape(params)
			code := d.call("cuLaunchKernel", fn, uintptr(nseg), 1, 1, uintptr(b.opts.Threads), 1, 1, 0, copyS,
				uintptr(unsafe.Pointer(&params[0])), 0)
			runtime.KeepAlive(params)
			runtime.KeepAlive(&a)
			if err := d.check("cuLaunchKernel hc_fp8_dequant", code); err != nil {
				return err
			}
			d.call("cuEventRecord", ev[1], copyS)
			t2, err := elapsed(ev[0], ev[1])
			if err != nil {
				return err
			}
			t3, err := elapsed(ev[0], ev[2])
			if err != nil {
				return err
			}
			if r > 0 {
				copyMS, codecMS, codecCopyMS = append(copyMS, t1), append(codecMS, t2), append(codecCopyMS, t3)
			}
		}
		runtime.KeepAlive(raw)
		runtime.KeepAlive(enc)
		got := make([]byte, len(raw))
		if err := b.dtoh(got, dDst); err != nil {
			return err
		}
		bad := make([]byte, 4)
		if err := b.dtoh(bad, dBad); err != nil {
			return err
		}
		if !bytes.Equal(bad, make([]byte, 4)) {
			return errors.New("cuda: the dequantize kernel flagged rows that are not an encoding")
		}
		if !bytes.Equal(got, want) {
			for i := range got {
				if got[i] != want[i] {
					return fmt.Errorf("cuda: the dequantize kernel's byte %d is 0x%02x, state/codec's 0x%02x", i, got[i], want[i])
				}
			}
		}
		res.Checked = true
		res.CopyMS, res.CodecMS, res.CodecCopyMS = stat.Median(copyMS), stat.Median(codecMS), stat.Median(codecCopyMS)
		res.Ratio = res.CodecMS / res.CopyMS
		return nil
	})
	if err != nil {
		return nil, err
	}
	return res, nil
}
