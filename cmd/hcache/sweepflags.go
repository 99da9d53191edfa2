package main

import (
	"flag"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/hcache/hcache/bench/fio"
)

// sweepFlags are the flags of the fio sweep that the I/O benchmarks take as
// the disk's limit.
type sweepFlags struct {
	on      *bool
	bs, qd  *string
	runtime *time.Duration
	size    sizeFlag
	huge    *string
}

func addSweepFlags(fs *flag.FlagSet) *sweepFlags {
	s := &sweepFlags{size: sizeFlag(fio.DefaultSweepSize)}
	s.on = fs.Bool("sweep", true, "also run a short fio sweep and compare with its best point (the disk's limit)")
	s.bs = fs.String("sweep-bs", "256K,1M,2M", "fio sweep block sizes")
	s.qd = fs.String("sweep-qd", "8,32,64", "fio sweep queue depths")
	s.runtime = fs.Duration("sweep-runtime", fio.DefaultSweepRuntime, "fio sweep time per point")
	fs.Var(&s.size, "sweep-size", "fio sweep file size")
	s.huge = fs.String("sweep-huge", "", "hugetlbfs mount for fio's buffers (default: the first one mounted; '-': none)")
	return s
}

// parse parses a benchmark's flags (args into fs, which holds the sweep's)
// and returns the sweep's options in *dir, or nil when the sweep is off.
func (s *sweepFlags) parse(fs *flag.FlagSet, args []string, dir *string) (*fio.SweepOptions, error) {
	if err := parseFlags(fs, args); err != nil {
		return nil, err
	}
	return s.options(*dir)
}

// options returns the sweep's options, or nil when the sweep is off.
func (s *sweepFlags) options(dir string) (*fio.SweepOptions, error) {
	if !*s.on {
		return nil, nil
	}
	o := &fio.SweepOptions{Dir: dir, SizeBytes: int64(s.size), Runtime: *s.runtime, HugeDir: *s.huge}
	for _, v := range strings.Split(*s.bs, ",") {
		n, err := parseSize(strings.TrimSpace(v))
		if err != nil {
			return nil, fmt.Errorf("--sweep-bs: %w", err)
		}
		o.BS = append(o.BS, int(n))
	}
	for _, v := range strings.Split(*s.qd, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(v))
		if err != nil {
			return nil, fmt.Errorf("--sweep-qd: bad queue depth %q", v)
		}
		o.QD = append(o.QD, n)
	}
	return o, nil
}
