// Package objstore runs a real S3-compatible object store on loopback:
// SeaweedFS's `weed server` on free ports in a directory of the caller's.
// Tests (Start) and `hcache bench fleet` (Launch) use it.
//
// The binary comes from HCACHE_WEED, else `weed` on PATH, else the cache
// directory scripts/seaweedfs.sh builds into.
package objstore

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
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

// ErrNoWeed: no weed binary was found.
var ErrNoWeed = errors.New("no SeaweedFS weed binary: run `bash scripts/seaweedfs.sh` (builds it once into ~/.cache/hcache) or set HCACHE_WEED")

// Server is a running weed server.
type Server struct {
	bin, dir string
	ports    []int
	// Endpoint is the S3 API's host:port.
	Endpoint string
	mu       sync.Mutex
	cmd      *exec.Cmd
	done     chan struct{}
}

// Launch starts weed (bin; "" finds it) with its data and log in dir.
func Launch(bin, dir string) (*Server, error) {
	if bin == "" {
		bin = Weed()
	}
	if bin == "" {
		return nil, ErrNoWeed
	}
	ports, err := freePorts(8)
	if err != nil {
		return nil, err
	}
	s := &Server{bin: bin, dir: dir, ports: ports, Endpoint: "127.0.0.1:" + strconv.Itoa(ports[0])}
	return s, s.start()
}

// Log is the path of the server's log.
func (s *Server) Log() string { return filepath.Join(s.dir, "weed.log") }

func (s *Server) start() error {
	p := s.ports
	data := filepath.Join(s.dir, "data")
	if err := os.MkdirAll(data, 0o755); err != nil {
		return err
	}
	args := []string{"server", "-dir=" + data, "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
		"-s3", "-s3.port=" + strconv.Itoa(p[0]), "-s3.port.grpc=" + strconv.Itoa(p[1]),
		"-master.port=" + strconv.Itoa(p[2]), "-master.port.grpc=" + strconv.Itoa(p[3]),
		"-volume.port=" + strconv.Itoa(p[4]), "-volume.port.grpc=" + strconv.Itoa(p[5]),
		"-filer.port=" + strconv.Itoa(p[6]), "-filer.port.grpc=" + strconv.Itoa(p[7]),
		"-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
		"-master.volumeSizeLimitMB=1024", "-volume.max=64"}
	log, err := os.OpenFile(s.Log(), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	cmd := exec.Command(s.bin, args...)
	cmd.Stdout, cmd.Stderr = log, log
	// No Pdeathsig: it fires when the forking OS thread exits, and Go ends
	// threads (a goroutine locked to its thread, as an io_uring ring's,
	// that returns), which killed the server mid-test. Kill stops it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		log.Close()
		return fmt.Errorf("start %s: %w", s.bin, err)
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
			return nil
		}
		select {
		case <-done:
			return fmt.Errorf("weed server exited at start: %s", s.Tail())
		default:
		}
		if time.Now().After(deadline) {
			s.Kill()
			return fmt.Errorf("weed server did not answer on %s within 60 s: %s", s.Endpoint, s.Tail())
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// Tail is the end of the server's log.
func (s *Server) Tail() string {
	b, _ := os.ReadFile(s.Log())
	if len(b) > 2000 {
		b = b[len(b)-2000:]
	}
	return string(b)
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
func (s *Server) Restart() error {
	s.Kill()
	return s.start()
}

// freePorts finds n free loopback ports.
func freePorts(n int) ([]int, error) {
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
			return nil, err
		}
		ls = append(ls, l)
		out = append(out, l.Addr().(*net.TCPAddr).Port)
	}
	return out, nil
}
