// Package benchsave is `hcache bench save` (issue 24): what saving a decode
// step costs the engine, on the CPU path, while another context's prefill
// is being flushed.
//
// Each round times, in a rotated order and per token of one decode step
// (one row of every stored layer, a Llama2-7B-shaped plan by default):
//
//   - copy: a plain copy of the token's rows into a group-shaped host buffer
//     (what any save must at least do);
//   - append: chunk.Writer.AppendToken of the same rows (the host path: the
//     rows already in host memory);
//   - save call: serve.DeviceSaver.SaveToken from "device" memory of the
//     gpu.CPUDevice, the caller's cost (queue the copy, return);
//   - save done: from the round's first SaveToken until its last token's
//     rows were appended (WaitWritten): the device saver's whole pipeline
//     (the copy into staging, then the append) per token.
//
// Throughout, a background goroutine saves a second context's prefill
// (every layer, through its own DeviceSaver), flushes it to disk and
// deletes it, again and again. Each side reports the median of its rounds
// and the spread (min, max); each ratio is taken within a round (both
// sides saw the same machine) and reported the same way. The target of
// issue 24 is append <= 1.5x copy.
package benchsave

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hcache/hcache/chunk"
	"github.com/hcache/hcache/gpu"
	"github.com/hcache/hcache/internal/stat"
	"github.com/hcache/hcache/model"
	"github.com/hcache/hcache/serve"
	"github.com/hcache/hcache/serve/sched"
)

// Defaults.
const (
	DefaultModel   = "llama2-7b"
	DefaultRounds  = 15
	DefaultTokens  = 64
	DefaultPrefill = 128
	Target         = 1.5 // append <= Target x copy
)

// Options of one run.
type Options struct {
	Dir      string // where the store lives (the device measured)
	Model    string // preset (its shape only; no weights)
	Rounds   int
	Tokens   int // decode tokens per side per round
	Prefill  int // tokens of the background context's prefill per flush
	Seed     int64
	Progress io.Writer
}

// Spread is a median over rounds with its extremes.
type Spread struct {
	Median float64   `json:"median"`
	Min    float64   `json:"min"`
	Max    float64   `json:"max"`
	Rounds []float64 `json:"rounds"`
}

func spread(v []float64) Spread {
	return Spread{Median: stat.Median(v), Min: slices.Min(v), Max: slices.Max(v), Rounds: v}
}

// Result of a run. Times are nanoseconds per decode token.
type Result struct {
	Model          string `json:"model"`
	Plan           string `json:"plan"`
	Layers         int    `json:"stored_layers"`
	TokenBytes     int    `json:"token_bytes"`
	Rounds         int    `json:"rounds"`
	TokensPerRound int    `json:"tokens_per_round"`
	PrefillTokens  int    `json:"prefill_tokens"`
	Order          string `json:"order"`

	CopyNS     Spread `json:"copy_ns"`
	AppendNS   Spread `json:"append_ns"`
	SaveCallNS Spread `json:"save_call_ns"`
	SaveDoneNS Spread `json:"save_done_ns"`

	AppendRatio   Spread  `json:"append_over_copy"`
	SaveCallRatio Spread  `json:"save_call_over_copy"`
	SaveDoneRatio Spread  `json:"save_done_over_copy"`
	Target        float64 `json:"target_append_over_copy"`
	Pass          bool    `json:"pass"`

	BackgroundFlushes int     `json:"background_flushes"`
	BackgroundMiB     float64 `json:"background_mib"`
	// Flushes of the background prefill that overlapped each round (at
	// least one, or the round waited for one to start).
	FlushesPerRound []int                 `json:"flushes_per_round"`
	SaverStats      serve.DeviceSaveStats `json:"saver_stats"`
	CPUs            int                   `json:"cpus"`
	LoadBefore      string                `json:"loadavg_before"`
	LoadAfter       string                `json:"loadavg_after"`
	WallS           float64               `json:"wall_s"`
}

func loadavg() string {
	b, _ := os.ReadFile("/proc/loadavg")
	return strings.TrimSpace(string(b))
}

// Run runs the benchmark.
func Run(o Options) (*Result, error) {
	if o.Model == "" {
		o.Model = DefaultModel
	}
	if o.Rounds == 0 {
		o.Rounds = DefaultRounds
	}
	if o.Tokens == 0 {
		o.Tokens = DefaultTokens
	}
	if o.Prefill == 0 {
		o.Prefill = DefaultPrefill
	}
	if o.Rounds < 1 || o.Tokens < 1 || o.Prefill < 1 {
		return nil, fmt.Errorf("bench save: rounds %d, tokens %d, prefill %d: all must be positive", o.Rounds, o.Tokens, o.Prefill)
	}
	if o.Progress == nil {
		o.Progress = io.Discard
	}
	c, err := model.Preset(o.Model)
	if err != nil {
		return nil, err
	}
	t0 := time.Now()
	plan := sched.DefaultPlan(c)
	ident := &chunk.Identity{Model: model.ShapeFingerprint(c), Plan: plan}
	res := &Result{Model: o.Model, Plan: plan[0].Kind.String(), Rounds: o.Rounds, TokensPerRound: o.Tokens, PrefillTokens: o.Prefill,
		Target: Target, CPUs: runtime.NumCPU(), LoadBefore: loadavg()}
	for _, p := range plan {
		if p.RowBytes > 0 {
			res.Layers++
			res.TokenBytes += int(p.RowBytes)
		}
	}
	dir := filepath.Join(o.Dir, "hcache-bench-save")
	os.RemoveAll(dir)
	defer os.RemoveAll(dir)
	st, err := chunk.Open(chunk.Options{Dir: dir, CapacityBytes: -1, GCInterval: -1,
		StagingBytes: int64(4*(o.Tokens+64)+2*(o.Prefill+64)) * int64(res.TokenBytes), Logf: func(string, ...any) {}})
	if err != nil {
		return nil, err
	}
	defer st.Close()
	dev := gpu.NewCPUDevice()
	defer dev.Close()

	rng := rand.New(rand.NewSource(o.Seed))
	// A decode step's rows, in device memory (one buffer: layer after
	// layer) and the same bytes in host memory.
	devTok, devMem, err := dev.Alloc(res.TokenBytes)
	if err != nil {
		return nil, err
	}
	rng.Read(devMem)
	hostRows := make([][]byte, len(plan))
	devRows := make([]gpu.DevicePtr, len(plan))
	layerOff := make([]int, len(plan)) // in a 64-token layer-major group
	off, goff := 0, 0
	for l, p := range plan {
		rb := int(p.RowBytes)
		if rb == 0 {
			continue
		}
		hostRows[l] = append([]byte(nil), devMem[off:off+rb]...)
		devRows[l] = devTok + gpu.DevicePtr(off)
		layerOff[l] = goff
		off += rb
		goff += 64 * rb
	}
	group := make([]byte, goff)
	for i := range group {
		group[i] = 1
	}

	hostW, err := st.Create("bench", "decode-host", ident, chunk.CreateOptions{})
	if err != nil {
		return nil, err
	}
	devW, err := st.Create("bench", "decode-device", ident, chunk.CreateOptions{})
	if err != nil {
		return nil, err
	}
	stream, err := dev.NewStream()
	if err != nil {
		return nil, err
	}
	saver, err := serve.NewDeviceSaver(plan, devW, dev, serve.DeviceSaveOptions{StagingBytes: int64(2*o.Tokens) * int64(res.TokenBytes), WaitFull: time.Minute})
	if err != nil {
		return nil, err
	}

	bg := startBackground(st, ident, plan, dev, o.Prefill, res.TokenBytes, rng.Int63())
	var werr error
	pos := 0 // decode tokens appended per context so far
	sides := []string{"copy", "append", "save"}
	var copyNS, appendNS, callNS, doneNS []float64
	for r := range o.Rounds {
		f0 := bg.flushes.Load()
		bg.waitRunning()
		order := slices.Clone(sides)
		for i := 0; i < r%len(order); i++ {
			order = append(order[1:], order[0])
		}
		if r == 0 {
			res.Order = "rotated each round: " + strings.Join(order, ",") + " first"
		}
		for _, side := range order {
			switch side {
			case "copy":
				start := time.Now()
				for t := range o.Tokens {
					in := (pos + t) % 64
					for l, row := range hostRows {
						copy(group[layerOff[l]+in*len(row):], row)
					}
				}
				copyNS = append(copyNS, float64(time.Since(start).Nanoseconds())/float64(o.Tokens))
			case "append":
				start := time.Now()
				for range o.Tokens {
					if err := hostW.AppendToken(hostRows); err != nil {
						werr = err
						break
					}
				}
				appendNS = append(appendNS, float64(time.Since(start).Nanoseconds())/float64(o.Tokens))
			case "save":
				var call time.Duration
				var last uint64
				start := time.Now()
				for range o.Tokens {
					c0 := time.Now()
					seq, err := saver.SaveToken(context.Background(), devRows, stream)
					call += time.Since(c0)
					if err != nil {
						werr = err
						break
					}
					last = seq
				}
				if err := saver.WaitWritten(last); err != nil && werr == nil {
					werr = err
				}
				doneNS = append(doneNS, float64(time.Since(start).Nanoseconds())/float64(o.Tokens))
				callNS = append(callNS, float64(call.Nanoseconds())/float64(o.Tokens))
			}
			if werr != nil {
				break
			}
		}
		if werr != nil {
			break
		}
		pos += o.Tokens
		// Untimed: make the decode contexts durable (their groups too go
		// through the flusher, as in serving).
		if err := hostW.Flush(); err != nil {
			werr = err
			break
		}
		if err := saver.Flush(); err != nil {
			werr = err
			break
		}
		res.FlushesPerRound = append(res.FlushesPerRound, int(bg.flushes.Load()-f0))
		fmt.Fprintf(o.Progress, "round %d/%d: copy %.0f ns, append %.0f ns, save call %.0f ns, save done %.0f ns per token\n",
			r+1, o.Rounds, copyNS[r], appendNS[r], callNS[r], doneNS[r])
	}
	bgErr := bg.stop()
	res.SaverStats = saver.Stats()
	werr = errors.Join(werr, saver.Close(), hostW.Close(), devW.Close(), bgErr)
	if werr != nil {
		return nil, werr
	}
	res.CopyNS, res.AppendNS, res.SaveCallNS, res.SaveDoneNS = spread(copyNS), spread(appendNS), spread(callNS), spread(doneNS)
	ratio := func(a []float64) Spread {
		out := make([]float64, len(a))
		for i := range a {
			out[i] = a[i] / max(copyNS[i], 1)
		}
		return spread(out)
	}
	res.AppendRatio, res.SaveCallRatio, res.SaveDoneRatio = ratio(appendNS), ratio(callNS), ratio(doneNS)
	res.Pass = res.AppendRatio.Median <= Target
	res.BackgroundFlushes = int(bg.flushes.Load())
	res.BackgroundMiB = float64(bg.bytes.Load()) / (1 << 20)
	res.LoadAfter = loadavg()
	res.WallS = time.Since(t0).Seconds()
	return res, nil
}

// background saves, flushes and deletes a prefill context in a loop.
type background struct {
	flushes atomic.Int64
	bytes   atomic.Int64
	started chan struct{}
	once    sync.Once
	quit    chan struct{}
	done    chan error
}

func startBackground(st *chunk.Store, ident *chunk.Identity, plan []chunk.LayerPlan, dev *gpu.CPUDevice, tokens, tokBytes int, seed int64) *background {
	b := &background{started: make(chan struct{}), quit: make(chan struct{}), done: make(chan error, 1)}
	go func() { b.done <- b.run(st, ident, plan, dev, tokens, tokBytes, seed) }()
	return b
}

func (b *background) waitRunning() {
	select {
	case <-b.started:
	case <-b.quit:
	}
}

func (b *background) stop() error {
	close(b.quit)
	return <-b.done
}

func (b *background) run(st *chunk.Store, ident *chunk.Identity, plan []chunk.LayerPlan, dev *gpu.CPUDevice, tokens, tokBytes int, seed int64) error {
	defer b.once.Do(func() { close(b.started) })
	stream, err := dev.NewStream()
	if err != nil {
		return err
	}
	rng := rand.New(rand.NewSource(seed))
	layers := make([]gpu.DevicePtr, len(plan))
	for l, p := range plan {
		if p.RowBytes == 0 {
			continue
		}
		ptr, mem, err := dev.Alloc(tokens * int(p.RowBytes))
		if err != nil {
			return err
		}
		rng.Read(mem)
		layers[l] = ptr
	}
	for i := 0; ; i++ {
		select {
		case <-b.quit:
			return nil
		default:
		}
		id := fmt.Sprint("prefill-", i)
		w, err := st.Create("bench", id, ident, chunk.CreateOptions{})
		if err != nil {
			return err
		}
		ds, err := serve.NewDeviceSaver(plan, w, dev, serve.DeviceSaveOptions{StagingBytes: int64(tokens) * int64(tokBytes), WaitFull: time.Minute})
		if err != nil {
			return err
		}
		b.once.Do(func() { close(b.started) })
		for l, p := range layers {
			if p != 0 {
				if _, err := ds.SaveLayer(context.Background(), l, p, tokens, stream); err != nil {
					return errors.Join(err, ds.Close(), w.Close())
				}
			}
		}
		if err := errors.Join(ds.Close(), w.Close()); err != nil {
			return err
		}
		b.flushes.Add(1)
		b.bytes.Add(int64(tokens * tokBytes))
		if err := st.Delete("bench", id); err != nil {
			return err
		}
	}
}
