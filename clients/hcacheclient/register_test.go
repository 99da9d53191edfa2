package hcacheclient

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestRegisterDeadline: a registration on a side socket that never answers
// (a listener that never accepts: the connect lands in its backlog) fails at
// the context's deadline instead of holding the caller forever.
func TestRegisterDeadline(t *testing.T) {
	sd, err := os.MkdirTemp("", "hcr")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(sd)
	path := filepath.Join(sd, "x.shm")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	fd, err := unix.MemfdCreate("hcache-test", unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if err := unix.Ftruncate(fd, 4096); err != nil {
		t.Fatal(err)
	}
	mem, err := unix.Mmap(fd, 0, 4096, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(mem)
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	done := make(chan error, 1)
	go func() {
		_, err := register(ctx, path, fd, mem)
		done <- err
	}()
	select {
	case err := <-done:
		var ne net.Error
		if err == nil || !(errors.As(err, &ne) && ne.Timeout() || errors.Is(err, context.DeadlineExceeded)) {
			t.Fatalf("registration on a silent side socket: %v, want a timeout", err)
		}
	case <-time.After(RegisterTimeout + 30*time.Second):
		// Not a timing assertion: only a guard so that a registration
		// without any deadline fails the test instead of hanging it.
		t.Fatal("registration on a silent side socket never returned")
	}
}
