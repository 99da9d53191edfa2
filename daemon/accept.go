package daemon

import (
	"errors"
	"net"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Accept loops survive transient errors. A listener's Accept fails for
// reasons that pass: the process is out of file descriptors (EMFILE, ENFILE:
// a client holding many connections), a peer gave up before it was accepted
// (ECONNABORTED), the kernel is short of memory (ENOBUFS, ENOMEM). Returning
// from the loop on such an error would stop the listener for good, until a
// restart; instead the loop waits (5 ms, doubling up to 1 s, reset by the
// next connection), counts the error in hcache_accept_errors_total, and
// accepts again. Only a closed listener ends it.

const (
	acceptBackoffMin = 5 * time.Millisecond
	acceptBackoffMax = time.Second
)

// steadyListener is a listener whose Accept returns only a connection or
// net.ErrClosed: every other error is counted and retried after a backoff.
// The gRPC server and the side socket's loop both accept through it.
type steadyListener struct {
	net.Listener
	onErr  func(err error, retryIn time.Duration)
	closed chan struct{}
	once   sync.Once
}

func newSteady(ln net.Listener, onErr func(error, time.Duration)) *steadyListener {
	return &steadyListener{Listener: ln, onErr: onErr, closed: make(chan struct{})}
}

func (s *Server) steady(ln net.Listener, name string) *steadyListener {
	return newSteady(ln, func(err error, retryIn time.Duration) {
		s.metrics.acceptErrors.WithLabelValues(name, errnoName(err)).Inc()
		s.log.Warn("accept failed; retrying", "listener", name, "err", err, "retry_in", retryIn.String())
	})
}

func (l *steadyListener) Accept() (net.Conn, error) {
	delay := time.Duration(0)
	for {
		c, err := l.Listener.Accept()
		if err == nil {
			return c, nil
		}
		select {
		case <-l.closed:
			return nil, net.ErrClosed
		default:
		}
		if errors.Is(err, net.ErrClosed) {
			return nil, err
		}
		delay = min(max(2*delay, acceptBackoffMin), acceptBackoffMax)
		if l.onErr != nil {
			l.onErr(err, delay)
		}
		t := time.NewTimer(delay)
		select {
		case <-l.closed:
			t.Stop()
			return nil, net.ErrClosed
		case <-t.C:
		}
	}
}

func (l *steadyListener) Close() error {
	l.once.Do(func() { close(l.closed) })
	return l.Listener.Close()
}

// errnoName is the errno of an accept error ("EMFILE"), or "other".
func errnoName(err error) string {
	var e syscall.Errno
	if errors.As(err, &e) {
		if n := unix.ErrnoName(e); n != "" {
			return n
		}
	}
	return "other"
}
