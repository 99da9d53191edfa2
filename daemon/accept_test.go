package daemon

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/hcache/hcache/chunk"
)

func counterValue(t *testing.T, c prometheus.Counter) float64 {
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetCounter().GetValue()
}

// faultyListener fails Accept with the errors queued, then hands out the
// connections queued, then reports itself closed.
type faultyListener struct {
	errs  chan error
	conns chan net.Conn
	done  chan struct{}
}

func (l *faultyListener) Accept() (net.Conn, error) {
	select {
	case err := <-l.errs:
		return nil, err
	default:
	}
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}
func (l *faultyListener) Close() error   { return nil }
func (l *faultyListener) Addr() net.Addr { return &net.UnixAddr{Name: "faulty", Net: "unix"} }

// TestShmAcceptSurvivesTransientErrors: the side socket's accept loop goes
// on after EMFILE, ENFILE, ECONNABORTED and ENOBUFS (counted per errno in
// hcache_accept_errors_total) and registers the next region; before, it
// returned on the first error and shared memory was gone until a restart.
func TestShmAcceptSurvivesTransientErrors(t *testing.T) {
	sd, err := os.MkdirTemp("", "hcd")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(sd)
	st, err := chunk.Open(chunk.Options{Dir: t.TempDir(), GCInterval: -1, SegmentBytes: 8 << 20, Logf: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	s, err := New(Config{Store: st, Listen: filepath.Join(sd, "s"), GCInterval: -1, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Stop()
	transient := []syscall.Errno{unix.EMFILE, unix.ENFILE, unix.ECONNABORTED, unix.ENOBUFS}
	fl := &faultyListener{errs: make(chan error, len(transient)), conns: make(chan net.Conn, 1), done: make(chan struct{})}
	defer close(fl.done)
	for _, e := range transient {
		fl.errs <- &net.OpError{Op: "accept", Net: "unix", Err: os.NewSyscallError("accept4", e)}
	}
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	mine, theirs := os.NewFile(uintptr(fds[0]), "client"), os.NewFile(uintptr(fds[1]), "daemon")
	server, err := net.FileConn(theirs)
	theirs.Close()
	if err != nil {
		t.Fatal(err)
	}
	client, err := net.FileConn(mine)
	mine.Close()
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	fl.conns <- server
	go s.serveShm(s.steady(fl, "shm"))

	mfd, err := unix.MemfdCreate("t", unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(mfd)
	unix.Ftruncate(mfd, 4096)
	unix.FcntlInt(uintptr(mfd), unix.F_ADD_SEALS, unix.F_SEAL_SHRINK)
	if _, _, err := client.(*net.UnixConn).WriteMsgUnix([]byte(ShmMagic), unix.UnixRights(mfd), nil); err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(client).ReadString('\n')
	if err != nil || !strings.HasPrefix(line, "OK ") {
		t.Fatalf("registration after transient accept errors: %q, %v", line, err)
	}
	for _, e := range transient {
		name := unix.ErrnoName(e)
		if n := counterValue(t, s.metrics.acceptErrors.WithLabelValues("shm", name)); n != 1 {
			t.Errorf("hcache_accept_errors_total{listener=shm,errno=%s} = %v, want 1", name, n)
		}
	}
}

// TestDiskFullIsResourceExhausted: a full disk reaches the client as
// RESOURCE_EXHAUSTED (the client may retry once space is freed), not as
// INTERNAL, and is not counted as an I/O error.
func TestDiskFullIsResourceExhausted(t *testing.T) {
	s := &Server{}
	s.metrics = newMetrics(s)
	cases := []struct {
		name string
		err  error
		code codes.Code
	}{
		{"store refuses writes on a full disk", fmt.Errorf("close ns/x: %w", fmt.Errorf("%w (%w)", chunk.ErrDiskFull, syscall.ENOSPC)), codes.ResourceExhausted},
		{"segment grow meets ENOSPC", fmt.Errorf("chunk: grow 000001.seg: %w", os.NewSyscallError("fallocate", syscall.ENOSPC)), codes.ResourceExhausted},
		{"staging full", chunk.ErrStagingFull, codes.ResourceExhausted},
		{"other I/O error", os.NewSyscallError("pwrite", syscall.EIO), codes.Internal},
		{"store broken by a violated invariant", fmt.Errorf("append ns/x: %w", chunk.ErrInvariant), codes.FailedPrecondition},
	}
	for _, tc := range cases {
		if got := status.Code(s.storeErr(tc.err)); got != tc.code {
			t.Errorf("%s: %v, want %v", tc.name, got, tc.code)
		}
	}
	if n := counterValue(t, s.metrics.ioErrors); n != 1 {
		t.Errorf("hcache_io_errors_total = %v, want 1 (the EIO alone)", n)
	}
}

// TestSteadyListenerEndsOnlyWhenClosed: an Accept that keeps failing
// (ENOBUFS) is retried, never returned; closing the listener ends the wait
// with net.ErrClosed.
func TestSteadyListenerEndsOnlyWhenClosed(t *testing.T) {
	fl := &faultyListener{errs: make(chan error, 64), conns: make(chan net.Conn), done: make(chan struct{})}
	for i := 0; i < cap(fl.errs); i++ {
		fl.errs <- os.NewSyscallError("accept4", unix.ENOBUFS)
	}
	failures := make(chan error, cap(fl.errs))
	ln := newSteady(fl, func(err error, _ time.Duration) { failures <- err })
	done := make(chan error, 1)
	go func() {
		_, err := ln.Accept()
		done <- err
	}()
	for i := 0; i < 3; i++ {
		if err := <-failures; !errors.Is(err, unix.ENOBUFS) {
			t.Fatalf("failure %d: %v, want ENOBUFS", i, err)
		}
	}
	select {
	case err := <-done:
		t.Fatalf("Accept returned %v on a transient error", err)
	default:
	}
	ln.Close()
	if err := <-done; !errors.Is(err, net.ErrClosed) {
		t.Fatalf("Accept after Close: %v, want net.ErrClosed", err)
	}
}
