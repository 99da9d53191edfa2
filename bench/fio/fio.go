// Package fio runs the fio benchmark tool as the baseline that hcache's own
// I/O figures are compared against in the same run.
package fio

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os/exec"
	"strconv"
)

// Job describes one sequential fio run with the io_uring engine and O_DIRECT.
type Job struct {
	File      string
	SizeBytes int64
	BlockSize int
	QD        int
	Write     bool // sequential write; else sequential read
}

// Run runs the job and returns its bandwidth in GB/s (1e9 bytes per second).
func Run(j Job) (float64, error) {
	path, err := exec.LookPath("fio")
	if err != nil {
		return 0, fmt.Errorf("fio not found on PATH (apt-get install fio): %w", err)
	}
	rw := "read"
	if j.Write {
		rw = "write"
	}
	args := []string{
		"--name=hcache-baseline", "--filename=" + j.File, "--size=" + strconv.FormatInt(j.SizeBytes, 10),
		"--bs=" + strconv.Itoa(j.BlockSize), "--iodepth=" + strconv.Itoa(j.QD), "--ioengine=io_uring",
		"--direct=1", "--fixedbufs", "--rw=" + rw, "--output-format=json", "--group_reporting",
	}
	var out, stderr bytes.Buffer
	cmd := exec.Command(path, args...)
	cmd.Stdout, cmd.Stderr = &out, &stderr
	if err := cmd.Run(); err != nil {
		return 0, fmt.Errorf("fio %v: %w: %s", args, err, stderr.String())
	}
	var res struct {
		Jobs []struct {
			Read struct {
				BwBytes float64 `json:"bw_bytes"`
			} `json:"read"`
			Write struct {
				BwBytes float64 `json:"bw_bytes"`
			} `json:"write"`
		} `json:"jobs"`
	}
	// fio may print warnings before the JSON object.
	b := out.Bytes()
	if i := bytes.IndexByte(b, '{'); i > 0 {
		b = b[i:]
	}
	if err := json.Unmarshal(b, &res); err != nil || len(res.Jobs) == 0 {
		return 0, fmt.Errorf("fio: cannot parse its JSON output (%v): %.200s", err, out.String())
	}
	bw := res.Jobs[0].Read.BwBytes
	if j.Write {
		bw = res.Jobs[0].Write.BwBytes
	}
	return bw / 1e9, nil
}
