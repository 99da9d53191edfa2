package profiler

import (
	"errors"
	"fmt"
	"math/rand"
	"os"
	"time"

	"golang.org/x/sys/unix"

	"github.com/hcache/hcache/gpu/cuda"
	"github.com/hcache/hcache/model"
	"github.com/hcache/hcache/profiles"
	"github.com/hcache/hcache/serve/sched"
	"github.com/hcache/hcache/state"
)

// DeviceCurves are a CUDA backend's own curves: hcache's device recompute,
// projection and KV load of every layer, and the host-to-device copy.
type DeviceCurves struct {
	Curves
	// Copy is the copy-only restore of every layer's hidden rows (ms), and
	// H2DGBps its bandwidth at the largest token count (device time).
	Copy    []profiles.Point
	H2DGBps float64
	// EffTFLOPs is the recompute's effective rate at the largest token
	// count: its matrix and attention FLOPs over its time.
	EffTFLOPs float64
}

// deviceTimer is what the device curves time: a restore of n tokens from
// 0 into a device cache, queueing work through fn, to its Wait. The
// cuda.Backend in production; a test seam.
type deviceTimer interface {
	// run returns the restore's wall time (Begin to the end of Wait) and
	// its device time.
	run(n int, fn func(r devRestore) error) (wall, dev time.Duration, err error)
}

// devRestore is what the curves queue on a restore (*cuda.Restore).
type devRestore interface {
	Recompute(tokens []int, layers int, done func(layer int)) error
	Hidden(layer int, rows []byte, release func()) error
	KV(layer int, rows []byte, release func()) error
	Copy(rows []byte, release func()) error
}

type cudaTimer struct {
	b      *cuda.Backend
	layers int
	caches map[int]*cuda.Cache
}

func (t *cudaTimer) run(n int, fn func(r devRestore) error) (time.Duration, time.Duration, error) {
	c := t.caches[n]
	if c == nil {
		var err error
		if c, err = t.b.NewCache(t.layers, (n+15)/16, 16); err != nil {
			return 0, 0, err
		}
		t.caches[n] = c
	}
	positions := make([]int, n)
	for i := range positions {
		positions[i] = i
	}
	t0 := time.Now()
	r, err := t.b.Begin(c, positions)
	if err != nil {
		return 0, 0, err
	}
	err = fn(r)
	tm, werr := r.Wait()
	if err = errors.Join(err, werr); err != nil {
		return 0, 0, err
	}
	return time.Since(t0), tm.GPU, nil
}

func (t *cudaTimer) free() {
	for _, c := range t.caches {
		c.Free()
	}
}

// recomputeFLOPs is the forward pass of n tokens through c's layers: every
// matrix, and causal attention's QK^T and PV over n(n+1)/2 pairs.
func recomputeFLOPs(c *model.Config, n int) float64 {
	d, qd, kvd, im := float64(c.HiddenSize), float64(c.Heads*c.HeadDim), float64(c.KVDim()), float64(c.Intermediate)
	mlp := 3.0
	if c.Arch == model.ArchOPT {
		mlp = 2
	}
	nf := float64(n)
	per := nf*2*(d*qd+2*d*kvd+qd*d+mlp*d*im) + 2*qd*nf*(nf+1)
	return per * float64(c.Layers)
}

// MeasureDeviceCurves times, at each token count, through the CUDA
// backend's own restore path into a device cache: the device recompute of
// every layer from token ids (Recompute; LoadRecompute must have loaded
// every layer), the pipelined hidden restore of every layer from pinned
// host rows (copy, K/V GEMM, fused RoPE and scatter: the projection with
// its copy overlapped), the KV restore of every layer (copy and scatter),
// and the copy alone. Each is run once to warm up, then rounds times; the
// median wall time (Begin to the end of Wait) is kept, and the copy's
// device time gives the host-to-device bandwidth.
func MeasureDeviceCurves(b *cuda.Backend, c *model.Config, tokens []int, rounds int, bar func(string)) (DeviceCurves, error) {
	maxN := 0
	for _, n := range tokens {
		maxN = max(maxN, n)
	}
	hrb, kvrb := c.HiddenRowBytes(), c.KVRowBytes()
	mem, err := unix.Mmap(-1, 0, maxN*(hrb+kvrb), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_POPULATE)
	if err != nil {
		return DeviceCurves{}, fmt.Errorf("profile: mmap %d bytes: %w", maxN*(hrb+kvrb), err)
	}
	defer unix.Munmap(mem)
	if err := b.HostRegister(mem); err != nil {
		return DeviceCurves{}, err
	}
	defer b.HostUnregister(mem)
	rng := rand.New(rand.NewSource(2))
	copy(mem, RandomRows(c, rng, maxN, c.HiddenSize))
	copy(mem[maxN*hrb:], RandomRows(c, rng, maxN, 2*c.KVDim()))
	t := &cudaTimer{b: b, layers: c.Layers, caches: map[int]*cuda.Cache{}}
	defer t.free()
	return measureDevice(t, c, tokens, rounds, mem[:maxN*hrb], mem[maxN*hrb:], rng, bar)
}

func measureDevice(t deviceTimer, c *model.Config, tokens []int, rounds int, hid, kv []byte, rng *rand.Rand, bar func(string)) (DeviceCurves, error) {
	var dc DeviceCurves
	L := c.Layers
	hrb, kvrb := c.HiddenRowBytes(), c.KVRowBytes()
	for _, n := range tokens {
		if n > c.MaxPositions {
			return dc, fmt.Errorf("profile: %d tokens exceed the model's %d positions", n, c.MaxPositions)
		}
		ids := make([]int, n)
		for i := range ids {
			ids[i] = rng.Intn(c.Vocab)
		}
		time1 := func(what string, fn func(r devRestore) error) (wall, dev time.Duration, err error) {
			var ws, ds []time.Duration
			for i := 0; i <= rounds; i++ { // the first run warms up
				w, d, err := t.run(n, fn)
				if err != nil {
					return 0, 0, fmt.Errorf("profile: device %s of %d tokens: %w", what, n, err)
				}
				if i > 0 {
					ws, ds = append(ws, w), append(ds, d)
				}
			}
			return median(ws), median(ds), nil
		}
		rc, _, err := time1("recompute", func(r devRestore) error { return r.Recompute(ids, L, nil) })
		if err != nil {
			return dc, err
		}
		layers := func(fn func(r devRestore, l int) error) func(r devRestore) error {
			return func(r devRestore) error {
				for l := 0; l < L; l++ {
					if err := fn(r, l); err != nil {
						return err
					}
				}
				return nil
			}
		}
		pj, _, err := time1("hidden restore", layers(func(r devRestore, l int) error { return r.Hidden(l, hid[:n*hrb], nil) }))
		if err != nil {
			return dc, err
		}
		kl, _, err := time1("KV restore", layers(func(r devRestore, l int) error { return r.KV(l, kv[:n*kvrb], nil) }))
		if err != nil {
			return dc, err
		}
		cw, cdev, err := time1("copy", layers(func(r devRestore, l int) error { return r.Copy(hid[:n*hrb], nil) }))
		if err != nil {
			return dc, err
		}
		dc.Recompute = append(dc.Recompute, profiles.Point{Tokens: n, MS: ms(rc)})
		dc.Project = append(dc.Project, profiles.Point{Tokens: n, MS: ms(pj)})
		dc.KVLoad = append(dc.KVLoad, profiles.Point{Tokens: n, MS: ms(kl)})
		dc.Copy = append(dc.Copy, profiles.Point{Tokens: n, MS: ms(cw)})
		if cdev <= 0 {
			cdev = cw
		}
		dc.H2DGBps = float64(L*n*hrb) / cdev.Seconds() / 1e9
		dc.EffTFLOPs = recomputeFLOPs(c, n) / rc.Seconds() / 1e12
		bar(fmt.Sprintf("device %d tokens, all %d layers: recompute %.2f ms (%.0f TFLOP/s effective), hidden restore %.2f ms, kv restore %.2f ms, copy %.2f ms (%.1f GB/s)",
			n, L, ms(rc), dc.EffTFLOPs, ms(pj), ms(kl), ms(cw), dc.H2DGBps))
	}
	return dc, nil
}

// measureCUDA is Measure on the CUDA backend: the store's read bandwidth,
// the host decode, and the device curves.
func measureCUDA(o Options, say func(string)) (*profiles.Profile, error) {
	if _, _, err := cuda.Probe(o.CUDA.CublasPath); err != nil {
		return nil, err
	}
	c, w, synthetic, err := loadDeviceModel(o.Model, o.Seed)
	if err != nil {
		return nil, err
	}
	if synthetic {
		for _, n := range o.Tokens {
			if n > c.MaxPositions {
				say(fmt.Sprintf("preset %s: positions raised from %d to %d (synthetic weights; the rope table grows)", o.Model, c.MaxPositions, n))
				c.MaxPositions = n
			}
		}
		t0 := time.Now()
		w = model.SynthesizeParallel(c, o.Seed)
		say(fmt.Sprintf("synthesized %s weights in %v", o.Model, time.Since(t0).Round(time.Millisecond)))
	}
	t0 := time.Now()
	b, err := cuda.Open(c, w, o.CUDA)
	if err != nil {
		return nil, err
	}
	defer b.Close()
	if err := b.LoadRecompute(w, c.Layers); err != nil {
		return nil, fmt.Errorf("profile: the device recompute of every layer: %w", err)
	}
	_, wbytes := b.RecomputeLayers()
	note := fmt.Sprintf("cuda backend on %s (cuBLAS %s)", b.Device(), b.CublasPath())
	say(fmt.Sprintf("%s; weights of %d layers on the device (%d MiB) in %v", note, c.Layers, wbytes>>20, time.Since(t0).Round(time.Millisecond)))
	w = nil
	say(fmt.Sprintf("store read bandwidth on %s (%d MiB context)", o.Dir, o.ReadBytes>>20))
	readGBps, engine, err := StoreReadGBps(o.Dir, c, o.ReadBytes, o.Rounds, false)
	if err != nil {
		return nil, err
	}
	say(fmt.Sprintf("store read: %.2f GB/s from disk (%s engine)", readGBps, engine))
	decRates, err := DecodeRates(c, o.Rounds, say)
	if err != nil {
		return nil, err
	}
	memGBps := CopyGBps(o.Rounds)
	dc, err := MeasureDeviceCurves(b, c, o.Tokens, o.Rounds, say)
	if err != nil {
		return nil, err
	}
	host, _ := os.Hostname()
	return deviceProfile(o, c, host, note, engine, readGBps, decRates, memGBps, dc, time.Now())
}

// loadDeviceModel is LoadModel without the CPU's size bound: a preset's
// config (synthetic is true: the caller synthesizes its weights once the
// positions are set), or a model directory with all its weights.
func loadDeviceModel(name string, seed int64) (*model.Config, *model.Weights, bool, error) {
	if p, err := model.Preset(name); err == nil {
		c := *p
		return &c, nil, true, nil
	}
	c, w, err := LoadModel(name, seed, 0)
	return c, w, false, err
}

// deviceProfile assembles the profile of a CUDA measurement.
func deviceProfile(o Options, c *model.Config, host, note, engine string, readGBps float64, decRates map[state.Codec]float64, memGBps float64, dc DeviceCurves, at time.Time) (*profiles.Profile, error) {
	if len(dc.Recompute) == 0 {
		return nil, errors.New("profile: no device curves")
	}
	when := at.UTC().Format(time.RFC3339)
	src := func(what string) string {
		return fmt.Sprintf("measured by hcache profile --backend cuda on %s at %s: %s (median of %d after a warm-up)", host, when, what, o.Rounds)
	}
	shape := sched.ShapeOf(c)
	shape.Name = o.Model
	curve := func(pts []profiles.Point, what string) *profiles.Curve {
		return &profiles.Curve{Model: o.Model, Shape: &shape, Points: pts, Source: src(what)}
	}
	last := dc.Recompute[len(dc.Recompute)-1].Tokens
	name := o.Name
	if name == "" {
		name = "measured-" + host
	}
	p := &profiles.Profile{
		Name:            name,
		Description:     fmt.Sprintf("This machine, %s, model %s, hcache's own device paths (%s engine on %s).", note, o.Model, engine, o.Dir),
		Backend:         "cuda",
		Tiers:           []profiles.Tier{{Name: "dir", ReadGBps: profiles.Figure{Value: readGBps, Source: src("store restore of one context, O_DIRECT, no DRAM cache, on " + o.Dir)}}},
		H2DGBps:         profiles.Figure{Value: dc.H2DGBps, Source: src(fmt.Sprintf("copy-only restore of every layer's hidden rows of %d tokens from pinned host memory, device time", last))},
		GemmTFLOPs:      profiles.Figure{Value: dc.EffTFLOPs, Source: src(fmt.Sprintf("effective rate of the device recompute at %d tokens: its matrix and attention FLOPs over its time (not a GEMM peak; unused while the curves are given)", last))},
		MemGBps:         profiles.Figure{Value: memGBps, Source: src("64 MiB host memory copy (not the device's memory; unused while the curves are given)")},
		LayerOverheadUS: profiles.Figure{Value: 0, Source: "measured curves include per-layer overheads"},
		Recompute:       curve(dc.Recompute, "hcache's device recompute (gpu/cuda Restore.Recompute) of every layer from token ids into a device cache, wall time from Begin to the end of Wait"),
		Project:         curve(dc.Project, "hcache's pipelined hidden restore of every layer from pinned host rows (copy overlapped with the K/V GEMM and the fused RoPE and scatter), wall time: the PCIe copy included, an upper bound of the projection"),
		KVLoad:          curve(dc.KVLoad, "hcache's KV restore of every layer from pinned host rows (copy and scatter), wall time: the PCIe copy included"),
	}
	setDecodeRates(p, c, decRates, src, "serve decodes int8 on the host; the CUDA backend decodes the fp8 codecs on the device (gpu.DeviceDecoder), which this does not time, so for them it is a lower bound")
	if err := p.Validate(); err != nil {
		return nil, fmt.Errorf("profile: the measurement is not a valid profile: %w", err)
	}
	return p, nil
}
