package fio

import (
	"os/exec"
	"strings"
	"testing"
	"time"
)

func TestJobArgs(t *testing.T) {
	cases := []struct {
		job  Job
		want []string
		not  []string
	}{
		{Job{File: "f", SizeBytes: 1 << 20, BlockSize: 4096, QD: 2}, []string{"--rw=read", "--bs=4096", "--iodepth=2"}, []string{"--time_based", "--mem=", "--iomem_align"}},
		{Job{File: "f", SizeBytes: 1 << 20, BlockSize: 8192, QD: 4, Write: true, Runtime: 1500 * time.Millisecond, Mem: "mmap", IOMemAlign: 2 << 20},
			[]string{"--rw=write", "--time_based", "--runtime=1500ms", "--mem=mmap", "--iomem_align=2097152"}, []string{"--fdatasync", "--end_fsync"}},
		{Job{File: "f", SizeBytes: 1 << 30, BlockSize: 16 << 20, QD: 4, Write: true, Fdatasync: 16, EndFsync: true},
			[]string{"--rw=write", "--fdatasync=16", "--end_fsync=1"}, []string{"--time_based"}},
	}
	for _, c := range cases {
		a := strings.Join(c.job.Args(), " ")
		for _, w := range c.want {
			if !strings.Contains(a, w) {
				t.Errorf("%+v: args %q lack %q", c.job, a, w)
			}
		}
		for _, n := range c.not {
			if strings.Contains(a, n) {
				t.Errorf("%+v: args %q contain %q", c.job, a, n)
			}
		}
	}
}

func TestJobDescribe(t *testing.T) {
	for _, c := range []struct {
		job  Job
		want string
	}{
		{Job{BlockSize: 4096, QD: 2}, "read bs=4096 qd=2"},
		{Job{BlockSize: 2 << 20, QD: 32, Write: true}, "write bs=2097152 qd=32 no fsync"},
		{Job{BlockSize: 16 << 20, QD: 4, Write: true, Fdatasync: 16, EndFsync: true}, "write bs=16777216 qd=4 fdatasync every 16 writes end_fsync"},
		{Job{BlockSize: 1 << 20, QD: 8, Write: true, EndFsync: true}, "write bs=1048576 qd=8 end_fsync"},
	} {
		if got := c.job.Describe(); got != c.want {
			t.Errorf("%+v: %q, want %q", c.job, got, c.want)
		}
	}
}

func TestParse(t *testing.T) {
	out := []byte(`note: warning
{"jobs":[{"error":0,"read":{"bw_bytes":2000000000},"write":{"bw_bytes":1000000000}}]}`)
	if bw, err := parse(out, false); err != nil || bw != 2 {
		t.Fatalf("read: %v %v", bw, err)
	}
	if bw, err := parse(out, true); err != nil || bw != 1 {
		t.Fatalf("write: %v %v", bw, err)
	}
	if _, err := parse([]byte(`{"jobs":[{"error":5}]}`), false); err == nil {
		t.Fatal("a job error was accepted")
	}
	if _, err := parse([]byte(`garbage`), false); err == nil {
		t.Fatal("garbage was accepted")
	}
}

// TestSweepTiny runs a real two-point sweep and checks that the best points
// are the fastest of those measured.
func TestSweepTiny(t *testing.T) {
	if _, err := exec.LookPath("fio"); err != nil {
		t.Fatal("fio is required (apt-get install fio)")
	}
	r, err := RunSweep(SweepOptions{Dir: t.TempDir(), SizeBytes: 8 << 20, BS: []int{256 << 10}, QD: []int{1, 4}, Runtime: 200 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	if len(r.Points) != 4 {
		t.Fatalf("%d points, want 4", len(r.Points))
	}
	for _, p := range r.Points {
		if p.GBps <= 0 || p.Mem == "" {
			t.Errorf("point %+v", p)
		}
		best := r.BestRead
		if p.Write {
			best = r.BestWrite
		}
		if p.GBps > best.GBps || best.Write != p.Write {
			t.Errorf("point %+v beats best %+v", p, best)
		}
	}
	if _, err := RunSweep(SweepOptions{Dir: t.TempDir(), SizeBytes: 1 << 20, BS: []int{1000}}); err == nil {
		t.Error("a block size not a multiple of 4096 was accepted")
	}
}

// TestDurableJobRuns: fio accepts a durable job's options (fdatasync
// cadence, end fsync) on a fresh file and reports a bandwidth.
func TestDurableJobRuns(t *testing.T) {
	if _, err := exec.LookPath("fio"); err != nil {
		t.Fatal("fio is required (apt-get install fio)")
	}
	j := Job{File: t.TempDir() + "/f", SizeBytes: 8 << 20, BlockSize: 1 << 20, QD: 2, Write: true, Fdatasync: 2, EndFsync: true}
	bw, err := Run(j)
	if err != nil || bw <= 0 {
		t.Fatalf("%s: %v GB/s, %v", j.Describe(), bw, err)
	}
}
