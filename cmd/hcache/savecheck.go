package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/hcache/hcache/chunk"
	"github.com/hcache/hcache/gpu"
	"github.com/hcache/hcache/gpu/cuda"
	"github.com/hcache/hcache/internal/buildinfo"
	istat "github.com/hcache/hcache/internal/stat"
	"github.com/hcache/hcache/serve"
	"github.com/hcache/hcache/state"
)

func init() {
	register("gpu save-check", "device save path on a GPU: rows saved from device memory arrive bit-exact and durable, the caller's stream never waits (needs a GPU)", gpuSaveCheck)
	examples["gpu save-check"] = "hcache gpu save-check --dir /tmp --json"
}

// saveCheckResult is what `gpu save-check` reports.
type saveCheckResult struct {
	Build      string `json:"build"`
	Layers     int    `json:"layers"`
	RowBytes   int    `json:"row_bytes"`
	Prefill    int    `json:"prefill_tokens"`
	Decode     int    `json:"decode_tokens"`
	BusyMiB    int    `json:"busy_mib"`
	OK         bool   `json:"ok"`
	Mismatches int    `json:"mismatches"`
	// Prefill: the caller's stream is busy (memsets of BusyMiB), then a
	// copy writes each layer's rows and SaveLayer is called for it.
	PrefillCallsMS  float64               `json:"prefill_calls_ms"`     // all SaveLayer calls, host time
	StreamBusyAfter bool                  `json:"stream_busy_after"`    // the caller's stream was still busy when they had returned
	PrefillStreamMS float64               `json:"prefill_stream_ms"`    // first call to the caller's stream done
	PrefillFlushMS  float64               `json:"prefill_flush_ms"`     // first call to Flush returning (copied, appended, durable)
	PrefillGBps     float64               `json:"prefill_save_gbps"`    // bytes / flush time
	DecodeCallUS    float64               `json:"decode_call_us"`       // SaveToken, median per token
	DecodeCallP99US float64               `json:"decode_call_p99_us"`   // and its p99
	DecodeSyncUS    float64               `json:"decode_sync_copy_us"`  // the baseline: the token's rows copied to the host synchronously, median
	DecodeSyncP99US float64               `json:"decode_sync_copy_p99"` // and its p99
	DecodeDoneUS    float64               `json:"decode_done_us"`       // per token, first SaveToken to the last appended
	DecodeFlushMS   float64               `json:"decode_flush_ms"`
	Stats           serve.DeviceSaveStats `json:"saver_stats"`
	Notes           []string              `json:"notes"`
}

// checkWriter verifies each row against the rows the engine wrote, then
// appends it to the store's writer.
type checkWriter struct {
	mu        sync.Mutex
	w         *chunk.Writer
	want      [][]byte // per layer: the rows expected, in order
	got       []int    // per layer: bytes checked
	mismatch  int
	firstDiff string
}

func (c *checkWriter) verify(layer int, rows []byte) {
	c.mu.Lock()
	defer c.mu.Unlock()
	off := c.got[layer]
	if off+len(rows) > len(c.want[layer]) || !bytes.Equal(rows, c.want[layer][off:off+len(rows)]) {
		c.mismatch++
		if c.firstDiff == "" {
			c.firstDiff = fmt.Sprintf("layer %d bytes [%d, %d) differ from the rows the engine wrote", layer, off, off+len(rows))
		}
	}
	c.got[layer] = off + len(rows)
}

func (c *checkWriter) AppendLayer(layer int, rows []byte) error {
	c.verify(layer, rows)
	return c.w.AppendLayer(layer, rows)
}

func (c *checkWriter) AppendToken(rows [][]byte) error {
	for l, r := range rows {
		c.verify(l, r)
	}
	return c.w.AppendToken(rows)
}

func (c *checkWriter) Flush() error { return c.w.Flush() }

func gpuSaveCheck(args []string, stdout, stderr io.Writer) error {
	fs := newFlags("gpu save-check", stderr)
	dir := fs.String("dir", os.TempDir(), "directory for the store")
	device := fs.Int("device", 0, "CUDA device ordinal")
	cublas := fs.String("cublas", "", "libcublas path (loaded with the driver; the check does not use it)")
	layers := fs.Int("layers", 32, "stored layers (hidden rows)")
	rowBytes := fs.Int("row-bytes", 8192, "bytes per row (Llama2-7B's hidden row in fp16)")
	prefill := fs.Int("prefill", 1024, "prefill tokens")
	decode := fs.Int("decode", 256, "decode tokens")
	busy := fs.Int("busy-mib", 32768, "MiB of memsets queued on the caller's stream before the prefill's rows are written")
	seed := fs.Int64("seed", 1, "seed of the rows")
	asJSON := fs.Bool("json", false, "print JSON")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if *layers < 1 || *rowBytes < 2 || *rowBytes%2 != 0 || *prefill < 1 || *decode < 1 || *busy < 1 {
		return errors.New("gpu save-check: --layers, --prefill, --decode and --busy-mib must be positive, --row-bytes even")
	}
	cp, err := cuda.OpenCopier(cuda.CopierOptions{Device: *device, CublasPath: *cublas})
	if err != nil {
		return err
	}
	res, err := runSaveCheck(*dir, cp, cp.CheckDevice(), *layers, *rowBytes, *prefill, *decode, *busy, *seed, stderr)
	if err = errors.Join(err, cp.Close()); err != nil {
		return err
	}
	if *asJSON {
		if err := printJSON(stdout, res); err != nil {
			return err
		}
	} else {
		fmt.Fprintf(stdout, "prefill %d tokens x %d layers x %d B: calls %.2f ms, caller's stream still busy after them: %v (stream %.2f ms), durable after %.2f ms (%.2f GB/s)\n",
			res.Prefill, res.Layers, res.RowBytes, res.PrefillCallsMS, res.StreamBusyAfter, res.PrefillStreamMS, res.PrefillFlushMS, res.PrefillGBps)
		fmt.Fprintf(stdout, "decode %d tokens: SaveToken %.1f us (p99 %.1f) against a synchronous copy %.1f us (p99 %.1f); pipeline %.1f us per token\n",
			res.Decode, res.DecodeCallUS, res.DecodeCallP99US, res.DecodeSyncUS, res.DecodeSyncP99US, res.DecodeDoneUS)
		fmt.Fprintf(stdout, "bit-exact: %v (%d mismatches); ok: %v\n", res.Mismatches == 0, res.Mismatches, res.OK)
	}
	if !res.OK {
		return fmt.Errorf("gpu save-check failed: %v", res.Notes)
	}
	return nil
}

func p99(v []float64) float64 {
	s := slices.Clone(v)
	slices.Sort(s)
	return s[min(len(s)-1, len(s)*99/100)]
}

// saveCheckDevice is what the check plays an engine with: cuda.CheckDevice
// on a GPU (the test runs the check on the CPU device through an adapter).
type saveCheckDevice interface {
	Alloc(n int) (gpu.DevicePtr, error)
	Free(p gpu.DevicePtr) error
	Upload(p gpu.DevicePtr, b []byte) error
	Download(b []byte, p gpu.DevicePtr) error
	NewStream() (gpu.Stream, error)
	DestroyStream(s gpu.Stream) error
	Memset(s gpu.Stream, p gpu.DevicePtr, v byte, n int) error
	CopyAsync(s gpu.Stream, dst, src gpu.DevicePtr, n int) error
	Synchronize(s gpu.Stream) error
	Marker(s gpu.Stream) (query func() (bool, error), release func(), err error)
}

var _ saveCheckDevice = (*cuda.CheckDevice)(nil)

func runSaveCheck(dir string, cp gpu.AsyncCopier, dev saveCheckDevice, layers, rb, prefill, decode, busyMiB int, seed int64, progress io.Writer) (res *saveCheckResult, err error) {
	res = &saveCheckResult{Build: buildinfo.String("hcache"), Layers: layers, RowBytes: rb, Prefill: prefill, Decode: decode, BusyMiB: busyMiB}
	var allocs []gpu.DevicePtr
	alloc := func(n int) gpu.DevicePtr {
		if err != nil {
			return 0
		}
		var p gpu.DevicePtr
		p, err = dev.Alloc(n)
		allocs = append(allocs, p)
		return p
	}
	defer func() {
		for _, p := range allocs {
			if p != 0 {
				err = errors.Join(err, dev.Free(p))
			}
		}
	}()
	s, err := dev.NewStream()
	if err != nil {
		return nil, err
	}
	defer func() { err = errors.Join(err, dev.DestroyStream(s)) }()

	sdir := filepath.Join(dir, "hcache-gpu-save-check")
	os.RemoveAll(sdir)
	defer os.RemoveAll(sdir)
	plan := make([]state.LayerPlan, layers)
	for l := range plan {
		plan[l] = state.LayerPlan{Kind: state.LayerHidden, RowBytes: uint32(rb)}
	}
	tokBytes := layers * rb
	st, err := chunk.Open(chunk.Options{Dir: sdir, CapacityBytes: -1, GCInterval: -1,
		StagingBytes: int64(prefill+decode+256) * int64(tokBytes), Logf: func(string, ...any) {}})
	if err != nil {
		return nil, err
	}
	defer func() { err = errors.Join(err, st.Close()) }()
	w, err := st.Create("check", "save", &state.Identity{Model: []byte("hcache gpu save-check"), Plan: plan}, chunk.CreateOptions{})
	if err != nil {
		return nil, err
	}
	defer func() { err = errors.Join(err, w.Close()) }()
	cw := &checkWriter{w: w, want: make([][]byte, layers), got: make([]int, layers)}

	rng := rand.New(rand.NewSource(seed))
	// The engine's rows: each prefill layer's in a source buffer, copied
	// into the saved buffer (zeroed first) by a copy queued on the
	// caller's stream behind the busy work, so that a save that did not
	// wait for the stream reads zeros; decode rows each token its own (none
	// is overwritten before its copy completes).
	srcs := make([]gpu.DevicePtr, layers)
	layerBuf := make([]gpu.DevicePtr, layers)
	for l := range layerBuf {
		srcs[l], layerBuf[l] = alloc(prefill*rb), alloc(prefill*rb)
	}
	decodeBuf := alloc(decode * tokBytes)
	scratchBytes := min(256, busyMiB) << 20
	scratch := alloc(scratchBytes)
	if err != nil {
		return nil, err
	}
	host := make([]byte, prefill*rb)
	for l := range layers {
		rng.Read(host)
		cw.want[l] = append(cw.want[l], host...)
		if err := dev.Upload(srcs[l], host); err != nil {
			return nil, err
		}
		if err := dev.Memset(s, layerBuf[l], 0, prefill*rb); err != nil {
			return nil, err
		}
	}
	if err := dev.Synchronize(s); err != nil {
		return nil, err
	}
	ds, err := serve.NewDeviceSaver(plan, cw, cp, serve.DeviceSaveOptions{
		// Slots of one token: the whole prefill and decode fit, so no call
		// waits for staging (which would wait for the caller's stream).
		StagingBytes: int64(prefill+decode+layers) * int64(tokBytes), SlotBytes: tokBytes, Preallocate: true, WaitFull: time.Minute})
	if err != nil {
		return nil, err
	}
	defer func() {
		if ds != nil {
			err = errors.Join(err, ds.Close())
		}
	}()
	bg := context.Background()

	fmt.Fprintf(progress, "prefill: %d layers of %d tokens behind %d MiB of memsets\n", layers, prefill, busyMiB)
	for m := 0; m < busyMiB; m += scratchBytes >> 20 {
		if err := dev.Memset(s, scratch, byte(m), scratchBytes); err != nil {
			return nil, err
		}
	}
	var calls time.Duration
	t0 := time.Now()
	for l := range layers {
		if err := dev.CopyAsync(s, layerBuf[l], srcs[l], prefill*rb); err != nil {
			return nil, err
		}
		c0 := time.Now()
		if _, err := ds.SaveLayer(bg, l, layerBuf[l], prefill, s); err != nil {
			return nil, err
		}
		calls += time.Since(c0)
	}
	query, release, err := dev.Marker(s)
	if err != nil {
		return nil, err
	}
	done, qerr := query()
	release()
	if qerr != nil {
		return nil, qerr
	}
	res.StreamBusyAfter = !done
	if err := dev.Synchronize(s); err != nil {
		return nil, err
	}
	res.PrefillStreamMS = float64(time.Since(t0).Microseconds()) / 1e3
	if err := ds.Flush(); err != nil {
		return nil, err
	}
	flush := time.Since(t0)
	res.PrefillCallsMS = float64(calls.Microseconds()) / 1e3
	res.PrefillFlushMS = float64(flush.Microseconds()) / 1e3
	res.PrefillGBps = float64(layers*prefill*rb) / flush.Seconds() / 1e9

	// Decode: each step's rows are copied on the stream from src into the
	// step's rows, then saved; the baseline copies the same rows to the
	// host synchronously, as an engine that saves by itself does.
	fmt.Fprintf(progress, "decode: %d tokens\n", decode)
	tok := make([]byte, decode*tokBytes)
	rng.Read(tok)
	if err := dev.Upload(decodeBuf, tok); err != nil {
		return nil, err
	}
	for t := range decode {
		for l := range layers {
			cw.want[l] = append(cw.want[l], tok[t*tokBytes+l*rb:t*tokBytes+(l+1)*rb]...)
		}
	}
	pinned, free, err := cp.AllocHost(tokBytes)
	if err != nil {
		return nil, err
	}
	defer func() { err = errors.Join(err, free()) }()
	var callUS, syncUS []float64
	var last uint64
	t1 := time.Now()
	for t := range decode {
		ptrs := make([]gpu.DevicePtr, layers)
		for l := range layers {
			ptrs[l] = decodeBuf + gpu.DevicePtr(t*tokBytes+l*rb)
		}
		// A little of the engine's work on the stream before the step.
		if err := dev.Memset(s, scratch, byte(t), 1<<20); err != nil {
			return nil, err
		}
		c0 := time.Now()
		seq, err := ds.SaveToken(bg, ptrs, s)
		callUS = append(callUS, float64(time.Since(c0).Nanoseconds())/1e3)
		if err != nil {
			return nil, err
		}
		last = seq
	}
	if err := ds.WaitWritten(last); err != nil {
		return nil, err
	}
	res.DecodeDoneUS = float64(time.Since(t1).Nanoseconds()) / 1e3 / float64(decode)
	c1 := time.Now()
	if err := ds.Flush(); err != nil {
		return nil, err
	}
	res.DecodeFlushMS = float64(time.Since(c1).Microseconds()) / 1e3
	for t := range decode {
		c0 := time.Now()
		for l := range layers {
			if err := dev.Download(pinned[l*rb:(l+1)*rb], decodeBuf+gpu.DevicePtr(t*tokBytes+l*rb)); err != nil {
				return nil, err
			}
		}
		syncUS = append(syncUS, float64(time.Since(c0).Nanoseconds())/1e3)
	}
	res.DecodeCallUS, res.DecodeCallP99US = istat.Median(callUS), p99(callUS)
	res.DecodeSyncUS, res.DecodeSyncP99US = istat.Median(syncUS), p99(syncUS)
	res.Stats = ds.Stats()
	cerr := ds.Close()
	ds = nil
	if cerr != nil {
		return nil, cerr
	}
	res.Mismatches = cw.mismatch
	res.OK = true
	if cw.mismatch > 0 {
		res.OK = false
		res.Notes = append(res.Notes, cw.firstDiff)
	}
	for l := range layers {
		if cw.got[l] != len(cw.want[l]) {
			res.OK = false
			res.Notes = append(res.Notes, fmt.Sprintf("layer %d: %d bytes reached the writer, want %d", l, cw.got[l], len(cw.want[l])))
			break
		}
	}
	if !res.StreamBusyAfter {
		res.OK = false
		res.Notes = append(res.Notes, fmt.Sprintf("the caller's stream was done when SaveLayer returned: the call waited for it, or %d MiB of memsets were too short to tell", busyMiB))
	}
	if got := w.Tokens(); got != prefill+decode {
		res.OK = false
		res.Notes = append(res.Notes, fmt.Sprintf("the store's writer holds %d tokens, want %d", got, prefill+decode))
	}
	return res, nil
}
