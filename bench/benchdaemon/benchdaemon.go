package benchdaemon

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"math/rand"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"time"

	"github.com/hcache/hcache/chunk"
	hc "github.com/hcache/hcache/clients/hcacheclient"
	"github.com/hcache/hcache/daemon"
	"github.com/hcache/hcache/internal/progress"
	"github.com/hcache/hcache/model"
	"github.com/hcache/hcache/serve/sched"
	"github.com/hcache/hcache/state"
	"github.com/hcache/hcache/state/codec"
)

// encodedRows fills layer with rows of p's kind encoded under cd from
// seeded gaussian values (a KV row: K then V segments of kv_dim values).
func encodedRows(c *model.Config, p state.LayerPlan, cd state.Codec, rng *rand.Rand, layer []byte) error {
	segs, n := 1, c.HiddenSize
	if p.Kind == state.LayerKV {
		segs, n = 2, c.KVDim()
	}
	vals := make([][]float32, segs)
	for j := range vals {
		vals[j] = make([]float32, n)
	}
	rb := int(p.RowBytes)
	for r := 0; r < len(layer)/rb; r++ {
		for _, v := range vals {
			for i := range v {
				v[i] = float32(rng.NormFloat64())
			}
		}
		if err := codec.EncodeRow(cd, c.DType, layer[r*rb:(r+1)*rb], vals...); err != nil {
			return err
		}
	}
	return nil
}

// Options configure a run.
type Options struct {
	Dir      string
	Model    string
	Tokens   int
	Contexts int
	Clients  []int
	Rounds   int // restores per client in the clients rows
	// Codec of the stored rows: the default plan's kind with the codec's
	// row sizes, rows encoded from seeded gaussian values (the client
	// encodes; the daemon stores and restores them as they are).
	Codec    state.Codec
	Progress io.Writer
}

// Row is one concurrency level.
type Row struct {
	Clients       int     `json:"clients"`
	Restores      int     `json:"restores"`
	AggregateGBps float64 `json:"aggregate_gbps"`
	P50MS         float64 `json:"p50_ms"`
	P99MS         float64 `json:"p99_ms"`
}

// Result is what `hcache bench daemon --json` prints.
type Result struct {
	Model           string  `json:"model"`
	Codec           string  `json:"codec"`
	Tokens          int     `json:"tokens"`
	Contexts        int     `json:"contexts"`
	BytesPerContext int64   `json:"bytes_per_context"`
	Engine          string  `json:"engine"`
	Transport       string  `json:"transport"`
	EmbeddedGBps    float64 `json:"embedded_gbps"`
	DaemonGBps      float64 `json:"daemon_gbps"`
	Ratio           float64 `json:"ratio"`
	InlineGBps      float64 `json:"daemon_inline_gbps"` // one client, bytes in the messages (as over TCP)
	Method          string  `json:"method"`
	Rows            []Row   `json:"clients_rows"`
}

// Run runs the benchmark.
func Run(o Options) (*Result, error) {
	c, err := model.Preset(o.Model)
	if err != nil {
		return nil, err
	}
	if o.Tokens <= 0 || o.Contexts <= 0 || o.Rounds <= 0 {
		return nil, fmt.Errorf("bench daemon: --tokens, --contexts and --rounds must be positive")
	}
	if !o.Codec.Known() {
		return nil, fmt.Errorf("bench daemon: unknown codec %d", uint8(o.Codec))
	}
	plan := sched.PlanOfCodec(c, sched.DefaultPlan(c)[0].Kind, o.Codec)
	// The store and the client share state's Identity.
	cident := &chunk.Identity{Model: model.ShapeFingerprint(c), Plan: plan, Codec: o.Codec}
	ident := *cident
	ctxBytes := int64(cident.TokenBytes()) * int64(o.Tokens)
	base, err := os.MkdirTemp(o.Dir, "hcache-bench-daemon")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(base)
	st, err := chunk.Open(chunk.Options{Dir: filepath.Join(base, "store"), CacheBytes: 0, CapacityBytes: -1, GCInterval: -1,
		StagingBytes: 2*ctxBytes + 64<<20, Logf: func(string, ...any) {}})
	if err != nil {
		return nil, err
	}
	defer st.Close()
	res := &Result{Model: o.Model, Codec: o.Codec.String(), Tokens: o.Tokens, Contexts: o.Contexts, BytesPerContext: ctxBytes, Engine: st.EngineName(), Transport: "unix socket + shared memory region",
		Method: "embedded: Store.Restore copying each layer into a caller buffer; daemon: one client restoring into its shared region (the daemon copies each layer there); the sides alternate restore by restore (ABBA) over the same contexts, each side's bytes over its total time"}

	// Save the contexts.
	rng := rand.New(rand.NewSource(1))
	layer := make([]byte, o.Tokens*int(plan[0].RowBytes))
	if o.Codec == state.CodecNone {
		for i := 0; i+1 < len(layer); i += 2 {
			layer[i], layer[i+1] = byte(rng.Intn(256)), byte(0x30+rng.Intn(12))
		}
	} else if err := encodedRows(c, plan[0], o.Codec, rng, layer); err != nil {
		return nil, err
	}
	bar := progress.New(o.Progress, "save", int64(o.Contexts), "contexts")
	for i := 0; i < o.Contexts; i++ {
		w, err := st.Create("bench", fmt.Sprintf("c%d", i), cident, chunk.CreateOptions{})
		if err != nil {
			return nil, err
		}
		for l, p := range plan {
			if p.RowBytes > 0 {
				if err := w.AppendLayer(l, layer[:o.Tokens*int(p.RowBytes)]); err != nil {
					return nil, err
				}
			}
		}
		if err := w.Close(); err != nil {
			return nil, err
		}
		bar.Add(1)
	}
	bar.Finish()

	sock := filepath.Join(base, "s")
	srv, err := daemon.New(daemon.Config{Store: st, Listen: sock, Shm: sock + ".shm", GCInterval: -1, MaxRegionBytes: 1 << 40,
		MaxInflight: 1024, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		return nil, err
	}
	defer srv.Stop()
	ctx := context.Background()
	dial := func() (*hc.Client, *hc.Region, error) {
		cl, err := hc.Dial("unix://" + sock)
		if err != nil {
			return nil, nil, err
		}
		g, err := cl.NewRegion(ctx, int(ctxBytes))
		if err != nil {
			cl.Close()
			return nil, nil, err
		}
		clear(g.Mem) // fault the pages in before timing
		return cl, g, nil
	}
	cl, g, err := dial()
	if err != nil {
		return nil, err
	}
	dst := make([]byte, ctxBytes)
	clear(dst)
	embedded := func(i int) error {
		off := 0
		n, err := st.Restore("bench", fmt.Sprintf("c%d", i), cident, func(l int, rows []byte) error {
			off += copy(dst[off:], rows)
			return nil
		})
		if err == nil && n != o.Tokens {
			err = fmt.Errorf("embedded restore: %d tokens, want %d", n, o.Tokens)
		}
		return err
	}
	viaDaemon := func(cl *hc.Client, g *hc.Region, i int) error {
		n, err := cl.RestoreInto(ctx, "bench", fmt.Sprintf("c%d", i), ident, g, 0, uint64(len(g.Mem)), func(int, []byte) error { return nil })
		if err == nil && int(n) != o.Tokens {
			err = fmt.Errorf("daemon restore: %d tokens, want %d", n, o.Tokens)
		}
		return err
	}
	// Warm-up (not timed): restore buffers and region pages exist afterwards.
	if err := embedded(0); err != nil {
		return nil, err
	}
	if err := viaDaemon(cl, g, 0); err != nil {
		return nil, err
	}
	// The disk's speed drifts within seconds here, so the two sides
	// alternate restore by restore, in ABBA order, over the same contexts.
	var eTime, dTime time.Duration
	const passes = 2
	bar = progress.New(o.Progress, "restore embedded/daemon", int64(2*passes*o.Contexts), "restores")
	for pass := 0; pass < passes; pass++ {
		for i := 0; i < o.Contexts; i++ {
			for k := 0; k < 2; k++ {
				t0 := time.Now()
				var err error
				daemonSide := (k+i+pass)%2 == 1
				if daemonSide {
					err = viaDaemon(cl, g, i)
				} else {
					err = embedded(i)
				}
				if err != nil {
					return nil, err
				}
				if daemonSide {
					dTime += time.Since(t0)
				} else {
					eTime += time.Since(t0)
				}
				bar.Add(1)
			}
		}
	}
	bar.Finish()
	total := float64(passes * int64(o.Contexts) * ctxBytes)
	res.EmbeddedGBps = total / eTime.Seconds() / 1e9
	res.DaemonGBps = total / dTime.Seconds() / 1e9
	res.Ratio = res.DaemonGBps / res.EmbeddedGBps

	// The same client with the bytes inline in the messages (what a TCP
	// client gets), one pass, after the ratio's passes.
	bar = progress.New(o.Progress, "restore inline", int64(o.Contexts), "restores")
	t0 := time.Now()
	for i := 0; i < o.Contexts; i++ {
		n, err := cl.Restore(ctx, "bench", fmt.Sprintf("c%d", i), ident, func(int, []byte) error { return nil })
		if err == nil && int(n) != o.Tokens {
			err = fmt.Errorf("inline restore: %d tokens, want %d", n, o.Tokens)
		}
		if err != nil {
			return nil, err
		}
		bar.Add(1)
	}
	res.InlineGBps = float64(int64(o.Contexts)*ctxBytes) / time.Since(t0).Seconds() / 1e9
	bar.Finish()
	g.Close()
	cl.Close()

	for _, n := range o.Clients {
		row, err := clientsRow(n, o, dial, viaDaemon, ctxBytes)
		if err != nil {
			return nil, err
		}
		res.Rows = append(res.Rows, *row)
	}
	return res, nil
}

func clientsRow(n int, o Options, dial func() (*hc.Client, *hc.Region, error), restore func(*hc.Client, *hc.Region, int) error, ctxBytes int64) (*Row, error) {
	type conn struct {
		cl *hc.Client
		g  *hc.Region
	}
	conns := make([]conn, n)
	for i := range conns {
		cl, g, err := dial()
		if err != nil {
			return nil, err
		}
		conns[i] = conn{cl, g}
		defer cl.Close()
		defer g.Close()
	}
	bar := progress.New(o.Progress, fmt.Sprintf("%d clients", n), int64(n*o.Rounds), "restores")
	var mu sync.Mutex
	var lat []float64
	errs := make(chan error, n)
	var wg sync.WaitGroup
	t0 := time.Now()
	for i, c := range conns {
		wg.Add(1)
		go func(i int, c conn) {
			defer wg.Done()
			for r := 0; r < o.Rounds; r++ {
				s := time.Now()
				if err := restore(c.cl, c.g, (i+r)%o.Contexts); err != nil {
					errs <- err
					return
				}
				d := time.Since(s).Seconds() * 1e3
				mu.Lock()
				lat = append(lat, d)
				mu.Unlock()
				bar.Add(1)
			}
		}(i, c)
	}
	wg.Wait()
	el := time.Since(t0)
	bar.Finish()
	close(errs)
	if err := <-errs; err != nil {
		return nil, err
	}
	sort.Float64s(lat)
	pct := func(p float64) float64 { return lat[min(len(lat)-1, int(p*float64(len(lat))))] }
	return &Row{Clients: n, Restores: len(lat), AggregateGBps: float64(int64(len(lat))*ctxBytes) / el.Seconds() / 1e9,
		P50MS: pct(0.50), P99MS: pct(0.99)}, nil
}
