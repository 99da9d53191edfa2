package peer

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/redis/go-redis/v9/maintnotifications"
)

// Redis keeps KV chunks in a real redis-server (Debian's), started and
// stopped here on a unix socket with persistence off, as LMCache's remote
// backend uses one: one key per ChunkTokens-token chunk, its value every
// layer's K/V laid out layer-major. A chunk a later turn extends is
// rewritten whole.
type Redis struct {
	spec Spec
	cmd  *exec.Cmd
	rdb  *redis.Client
	done chan error
}

// NewRedis starts redis-server in spec.Dir; pool is the client's
// connection pool (at least the benchmark's concurrency).
func NewRedis(spec Spec, pool int) (*Redis, error) {
	if err := spec.check(); err != nil {
		return nil, err
	}
	if spec.ChunkTokens <= 0 {
		spec.ChunkTokens = DefaultChunkTokens
	}
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		return nil, fmt.Errorf("peer redis: redis-server not found (apt-get install redis-server): %w", err)
	}
	sock := filepath.Join(spec.Dir, "redis.sock")
	if len(sock) > 100 {
		return nil, fmt.Errorf("peer redis: socket path %q is too long for a unix socket", sock)
	}
	cmd := exec.Command(bin, "--port", "0", "--unixsocket", sock, "--unixsocketperm", "700", "--save", "",
		"--appendonly", "no", "--dir", spec.Dir, "--daemonize", "no", "--protected-mode", "no", "--logfile", "",
		"--maxmemory", "0", "--loglevel", "warning")
	var stderr strings.Builder
	cmd.Stdout, cmd.Stderr = &stderr, &stderr
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("peer redis: start %s: %w", bin, err)
	}
	r := &Redis{spec: spec, cmd: cmd, done: make(chan error, 1)}
	go func() { r.done <- cmd.Wait() }()
	r.rdb = redis.NewClient(&redis.Options{Network: "unix", Addr: sock, PoolSize: max(pool, 4), DisableIdentity: true,
		Protocol: 2, ReadTimeout: time.Minute, WriteTimeout: time.Minute,
		MaintNotificationsConfig: &maintnotifications.Config{Mode: maintnotifications.ModeDisabled}})
	deadline := time.Now().Add(10 * time.Second)
	for {
		err := r.rdb.Ping(context.Background()).Err()
		if err == nil {
			return r, nil
		}
		select {
		case werr := <-r.done:
			r.rdb.Close()
			return nil, fmt.Errorf("peer redis: redis-server exited (%v): %s", werr, stderr.String())
		default:
		}
		if time.Now().After(deadline) {
			r.Close()
			return nil, fmt.Errorf("peer redis: redis-server not answering on %s: %v", sock, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Name implements System.
func (r *Redis) Name() string { return "redis" }

// RowBytes implements System.
func (r *Redis) RowBytes() int { return r.spec.RowBytes }

func (r *Redis) key(id string, c int) string { return id + "/" + strconv.Itoa(c) }

// Save implements System.
func (r *Redis) Save(id string, from, to int, rows Rows) error {
	ct, row := r.spec.ChunkTokens, r.spec.RowBytes
	var b []byte
	for c := from / ct; c*ct < to; c++ {
		lo, hi := c*ct, min((c+1)*ct, to)
		n := hi - lo
		b = append(b[:0], make([]byte, r.spec.Layers*n*row)...)
		for l := 0; l < r.spec.Layers; l++ {
			copy(b[l*n*row:], rows(l, lo, hi))
		}
		if err := r.rdb.Set(context.Background(), r.key(id, c), b, 0).Err(); err != nil {
			return fmt.Errorf("peer redis: SET %s: %w", r.key(id, c), err)
		}
	}
	return nil
}

// Restore implements System: one GET per chunk.
func (r *Redis) Restore(id string, tokens int, fn Deliver) error {
	ct, row := r.spec.ChunkTokens, r.spec.RowBytes
	for c := 0; c*ct < tokens; c++ {
		b, err := r.rdb.Get(context.Background(), r.key(id, c)).Bytes()
		if err != nil {
			return fmt.Errorf("peer redis: GET %s: %w", r.key(id, c), err)
		}
		stored := len(b) / (r.spec.Layers * row)
		n := min(ct, tokens-c*ct)
		if stored < n || len(b) != stored*r.spec.Layers*row {
			return fmt.Errorf("peer redis: %s holds %d bytes, not %d tokens", r.key(id, c), len(b), n)
		}
		for l := 0; l < r.spec.Layers; l++ {
			if err := fn(l, c*ct, b[l*stored*row:(l*stored+n)*row]); err != nil {
				return err
			}
		}
	}
	return nil
}

// BytesOnDisk implements System: persistence is off.
func (r *Redis) BytesOnDisk() (int64, error) { return 0, nil }

// BytesInMemory implements MemoryUser: the server's used_memory.
func (r *Redis) BytesInMemory() (int64, error) {
	info, err := r.rdb.Info(context.Background(), "memory").Result()
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(info, "\n") {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), "used_memory:"); ok {
			return strconv.ParseInt(v, 10, 64)
		}
	}
	return 0, errors.New("peer redis: INFO memory lacks used_memory")
}

// Close implements System: the client closes and the server is stopped
// (SIGTERM; SIGKILL after 5 s).
func (r *Redis) Close() error {
	r.rdb.Close()
	r.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-r.done:
	case <-time.After(5 * time.Second):
		r.cmd.Process.Kill()
		<-r.done
	}
	os.Remove(filepath.Join(r.spec.Dir, "redis.sock"))
	return nil
}
