package main

import (
	"fmt"
	"io"
	"os"

	"github.com/hcache/hcache/bench/benchio"
)

func init() {
	register("bench io", "sequential O_DIRECT bandwidth of the I/O engine against fio in the same run", benchIO)
}

func benchIO(args []string, stdout, stderr io.Writer) error {
	fs := newFlags("bench io", stderr)
	dir := fs.String("dir", os.TempDir(), "directory for the test files (on the device to measure)")
	size := sizeFlag(1 << 30)
	fs.Var(&size, "size", "bytes per run (e.g. 4G)")
	bs := sizeFlag(1 << 20)
	fs.Var(&bs, "bs", "block size (multiple of 4096)")
	qd := fs.Int("qd", 8, "queue depth (requests in flight)")
	engine := fs.String("engine", "auto", "engine: auto, io_uring or fallback")
	asJSON := fs.Bool("json", false, "print one JSON object")
	noFio := fs.Bool("no-fio", false, "skip the fio baseline")
	rounds := fs.Int("rounds", 3, "alternate ours and fio this many times; report medians")
	sweep := addSweepFlags(fs)
	so, err := sweep.parse(fs, args, dir)
	if err != nil {
		return err
	}
	res, err := benchio.Run(benchio.Options{
		Dir: *dir, SizeBytes: int64(size), BlockSize: int(bs), QD: *qd, Engine: *engine, SkipFio: *noFio, Rounds: *rounds, Progress: stderr,
		Sweep: so,
	})
	if err != nil {
		return err
	}
	if *asJSON {
		return printJSON(stdout, res)
	}
	fmt.Fprintf(stdout, "engine %s bs %d qd %d: write %.2f GB/s (fio %.2f, ratio %.2f), read %.2f GB/s (fio %.2f, ratio %.2f)\n",
		res.Engine, res.BS, res.QD, res.WriteGBps, res.FioWriteGBps, res.WriteRatio, res.ReadGBps, res.FioReadGBps, res.ReadRatio)
	if res.FioSweep != nil {
		fmt.Fprintf(stdout, "%s; ours: write %.2f x, read %.2f x the best\n", res.FioSweep, res.WriteVsBest, res.ReadVsBest)
	}
	return nil
}
