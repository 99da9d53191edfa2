// Package s3test starts a real S3-compatible object store for tests:
// SeaweedFS's `weed server` on loopback, on free ports, in a temporary
// directory. No mock: the remote tier's tests talk S3 to it.
//
// The binary comes from HCACHE_WEED, else `weed` on PATH, else the cache
// directory scripts/seaweedfs.sh builds into. Without one the test skips,
// naming the script; with HCACHE_REQUIRE_S3=1 (CI) it fails instead.
package s3test

import (
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Version is the SeaweedFS module version scripts/seaweedfs.sh builds.
const Version = "v0.0.0-20261109003541-7506e5f91cd6"

// Weed finds the weed binary ("" if none).
func Weed() string {
	if p := os.Getenv("HCACHE_WEED"); p != "" {
		return p
	}
	if p, err := exec.LookPath("weed"); err == nil {
		return p
	}
	var dirs []string
	if d := os.Getenv("HCACHE_CACHE"); d != "" {
		dirs = append(dirs, d)
	}
	if d := os.Getenv("XDG_CACHE_HOME"); d != "" {
		dirs = append(dirs, filepath.Join(d, "hcache"))
	}
	if h, err := os.UserHomeDir(); err == nil {
		dirs = append(dirs, filepath.Join(h, ".cache", "hcache"))
	}
	dirs = append(dirs, "/work/cache/weed")
	for _, d := range dirs {
		p := filepath.Join(d, "weed-"+Version, "weed")
		if st, err := os.Stat(p); err == nil && st.Mode().IsRegular() {
			return p
		}
	}
	return ""
}

// Server is a running weed server.
type Server struct {
	t        testing.TB
	bin, dir string
	ports    []int
	// Endpoint is the S3 API's host:port.
	Endpoint string
	mu       sync.Mutex
	cmd      *exec.Cmd
	done     chan struct{}
}

// Start starts a weed server for the test (stopped at its end), or skips
// the test when no binary is found.
func Start(t testing.TB) *Server {
	t.Helper()
	bin := Weed()
	if bin == "" {
		msg := "no SeaweedFS weed binary: run `bash scripts/seaweedfs.sh` (builds it once into ~/.cache/hcache) or set HCACHE_WEED"
		if os.Getenv("HCACHE_REQUIRE_S3") != "" {
			t.Fatal(msg + " (HCACHE_REQUIRE_S3 is set)")
		}
		t.Skip(msg)
	}
	s := &Server{t: t, bin: bin, dir: t.TempDir()}
	// s3, s3 grpc, master, master grpc, volume, volume grpc, filer, filer grpc
	s.ports = freePorts(t, 8)
	s.Endpoint = "127.0.0.1:" + strconv.Itoa(s.ports[0])
	s.start()
	t.Cleanup(func() {
		s.Kill()
		if t.Failed() {
			b, _ := os.ReadFile(filepath.Join(s.dir, "weed.log"))
			t.Logf("the end of weed.log:\n%s", tail(b))
		}
	})
	return s
}

func (s *Server) start() {
	s.t.Helper()
	p := s.ports
	data := filepath.Join(s.dir, "data")
	os.MkdirAll(data, 0o755)
	args := []string{"server", "-dir=" + data, "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
		"-s3", "-s3.port=" + strconv.Itoa(p[0]), "-s3.port.grpc=" + strconv.Itoa(p[1]),
		"-master.port=" + strconv.Itoa(p[2]), "-master.port.grpc=" + strconv.Itoa(p[3]),
		"-volume.port=" + strconv.Itoa(p[4]), "-volume.port.grpc=" + strconv.Itoa(p[5]),
		"-filer.port=" + strconv.Itoa(p[6]), "-filer.port.grpc=" + strconv.Itoa(p[7]),
		"-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
		"-master.volumeSizeLimitMB=1024", "-volume.max=64"}
	log, err := os.OpenFile(filepath.Join(s.dir, "weed.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		s.t.Fatal(err)
	}
	cmd := exec.Command(s.bin, args...)
	cmd.Stdout, cmd.Stderr = log, log
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		s.t.Fatalf("start %s: %v", s.bin, err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); log.Close(); close(done) }()
	s.mu.Lock()
	s.cmd, s.done = cmd, done
	s.mu.Unlock()
	deadline := time.Now().Add(60 * time.Second)
	for {
		resp, err := http.Get("http://" + s.Endpoint + "/")
		if err == nil {
			resp.Body.Close()
			return
		}
		select {
		case <-done:
			b, _ := os.ReadFile(filepath.Join(s.dir, "weed.log"))
			s.t.Fatalf("weed server exited at start: %s", tail(b))
		default:
		}
		if time.Now().After(deadline) {
			s.Kill()
			b, _ := os.ReadFile(filepath.Join(s.dir, "weed.log"))
			s.t.Fatalf("weed server did not answer on %s within 60 s: %s", s.Endpoint, tail(b))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// Kill stops the server at once (SIGKILL), its data kept.
func (s *Server) Kill() {
	s.mu.Lock()
	cmd, done := s.cmd, s.done
	s.cmd = nil
	s.mu.Unlock()
	if cmd == nil {
		return
	}
	syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
	<-done
}

// Restart starts the server again on the same ports and data.
func (s *Server) Restart() {
	s.Kill()
	s.start()
}

func tail(b []byte) string {
	if len(b) > 2000 {
		b = b[len(b)-2000:]
	}
	return string(b)
}

// freePorts reserves n free loopback ports whose +10000 neighbours are free
// too (weed binds some defaults there).
func freePorts(t testing.TB, n int) []int {
	var out []int
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	for len(out) < n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		p := l.Addr().(*net.TCPAddr).Port
		if p+10000 > 65535 {
			l.Close()
			continue
		}
		l2, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(p+10000))
		if err != nil {
			l.Close()
			continue
		}
		ls = append(ls, l, l2)
		out = append(out, p)
	}
	return out
}

// String describes the server.
func (s *Server) String() string { return fmt.Sprintf("weed at %s (%s)", s.Endpoint, s.dir) }
