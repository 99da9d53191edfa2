// Package faultproxy is a TCP proxy on loopback that injects the faults of
// a network path to a server: refused connections (drop), latency (delay)
// and connections cut after some bytes (a truncated reply). Tests put it
// between a client and a real server (the remote tier's object store).
package faultproxy

import (
	"errors"
	"io"
	"net"
	"sync"
	"time"
)

// Faults is what the proxy does to connections.
type Faults struct {
	// Drop closes new connections at once and cuts the open ones (the
	// server looks down).
	Drop bool
	// Delay holds every chunk of bytes, both ways, this long.
	Delay time.Duration
	// CutAfter closes a connection once this many bytes went from the
	// server to the client on it (0: never): a reply truncated mid-body.
	CutAfter int64
	// CutRequestAfter closes a connection once this many bytes went from
	// the client to the server on it (0: never): an upload cut mid-body,
	// as when its node is killed.
	CutRequestAfter int64
}

// Proxy forwards connections on a loopback port to a target.
type Proxy struct {
	ln     net.Listener
	target string
	mu     sync.Mutex
	f      Faults
	conns  map[net.Conn]bool
	wg     sync.WaitGroup
	closed bool
	cuts   int64
}

// Start listens on 127.0.0.1 (a free port) and forwards to target.
func Start(target string) (*Proxy, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	p := &Proxy{ln: ln, target: target, conns: map[net.Conn]bool{}}
	p.wg.Add(1)
	go p.accept()
	return p, nil
}

// Addr is the proxy's host:port.
func (p *Proxy) Addr() string { return p.ln.Addr().String() }

// Set changes the faults; with Drop the open connections are cut too.
func (p *Proxy) Set(f Faults) {
	p.mu.Lock()
	p.f = f
	p.mu.Unlock()
	if f.Drop {
		p.CutAll()
	}
}

// CutAll closes every open connection.
func (p *Proxy) CutAll() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for c := range p.conns {
		c.Close()
	}
}

// Cuts counts the connections closed by CutAfter or CutRequestAfter.
func (p *Proxy) Cuts() int64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.cuts
}

// Close stops the proxy and closes its connections.
func (p *Proxy) Close() error {
	p.mu.Lock()
	p.closed = true
	p.mu.Unlock()
	err := p.ln.Close()
	p.CutAll()
	p.wg.Wait()
	return err
}

func (p *Proxy) faults() Faults {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.f
}

func (p *Proxy) track(c net.Conn, add bool) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if add {
		if p.closed {
			return false
		}
		p.conns[c] = true
	} else {
		delete(p.conns, c)
	}
	return true
}

func (p *Proxy) accept() {
	defer p.wg.Done()
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		if p.faults().Drop || !p.track(c, true) {
			c.Close()
			continue
		}
		p.wg.Add(1)
		go p.serve(c)
	}
}

func (p *Proxy) serve(c net.Conn) {
	defer p.wg.Done()
	defer p.track(c, false)
	defer c.Close()
	s, err := net.DialTimeout("tcp", p.target, 5*time.Second)
	if err != nil {
		return
	}
	if !p.track(s, true) {
		s.Close()
		return
	}
	defer p.track(s, false)
	defer s.Close()
	done := make(chan struct{}, 2)
	go func() { p.pipe(s, c, false); c.Close(); s.Close(); done <- struct{}{} }()
	go func() { p.pipe(c, s, true); c.Close(); s.Close(); done <- struct{}{} }()
	<-done
	<-done
}

// pipe copies src to dst, counting bytes toward CutAfter (fromServer) or
// CutRequestAfter.
func (p *Proxy) pipe(dst, src net.Conn, fromServer bool) {
	buf := make([]byte, 32<<10)
	var sent int64
	for {
		n, err := src.Read(buf)
		if n > 0 {
			f := p.faults()
			if f.Drop {
				return
			}
			if f.Delay > 0 {
				time.Sleep(f.Delay)
			}
			chunk := buf[:n]
			cut := false
			limit := f.CutRequestAfter
			if fromServer {
				limit = f.CutAfter
			}
			if limit > 0 && sent+int64(n) >= limit {
				chunk, cut = buf[:max(limit-sent, 0)], true
			}
			if _, werr := dst.Write(chunk); werr != nil {
				return
			}
			sent += int64(len(chunk))
			if cut {
				p.mu.Lock()
				p.cuts++
				p.mu.Unlock()
				return
			}
		}
		if err != nil {
			if !errors.Is(err, io.EOF) {
				return
			}
			if tc, ok := dst.(*net.TCPConn); ok {
				tc.CloseWrite()
			}
			return
		}
	}
}
