package fio

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Sweep defaults: a few seconds per point on a small file.
const (
	DefaultSweepRuntime = 2 * time.Second
	DefaultSweepSize    = 1 << 30
	hugePage            = 2 << 20
)

// DefaultSweepBS and DefaultSweepQD span the grid the limit is the best of.
var (
	DefaultSweepBS = []int{256 << 10, 1 << 20, 2 << 20}
	DefaultSweepQD = []int{8, 32, 64}
)

// SweepOptions configure a sweep: every block size x queue depth, reads and
// writes, each point time-based for Runtime on a file of SizeBytes.
type SweepOptions struct {
	Dir       string
	SizeBytes int64
	BS        []int
	QD        []int
	Runtime   time.Duration
	// HugeDir is a hugetlbfs mount for fio's buffers (--mem=mmaphuge);
	// "" looks one up in /proc/mounts; "-" never uses huge pages.
	HugeDir  string
	Progress io.Writer
}

// Point is one sweep measurement.
type Point struct {
	Write bool    `json:"write"`
	BS    int     `json:"bs"`
	QD    int     `json:"qd"`
	GBps  float64 `json:"gbps"`
	Mem   string  `json:"mem"` // fio's buffer settings for this point
}

// SweepResult holds every point and the best read and write.
type SweepResult struct {
	Points    []Point `json:"points"`
	BestRead  Point   `json:"best_read"`
	BestWrite Point   `json:"best_write"`
	Runtime   string  `json:"runtime_per_point"`
	SizeBytes int64   `json:"size_bytes"`
}

// String is a one-line summary of the best points.
func (r *SweepResult) String() string {
	return fmt.Sprintf("fio best-of %d points: read %.2f GB/s (bs %d qd %d, %s), write %.2f GB/s (bs %d qd %d, %s)",
		len(r.Points), r.BestRead.GBps, r.BestRead.BS, r.BestRead.QD, r.BestRead.Mem,
		r.BestWrite.GBps, r.BestWrite.BS, r.BestWrite.QD, r.BestWrite.Mem)
}

// FindHugetlbfs returns the first hugetlbfs mount with 2 MiB pages, or "".
func FindHugetlbfs() string {
	f, err := os.Open("/proc/mounts")
	if err != nil {
		return ""
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fs := strings.Fields(sc.Text())
		if len(fs) >= 4 && fs[2] == "hugetlbfs" && !strings.Contains(fs[3], "pagesize=1G") {
			return fs[1]
		}
	}
	return ""
}

// hugeFree returns the free bytes of a hugetlbfs mount: its own limit when
// mounted with size=, else the system's free huge pages.
func hugeFree(dir string) int64 {
	var st unix.Statfs_t
	if unix.Statfs(dir, &st) != nil {
		return 0
	}
	if st.Blocks > 0 {
		return int64(st.Bfree) * int64(st.Bsize)
	}
	b, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return 0
	}
	var free, size int64
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) >= 2 && f[0] == "HugePages_Free:" {
			free, _ = strconv.ParseInt(f[1], 10, 64)
		}
		if len(f) >= 2 && f[0] == "Hugepagesize:" {
			size, _ = strconv.ParseInt(f[1], 10, 64)
			size <<= 10
		}
	}
	return free * size
}

// memFor picks fio's buffer settings for a point: huge pages from a
// hugetlbfs mount when it has room for bs x qd (plus alignment), else
// anonymous memory aligned to 2 MiB.
func memFor(hugeDir string, bs, qd int) (mem string, align int) {
	need := int64(bs)*int64(qd) + 2*hugePage
	if hugeDir != "" && hugeDir != "-" && hugeFree(hugeDir) >= need {
		return "mmaphuge:" + filepath.Join(hugeDir, fmt.Sprintf("hcache-fio-%d", os.Getpid())), hugePage
	}
	return "mmap", hugePage
}

// RunSweepIn runs the sweep o in dir when o names no directory: the
// benchmarks measure the disk they ran on.
func RunSweepIn(o SweepOptions, dir string) (*SweepResult, error) {
	if o.Dir == "" {
		o.Dir = dir
	}
	return RunSweep(o)
}

// RunSweep runs the sweep. A point whose huge-page run fails is retried with
// aligned anonymous memory, and the settings used are recorded per point.
func RunSweep(o SweepOptions) (*SweepResult, error) {
	if o.SizeBytes <= 0 {
		o.SizeBytes = DefaultSweepSize
	}
	if len(o.BS) == 0 {
		o.BS = DefaultSweepBS
	}
	if len(o.QD) == 0 {
		o.QD = DefaultSweepQD
	}
	if o.Runtime <= 0 {
		o.Runtime = DefaultSweepRuntime
	}
	if o.HugeDir == "" {
		o.HugeDir = FindHugetlbfs()
	}
	for _, bs := range o.BS {
		if bs <= 0 || bs%4096 != 0 || int64(bs) > o.SizeBytes {
			return nil, fmt.Errorf("fio sweep: block size %d must be a positive multiple of 4096 no larger than the file (%d)", bs, o.SizeBytes)
		}
	}
	for _, qd := range o.QD {
		if qd < 1 || qd > 4096 {
			return nil, fmt.Errorf("fio sweep: queue depth %d out of [1, 4096]", qd)
		}
	}
	if err := os.MkdirAll(o.Dir, 0o755); err != nil {
		return nil, err
	}
	file := filepath.Join(o.Dir, "hcache-fio-sweep.dat")
	defer os.Remove(file)
	res := &SweepResult{Runtime: o.Runtime.String(), SizeBytes: o.SizeBytes}
	// Writes first: they lay the file out for the reads.
	for _, write := range []bool{true, false} {
		for _, bs := range o.BS {
			for _, qd := range o.QD {
				mem, align := memFor(o.HugeDir, bs, qd)
				j := Job{File: file, SizeBytes: o.SizeBytes - o.SizeBytes%int64(bs), BlockSize: bs, QD: qd, Write: write,
					Runtime: o.Runtime, Mem: mem, IOMemAlign: align}
				bw, err := Run(j)
				if err != nil && strings.HasPrefix(mem, "mmaphuge") {
					j.Mem = "mmap"
					bw, err = Run(j)
				}
				if err != nil {
					return nil, err
				}
				desc := j.Mem
				if strings.HasPrefix(desc, "mmaphuge") {
					desc = "mmaphuge (hugetlbfs)"
				}
				desc += fmt.Sprintf(", iomem_align=%d", j.IOMemAlign)
				p := Point{Write: write, BS: bs, QD: qd, GBps: bw, Mem: desc}
				res.Points = append(res.Points, p)
				if o.Progress != nil {
					op := "read"
					if write {
						op = "write"
					}
					fmt.Fprintf(o.Progress, "fio sweep %s bs %d qd %d: %.2f GB/s (%s)\n", op, bs, qd, bw, desc)
				}
				best := &res.BestRead
				if write {
					best = &res.BestWrite
				}
				if bw > best.GBps {
					*best = p
				}
			}
		}
	}
	return res, nil
}
