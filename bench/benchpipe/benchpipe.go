package benchpipe

import (
	"fmt"
	"io"
	"math/rand"
	"os"
	"path/filepath"
	"sort"
	"time"

	"github.com/hcache/hcache/bench/profiler"
	"github.com/hcache/hcache/chunk"
	"github.com/hcache/hcache/gpu"
	"github.com/hcache/hcache/model"
	"github.com/hcache/hcache/serve"
	"github.com/hcache/hcache/serve/sched"
)

// Options of a run.
type Options struct {
	Dir      string
	Model    string
	Tokens   int
	Rounds   int
	Seed     int64
	Split    *sched.Split // nil: the scheduler's best mixed plan on a profile measured now
	Progress io.Writer
}

// Result is the JSON of `hcache bench pipeline`.
type Result struct {
	Model       string      `json:"model"`
	Tokens      int         `json:"tokens"`
	Engine      string      `json:"engine"`
	Split       sched.Split `json:"split"`
	PlanSource  string      `json:"plan_source"`
	PredictedMS float64     `json:"predicted_ms"`
	Rounds      int         `json:"rounds"`
	IOMS        float64     `json:"io_alone_ms"`
	ComputeMS   float64     `json:"compute_alone_ms"`
	PipelinedMS float64     `json:"pipelined_ms"`
	Ratio       float64     `json:"ratio"`
	// RatioOfMedians is pipelined median / max(io median, compute median).
	RatioOfMedians float64 `json:"ratio_of_medians"`
	Bound          string  `json:"bound"`
	RecomputeMS    float64 `json:"pipelined_recompute_ms"`
	ComputeIdle    float64 `json:"pipelined_compute_idle_ms"`
	// BackendMS is the pipelined restore's time in the backend
	// (projection and KV loads): compared with compute_alone_ms it shows
	// how much the reads running beside it slowed the compute down.
	BackendMS    float64 `json:"pipelined_backend_ms"`
	PeakBuffered int64   `json:"pipelined_peak_buffered_bytes"`
	ReadBytes    int64   `json:"read_bytes"`
	Lossless     bool    `json:"lossless"`
}

func median(v []float64) float64 {
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	return s[len(s)/2]
}

func ms(d time.Duration) float64 { return float64(d.Nanoseconds()) / 1e6 }

// bestMixed is the scheduler's best plan with at least two kinds of layer
// and some compute (a recomputed prefix or hidden layers).
func bestMixed(c *model.Config, cs sched.Costs) (sched.Split, float64) {
	best, bt := sched.Split{}, -1.0
	for r := 0; r < c.Layers; r++ {
		for k := 0; k <= c.Layers-r; k++ {
			s := sched.Split{Recompute: r, Hidden: c.Layers - r - k, KV: k}
			kinds := 0
			for _, n := range []int{s.Recompute, s.Hidden, s.KV} {
				if n > 0 {
					kinds++
				}
			}
			if kinds < 2 || (s.Hidden > 0 && !sched.HiddenAllowed(c)) {
				continue
			}
			if t := sched.Predict(cs, s); bt < 0 || t < bt {
				best, bt = s, t
			}
		}
	}
	return best, bt
}

// Run runs the benchmark.
func Run(o Options) (*Result, error) {
	if o.Tokens <= 0 || o.Rounds <= 0 {
		return nil, fmt.Errorf("bench pipeline: --tokens and --rounds must be positive")
	}
	say := func(format string, a ...any) {
		if o.Progress != nil {
			fmt.Fprintf(o.Progress, "bench pipeline: "+format+"\n", a...)
		}
	}
	c, w, err := profiler.LoadModel(o.Model, o.Seed, 50_000_000)
	if err != nil {
		return nil, err
	}
	if o.Tokens > c.MaxPositions {
		return nil, fmt.Errorf("bench pipeline: %d tokens exceed %s's %d positions", o.Tokens, o.Model, c.MaxPositions)
	}
	m, err := model.New(c, w)
	if err != nil {
		return nil, err
	}
	backend, err := gpu.NewCPU(c, w)
	if err != nil {
		return nil, err
	}
	if err := backend.LoadRecompute(m.W, c.Layers); err != nil {
		return nil, err
	}
	res := &Result{Model: o.Model, Tokens: o.Tokens, Rounds: o.Rounds}
	sdir := filepath.Join(o.Dir, "hcache-bench-pipeline")
	os.RemoveAll(sdir)
	defer os.RemoveAll(sdir)

	// The plan: given, or the scheduler's on a profile of this machine
	// measured now at this token count.
	if o.Split != nil {
		res.Split, res.PlanSource = *o.Split, "--plan"
		if res.Split.Layers() != c.Layers {
			return nil, fmt.Errorf("bench pipeline: --plan %v covers %d layers, %s has %d", res.Split, res.Split.Layers(), o.Model, c.Layers)
		}
	} else {
		say("profiling this machine at %d tokens", o.Tokens)
		readGBps, _, err := profiler.StoreReadGBps(o.Dir, c, 32<<20, 3, false)
		if err != nil {
			return nil, err
		}
		cv, err := profiler.MeasureCurves(m, backend, []int{o.Tokens}, 3, func(s string) { say("%s", s) })
		if err != nil {
			return nil, err
		}
		L := float64(c.Layers)
		cs := sched.Costs{Tokens: o.Tokens, RecomputeMS: cv.Recompute[0].MS / L, ProjectMS: cv.Project[0].MS / L, KVLoadMS: cv.KVLoad[0].MS / L,
			HiddenIOMS: float64(o.Tokens*c.HiddenRowBytes()) / readGBps / 1e6, KVIOMS: float64(o.Tokens*c.KVRowBytes()) / readGBps / 1e6}
		res.Split, res.PredictedMS = bestMixed(c, cs)
		res.PlanSource = fmt.Sprintf("scheduler's best mixed plan on this machine (read %.2f GB/s; per layer: recompute %.2f ms, projection %.2f ms, kv load %.3f ms, hidden read %.3f ms, kv read %.3f ms)",
			readGBps, cs.RecomputeMS, cs.ProjectMS, cs.KVLoadMS, cs.HiddenIOMS, cs.KVIOMS)
	}
	say("plan: %v", res.Split)

	st, err := chunk.Open(chunk.Options{Dir: sdir, CacheBytes: 0, GCInterval: -1, Logf: func(string, ...any) {}})
	if err != nil {
		return nil, err
	}
	defer st.Close()
	res.Engine = st.EngineName()
	plan := res.Split.Plan(c)
	ident := serve.Identity(c, w, plan)
	rng := rand.New(rand.NewSource(o.Seed))
	tokens := make([]int, o.Tokens)
	for i := range tokens {
		tokens[i] = rng.Intn(c.Vocab)
	}
	wr, err := st.Create("bench", "ctx", ident, chunk.CreateOptions{})
	if err != nil {
		return nil, err
	}
	saver := serve.NewSaver(c, plan, wr)
	ref := model.NewKVCache(c)
	if _, err := m.Forward(tokens, ref, saver.Trace); err != nil {
		return nil, err
	}
	if err := saver.Err(); err != nil {
		return nil, err
	}
	if err := wr.Close(); err != nil {
		return nil, err
	}
	newPaged := func() ([]*gpu.PagedKV, error) {
		p := make([]*gpu.PagedKV, c.Layers)
		for l := range p {
			var err error
			if p[l], err = gpu.NewPagedKV(c, 16, (o.Tokens+15)/16); err != nil {
				return nil, err
			}
		}
		return p, nil
	}
	paged, err := newPaged()
	if err != nil {
		return nil, err
	}
	// The stored rows, read once, for the compute-only runs.
	held := map[int][]byte{}
	if _, err := st.Restore("bench", "ctx", ident, func(l int, rows []byte) error {
		held[l] = append([]byte(nil), rows...)
		return nil
	}); err != nil {
		return nil, err
	}
	positions := make([]int, o.Tokens)
	for i := range positions {
		positions[i] = i
	}
	rest := serve.NewRestorer(st, backend, serve.Settings{})
	var ioT, compT, pipeT, backT []float64
	pagedPipe, err := newPaged()
	if err != nil {
		return nil, err
	}
	runIO := func() error {
		t0 := time.Now()
		var n int64
		if _, err := st.Restore("bench", "ctx", ident, func(_ int, rows []byte) error { n += int64(len(rows)); return nil }); err != nil {
			return err
		}
		ioT = append(ioT, ms(time.Since(t0)))
		res.ReadBytes = n
		return nil
	}
	runCompute := func() error {
		t0 := time.Now()
		r, err := backend.BeginRestore(gpu.HostCache(paged), positions)
		if err != nil {
			return err
		}
		if res.Split.Recompute > 0 {
			err = r.Recompute(tokens, res.Split.Recompute, nil)
		}
		for l := res.Split.Recompute; l < c.Layers && err == nil; l++ {
			if plan[l].Kind == chunk.LayerHidden {
				err = r.Hidden(l, held[l], nil)
			} else {
				err = r.KV(l, held[l], nil)
			}
		}
		if _, werr := r.Wait(); err == nil {
			err = werr
		}
		if err != nil {
			return err
		}
		compT = append(compT, ms(time.Since(t0)))
		return nil
	}
	res.Lossless = true
	runPipe := func() error {
		for _, p := range pagedPipe { // every byte must be written again
			clear(p.K)
			clear(p.V)
		}
		t0 := time.Now()
		rs, err := rest.Restore(serve.Request{NS: "bench", ID: "ctx", Ident: ident, Tokens: tokens, Dst: gpu.HostCache(pagedPipe)})
		if err != nil {
			return err
		}
		pipeT = append(pipeT, ms(time.Since(t0)))
		res.RecomputeMS, res.ComputeIdle, res.PeakBuffered = ms(rs.RecomputeDur), ms(rs.ComputeIdle), rs.PeakBufferedBytes
		backT = append(backT, ms(rs.ProjectDur))
		got, err := serve.PagedToCache(c, pagedPipe, o.Tokens)
		if err != nil {
			return err
		}
		res.Lossless = res.Lossless && sameCache(got, ref)
		return nil
	}
	runs := []func() error{runIO, runCompute, runPipe}
	for round := 0; round < o.Rounds; round++ {
		// The three run back to back, in an order rotated every round, so
		// none always follows the same one.
		for k := 0; k < 3; k++ {
			if err := runs[(round+k)%3](); err != nil {
				return nil, err
			}
		}
		say("round %d: io %.2f ms, compute %.2f ms, pipelined %.2f ms (backend %.2f ms)", round+1, ioT[round], compT[round], pipeT[round], backT[round])
	}
	res.IOMS, res.ComputeMS, res.PipelinedMS, res.BackendMS = median(ioT), median(compT), median(pipeT), median(backT)
	res.Bound = "compute"
	if res.IOMS > res.ComputeMS {
		res.Bound = "io"
	}
	// The machine is shared and drifts: the ratio is the median of the
	// rounds' ratios, each from three runs back to back.
	var ratios []float64
	for i := range pipeT {
		ratios = append(ratios, pipeT[i]/max(ioT[i], compT[i]))
	}
	res.Ratio = median(ratios)
	res.RatioOfMedians = res.PipelinedMS / max(res.IOMS, res.ComputeMS)
	if !res.Lossless {
		return res, fmt.Errorf("bench pipeline: the pipelined restore differs from the forward pass's cache")
	}
	return res, nil
}

func sameCache(a, b *model.KVCache) bool {
	for l := range a.K {
		if len(a.K[l]) != len(b.K[l]) {
			return false
		}
		for i := range a.K[l] {
			if a.K[l][i] != b.K[l][i] || a.V[l][i] != b.V[l][i] {
				return false
			}
		}
	}
	return true
}
