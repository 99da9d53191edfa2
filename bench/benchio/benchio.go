package benchio

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"

	"github.com/hcache/hcache/bench/fio"
	"github.com/hcache/hcache/internal/progress"
	"github.com/hcache/hcache/internal/stat"
	"github.com/hcache/hcache/iouring"
)

// Options of one benchmark run.
type Options struct {
	Dir       string
	SizeBytes int64
	BlockSize int
	QD        int
	Engine    string // auto, io_uring, fallback
	SkipFio   bool
	// Rounds alternates our runs with fio's this many times and reports the
	// median of each: the disk's speed drifts by tens of percent over a
	// minute here, and alternating keeps that drift out of the ratios.
	Rounds   int
	Progress io.Writer
	// Sweep, when set, runs a fio sweep first; its best points are the
	// disk's limit the result is also compared with.
	Sweep *fio.SweepOptions
}

// Result is what `hcache bench io --json` prints.
type Result struct {
	Engine       string  `json:"engine"`
	BS           int     `json:"bs"`
	QD           int     `json:"qd"`
	SizeBytes    int64   `json:"size_bytes"`
	ReadGBps     float64 `json:"read_gbps"`
	WriteGBps    float64 `json:"write_gbps"`
	FioReadGBps  float64 `json:"fio_read_gbps"`
	FioWriteGBps float64 `json:"fio_write_gbps"`
	ReadRatio    float64 `json:"read_ratio"`
	WriteRatio   float64 `json:"write_ratio"`
	Registered   bool    `json:"registered_buffers"`
	Rounds       int     `json:"rounds"`
	// Against the best of the fio sweep (the disk's limit): a figure above
	// 1 means the sweep missed the disk's best, not that we beat it.
	FioBestReadGBps  float64          `json:"fio_best_read_gbps,omitempty"`
	FioBestWriteGBps float64          `json:"fio_best_write_gbps,omitempty"`
	ReadVsBest       float64          `json:"read_vs_best,omitempty"`
	WriteVsBest      float64          `json:"write_vs_best,omitempty"`
	FioSweep         *fio.SweepResult `json:"fio_sweep,omitempty"`
}

// Run runs the benchmark.
func Run(o Options) (*Result, error) {
	if o.BlockSize <= 0 || o.BlockSize%iouring.Alignment != 0 {
		return nil, fmt.Errorf("bench io: --bs %d must be a positive multiple of %d", o.BlockSize, iouring.Alignment)
	}
	if o.QD < 1 || o.QD > iouring.MaxEntries {
		return nil, fmt.Errorf("bench io: --qd %d must be in [1, %d]", o.QD, iouring.MaxEntries)
	}
	if o.SizeBytes < int64(o.BlockSize) || o.SizeBytes%int64(o.BlockSize) != 0 {
		return nil, fmt.Errorf("bench io: --size %d must be a positive multiple of --bs %d", o.SizeBytes, o.BlockSize)
	}
	if err := os.MkdirAll(o.Dir, 0o755); err != nil {
		return nil, err
	}
	entries := 1
	for entries < o.QD {
		entries <<= 1
	}
	e, err := iouring.New(iouring.Config{Kind: o.Engine, Entries: entries, Workers: o.QD})
	if err != nil {
		return nil, err
	}
	defer e.Close()
	pool, err := iouring.NewPool(o.BlockSize, o.QD)
	if err != nil {
		return nil, err
	}
	defer pool.Free()
	res := &Result{Engine: e.Name(), BS: o.BlockSize, QD: o.QD, SizeBytes: o.SizeBytes}
	res.Registered = iouring.RegisterPool(e, pool, nil)
	defer e.RegisterBuffers(nil)

	path := filepath.Join(o.Dir, "hcache-bench-io.dat")
	defer os.Remove(path)
	fd, err := iouring.OpenDirect(path, unix.O_RDWR|unix.O_CREAT|unix.O_TRUNC, 0o644)
	if err != nil {
		return nil, err
	}
	defer unix.Close(fd)
	if err := unix.Fallocate(fd, 0, 0, o.SizeBytes); err != nil {
		return nil, fmt.Errorf("bench io: fallocate %s: %w", path, err)
	}
	for i := 0; i < pool.Count(); i++ {
		b := pool.Get()
		for j := range b {
			b[j] = byte(j*7 + i)
		}
		defer pool.Put(b)
	}
	if o.Rounds <= 0 {
		o.Rounds = 3
	}
	res.Rounds = o.Rounds
	fpath := filepath.Join(o.Dir, "hcache-bench-fio.dat")
	defer os.Remove(fpath)
	job := fio.Job{File: fpath, SizeBytes: o.SizeBytes, BlockSize: o.BlockSize, QD: o.QD}
	var ws, rs, fws, frs []float64
	ourWrite := func() error {
		sec, err := stream(e, pool, fd, o, iouring.OpWrite)
		if err == nil {
			err = e.Do(&iouring.Request{Op: iouring.OpFdatasync, Fd: fd})
		}
		ws = append(ws, float64(o.SizeBytes)/sec/1e9)
		return err
	}
	ourRead := func() error {
		sec, err := stream(e, pool, fd, o, iouring.OpRead)
		rs = append(rs, float64(o.SizeBytes)/sec/1e9)
		return err
	}
	fioRun := func(write bool, into *[]float64) error {
		if o.SkipFio {
			return nil
		}
		job.Write = write
		bw, err := fio.Run(job)
		*into = append(*into, bw)
		return err
	}
	// Writes, then reads, each round alternating who goes first: a run
	// right after a large write is slowed by the write-back it left, and
	// alternating spreads that over both sides.
	for phase := 0; phase < 2; phase++ {
		for r := 0; r < o.Rounds; r++ {
			var steps []func() error
			if phase == 0 {
				steps = []func() error{ourWrite, func() error { return fioRun(true, &fws) }}
			} else {
				steps = []func() error{ourRead, func() error { return fioRun(false, &frs) }}
			}
			if r%2 == 1 {
				steps[0], steps[1] = steps[1], steps[0]
			}
			for _, step := range steps {
				if err := step(); err != nil {
					return nil, err
				}
			}
		}
	}
	res.WriteGBps, res.ReadGBps = stat.Median(ws), stat.Median(rs)
	if o.SkipFio {
		return res, nil
	}
	vs, err := fio.Compare(res.ReadGBps, res.WriteGBps, stat.Median(frs), stat.Median(fws), o.Sweep, o.Dir)
	if err != nil {
		return nil, err
	}
	res.FioReadGBps, res.FioWriteGBps, res.ReadRatio, res.WriteRatio = vs.FioReadGBps, vs.FioWriteGBps, vs.ReadRatio, vs.WriteRatio
	res.FioSweep, res.FioBestReadGBps, res.FioBestWriteGBps, res.ReadVsBest, res.WriteVsBest = vs.Sweep, vs.BestReadGBps, vs.BestWriteGBps, vs.ReadVsBest, vs.WriteVsBest
	return res, nil
}

// stream keeps QD requests of BlockSize in flight over the whole file, in
// order, and returns the elapsed seconds. The slabs are owned by the caller.
func stream(e iouring.Engine, pool *iouring.Pool, fd int, o Options, op iouring.Op) (float64, error) {
	slabs := make([][]byte, o.QD)
	mem := pool.Memory()
	for i := range slabs {
		slabs[i] = mem[i*pool.SlabBytes() : i*pool.SlabBytes()+o.BlockSize]
	}
	total := o.SizeBytes / int64(o.BlockSize)
	bar := progress.New(o.Progress, "bench io "+op.String(), o.SizeBytes, "bytes")
	doneCh := make(chan *iouring.Request, o.QD)
	cb := func(r *iouring.Request) { doneCh <- r }
	reqs := make([]iouring.Request, o.QD)
	start := time.Now()
	var next, completed int64
	inflight := 0
	for i := 0; i < o.QD && next < total; i++ {
		reqs[i] = iouring.Request{Op: op, Fd: fd, Buf: slabs[i], Off: next * int64(o.BlockSize)}
		if err := e.Submit([]*iouring.Request{&reqs[i]}, cb); err != nil {
			return 0, err
		}
		next++
		inflight++
	}
	// Refill in batches: every completion available is resubmitted in one
	// Submit (one io_uring_enter), as fio reaps and resubmits.
	var batch []*iouring.Request
	for inflight > 0 {
		batch = append(batch[:0], <-doneCh)
	drain:
		for {
			select {
			case r := <-doneCh:
				batch = append(batch, r)
			default:
				break drain
			}
		}
		inflight -= len(batch)
		refill := batch[:0]
		for _, r := range batch {
			if r.Err != nil {
				return 0, r.Err
			}
			completed++
			bar.Add(int64(o.BlockSize))
			if next < total {
				r.Off = next * int64(o.BlockSize)
				next++
				refill = append(refill, r)
			}
		}
		if len(refill) > 0 {
			if err := e.Submit(refill, cb); err != nil {
				return 0, err
			}
			inflight += len(refill)
		}
	}
	sec := time.Since(start).Seconds()
	bar.Finish()
	return sec, nil
}
