// Package benchstore measures the chunk store on real files: save and
// restore bandwidth against fio in the same run, bytes on disk per token, the
// caller-side cost of a decode-step append against a plain copy, and the time
// to reopen the store.
package benchstore

import (
	"fmt"
	"io"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"github.com/hcache/hcache/bench/fio"
	"github.com/hcache/hcache/chunk"
	"github.com/hcache/hcache/internal/progress"
	"github.com/hcache/hcache/internal/stat"
	"github.com/hcache/hcache/model"
	"github.com/hcache/hcache/serve/sched"
)

// Options of one run.
type Options struct {
	Dir         string
	Model       string // preset name
	Tokens      int
	Contexts    int
	Writers     int // contexts saved concurrently
	Compression string
	SkipFio     bool
	Progress    io.Writer
	// CrashWriter, when set, starts a writer process on a store directory
	// (hcache stress); it is killed with SIGKILL mid-write and the reopen
	// after that crash is what recovery_ms times. Without it, recovery_ms
	// times a reopen after a clean close.
	CrashWriter func(dir string) *exec.Cmd
	// Sweep, when set, runs a fio sweep after the measurement; its best
	// points are the disk's limit the result is also compared with.
	Sweep *fio.SweepOptions
}

// Result is what `hcache bench store --json` prints.
type Result struct {
	Model               string  `json:"model"`
	Engine              string  `json:"engine"`
	Tokens              int     `json:"tokens"`
	Contexts            int     `json:"contexts"`
	Plan                string  `json:"plan"`
	RawBytesPerToken    int     `json:"raw_bytes_per_token"`
	SaveGBps            float64 `json:"save_gbps"`
	RestoreGBps         float64 `json:"restore_gbps"`
	FioWriteGBps        float64 `json:"fio_write_gbps"`
	FioReadGBps         float64 `json:"fio_read_gbps"`
	FioWrite            string  `json:"fio_write_job"`
	FioRead             string  `json:"fio_read_job"`
	SaveRatio           float64 `json:"save_ratio"`
	RestoreRatio        float64 `json:"restore_ratio"`
	BytesOnDiskPerToken float64 `json:"bytes_on_disk_per_token"`
	DiskOverRaw         float64 `json:"bytes_on_disk_over_raw"`
	AppendTokenUS       float64 `json:"append_token_us"`
	CopyUS              float64 `json:"copy_us"`
	AppendTokenRatio    float64 `json:"append_token_ratio"`
	RecoveryMS          float64 `json:"recovery_ms"`
	RecoveryAfter       string  `json:"recovery_after"`
	CompressionRatio    float64 `json:"compression_ratio,omitempty"`
	// Against the best of the fio sweep (the disk's limit).
	FioBestReadGBps  float64          `json:"fio_best_read_gbps,omitempty"`
	FioBestWriteGBps float64          `json:"fio_best_write_gbps,omitempty"`
	SaveVsBest       float64          `json:"save_vs_best,omitempty"`
	RestoreVsBest    float64          `json:"restore_vs_best,omitempty"`
	FioSweep         *fio.SweepResult `json:"fio_sweep,omitempty"`
	// Where the timed save's time went (chunk.Store.SaveStages): group
	// writes (count, mean ms from submission to completion, bytes each),
	// fdatasyncs and index commits (count, ms in all).
	SaveWrites     uint64  `json:"save_writes"`
	SaveWriteMS    float64 `json:"save_write_ms_mean"`
	SaveWriteBytes uint64  `json:"save_write_bytes_mean"`
	SaveSyncs      uint64  `json:"save_syncs"`
	SaveSyncMS     float64 `json:"save_sync_ms_total"`
	SaveCommits    uint64  `json:"save_commits"`
	SaveIndexMS    float64 `json:"save_index_ms_total"`
	SaveWallMS     float64 `json:"save_wall_ms"`
}

// Run runs the benchmark.
func Run(o Options) (*Result, error) {
	c, err := model.Preset(o.Model)
	if err != nil {
		return nil, err
	}
	if o.Tokens <= 0 || o.Contexts <= 0 {
		return nil, fmt.Errorf("bench store: --tokens and --contexts must be positive")
	}
	if o.Writers <= 0 {
		o.Writers = 2
	}
	plan := sched.DefaultPlan(c)
	ident := &chunk.Identity{Model: model.ShapeFingerprint(c), Plan: plan}
	dir := filepath.Join(o.Dir, "hcache-bench-store")
	os.RemoveAll(dir)
	defer os.RemoveAll(dir)
	opts := chunk.Options{Dir: dir, CacheBytes: 0, CapacityBytes: -1, Compression: o.Compression, GCInterval: -1,
		StagingBytes: int64(o.Writers+1) * int64(o.Tokens+64) * int64(rawPerToken(plan)), Logf: func(string, ...any) {}}
	st, err := chunk.Open(opts)
	if err != nil {
		return nil, err
	}
	res := &Result{Model: o.Model, Engine: st.EngineName(), Tokens: o.Tokens, Contexts: o.Contexts,
		Plan: plan[0].Kind.String(), RawBytesPerToken: rawPerToken(plan)}
	// One layer of rows, reused for every layer and context.
	maxRow := 0
	for _, p := range plan {
		maxRow = max(maxRow, int(p.RowBytes))
	}
	src := make([]byte, o.Tokens*maxRow)
	rng := rand.New(rand.NewSource(1))
	for i := 0; i+1 < len(src); i += 2 {
		// fp16-like values: random mantissa, narrow exponent range.
		src[i] = byte(rng.Intn(256))
		src[i+1] = byte(0x30 + rng.Intn(12))
	}
	total := int64(o.Tokens) * int64(res.RawBytesPerToken) * int64(o.Contexts)

	// fio runs interleave with ours (write before and after the save; read
	// ABBA around two restore passes) and each side reports its mean: the
	// disk's speed drifts by tens of percent within a minute here.
	fpath := filepath.Join(o.Dir, "hcache-bench-store-fio.dat")
	defer os.Remove(fpath)
	fsize := min(total, 4<<30)
	fsize -= fsize % (1 << 20)
	groups := (o.Tokens + 63) / 64
	sliceBytes := 64 * int(plan[0].RowBytes)
	wj := fio.Job{File: fpath, SizeBytes: fsize, BlockSize: 1 << 20, QD: chunk.DefaultQueueDepth, Write: true}
	rj := fio.Job{File: fpath, SizeBytes: fsize - fsize%int64(sliceBytes), BlockSize: sliceBytes, QD: min(groups, 64)}
	res.FioWrite = fmt.Sprintf("write bs=%d qd=%d size=%d", wj.BlockSize, wj.QD, wj.SizeBytes)
	res.FioRead = fmt.Sprintf("read bs=%d qd=%d size=%d", rj.BlockSize, rj.QD, rj.SizeBytes)
	var fioW, fioR []float64
	runFio := func(j fio.Job, into *[]float64) error {
		if o.SkipFio {
			return nil
		}
		bw, err := fio.Run(j)
		*into = append(*into, bw)
		return err
	}
	if err := runFio(wj, &fioW); err != nil {
		st.Close()
		return nil, err
	}

	// Warm-up, not timed: Writers+1 contexts staged at once (what the
	// timed save holds at its peak), then saved, restored and deleted, so
	// the staging slabs and read buffers exist, as in a running server. On
	// a VM the first touch of guest memory also costs the host's page
	// faults: 1.4 s per GiB here against 0.13 s once it has been used.
	var warm []*chunk.Writer
	for i := 0; i <= o.Writers; i++ {
		wr, err := st.Create("bench", fmt.Sprint("warmup-", i), ident, chunk.CreateOptions{})
		if err != nil {
			st.Close()
			return nil, err
		}
		for l, p := range plan {
			if err := wr.AppendLayer(l, src[:o.Tokens*int(p.RowBytes)]); err != nil {
				st.Close()
				return nil, err
			}
		}
		warm = append(warm, wr)
	}
	for i, wr := range warm {
		id := fmt.Sprint("warmup-", i)
		err := wr.Close()
		if err == nil {
			_, err = st.Restore("bench", id, ident, func(int, []byte) error { return nil })
		}
		if err == nil {
			err = st.Delete("bench", id)
		}
		if err != nil {
			st.Close()
			return nil, err
		}
	}

	// Save: prefill-style appends, Writers contexts at a time.
	bar := progress.New(o.Progress, "bench store save", int64(o.Contexts), "contexts")
	ss0 := st.SaveStages()
	start := time.Now()
	var wg sync.WaitGroup
	errs := make(chan error, o.Contexts)
	next := make(chan int, o.Contexts)
	for i := 0; i < o.Contexts; i++ {
		next <- i
	}
	close(next)
	for w := 0; w < o.Writers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				wr, err := st.Create("bench", fmt.Sprint("ctx-", i), ident, chunk.CreateOptions{})
				if err != nil {
					errs <- err
					return
				}
				for l, p := range plan {
					if err := wr.AppendLayer(l, src[:o.Tokens*int(p.RowBytes)]); err != nil {
						errs <- err
						return
					}
				}
				if err := wr.Close(); err != nil {
					errs <- err
					return
				}
				bar.Add(1)
			}
		}()
	}
	wg.Wait()
	close(errs)
	if err := <-errs; err != nil {
		st.Close()
		return nil, err
	}
	saveSec := time.Since(start).Seconds()
	bar.Finish()
	ss1 := st.SaveStages()
	res.SaveWallMS = saveSec * 1000
	if res.SaveWrites = ss1.Writes - ss0.Writes; res.SaveWrites > 0 {
		res.SaveWriteMS = float64(ss1.Write-ss0.Write) / 1e6 / float64(res.SaveWrites)
		res.SaveWriteBytes = (ss1.WriteBytes - ss0.WriteBytes) / res.SaveWrites
	}
	res.SaveSyncs, res.SaveSyncMS = ss1.Syncs-ss0.Syncs, float64(ss1.Sync-ss0.Sync)/1e6
	res.SaveCommits, res.SaveIndexMS = ss1.Commits-ss0.Commits, float64(ss1.Index-ss0.Index)/1e6
	res.SaveGBps = float64(total) / saveSec / 1e9
	var onDisk uint64
	for _, s := range st.Segments() {
		onDisk += s.Live
	}
	res.BytesOnDiskPerToken = float64(onDisk) / float64(o.Tokens*o.Contexts)
	res.DiskOverRaw = res.BytesOnDiskPerToken / float64(res.RawBytesPerToken)
	if s := st.Stats(); s.CompressRawBytes > 0 {
		res.CompressionRatio = float64(s.CompressRawBytes) / float64(s.CompressStored)
	}

	if err := runFio(wj, &fioW); err != nil {
		st.Close()
		return nil, err
	}
	// Restore: every context, layer by layer; two passes around fio's reads.
	var restores []float64
	restoreAll := func() error {
		bar := progress.New(o.Progress, "bench store restore", int64(o.Contexts), "contexts")
		start := time.Now()
		for i := 0; i < o.Contexts; i++ {
			if _, err := st.Restore("bench", fmt.Sprint("ctx-", i), ident, func(int, []byte) error { return nil }); err != nil {
				return err
			}
			bar.Add(1)
		}
		restores = append(restores, float64(total)/time.Since(start).Seconds()/1e9)
		bar.Finish()
		return nil
	}
	for _, step := range []func() error{restoreAll, func() error { return runFio(rj, &fioR) }, func() error { return runFio(rj, &fioR) }, restoreAll} {
		if err := step(); err != nil {
			st.Close()
			return nil, err
		}
	}
	res.RestoreGBps = stat.Mean(restores)

	// Decode-step appends against a plain copy of the same bytes.
	if res.AppendTokenUS, res.CopyUS, err = appendCost(st, ident, plan, src); err != nil {
		st.Close()
		return nil, err
	}
	res.AppendTokenRatio = res.AppendTokenUS / res.CopyUS
	if err := st.Close(); err != nil {
		return nil, err
	}
	// Reopen with the written index, after a writer was killed mid-write.
	res.RecoveryAfter = "clean close"
	if o.CrashWriter != nil {
		cmd := o.CrashWriter(dir)
		if err := cmd.Start(); err != nil {
			return nil, fmt.Errorf("bench store: start the crash writer: %w", err)
		}
		time.Sleep(700 * time.Millisecond)
		cmd.Process.Signal(syscall.SIGKILL)
		cmd.Wait()
		res.RecoveryAfter = "SIGKILL of a writer process"
	}
	start = time.Now()
	st, err = chunk.Open(opts)
	if err != nil {
		return nil, err
	}
	res.RecoveryMS = float64(time.Since(start).Microseconds()) / 1000
	st.Close()

	var fioRead, fioWrite float64
	if !o.SkipFio {
		fioRead, fioWrite = stat.Mean(fioR), stat.Mean(fioW)
	}
	vs, err := fio.Compare(res.RestoreGBps, res.SaveGBps, fioRead, fioWrite, o.Sweep, o.Dir)
	if err != nil {
		return nil, err
	}
	res.FioReadGBps, res.FioWriteGBps, res.RestoreRatio, res.SaveRatio = vs.FioReadGBps, vs.FioWriteGBps, vs.ReadRatio, vs.WriteRatio
	res.FioSweep, res.FioBestReadGBps, res.FioBestWriteGBps, res.RestoreVsBest, res.SaveVsBest = vs.Sweep, vs.BestReadGBps, vs.BestWriteGBps, vs.ReadVsBest, vs.WriteVsBest
	return res, nil
}

func rawPerToken(plan []chunk.LayerPlan) int {
	n := 0
	for _, p := range plan {
		n += int(p.RowBytes)
	}
	return n
}

// appendCost times AppendToken of every layer's row against copying the
// same rows into a staging-like buffer, in the same run.
func appendCost(st *chunk.Store, ident *chunk.Identity, plan []chunk.LayerPlan, src []byte) (float64, float64, error) {
	const steps = 2048
	rows := make([][]byte, len(plan))
	for l, p := range plan {
		rows[l] = src[l%8*int(p.RowBytes) : (l%8+1)*int(p.RowBytes)]
	}
	wr, err := st.Create("bench", "append-cost", ident, chunk.CreateOptions{})
	if err != nil {
		return 0, 0, err
	}
	defer st.Delete("bench", "append-cost")
	// Steady state of decoding: staging slabs recycle and the disk is far
	// from busy. Each timed round appends one 64-token group; the flush
	// between rounds is not timed.
	for i := 0; i < 128; i++ {
		if err := wr.AppendToken(rows); err != nil {
			return 0, 0, err
		}
	}
	if err := wr.Flush(); err != nil {
		return 0, 0, err
	}
	// Baseline: the same bytes copied into a 64-token layer-major buffer,
	// timed in rounds alternating with the appends' rounds so both see the
	// same machine; each side reports its median round.
	layerOff := make([]int, len(plan))
	off := 0
	for l, p := range plan {
		layerOff[l] = off
		off += 64 * int(p.RowBytes)
	}
	// One destination, reused every round, as the store reuses the slab a
	// flush just returned.
	b := make([]byte, off)
	for i := range b {
		b[i] = 1
	}
	var appendRounds, copyRounds []float64
	for r := 0; r < steps/64; r++ {
		start := time.Now()
		for i := 0; i < 64; i++ {
			if err := wr.AppendToken(rows); err != nil {
				return 0, 0, err
			}
		}
		appendRounds = append(appendRounds, float64(time.Since(start).Nanoseconds())/64/1e3)
		if err := wr.Flush(); err != nil {
			return 0, 0, err
		}
		start = time.Now()
		for t := 0; t < 64; t++ {
			for l, row := range rows {
				copy(b[layerOff[l]+t*len(row):], row)
			}
		}
		copyRounds = append(copyRounds, float64(time.Since(start).Nanoseconds())/64/1e3)
	}
	if err := wr.Close(); err != nil {
		return 0, 0, err
	}
	appendUS, copyUS := stat.Median(appendRounds), stat.Median(copyRounds)
	return appendUS, max(copyUS, 1e-3), nil
}
