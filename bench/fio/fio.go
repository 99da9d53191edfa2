// Package fio runs the fio benchmark tool as the baseline that hcache's own
// I/O figures are compared against in the same run: single jobs (same block
// size and queue depth as ours) and a small sweep whose best point is the
// disk's limit.
package fio

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os/exec"
	"strconv"
	"time"
)

// Job describes one sequential fio run with the io_uring engine and O_DIRECT.
type Job struct {
	File      string
	SizeBytes int64
	BlockSize int
	QD        int
	Write     bool // sequential write; else sequential read
	// Runtime, when positive, makes the job time-based: it loops over the
	// file for this long (a short sweep point on a small file).
	Runtime time.Duration
	// Mem is fio's --mem (e.g. "mmaphuge:/mnt/huge/f"); "" keeps fio's
	// default (malloc).
	Mem string
	// IOMemAlign is fio's --iomem_align in bytes; 0 leaves it out.
	IOMemAlign int
	// Fdatasync, when positive, issues an fdatasync every this many
	// writes (fio's --fdatasync), and EndFsync an fsync at the end that
	// the bandwidth includes (--end_fsync): a durable write, as a save's
	// group commits are. Both zero: nothing is synced, as in the sweep.
	Fdatasync int
	EndFsync  bool
}

// Describe names what the job measures, for reports: the block size, the
// queue depth, and whether and how often it syncs.
func (j Job) Describe() string {
	rw := "read"
	if j.Write {
		rw = "write"
	}
	d := fmt.Sprintf("%s bs=%d qd=%d", rw, j.BlockSize, j.QD)
	if j.Write {
		switch {
		case j.Fdatasync > 0:
			d += fmt.Sprintf(" fdatasync every %d writes", j.Fdatasync)
		case !j.EndFsync:
			d += " no fsync"
		}
		if j.EndFsync {
			d += " end_fsync"
		}
	}
	return d
}

// Args returns fio's command line for the job.
func (j Job) Args() []string {
	rw := "read"
	if j.Write {
		rw = "write"
	}
	args := []string{
		"--name=hcache-baseline", "--filename=" + j.File, "--size=" + strconv.FormatInt(j.SizeBytes, 10),
		"--bs=" + strconv.Itoa(j.BlockSize), "--iodepth=" + strconv.Itoa(j.QD), "--ioengine=io_uring",
		"--direct=1", "--fixedbufs", "--rw=" + rw, "--output-format=json", "--group_reporting",
	}
	if j.Runtime > 0 {
		args = append(args, "--time_based", fmt.Sprintf("--runtime=%dms", j.Runtime.Milliseconds()))
	}
	if j.Mem != "" {
		args = append(args, "--mem="+j.Mem)
	}
	if j.IOMemAlign > 0 {
		args = append(args, "--iomem_align="+strconv.Itoa(j.IOMemAlign))
	}
	if j.Fdatasync > 0 {
		args = append(args, "--fdatasync="+strconv.Itoa(j.Fdatasync))
	}
	if j.EndFsync {
		args = append(args, "--end_fsync=1")
	}
	return args
}

// Run runs the job and returns its bandwidth in GB/s (1e9 bytes per second).
func Run(j Job) (float64, error) {
	path, err := exec.LookPath("fio")
	if err != nil {
		return 0, fmt.Errorf("fio not found on PATH (apt-get install fio): %w", err)
	}
	args := j.Args()
	var out, stderr bytes.Buffer
	cmd := exec.Command(path, args...)
	cmd.Stdout, cmd.Stderr = &out, &stderr
	if err := cmd.Run(); err != nil {
		return 0, fmt.Errorf("fio %v: %w: %s", args, err, stderr.String())
	}
	return parse(out.Bytes(), j.Write)
}

func parse(b []byte, write bool) (float64, error) {
	var res struct {
		Jobs []struct {
			Error int `json:"error"`
			Read  struct {
				BwBytes float64 `json:"bw_bytes"`
			} `json:"read"`
			Write struct {
				BwBytes float64 `json:"bw_bytes"`
			} `json:"write"`
		} `json:"jobs"`
	}
	// fio may print warnings before the JSON object.
	all := b
	if i := bytes.IndexByte(b, '{'); i > 0 {
		b = b[i:]
	}
	if err := json.Unmarshal(b, &res); err != nil || len(res.Jobs) == 0 {
		return 0, fmt.Errorf("fio: cannot parse its JSON output (%v): %.200s", err, all)
	}
	if res.Jobs[0].Error != 0 {
		return 0, fmt.Errorf("fio: job error %d", res.Jobs[0].Error)
	}
	bw := res.Jobs[0].Read.BwBytes
	if write {
		bw = res.Jobs[0].Write.BwBytes
	}
	return bw / 1e9, nil
}
