// Package benchfleet measures a fleet of hcached processes sharing one
// bucket (the remote tier, package chunk/remote) on one machine: seeded
// conversations whose turns a router sends to random nodes, with and
// without the shared tier; and the remote read throughput of one large
// context against the object store's own parallel-GET throughput for the
// same object, in the same run.
package benchfleet

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/hcache/hcache/chunk"
	"github.com/hcache/hcache/chunk/remote"
	hc "github.com/hcache/hcache/clients/hcacheclient"
	"github.com/hcache/hcache/internal/objstore"
)

// Options configure a run.
type Options struct {
	Nodes    int    `json:"nodes"`
	Workload string `json:"workload"` // chat or prefix
	// The prefix workload (prefix.go): a bench/prefixwl stream.
	PrefixWorkload string  `json:"prefix_workload,omitempty"`
	PrefixScale    float64 `json:"prefix_scale,omitempty"`
	Requests       int     `json:"requests,omitempty"`
	Conversations  int     `json:"conversations"`
	Turns          int     `json:"turns"`
	FirstTokens    int     `json:"first_tokens"`
	TurnTokens     int     `json:"turn_tokens"`
	Layers         int     `json:"layers"`    // of the fleet's model shape (K|V rows)
	RowBytes       int     `json:"row_bytes"` // per token per layer
	Seed           int64   `json:"seed"`
	// ThroughputTokens is the context of the remote read measurement, in
	// Llama2-7B's shape (32 layers of 16 KiB K|V rows per token); 0 skips it.
	ThroughputTokens int `json:"throughput_tokens"`
	// Parallel and RangeBytes are the remote client's GETs in flight per
	// layer and their size.
	Parallel int `json:"parallel"`
	// FetchAhead: a remote read holds 2 x FetchAhead layers (default 4);
	// its GETs in flight are 4 x Parallel.
	FetchAhead int       `json:"fetch_ahead"`
	RangeBytes int64     `json:"range_bytes"`
	Hcached    string    `json:"-"`
	Weed       string    `json:"-"`
	Dir        string    `json:"-"`
	Log        io.Writer `json:"-"`
}

// Class is the restores of one kind (local hit, remote hit, miss).
type Class struct {
	Count  int     `json:"count"`
	MeanMS float64 `json:"mean_ms"`
	P50MS  float64 `json:"p50_ms"`
	P90MS  float64 `json:"p90_ms"`
	Bytes  int64   `json:"bytes"`
	GBps   float64 `json:"gbps"` // bytes / summed restore time
}

// Mode is one run of the workload.
type Mode struct {
	SharedTier      bool    `json:"shared_tier"`
	RestorableTurns int     `json:"restorable_turns"`
	HitRate         float64 `json:"hit_rate"`
	LocalHit        Class   `json:"local_hit"`
	RemoteHit       Class   `json:"remote_hit"`
	Miss            Class   `json:"miss"`
	WrongBytes      int     `json:"wrong_bytes"`
	Seconds         float64 `json:"seconds"`
}

// Throughput compares the remote tier's verified read of one context with
// raw parallel GETs of the same object.
type Throughput struct {
	Model         string  `json:"model"`
	Tokens        int     `json:"tokens"`
	ObjectBytes   int64   `json:"object_bytes"`
	LayerBytes    int64   `json:"layer_bytes"`
	FetchGBps     float64 `json:"fetch_gbps"`     // Client.Fetch: ranged GETs, checksums, layers in order (best of runs)
	ImportGBps    float64 `json:"import_gbps"`    // Client.Import: the fetch plus the write into the local store
	RawGETGBps    float64 `json:"raw_get_gbps"`   // the same bytes, as many parallel ranged GETs, no checks (best of runs)
	Ratio         float64 `json:"fetch_over_raw"` // the target is >= 0.8
	RawInFlight   int     `json:"raw_gets_in_flight"`
	FetchInFlight int     `json:"fetch_gets_in_flight"`
	Runs          int     `json:"runs"`
}

// Result is what `hcache bench fleet --json` prints.
type Result struct {
	Options    Options      `json:"options"`
	Modes      []Mode       `json:"modes,omitempty"`
	Prefix     []PrefixMode `json:"prefix_modes,omitempty"`
	Throughput *Throughput  `json:"throughput,omitempty"`
}

func (o *Options) fill() error {
	def := func(p *int, v int) {
		if *p == 0 {
			*p = v
		}
	}
	def(&o.Nodes, 3)
	def(&o.Conversations, 16)
	def(&o.Turns, 5)
	def(&o.FirstTokens, 256)
	def(&o.TurnTokens, 64)
	def(&o.Layers, 4)
	def(&o.RowBytes, 4096)
	def(&o.Parallel, 8)
	def(&o.FetchAhead, 4)
	if o.RangeBytes == 0 {
		o.RangeBytes = 8 << 20
	}
	if o.Workload == "" {
		o.Workload = "chat"
	}
	if o.Workload != "chat" && o.Workload != "prefix" {
		return fmt.Errorf("workload %q: want chat or prefix", o.Workload)
	}
	if o.Workload == "prefix" {
		if o.PrefixWorkload == "" {
			o.PrefixWorkload = "chat"
		}
		if o.PrefixScale == 0 {
			o.PrefixScale = 0.05
		}
		def(&o.Requests, 120)
	}
	if o.Nodes < 1 || o.Turns < 2 || o.Conversations < 1 {
		return fmt.Errorf("want at least 1 node, 2 turns and 1 conversation")
	}
	if o.Log == nil {
		o.Log = io.Discard
	}
	if o.Hcached == "" {
		exe, err := os.Executable()
		if err == nil {
			o.Hcached = filepath.Join(filepath.Dir(exe), "hcached")
		}
	}
	if _, err := os.Stat(o.Hcached); err != nil {
		return fmt.Errorf("hcached binary %q: %v (build it: make build, or go build -o bin/hcached ./cmd/hcached; --hcached PATH)", o.Hcached, err)
	}
	return nil
}

// Run runs the benchmark.
func Run(o Options) (*Result, error) {
	if err := o.fill(); err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp(o.Dir, "hcache-fleet-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	srv, err := objstore.Launch(o.Weed, filepath.Join(dir, "weed"))
	if err != nil {
		return nil, err
	}
	defer srv.Kill()
	os.Setenv("AWS_ACCESS_KEY_ID", "fleet")
	os.Setenv("AWS_SECRET_ACCESS_KEY", "fleet")
	res := &Result{Options: o}
	for _, shared := range []bool{false, true} {
		if o.Workload == "prefix" {
			m, err := runPrefix(o, dir, srv.Endpoint, shared)
			if err != nil {
				return nil, fmt.Errorf("shared tier %v: %w", shared, err)
			}
			res.Prefix = append(res.Prefix, *m)
			continue
		}
		m, err := runMode(o, dir, srv.Endpoint, shared)
		if err != nil {
			return nil, fmt.Errorf("shared tier %v: %w", shared, err)
		}
		res.Modes = append(res.Modes, *m)
	}
	if o.ThroughputTokens > 0 {
		t, err := throughput(o, dir, srv.Endpoint)
		if err != nil {
			return nil, fmt.Errorf("throughput: %w", err)
		}
		res.Throughput = t
	}
	return res, nil
}

type node struct {
	cmd     *exec.Cmd
	sock    string
	metrics string
	c       *hc.Client
	done    chan struct{}
}

func startNode(o Options, dir, endpoint string, i int, shared bool, prefix string) (*node, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	metrics := ln.Addr().String()
	ln.Close()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	sdir, err := os.MkdirTemp("", "hcf")
	if err != nil {
		return nil, err
	}
	n := &node{sock: filepath.Join(sdir, "s"), metrics: metrics, done: make(chan struct{})}
	args := []string{"--dir", filepath.Join(dir, fmt.Sprintf("node-%d", i)), "--listen", n.sock, "--shm", "off",
		"--metrics", metrics, "--gc-interval", "-1s", "--log-level", "warn", "--capacity", "-1", "--staging", "512M"}
	if shared {
		args = append(args, "--remote-endpoint", endpoint, "--remote-bucket", "fleet", "--remote-prefix", prefix,
			"--remote-store-id", fmt.Sprintf("node-%d", i), "--remote-publish", "sync")
	}
	n.cmd = exec.Command(o.Hcached, args...)
	logf, err := os.Create(filepath.Join(dir, fmt.Sprintf("node-%d-%v.log", i, shared)))
	if err != nil {
		return nil, err
	}
	n.cmd.Stdout, n.cmd.Stderr = logf, logf
	if err := n.cmd.Start(); err != nil {
		return nil, err
	}
	go func() { n.cmd.Wait(); logf.Close(); os.RemoveAll(sdir); close(n.done) }()
	deadline := time.Now().Add(30 * time.Second)
	for {
		if c, err := hc.Dial("unix://" + n.sock); err == nil {
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			_, err = c.Info(ctx)
			cancel()
			if err == nil {
				n.c = c
				return n, nil
			}
			c.Close()
		}
		select {
		case <-n.done:
			return nil, fmt.Errorf("hcached node %d exited at start (log %s)", i, logf.Name())
		default:
		}
		if time.Now().After(deadline) {
			n.stop()
			return nil, fmt.Errorf("hcached node %d did not answer within 30 s", i)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (n *node) stop() {
	if n.c != nil {
		n.c.Close()
	}
	n.cmd.Process.Signal(os.Interrupt)
	select {
	case <-n.done:
	case <-time.After(30 * time.Second):
		n.cmd.Process.Kill()
		<-n.done
	}
}

// remoteHits reads hcache_remote_lookups_total{result="remote_hit"}.
func (n *node) remoteHits() (float64, error) {
	resp, err := http.Get("http://" + n.metrics + "/metrics")
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		if l := sc.Text(); strings.HasPrefix(l, `hcache_remote_lookups_total{result="remote_hit"} `) {
			return strconv.ParseFloat(strings.Fields(l)[1], 64)
		}
	}
	return 0, sc.Err()
}

func identity(o Options) hc.Identity {
	id := hc.Identity{Model: []byte(fmt.Sprintf("fleet-bench-%dx%d", o.Layers, o.RowBytes))}
	for range o.Layers {
		id.Plan = append(id.Plan, hc.LayerPlan{Kind: hc.LayerKV, RowBytes: uint32(o.RowBytes)})
	}
	return id
}

// rowsOf is the deterministic rows of tokens [from, from+n) of a layer of
// conversation conv.
func rowsOf(conv, layer, from, n, rb int) []byte {
	b := make([]byte, n*rb)
	for t := range n {
		x := uint64(conv)<<40 ^ uint64(layer)<<32 ^ uint64(from+t)
		row := b[t*rb : (t+1)*rb]
		for i := 0; i+8 <= len(row); i += 8 {
			x ^= x >> 12
			x ^= x << 25
			x ^= x >> 27
			binary.LittleEndian.PutUint64(row[i:], x*0x2545F4914F6CDD1D)
		}
	}
	return b
}

func runMode(o Options, dir, endpoint string, shared bool) (*Mode, error) {
	prefix := fmt.Sprintf("run-%d-%v/", time.Now().UnixNano(), shared)
	mdir := filepath.Join(dir, fmt.Sprintf("shared-%v", shared))
	nodes := make([]*node, o.Nodes)
	defer func() {
		for _, n := range nodes {
			if n != nil {
				n.stop()
			}
		}
	}()
	for i := range nodes {
		n, err := startNode(o, mdir, endpoint, i, shared, prefix)
		if err != nil {
			return nil, err
		}
		nodes[i] = n
	}
	ident := identity(o)
	ctx := context.Background()
	rng := rand.New(rand.NewSource(o.Seed))
	tokens := make([]int, o.Conversations)
	name := func(c int) string { return fmt.Sprintf("conv-%d", c) }
	write := func(n *node, c, from, count int, create bool) error {
		var w *hc.Writer
		var err error
		if create {
			w, err = n.c.Create(ctx, "chat", name(c), ident, false)
		} else {
			w, err = n.c.Append(ctx, "chat", name(c), ident)
		}
		if err != nil {
			return err
		}
		for l := range o.Layers {
			if err := w.AppendLayer(ctx, l, rowsOf(c, l, from, count, o.RowBytes)); err != nil {
				return err
			}
		}
		return w.Close(ctx)
	}
	m := &Mode{SharedTier: shared}
	var local, rem, miss []time.Duration
	var localB, remB int64
	start := time.Now()
	for t := 0; t < o.Turns; t++ {
		for _, c := range rng.Perm(o.Conversations) {
			n := nodes[rng.Intn(o.Nodes)]
			if t == 0 {
				if err := write(n, c, 0, o.FirstTokens, true); err != nil {
					return nil, err
				}
				tokens[c] = o.FirstTokens
				fmt.Fprintf(o.Log, ".")
				continue
			}
			m.RestorableTurns++
			before := 0.0
			if shared {
				before, _ = n.remoteHits()
			}
			want := tokens[c]
			wrong := false
			t0 := time.Now()
			got, err := n.c.Restore(ctx, "chat", name(c), ident, func(layer int, rows []byte) error {
				if len(rows) == want*o.RowBytes && !wrong {
					// compare sampled tokens: first, last and a middle one
					for _, tok := range []int{0, want / 2, want - 1} {
						exp := rowsOf(c, layer, tok, 1, o.RowBytes)
						if string(rows[tok*o.RowBytes:(tok+1)*o.RowBytes]) != string(exp) {
							wrong = true
						}
					}
				}
				return nil
			})
			d := time.Since(t0)
			if wrong {
				m.WrongBytes++
			}
			hit := err == nil && int(got) == want && !wrong
			if err != nil && status.Code(err) != codes.NotFound {
				return nil, fmt.Errorf("restore %s on a node: %w", name(c), err)
			}
			if hit {
				after := before
				if shared {
					after, _ = n.remoteHits()
				}
				b := int64(want) * int64(o.RowBytes) * int64(o.Layers)
				if after > before {
					rem, remB = append(rem, d), remB+b
				} else {
					local, localB = append(local, d), localB+b
				}
				if err := write(n, c, want, o.TurnTokens, false); err != nil {
					return nil, err
				}
			} else {
				miss = append(miss, d)
				// Recompute: the whole conversation so far, then the turn.
				if err := n.c.Delete(ctx, "chat", name(c)); err != nil && status.Code(err) != codes.NotFound {
					return nil, err
				}
				if err := write(n, c, 0, want+o.TurnTokens, true); err != nil {
					return nil, err
				}
			}
			tokens[c] = want + o.TurnTokens
			fmt.Fprintf(o.Log, ".")
		}
	}
	fmt.Fprintln(o.Log)
	m.Seconds = time.Since(start).Seconds()
	m.LocalHit, m.RemoteHit, m.Miss = class(local, localB), class(rem, remB), class(miss, 0)
	m.HitRate = float64(len(local)+len(rem)) / float64(m.RestorableTurns)
	return m, nil
}

func class(ds []time.Duration, bytes int64) Class {
	c := Class{Count: len(ds), Bytes: bytes}
	if len(ds) == 0 {
		return c
	}
	sort.Slice(ds, func(i, j int) bool { return ds[i] < ds[j] })
	var sum time.Duration
	for _, d := range ds {
		sum += d
	}
	ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
	c.MeanMS = ms(sum / time.Duration(len(ds)))
	c.P50MS = ms(ds[len(ds)/2])
	c.P90MS = ms(ds[min(len(ds)-1, len(ds)*9/10)])
	if bytes > 0 {
		c.GBps = float64(bytes) / sum.Seconds() / 1e9
	}
	return c
}

// throughput publishes one Llama2-7B-shaped context from an embedded store
// and reads it back with Client.Fetch and with raw parallel GETs.
func throughput(o Options, dir, endpoint string) (*Throughput, error) {
	const layers, rb = 32, 2 * 4096 * 2 // K|V rows of fp16, hidden 4096
	ident := &chunk.Identity{Model: []byte("llama2-7b-shaped")}
	for range layers {
		ident.Plan = append(ident.Plan, chunk.LayerPlan{Kind: chunk.LayerKV, RowBytes: rb})
	}
	cfg := remote.Config{Endpoint: endpoint, Bucket: "fleet", Prefix: "throughput/", StoreID: "bench",
		Parallel: o.Parallel, RangeBytes: o.RangeBytes, Timeout: 5 * time.Minute}
	c, err := remote.New(cfg)
	if err != nil {
		return nil, err
	}
	ctx := context.Background()
	if err := c.EnsureBucket(ctx); err != nil {
		return nil, err
	}
	st, err := chunk.Open(chunk.Options{Dir: filepath.Join(dir, "throughput"), GCInterval: -1, CapacityBytes: -1, Logf: func(string, ...any) {}})
	if err != nil {
		return nil, err
	}
	defer st.Close()
	w, err := st.Create("bench", "ctx", ident, chunk.CreateOptions{})
	if err != nil {
		return nil, err
	}
	for l := range layers {
		if err := w.AppendLayer(l, rowsOf(1, l, 0, o.ThroughputTokens, rb)); err != nil {
			return nil, err
		}
	}
	if err := w.Close(); err != nil {
		return nil, err
	}
	fmt.Fprintf(o.Log, "throughput: publishing %d tokens\n", o.ThroughputTokens)
	m, err := c.Publish(ctx, st, "bench", "ctx")
	if err != nil {
		return nil, err
	}
	layerBytes := int64(m.Layers[0].Bytes)
	total := int64(0)
	for _, l := range m.Layers {
		total += int64(l.Bytes)
	}
	ahead := o.FetchAhead
	t := &Throughput{Model: "llama2-7b", Tokens: o.ThroughputTokens, ObjectBytes: int64(m.ObjectBytes), LayerBytes: layerBytes,
		FetchInFlight: 4 * o.Parallel, Runs: 3}
	for range t.Runs {
		t0 := time.Now()
		if err := c.Fetch(ctx, m, ahead, func(int, []byte) error { return nil }); err != nil {
			return nil, err
		}
		t.FetchGBps = max(t.FetchGBps, float64(total)/time.Since(t0).Seconds()/1e9)
		// The store's limit: the best of several concurrencies.
		for _, inFlight := range []int{o.Parallel, 4 * o.Parallel, 16 * o.Parallel} {
			g, err := rawGETs(endpoint, m, o.RangeBytes, inFlight)
			if err != nil {
				return nil, err
			}
			if g > t.RawGETGBps {
				t.RawGETGBps, t.RawInFlight = g, inFlight
			}
		}
	}
	// Import: the fetch and the write into a fresh local store.
	st2, err := chunk.Open(chunk.Options{Dir: filepath.Join(dir, "throughput-import"), GCInterval: -1, CapacityBytes: -1, Logf: func(string, ...any) {}})
	if err != nil {
		return nil, err
	}
	defer st2.Close()
	t0 := time.Now()
	if _, err := c.Import(ctx, st2, "bench", "ctx"); err != nil {
		return nil, err
	}
	t.ImportGBps = float64(total) / time.Since(t0).Seconds() / 1e9
	t.Ratio = t.FetchGBps / t.RawGETGBps
	return t, nil
}

// rawGETs reads every layer's bytes of m's object as ranged GETs of
// rangeBytes, inFlight at once, with plain HTTP (no checks): the object
// store's own limit for these objects.
func rawGETs(endpoint string, m *remote.Manifest, rangeBytes int64, inFlight int) (float64, error) {
	type rg struct{ off, n int64 }
	var rgs []rg
	var total int64
	for _, l := range m.Layers {
		for off := int64(0); off < int64(l.Bytes); off += rangeBytes {
			n := min(rangeBytes, int64(l.Bytes)-off)
			rgs = append(rgs, rg{int64(l.Off) + off, n})
			total += n
		}
	}
	tr := &http.Transport{MaxIdleConnsPerHost: inFlight, DisableCompression: true}
	defer tr.CloseIdleConnections()
	cl := &http.Client{Transport: tr}
	url := "http://" + endpoint + "/fleet/" + m.Object
	sem := make(chan struct{}, inFlight)
	var wg sync.WaitGroup
	var mu sync.Mutex
	var first error
	bufs := make(chan []byte, inFlight)
	t0 := time.Now()
	for _, r := range rgs {
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer func() { <-sem; wg.Done() }()
			var buf []byte
			select {
			case buf = <-bufs:
			default:
				buf = make([]byte, rangeBytes)
			}
			defer func() {
				select {
				case bufs <- buf:
				default:
				}
			}()
			req, _ := http.NewRequest("GET", url, nil)
			req.Header.Set("Range", fmt.Sprintf("bytes=%d-%d", r.off, r.off+r.n-1))
			resp, err := cl.Do(req)
			if err == nil {
				_, err = io.ReadFull(resp.Body, buf[:r.n])
				resp.Body.Close()
				if err == nil && resp.StatusCode != http.StatusPartialContent {
					err = fmt.Errorf("GET %s: %s", url, resp.Status)
				}
			}
			if err != nil {
				mu.Lock()
				if first == nil {
					first = err
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	if first != nil {
		return 0, errors.Join(first, errors.New("raw GETs (anonymous reads: SeaweedFS without an IAM config allows them)"))
	}
	return float64(total) / time.Since(t0).Seconds() / 1e9, nil
}
