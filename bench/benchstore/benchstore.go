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
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hcache/hcache/bench/fio"
	"github.com/hcache/hcache/chunk"
	"github.com/hcache/hcache/internal/progress"
	"github.com/hcache/hcache/internal/stat"
	"github.com/hcache/hcache/model"
	"github.com/hcache/hcache/serve/sched"
	"golang.org/x/sys/unix"
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
	// Sweep, when set, runs a fio sweep before the save rounds; its best
	// points are the disk's limit the result is also compared with, and
	// its best write's block size and queue depth are the interleaved
	// best-write job of every round.
	Sweep *fio.SweepOptions
	// Rounds is how many timed saves run, each followed (or, in odd
	// rounds, preceded) by fio's interleaved write jobs (default 3).
	Rounds int
}

// SaveRound is one timed save and the fio writes run next to it.
type SaveRound struct {
	GBps   float64 `json:"gbps"`
	WallMS float64 `json:"wall_ms"`
	// fio in the same round: the best write's configuration (overwrite
	// of a laid-out file, no sync) and the durable job (fresh file,
	// fdatasync cadence like the store's commits, end fsync).
	FioBestWriteGBps    float64 `json:"fio_best_write_gbps,omitempty"`
	FioDurableWriteGBps float64 `json:"fio_durable_write_gbps,omitempty"`
	// The durable job run again over the file it just wrote (written
	// blocks, no extent conversions): the upside of recycling segments.
	FioDurableOverwriteGBps float64 `json:"fio_durable_overwrite_gbps,omitempty"`
	SaveVsBest              float64 `json:"save_vs_best,omitempty"`
	SaveVsDurable           float64 `json:"save_vs_durable,omitempty"`
	// Where the time went (chunk.Store.SaveStages over the round, and
	// the writers' own clocks, summed over the writers).
	Writes     uint64  `json:"writes"`
	WriteMS    float64 `json:"write_ms_mean"`
	WriteBytes uint64  `json:"write_bytes_mean"`
	Syncs      uint64  `json:"syncs"`
	SyncMS     float64 `json:"sync_ms_total"`
	Commits    uint64  `json:"commits"`
	IndexMS    float64 `json:"index_ms_total"`
	BusyMS     float64 `json:"busy_ms"`       // at least one write in flight
	IdleMS     float64 `json:"idle_ms"`       // wall - busy: no write of ours in flight
	Segments   uint64  `json:"segment_files"` // segment files created or grown
	SegmentMS  float64 `json:"segment_ms_total"`
	CopyMS     float64 `json:"copy_ms_sum"`  // AppendLayer calls, summed over writers
	CloseMS    float64 `json:"close_ms_sum"` // Close (flush + commit wait), summed over writers
}

// Spread is the median, least and greatest of a set of measurements.
type Spread struct {
	Median float64 `json:"median"`
	Min    float64 `json:"min"`
	Max    float64 `json:"max"`
	N      int     `json:"n"`
}

func spread(v []float64) Spread {
	if len(v) == 0 {
		return Spread{}
	}
	sp := Spread{Median: stat.Median(v), Min: v[0], Max: v[0], N: len(v)}
	for _, x := range v {
		sp.Min, sp.Max = min(sp.Min, x), max(sp.Max, x)
	}
	return sp
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
	// Rounds: every timed save with fio's write jobs of the same round
	// (save_gbps and the save_* stage fields above are the median
	// round's). The spreads are over the rounds; save_vs_best_interleaved
	// is the median of the rounds' save / best-write-job ratios (the
	// sweep's best configuration rerun next to each save: a fairer
	// comparison than against the sweep's single best point, which is
	// the greatest of many noisy ones), save_vs_durable the same against
	// the durable job. The target stays save_vs_best.
	SaveRounds            []SaveRound `json:"save_rounds,omitempty"`
	SaveSpread            Spread      `json:"save_gbps_spread"`
	FioBestWriteJob       string      `json:"fio_best_write_job,omitempty"`
	FioBestWriteSpread    Spread      `json:"fio_best_write_gbps_spread"`
	FioDurableWriteJob    string      `json:"fio_durable_write_job,omitempty"`
	FioDurableWriteSpread Spread      `json:"fio_durable_write_gbps_spread"`
	FioDurableOverSpread  Spread      `json:"fio_durable_overwrite_gbps_spread"`
	SaveVsBestInterleaved Spread      `json:"save_vs_best_interleaved"`
	SaveVsDurable         Spread      `json:"save_vs_durable"`
	FioSweepWriteSpread   Spread      `json:"fio_sweep_write_gbps_spread"`
	FioSweepReadSpread    Spread      `json:"fio_sweep_read_gbps_spread"`
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

	// fio runs interleave with ours and each side reports its mean or
	// median: the disk's speed drifts by tens of percent within a minute
	// here. The same-size write job runs before the warm-up (laying its
	// file out) and after the save rounds; each save round has fio's
	// best-write and durable jobs next to it (interleavedJobs); the reads
	// run ABBA around two restore passes.
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

	// The sweep first: its best write's block size and queue depth are
	// rerun in every save round, next to the save.
	var sw *fio.SweepResult
	if o.Sweep != nil && !o.SkipFio {
		if sw, err = fio.RunSweepIn(*o.Sweep, o.Dir); err != nil {
			st.Close()
			return nil, err
		}
	}
	bestJ, durJ := interleavedJobs(o.Sweep, sw, fpath, fsize, total)
	res.FioBestWriteJob = bestJ.Describe() + ", time-based, overwriting a laid-out file (as the sweep's points)"
	res.FioDurableWriteJob = durJ.Describe() + ", a fresh (fallocated) file each run, as a save's group commits"

	// Save rounds: prefill-style appends, Writers contexts at a time; fio's
	// two write jobs after the save in even rounds, before it in odd ones.
	rounds := max(o.Rounds, 1)
	var saveG, bestG, durG, overG, vsBest, vsDur []float64
	last := ""
	for r := 0; r < rounds; r++ {
		prefix := fmt.Sprintf("ctx-%d-", r)
		if last != "" { // the last round's contexts go, so the disk holds one round's
			for i := 0; i < o.Contexts; i++ {
				if err := st.Delete("bench", fmt.Sprint(last, i)); err != nil {
					st.Close()
					return nil, err
				}
			}
			if g := st.GC(); g.Err != nil {
				st.Close()
				return nil, g.Err
			}
		}
		settle(o.Dir)
		var sr SaveRound
		fioJobs := func() error {
			if o.SkipFio {
				return nil
			}
			bw, err := fio.Run(bestJ)
			if err != nil {
				return err
			}
			os.Remove(durJ.File)
			defer os.Remove(durJ.File)
			dw, err := fio.Run(durJ)
			if err != nil {
				return err
			}
			// The same again over the blocks it just wrote: what a
			// save into recycled segment files could reach.
			ow, err := fio.Run(durJ)
			sr.FioBestWriteGBps, sr.FioDurableWriteGBps, sr.FioDurableOverwriteGBps = bw, dw, ow
			os.Remove(durJ.File)
			settle(o.Dir)
			return err
		}
		steps := []func() error{func() error { return saveRound(st, o, ident, plan, src, prefix, total, &sr) }, fioJobs}
		if r%2 == 1 {
			steps[0], steps[1] = steps[1], steps[0]
		}
		for _, step := range steps {
			if err := step(); err != nil {
				st.Close()
				return nil, err
			}
		}
		if sr.FioBestWriteGBps > 0 {
			sr.SaveVsBest, sr.SaveVsDurable = sr.GBps/sr.FioBestWriteGBps, sr.GBps/sr.FioDurableWriteGBps
			bestG, durG = append(bestG, sr.FioBestWriteGBps), append(durG, sr.FioDurableWriteGBps)
			overG = append(overG, sr.FioDurableOverwriteGBps)
			vsBest, vsDur = append(vsBest, sr.SaveVsBest), append(vsDur, sr.SaveVsDurable)
		}
		saveG = append(saveG, sr.GBps)
		res.SaveRounds = append(res.SaveRounds, sr)
		last = prefix
	}
	res.SaveSpread, res.FioBestWriteSpread, res.FioDurableWriteSpread = spread(saveG), spread(bestG), spread(durG)
	res.FioDurableOverSpread = spread(overG)
	res.SaveVsBestInterleaved, res.SaveVsDurable = spread(vsBest), spread(vsDur)
	// The scalar save fields are the median round's.
	med := res.SaveRounds[0]
	for _, sr := range res.SaveRounds {
		if abs(sr.GBps-res.SaveSpread.Median) < abs(med.GBps-res.SaveSpread.Median) {
			med = sr
		}
	}
	res.SaveGBps, res.SaveWallMS = res.SaveSpread.Median, med.WallMS
	res.SaveWrites, res.SaveWriteMS, res.SaveWriteBytes = med.Writes, med.WriteMS, med.WriteBytes
	res.SaveSyncs, res.SaveSyncMS, res.SaveCommits, res.SaveIndexMS = med.Syncs, med.SyncMS, med.Commits, med.IndexMS
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
			if _, err := st.Restore("bench", fmt.Sprint(last, i), ident, func(int, []byte) error { return nil }); err != nil {
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
	start := time.Now()
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
	vs := fio.CompareWith(res.RestoreGBps, res.SaveGBps, fioRead, fioWrite, sw)
	if sw != nil {
		var wr, rd []float64
		for _, p := range sw.Points {
			if p.Write {
				wr = append(wr, p.GBps)
			} else {
				rd = append(rd, p.GBps)
			}
		}
		res.FioSweepWriteSpread, res.FioSweepReadSpread = spread(wr), spread(rd)
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

func abs(x float64) float64 { return max(x, -x) }

// settle commits the file system's journal (syncfs) before a timed step,
// so that the frees of the files and segments deleted before it (with
// online discard, the discards) are not charged to the step.
func settle(dir string) {
	f, err := os.Open(dir)
	if err != nil {
		return
	}
	unix.Syncfs(int(f.Fd()))
	f.Close()
}

// interleavedJobs returns fio's two write jobs of every save round: the
// sweep's best write configuration (overwriting the laid-out file fpath,
// time-based like a sweep point, no sync: the target), and a durable job
// shaped like the store's saves (its group write size, its bytes in flight,
// an fdatasync per CommitBytes, on a fresh fallocated file).
func interleavedJobs(so *fio.SweepOptions, sw *fio.SweepResult, fpath string, fsize, total int64) (best, durable fio.Job) {
	runtime, size := fio.DefaultSweepRuntime, int64(fio.DefaultSweepSize)
	if so != nil && so.Runtime > 0 {
		runtime = so.Runtime
	}
	if so != nil && so.SizeBytes > 0 {
		size = so.SizeBytes
	}
	best = fio.Job{File: fpath, BlockSize: 2 << 20, QD: 32, Write: true, Runtime: runtime, Mem: "mmap", IOMemAlign: 2 << 20}
	if sw != nil && sw.BestWrite.BS > 0 {
		best.BlockSize, best.QD = sw.BestWrite.BS, sw.BestWrite.QD
	}
	best.SizeBytes = min(size, fsize)
	best.SizeBytes -= best.SizeBytes % int64(best.BlockSize)
	const groupWrite = 16 << 20 // a 64-token group of llama2-7b's hidden rows
	durable = fio.Job{File: fpath + ".durable", BlockSize: groupWrite, QD: max(1, chunk.DefaultWriteBytes/groupWrite), Write: true,
		Fdatasync: max(1, chunk.DefaultCommitBytes/groupWrite), EndFsync: true, Mem: "mmap", IOMemAlign: 2 << 20}
	durable.SizeBytes = max(min(total, 2<<30), groupWrite)
	durable.SizeBytes -= durable.SizeBytes % groupWrite
	return best, durable
}

// saveRound saves o.Contexts contexts named prefix+i, Writers at a time,
// and fills sr with the bandwidth and where the time went.
func saveRound(st *chunk.Store, o Options, ident *chunk.Identity, plan []chunk.LayerPlan, src []byte, prefix string, total int64, sr *SaveRound) error {
	bar := progress.New(o.Progress, "bench store save", int64(o.Contexts), "contexts")
	ss0 := st.SaveStages()
	var copyNanos, closeNanos atomic.Int64
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
				wr, err := st.Create("bench", fmt.Sprint(prefix, i), ident, chunk.CreateOptions{})
				if err != nil {
					errs <- err
					return
				}
				t0 := time.Now()
				for l, p := range plan {
					if err := wr.AppendLayer(l, src[:o.Tokens*int(p.RowBytes)]); err != nil {
						errs <- err
						return
					}
				}
				t1 := time.Now()
				err = wr.Close()
				copyNanos.Add(int64(t1.Sub(t0)))
				closeNanos.Add(int64(time.Since(t1)))
				if err != nil {
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
		return err
	}
	wall := time.Since(start)
	bar.Finish()
	ss1 := st.SaveStages()
	sr.WallMS = float64(wall) / 1e6
	sr.GBps = float64(total) / wall.Seconds() / 1e9
	if sr.Writes = ss1.Writes - ss0.Writes; sr.Writes > 0 {
		sr.WriteMS = float64(ss1.Write-ss0.Write) / 1e6 / float64(sr.Writes)
		sr.WriteBytes = (ss1.WriteBytes - ss0.WriteBytes) / sr.Writes
	}
	sr.Syncs, sr.SyncMS = ss1.Syncs-ss0.Syncs, float64(ss1.Sync-ss0.Sync)/1e6
	sr.Commits, sr.IndexMS = ss1.Commits-ss0.Commits, float64(ss1.Index-ss0.Index)/1e6
	sr.BusyMS = float64(ss1.Busy-ss0.Busy) / 1e6
	sr.IdleMS = max(sr.WallMS-sr.BusyMS, 0)
	sr.Segments, sr.SegmentMS = ss1.Segments-ss0.Segments, float64(ss1.Segment-ss0.Segment)/1e6
	sr.CopyMS, sr.CloseMS = float64(copyNanos.Load())/1e6, float64(closeNanos.Load())/1e6
	return nil
}
