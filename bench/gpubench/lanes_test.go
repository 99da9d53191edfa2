package gpubench

import (
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/hcache/hcache/gpu"
	"github.com/hcache/hcache/model"
	"github.com/hcache/hcache/state"
	"github.com/hcache/hcache/state/codec"
)

// CheckLanes on the CPU backend, for a Llama (hidden and KV layers) and a
// GQA preset (KV only): both codecs and both concurrency levels pass, with
// a timing per level.
func TestCheckLanesCPU(t *testing.T) {
	for _, preset := range []string{"tiny-llama", "tiny-gqa"} {
		res, err := CheckLanes(LanesOptions{Model: preset, Tokens: 40, Dir: t.TempDir(), Backend: "cpu", Reps: 1, Seed: 7})
		if err != nil {
			t.Fatal(err)
		}
		if res.Failed != 0 || len(res.Codecs) != 2 || len(res.Concurrency) != 2 || res.Lanes != 4 {
			t.Fatalf("%s: %+v", preset, res)
		}
		for i, r := range res.Concurrency {
			if r.N != []int{4, 8}[i] || !r.Equal || !(r.SequentialMS > 0) || !(r.ConcurrentMS > 0) || r.Rounds != 1 {
				t.Errorf("%s: %+v", preset, r)
			}
		}
		for _, r := range res.Codecs {
			if !r.OK || !r.Exact || r.DecodedOnDevice {
				t.Errorf("%s: %+v", preset, r)
			}
		}
	}
	if _, err := CheckLanes(LanesOptions{Tokens: 8, Backend: "tpu"}); err == nil || !strings.Contains(err.Error(), `backend "tpu"`) {
		t.Fatalf("unknown backend: %v", err)
	}
	if _, err := CheckLanes(LanesOptions{Tokens: 8, Backend: "cpu", Layers: 99, Dir: t.TempDir()}); err == nil || !strings.Contains(err.Error(), "99 layers") {
		t.Fatalf("too many layers: %v", err)
	}
}

// faultyCPU is the CPU backend with restores that decode fp8 rows
// themselves (a gpu.DeviceDecoder, as CUDA's), and faults the check must
// catch: a decode that changes one value (badDecode), or a restore that
// changes a value while another runs beside it (badConcurrent).
type faultyCPU struct {
	gpu.Backend
	badDecode, badConcurrent bool
	running                  atomic.Int32
}

type faultyRestore struct {
	gpu.Restore
	b    *faultyCPU
	cfg  *model.Config
	once sync.Once
}

func (f *faultyCPU) BeginRestore(dst gpu.Cache, positions []int) (gpu.Restore, error) {
	r, err := f.Backend.BeginRestore(dst, positions)
	if err != nil {
		return nil, err
	}
	f.running.Add(1)
	return &faultyRestore{Restore: r, b: f, cfg: f.Config()}, nil
}

func (r *faultyRestore) ended() { r.once.Do(func() { r.b.running.Add(-1) }) }

func (r *faultyRestore) Wait() (gpu.Timing, error) { defer r.ended(); return r.Restore.Wait() }
func (r *faultyRestore) Abort()                    { r.ended(); r.Restore.Abort() }

// corrupt flips a low mantissa bit of row 0's first value.
func corrupt(rows []byte) []byte {
	out := append([]byte(nil), rows...)
	out[0] ^= 1
	return out
}

func (r *faultyRestore) KV(layer int, rows []byte, release func()) error {
	if r.b.badConcurrent && r.b.running.Load() > 1 {
		rows = corrupt(rows)
	}
	return r.Restore.KV(layer, rows, release)
}

func (r *faultyRestore) DecodesOnDevice(cd state.Codec) bool { return cd != state.CodecNone }

func (r *faultyRestore) Encoded(layer int, kind state.LayerKind, cd state.Codec, rows []byte, release func()) error {
	c := r.cfg
	segs, per := 1, c.HiddenSize
	if kind == state.LayerKV {
		segs, per = 2, c.KVDim()
	}
	n := len(rows) / codec.RowBytes(cd, c.DType, segs, per)
	dec := make([]byte, n*segs*per*c.ElemBytes())
	err := codec.TranscodeRows(cd, c.DType, dec, rows, segs, per)
	if release != nil {
		release()
	}
	if err != nil {
		return err
	}
	if r.b.badDecode {
		dec = corrupt(dec)
	}
	if kind == state.LayerHidden {
		return r.Restore.Hidden(layer, dec, nil)
	}
	return r.KV(layer, dec, nil)
}

// The check fails when the device's decode differs from the host's by one
// bit, and when a restore run beside others differs from its restore
// alone; a correct device decoder passes and is reported as decoding on
// the device.
func TestCheckLanesFindsFaults(t *testing.T) {
	for _, tc := range []struct {
		name                     string
		badDecode, badConcurrent bool
	}{
		{"correct", false, false},
		{"one bit decoded wrong", true, false},
		{"one bit wrong beside others", false, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o := LanesOptions{Model: "tiny-llama", Tokens: 33, Dir: t.TempDir(), Backend: "cpu", Reps: 1, Seed: 3}
			o.open = func(c *model.Config, w *model.Weights) (gpu.Backend, error) {
				b, err := gpu.NewCPU(c, w)
				return &faultyCPU{Backend: b, badDecode: tc.badDecode, badConcurrent: tc.badConcurrent}, err
			}
			res, err := CheckLanes(o)
			if err != nil {
				t.Fatal(err)
			}
			for _, r := range res.Codecs {
				if !r.DecodedOnDevice || r.OK == tc.badDecode || r.Exact == tc.badDecode {
					t.Errorf("codec %+v", r)
				}
			}
			for _, r := range res.Concurrency {
				if r.OK == tc.badConcurrent || r.Equal == tc.badConcurrent || (tc.badConcurrent && len(r.Mismatched) == 0) {
					t.Errorf("%d at once: %+v", r.N, r)
				}
			}
			want := 0
			if tc.badDecode {
				want += 2
			}
			if tc.badConcurrent {
				want += 2
			}
			if res.Failed != want {
				t.Errorf("%d failed, want %d: %s", res.Failed, want, fmt.Sprint(res))
			}
		})
	}
}
