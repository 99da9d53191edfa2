package compare

import (
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hcache/hcache/bench/fio"
	"github.com/hcache/hcache/bench/peer"
	"github.com/hcache/hcache/chunk"
	"github.com/hcache/hcache/internal/progress"
	"github.com/hcache/hcache/model"
	"github.com/hcache/hcache/serve/sched"
	"github.com/hcache/hcache/state"
	"golang.org/x/sys/unix"
)

// AllSystems are the systems compare knows, in report order.
var AllSystems = []string{"hcache", "hcache-kv", "hcache-fp8", "hcache-dram", "file-per-chunk", "pebble-blob", "redis", "recompute", "limit"}

// ExtraSystems run only when named: hcache-noprio is hcache with the
// restore admission and write yielding of issue 20 turned off (and the
// earlier write queue and idle buffer sizes), to show their effect in the
// same run.
var ExtraSystems = []string{"hcache-noprio", "hcache-fp8-block", "hcache-int8"}

// codecSystems are the hcache systems whose rows are under a codec: the
// hcache plan's kind with the codec's row sizes (hcache-fp8 runs by
// default; the others when named, for the codec column of one run).
var codecSystems = map[string]state.Codec{"hcache-fp8": state.CodecFP8Token, "hcache-fp8-block": state.CodecFP8Block, "hcache-int8": state.CodecInt8Channel}

// Options of one comparison.
type Options struct {
	Model       string // preset
	Workload    string // chat or long
	Layers      int    // layers kept (0: the model's); rows keep their width
	Dir         string // scratch directory on the disk to measure
	Concurrency []int
	Systems     []string
	Seed        int64
	// chat
	Conversations int
	MaxContext    int
	// long
	Docs, Questions, MinDoc, MaxDoc int
	// recompute: the model it runs and how many restores it does (at
	// concurrency 1 only: the CPU forward pass is slow)
	RecomputeModel     string
	RecomputeMax       int
	RecomputeMaxTokens int // restores of longer contexts are skipped
	// DRAMCacheBytes sizes hcache-dram's DRAM tier (0: every context fits).
	DRAMCacheBytes int64
	Sweep          *fio.SweepOptions // nil: no limit row from fio
	// WarmBytes of anonymous memory are mapped, populated and unmapped
	// before each system runs: on a VM the first touch of guest memory
	// also costs the host's page faults (1.4 s per GiB here), and free
	// memory goes back to the host within seconds, so without this the
	// cost falls unevenly, mostly on the first system.
	WarmBytes int64
	Progress  io.Writer
}

// Row is one system at one concurrency.
type Row struct {
	System          string  `json:"system"`
	Concurrency     int     `json:"concurrency"`
	Restores        int     `json:"restores"`
	RestoreMSMedian float64 `json:"restore_ms_median"`
	RestoreMSP99    float64 `json:"restore_ms_p99"`
	// RestoreMSFirst is the system's first timed restore: its buffers
	// and caches cold (included in the median, p99 and GB/s too).
	RestoreMSFirst float64 `json:"restore_ms_first"`
	RestoreGBps    float64 `json:"restore_gbps"` // own bytes restored / time in restores (per request stream)
	BurstTokPerS   float64 `json:"burst_tokens_per_s"`
	SaveMSMedian   float64 `json:"save_ms_median"`
	SaveGBps       float64 `json:"save_gbps"` // own bytes saved / time in saves
	BytesOnDisk    int64   `json:"bytes_on_disk"`
	BytesInMemory  int64   `json:"bytes_in_memory,omitempty"`
	BytesPerToken  float64 `json:"bytes_per_token"` // on disk, or in memory for memory-only systems
	Codec          string  `json:"codec,omitempty"` // hcache's rows: none (the model dtype) or fp8
	Note           string  `json:"note,omitempty"`
	// Stages is where hcache's timed restores spent their time, in ms per
	// restore (chunk.Store.RestoreStages over the timed phases; hcache only).
	Stages *Stages `json:"restore_stages_ms,omitempty"`
	// Phases has the restores of each phase of the workload apart: the
	// long workload's questions alone and with saves in the mix.
	Phases []PhaseRow `json:"phases,omitempty"`
}

// PhaseRow is the restores and saves of one phase.
type PhaseRow struct {
	Name            string  `json:"name"`
	Restores        int     `json:"restores"`
	RestoreMSMedian float64 `json:"restore_ms_median"`
	RestoreMSP99    float64 `json:"restore_ms_p99"`
	Saves           int     `json:"saves"`
	SaveMSMedian    float64 `json:"save_ms_median"`
	// Stages as in Row, for this phase (hcache only).
	Stages *Stages `json:"restore_stages_ms,omitempty"`
}

// Phase returns the row's phase of that name, or nil.
func (r *Row) Phase(name string) *PhaseRow {
	for i := range r.Phases {
		if r.Phases[i].Name == name {
			return &r.Phases[i]
		}
	}
	return nil
}

// Stages is chunk.RestoreStages per restore, in milliseconds.
type Stages struct {
	Buffer float64 `json:"buffer"` // getting (mapping) restore buffers
	Submit float64 `json:"submit"` // handing reads to the engine
	Queued float64 `json:"queued"` // reads queued behind other restores' reads
	Read   float64 `json:"read"`   // per layer: reads submitted to the last completion, summed
	Verify float64 `json:"verify"` // checksums
	Wall   float64 `json:"wall"`   // the restore as a whole
	// BasePageBuffers is the restore buffers handed out in base pages
	// (no idle one fitted; huge pages were then mapped in the
	// background), a count over the restores, not per restore.
	BasePageBuffers uint64 `json:"base_page_buffers"`
}

// storeOf is implemented by the hcache peers.
type storeOf interface{ Store() *chunk.Store }

func stagesOf(sys peer.System) (chunk.RestoreStages, bool) {
	if h, ok := sys.(storeOf); ok {
		return h.Store().RestoreStages(), true
	}
	return chunk.RestoreStages{}, false
}

func perRestore(a, b chunk.RestoreStages) *Stages {
	n := float64(b.Restores - a.Restores)
	if n == 0 {
		return nil
	}
	ms := func(x, y time.Duration) float64 { return float64(y-x) / 1e6 / n }
	return &Stages{Buffer: ms(a.Buffer, b.Buffer), Submit: ms(a.Submit, b.Submit), Queued: ms(a.Queued, b.Queued),
		Read: ms(a.Read, b.Read), Verify: ms(a.Verify, b.Verify), Wall: ms(a.Wall, b.Wall),
		BasePageBuffers: b.BasePageBuffers - a.BasePageBuffers}
}

// Target is one of hcache's design targets with what was measured.
type Target struct {
	Name string  `json:"name"`
	Want string  `json:"want"`
	Got  float64 `json:"got"`
	Met  bool    `json:"met"`
}

// Point is one timed restore (for the plots).
type Point struct {
	System      string
	Concurrency int
	Tokens      int
	MS          float64
}

// Result is what `hcache bench compare --json` prints.
type Result struct {
	Model       string             `json:"model"`
	Workload    string             `json:"workload"`
	Layers      int                `json:"layers"`
	ModelLayers int                `json:"model_layers"`
	Scale       string             `json:"scale"`
	Plan        string             `json:"plan"`
	Params      []string           `json:"workload_params"`
	Rows        []Row              `json:"rows"`
	Ratios      map[string]float64 `json:"ratios"`
	Targets     []Target           `json:"targets"`
	FioSweep    *fio.SweepResult   `json:"fio_sweep,omitempty"`
	MemcpyGBps  float64            `json:"memcpy_gbps"`
	Date        string             `json:"date"`
	Commit      string             `json:"commit"`
	Machine     string             `json:"machine"`
	// RunID tells this run's files from every other's (the start time and
	// a random suffix).
	RunID    string   `json:"run_id"`
	Plots    []string `json:"plots,omitempty"`
	Report   string   `json:"report,omitempty"`
	Raw      string   `json:"raw,omitempty"` // the JSON file with every timed request`
	ElapsedS float64  `json:"elapsed_s"`
	// LoadAvg is /proc/loadavg's 1-minute figure at the start and the end:
	// the machine is shared, and a load above its cores slows every system.
	LoadAvg      [2]float64 `json:"loadavg_start_end"`
	Points       []Point    `json:"-"`
	TokensStored int64      `json:"tokens_stored"`
}

// Row returns the row of system at concurrency c, or nil.
func (r *Result) Row(system string, c int) *Row {
	for i := range r.Rows {
		if r.Rows[i].System == system && r.Rows[i].Concurrency == c {
			return &r.Rows[i]
		}
	}
	return nil
}

func (o *Options) defaults() error {
	if o.Seed == 0 {
		o.Seed = 1
	}
	if len(o.Concurrency) == 0 {
		o.Concurrency = []int{1, 4, 16, 64}
	}
	if len(o.Systems) == 0 {
		o.Systems = AllSystems
	}
	for _, s := range o.Systems {
		if !contains(AllSystems, s) && !contains(ExtraSystems, s) {
			return fmt.Errorf("bench compare: unknown system %q (have %s)", s, strings.Join(AllSystems, ", "))
		}
	}
	for _, c := range o.Concurrency {
		if c < 1 || c > 256 {
			return fmt.Errorf("bench compare: concurrency %d out of [1, 256]", c)
		}
	}
	if o.RecomputeModel == "" {
		o.RecomputeModel = "tiny-llama"
	}
	if o.RecomputeMax <= 0 {
		o.RecomputeMax = 6
	}
	if o.RecomputeMaxTokens <= 0 {
		o.RecomputeMaxTokens = 2048
	}
	switch o.Workload {
	case "chat":
		if o.Conversations <= 0 {
			return fmt.Errorf("bench compare: --conversations must be positive")
		}
	case "long":
		if o.Docs <= 0 || o.Questions <= 0 || o.MinDoc <= 0 || o.MaxDoc < o.MinDoc {
			return fmt.Errorf("bench compare: long documents need --docs, --questions > 0 and 0 < --min-doc <= --max-doc")
		}
	default:
		return fmt.Errorf("bench compare: --workload %q (want chat or long)", o.Workload)
	}
	return nil
}

func contains(l []string, s string) bool {
	for _, x := range l {
		if x == s {
			return true
		}
	}
	return false
}

// Run runs the comparison.
func Run(o Options) (*Result, error) {
	if err := o.defaults(); err != nil {
		return nil, err
	}
	start := time.Now()
	load0 := LoadAvg()
	cfg, err := model.Preset(o.Model)
	if err != nil {
		return nil, err
	}
	res := &Result{Model: o.Model, Workload: o.Workload, ModelLayers: cfg.Layers, Ratios: map[string]float64{},
		Date: start.UTC().Format("2006-01-02"), RunID: fmt.Sprintf("%s-%04x", start.UTC().Format("150405"), rand.Uint32()&0xffff), Machine: Machine(o.Dir)}
	if o.Layers > 0 && o.Layers < cfg.Layers {
		cfg.Layers = o.Layers
	}
	res.Layers = cfg.Layers
	if o.MaxContext <= 0 {
		o.MaxContext = min(cfg.MaxPositions, 8192)
	}
	var w *Workload
	if o.Workload == "chat" {
		w = Chat(o.Seed, o.Conversations, o.MaxContext)
	} else {
		w = Long(o.Seed, o.Docs, o.Questions, o.MinDoc, o.MaxDoc)
	}
	res.Params = w.Params
	for _, n := range w.Contexts() {
		res.TokensStored += int64(n)
	}
	res.Scale = fmt.Sprintf("%d of %s's %d layers (rows at full width: hidden %d B, K||V %d B per token per layer); %s",
		cfg.Layers, o.Model, res.ModelLayers, cfg.HiddenRowBytes(), cfg.KVRowBytes(), strings.Join(w.Params[:1], ""))
	plan := sched.DefaultPlan(cfg)
	res.Plan = plan[0].Kind.String()
	shape := model.ShapeFingerprint(cfg)
	dir := filepath.Join(o.Dir, fmt.Sprintf("hcache-bench-compare-%d", os.Getpid()))
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)

	// The limits, measured first: the fio sweep and memory copy bandwidth.
	res.MemcpyGBps = MemcpyGBps(256 << 20)
	if contains(o.Systems, "limit") && o.Sweep != nil {
		so := *o.Sweep
		so.Dir, so.Progress = dir, o.Progress
		if res.FioSweep, err = fio.RunSweep(so); err != nil {
			return nil, err
		}
	}

	maxTokens := 0
	for _, n := range w.Contexts() {
		maxTokens = max(maxTokens, n)
	}
	hiddenTotal := res.TokensStored * int64(cfg.Layers) * int64(plan[0].RowBytes)
	for _, name := range o.Systems {
		if name == "limit" {
			continue
		}
		for _, c := range o.Concurrency {
			if name == "recompute" && c != 1 {
				continue
			}
			warm(o.WarmBytes)
			spec := peer.Spec{Dir: filepath.Join(dir, name), Layers: cfg.Layers, ChunkTokens: peer.DefaultChunkTokens}
			// Staging for c concurrent saves of the longest context (a
			// prefill stages a context whole), at least the default.
			staging := max(int64(chunk.DefaultStagingBytes), int64(c)*int64(maxTokens+chunk.DefaultChunkTokens)*int64(cfg.Layers)*int64(cfg.KVRowBytes()))
			var sys peer.System
			note := ""
			switch name {
			case "hcache-noprio":
				spec.RowBytes = int(plan[0].RowBytes)
				sys, err = peer.NewHcache(spec, peer.HcacheOptions{Name: name, Model: shape, Plan: plan, StagingBytes: staging, NoPriority: true})
				note = "hcache without restore admission and write yielding (RestoreQueueBytes -1, WriteBytes unbounded, idle restore buffers 256 MiB): the store's policies before issue 20"
			case "hcache", "hcache-dram":
				spec.RowBytes = int(plan[0].RowBytes)
				cache := int64(0)
				if name == "hcache-dram" {
					cache = o.DRAMCacheBytes
					if cache <= 0 {
						cache = hiddenTotal + hiddenTotal/4 + 64<<20
					}
					note = fmt.Sprintf("DRAM tier of %d MiB holds every context", cache>>20)
				}
				sys, err = peer.NewHcache(spec, peer.HcacheOptions{Name: name, Model: shape, Plan: plan, CacheBytes: cache, StagingBytes: staging})
				if name == "hcache" {
					note = "plan: " + res.Plan + " (sched.DefaultPlan), O_DIRECT, DRAM tier off"
				}
			case "hcache-fp8", "hcache-fp8-block", "hcache-int8":
				cd := codecSystems[name]
				cp := sched.PlanOfCodec(cfg, plan[0].Kind, cd)
				spec.RowBytes = int(cp[0].RowBytes)
				sys, err = peer.NewHcache(spec, peer.HcacheOptions{Name: name, Model: shape, Plan: cp, Codec: cd, StagingBytes: staging})
				note = map[state.Codec]string{
					state.CodecFP8Token:    "the hcache plan's rows under the fp8 codec (E4M3, a scale per token; encode and decode not timed), O_DIRECT, DRAM tier off",
					state.CodecFP8Block:    "the hcache plan's rows under the fp8-block codec (E4M3, a scale per 128 values; encode and decode not timed), O_DIRECT, DRAM tier off",
					state.CodecInt8Channel: "the hcache plan's rows under the int8 codec (a scale per channel per 64 tokens; encode and decode not timed), O_DIRECT, DRAM tier off",
				}[cd]
			case "hcache-kv":
				spec.RowBytes = cfg.KVRowBytes()
				sys, err = peer.NewHcache(spec, peer.HcacheOptions{Name: name, Model: shape, Plan: sched.PlanOf(cfg, chunk.LayerKV), StagingBytes: staging})
				note = "K||V rows, O_DIRECT, DRAM tier off"
			case "file-per-chunk":
				spec.RowBytes = cfg.KVRowBytes()
				sys, err = peer.NewFilePerChunk(spec)
				note = "256-token files, buffered writes without fsync; page cache dropped (fdatasync + fadvise DONTNEED) before each restore, untimed"
			case "pebble-blob":
				spec.RowBytes = cfg.KVRowBytes()
				sys, err = peer.NewPebbleBlob(spec)
				note = "value per (256-token chunk, layer), batch committed with Sync; memtable flushed and files dropped from the page cache before each restore, untimed"
			case "redis":
				spec.RowBytes = cfg.KVRowBytes()
				sys, err = peer.NewRedis(spec, 2*c)
				note = "redis-server on a unix socket, persistence off, one GET per 256-token chunk"
			case "recompute":
				var r *peer.Recompute
				r, err = peer.NewRecompute(o.RecomputeModel, maxTokens, o.Seed)
				sys = r
				if err == nil {
					rc := r.Shape()
					note = fmt.Sprintf("CPU reference forward pass of %s (%d layers, hidden %d), not %s: the first %d restores of at most %d tokens only (a 4096-token prefill of tiny-llama takes ~22 s here). For scale, %s",
						o.RecomputeModel, rc.Layers, rc.HiddenSize, o.Model, o.RecomputeMax, o.RecomputeMaxTokens, gpuRecompute)
				}
			}
			if err != nil {
				return nil, err
			}
			row, pts, err := runSystem(sys, w, c, o, name == "recompute")
			closeErr := sys.Close()
			os.RemoveAll(spec.Dir)
			if err != nil {
				return nil, fmt.Errorf("%s at concurrency %d: %w", name, c, err)
			}
			if closeErr != nil {
				return nil, fmt.Errorf("%s: close: %w", name, closeErr)
			}
			row.Note = note
			switch name {
			case "hcache", "hcache-kv", "hcache-dram":
				row.Codec = state.CodecNone.String()
			case "hcache-fp8", "hcache-fp8-block", "hcache-int8":
				row.Codec = codecSystems[name].String()
			}
			if row.Restores == 0 {
				res.Params = append(res.Params, fmt.Sprintf("%s: no row, no restore of this workload is within its limits (%s)", name, note))
				continue
			}
			row.BytesPerToken = float64(max(row.BytesOnDisk, row.BytesInMemory)) / float64(res.TokensStored)
			res.Rows = append(res.Rows, *row)
			res.Points = append(res.Points, pts...)
			if o.Progress != nil {
				fmt.Fprintf(o.Progress, "%-15s c=%-3d restore median %8.2f ms p99 %8.2f ms, save %.2f GB/s, %.0f B/token\n",
					name, c, row.RestoreMSMedian, row.RestoreMSP99, row.SaveGBps, row.BytesPerToken)
				for _, p := range row.Phases {
					if p.Restores > 0 {
						fmt.Fprintf(o.Progress, "%-15s c=%-3d   phase %-22q %3d restores median %8.2f ms p99 %8.2f ms, %d saves\n",
							name, c, p.Name, p.Restores, p.RestoreMSMedian, p.RestoreMSP99, p.Saves)
					}
				}
				if st := row.Stages; st != nil {
					fmt.Fprintf(o.Progress, "%-15s c=%-3d per restore: buffer %.2f ms, submit %.2f ms, queued %.2f ms, read %.2f ms, verify %.2f ms, wall %.2f ms\n",
						name, c, st.Buffer, st.Submit, st.Queued, st.Read, st.Verify, st.Wall)
				}
			}
		}
	}
	if contains(o.Systems, "limit") {
		res.addLimits(w, cfg.Layers*int(plan[0].RowBytes))
	}
	res.ratios()
	res.ElapsedS = time.Since(start).Seconds()
	res.LoadAvg = [2]float64{load0, LoadAvg()}
	return res, nil
}

// warm maps, populates and unmaps n bytes (see Options.WarmBytes).
func warm(n int64) {
	if n <= 0 {
		return
	}
	if mem, err := unix.Mmap(-1, 0, int(n), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_POPULATE); err == nil {
		unix.Munmap(mem)
	}
}

// gpuRecompute quotes the H200 measurements (docs/gpu-measurements.md).
const gpuRecompute = "the H200 measurements (docs/gpu-measurements.md, eager PyTorch) has a full Llama2-7B prefill at 48.7 / 127.1 / 615.7 ms for 1K / 4K / 16K tokens, against 9.9 / 40.7 / 158.8 ms to copy the KV in from host memory"

// runSystem runs the workload on one system at concurrency c.
func runSystem(sys peer.System, w *Workload, c int, o Options, limited bool) (*Row, []Point, error) {
	src := peer.NewSource(o.Seed)
	row := &Row{System: sys.Name(), Concurrency: c}
	var mu sync.Mutex
	var restoreMS, saveMS []float64
	var restoreBytes, saveBytes int64
	var restoreSec, saveSec float64
	var pts []Point
	rb := sys.RowBytes()
	var restores atomic.Int64
	total := 0
	for _, ph := range w.Phases {
		for _, s := range ph.Streams {
			total += len(s)
		}
	}
	bar := progress.New(o.Progress, fmt.Sprintf("bench compare %s c=%d", sys.Name(), c), int64(total), "requests")
	do := func(buf *[]byte, r Request) error {
		if r.Restore > 0 && (!limited || r.Restore <= o.RecomputeMaxTokens && restores.Add(1) <= int64(o.RecomputeMax)) {
			if cr, ok := sys.(peer.ColdReader); ok {
				if err := cr.DropCache(r.Ctx); err != nil {
					return err
				}
			}
			var got int64
			t0 := time.Now()
			err := sys.Restore(r.Ctx, r.Restore, func(l, first int, rows []byte) error {
				got += int64(len(rows))
				return nil
			})
			d := time.Since(t0)
			if err != nil {
				return err
			}
			mu.Lock()
			restoreMS = append(restoreMS, float64(d.Microseconds())/1000)
			restoreBytes += got
			restoreSec += d.Seconds()
			pts = append(pts, Point{System: sys.Name(), Concurrency: c, Tokens: r.Restore, MS: float64(d.Microseconds()) / 1000})
			mu.Unlock()
		}
		if r.To > r.From {
			k := peer.CtxKey(r.Ctx)
			var fill time.Duration
			var asked int64
			rows := func(l, from, to int) []byte {
				t := time.Now()
				n := (to - from) * rb
				asked += int64(n)
				if cap(*buf) < n {
					*buf = make([]byte, n)
				}
				b := (*buf)[:n]
				src.Fill(b, k, l, from, to, rb)
				fill += time.Since(t)
				return b
			}
			t0 := time.Now()
			if err := sys.Save(r.Ctx, r.From, r.To, rows); err != nil {
				return err
			}
			d := time.Since(t0) - fill
			mu.Lock()
			saveMS = append(saveMS, float64(d.Microseconds())/1000)
			saveSec += d.Seconds()
			saveBytes += asked
			mu.Unlock()
		}
		bar.Add(1)
		return nil
	}
	st0, hasStages := stagesOf(sys)
	for _, ph := range w.Phases {
		mu.Lock()
		r0, s0 := len(restoreMS), len(saveMS)
		mu.Unlock()
		p0, _ := stagesOf(sys)
		if err := runPhase(ph, c, do); err != nil {
			return nil, nil, err
		}
		mu.Lock()
		pr := PhaseRow{Name: ph.Name, Restores: len(restoreMS) - r0, RestoreMSMedian: quantile(restoreMS[r0:], 0.5), RestoreMSP99: quantile(restoreMS[r0:], 0.99),
			Saves: len(saveMS) - s0, SaveMSMedian: quantile(saveMS[s0:], 0.5)}
		mu.Unlock()
		if hasStages {
			p1, _ := stagesOf(sys)
			pr.Stages = perRestore(p0, p1)
		}
		row.Phases = append(row.Phases, pr)
	}
	bar.Finish()
	if hasStages {
		st1, _ := stagesOf(sys)
		row.Stages = perRestore(st0, st1)
	}
	// The burst: every context restored once, c at a time, from cold.
	ctxs := w.Contexts()
	ids := make([]string, 0, len(ctxs))
	for id := range ctxs {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	if limited {
		ids = nil
	}
	if cr, ok := sys.(peer.ColdReader); ok {
		for _, id := range ids {
			if err := cr.DropCache(id); err != nil {
				return nil, nil, err
			}
		}
	}
	var burst Phase
	for _, id := range ids {
		burst.Streams = append(burst.Streams, []Request{{Ctx: id, Restore: ctxs[id]}})
	}
	var tokens int64
	t0 := time.Now()
	err := runPhase(burst, c, func(_ *[]byte, r Request) error {
		atomic.AddInt64(&tokens, int64(r.Restore))
		return sys.Restore(r.Ctx, r.Restore, func(int, int, []byte) error { return nil })
	})
	if err != nil {
		return nil, nil, err
	}
	if len(ids) > 0 {
		row.BurstTokPerS = float64(tokens) / time.Since(t0).Seconds()
	}
	row.Restores = len(restoreMS)
	row.RestoreMSMedian, row.RestoreMSP99 = quantile(restoreMS, 0.5), quantile(restoreMS, 0.99)
	if len(restoreMS) > 0 {
		row.RestoreMSFirst = restoreMS[0]
	}
	row.SaveMSMedian = quantile(saveMS, 0.5)
	if restoreSec > 0 {
		row.RestoreGBps = float64(restoreBytes) / restoreSec / 1e9
	}
	if saveSec > 0 {
		row.SaveGBps = float64(saveBytes) / saveSec / 1e9
	}
	if row.BytesOnDisk, err = sys.BytesOnDisk(); err != nil {
		return nil, nil, err
	}
	if m, ok := sys.(peer.MemoryUser); ok {
		if row.BytesInMemory, err = m.BytesInMemory(); err != nil {
			return nil, nil, err
		}
	}
	return row, pts, nil
}

// runPhase runs a phase's streams with c workers: a worker takes the next
// request of the stream at the head of the queue and puts the stream back at
// the tail, so with one worker the streams advance round-robin.
func runPhase(ph Phase, c int, do func(buf *[]byte, r Request) error) error {
	n := len(ph.Streams)
	if n == 0 {
		return nil
	}
	ready := make(chan int, n)
	for i := 0; i < n; i++ {
		ready <- i
	}
	pos := make([]int, n)
	var left atomic.Int64
	left.Store(int64(n))
	var errMu sync.Mutex
	var firstErr error
	failed := func() bool { errMu.Lock(); defer errMu.Unlock(); return firstErr != nil }
	var wg sync.WaitGroup
	for k := 0; k < min(c, n); k++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var buf []byte
			for s := range ready {
				if !failed() {
					if err := do(&buf, ph.Streams[s][pos[s]]); err != nil {
						errMu.Lock()
						if firstErr == nil {
							firstErr = err
						}
						errMu.Unlock()
					}
				}
				pos[s]++
				if pos[s] < len(ph.Streams[s]) && !failed() {
					ready <- s
				} else if left.Add(-1) == 0 {
					close(ready)
				}
			}
		}()
	}
	wg.Wait()
	return firstErr
}

func quantile(v []float64, q float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	i := int(q*float64(len(s)-1) + 0.5)
	return s[min(i, len(s)-1)]
}
