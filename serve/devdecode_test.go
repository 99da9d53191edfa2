package serve

import (
	"bytes"
	"fmt"
	"math/rand"
	"sync"
	"testing"

	"github.com/hcache/hcache/chunk"
	"github.com/hcache/hcache/gpu"
	"github.com/hcache/hcache/internal/testseed"
	"github.com/hcache/hcache/model"
	"github.com/hcache/hcache/serve/sched"
	"github.com/hcache/hcache/state"
	"github.com/hcache/hcache/state/codec"
)

// decodingBackend is a CPU backend whose restores decode fp8 rows
// themselves (gpu.DeviceDecoder, as the CUDA backend's do on the device):
// it records the rows each call received.
type decodingBackend struct {
	*gpu.CPU
	decodes bool // DecodesOnDevice's answer

	mu  sync.Mutex
	got map[string]int // "encoded hidden 2" / "hidden 2" -> bytes received
}

func (b *decodingBackend) BeginRestore(dst gpu.Cache, positions []int) (gpu.Restore, error) {
	r, err := b.CPU.BeginRestore(dst, positions)
	if err != nil {
		return nil, err
	}
	return &decodingRestore{Restore: r, b: b, n: len(positions)}, nil
}

type decodingRestore struct {
	gpu.Restore
	b *decodingBackend
	n int
}

func (r *decodingRestore) note(what string, layer, n int) {
	r.b.mu.Lock()
	r.b.got[fmt.Sprint(what, " ", layer)] = n
	r.b.mu.Unlock()
}

func (r *decodingRestore) Hidden(layer int, rows []byte, release func()) error {
	r.note("hidden", layer, len(rows))
	return r.Restore.Hidden(layer, rows, release)
}

func (r *decodingRestore) KV(layer int, rows []byte, release func()) error {
	r.note("kv", layer, len(rows))
	return r.Restore.KV(layer, rows, release)
}

func (r *decodingRestore) DecodesOnDevice(cd state.Codec) bool {
	return r.b.decodes && cd != state.CodecNone
}

func (r *decodingRestore) Encoded(layer int, kind state.LayerKind, cd state.Codec, rows []byte, release func()) error {
	r.note("encoded "+kind.String(), layer, len(rows))
	c := r.b.Config()
	dec, err := decodeRows(c, cd, kind, rows, r.n)
	if release != nil {
		release()
	}
	if err != nil {
		return err
	}
	if kind == state.LayerHidden {
		return r.Restore.Hidden(layer, dec, nil)
	}
	return r.Restore.KV(layer, dec, nil)
}

// TestRestoreHandsEncodedRows: a backend whose restores decode on the
// device (gpu.DeviceDecoder) gets every stored layer of an fp8 state as
// stored (the encoded bytes, so that its copy moves them), and restores
// exactly what the host decode gives; one that declines the codec gets
// model-dtype rows decoded on the host, as the CPU backend does.
func TestRestoreHandsEncodedRows(t *testing.T) {
	seed := testseed.Seed(t)
	st, err := chunk.Open(chunk.Options{Dir: t.TempDir(), ChunkTokens: 16, SegmentBytes: 8 << 20, Logf: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	c, _ := model.Preset("tiny-gqa")
	w := model.Synthesize(c, seed)
	rng := rand.New(rand.NewSource(seed))
	n := 29
	for _, cd := range []state.Codec{state.CodecFP8Token, state.CodecFP8Block} {
		split := sched.Split{Hidden: 2, KV: c.Layers - 2}
		plan := split.PlanCodec(c, cd)
		ident := IdentityCodec(c, w, plan, cd)
		wr, err := st.Create("ns", cd.String(), ident, chunk.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		for l, lp := range plan {
			segs, vals := 1, c.HiddenSize
			if lp.Kind == state.LayerKV {
				segs, vals = 2, c.KVDim()
			}
			rb := int(lp.RowBytes)
			rows := make([]byte, n*rb)
			for i := 0; i < n; i++ {
				seg := make([][]float32, segs)
				for j := range seg {
					seg[j] = make([]float32, vals)
					for v := range seg[j] {
						seg[j][v] = float32(rng.NormFloat64())
					}
				}
				if err := codec.EncodeRow(cd, c.DType, rows[i*rb:(i+1)*rb], seg...); err != nil {
					t.Fatal(err)
				}
			}
			if err := wr.AppendLayer(l, rows); err != nil {
				t.Fatal(err)
			}
		}
		if err := wr.Close(); err != nil {
			t.Fatal(err)
		}
		restore := func(b gpu.Backend) gpu.HostCache {
			dst := make(gpu.HostCache, c.Layers)
			for l := range dst {
				dst[l], _ = gpu.NewPagedKV(c, 8, (n+7)/8)
			}
			if _, err := NewRestorer(st, b, Settings{}).Restore(Request{NS: "ns", ID: cd.String(), Ident: ident, Dst: dst}); err != nil {
				t.Fatal(err)
			}
			return dst
		}
		cpu, err := gpu.NewCPU(c, w)
		if err != nil {
			t.Fatal(err)
		}
		want := restore(cpu)
		for _, decodes := range []bool{true, false} {
			b := &decodingBackend{CPU: cpu, decodes: decodes, got: map[string]int{}}
			got := restore(b)
			for l, lp := range plan {
				if !bytes.Equal(got[l].K, want[l].K) || !bytes.Equal(got[l].V, want[l].V) {
					t.Errorf("%s, device decode %v: layer %d differs from the host decode's restore", cd, decodes, l)
				}
				key, size := "encoded "+lp.Kind.String(), n*int(lp.RowBytes)
				if !decodes {
					key, size = "hidden", n*c.HiddenRowBytes()
					if lp.Kind == state.LayerKV {
						key, size = "kv", n*c.KVRowBytes()
					}
				}
				key = fmt.Sprint(key, " ", l)
				if b.got[key] != size {
					t.Errorf("%s, device decode %v: layer %d: calls %v, want %q with %d bytes", cd, decodes, l, b.got, key, size)
				}
			}
			if len(b.got) != len(plan) {
				t.Errorf("%s, device decode %v: %d calls for %d layers: %v", cd, decodes, len(b.got), len(plan), b.got)
			}
		}
	}
}
