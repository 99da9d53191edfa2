package faultproxy

import (
	"bytes"
	"io"
	"net"
	"testing"
	"time"
)

// echoServer answers each connection with n bytes of a pattern after
// reading one byte.
func echoServer(t *testing.T, n int) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				b := make([]byte, 1)
				if _, err := c.Read(b); err != nil {
					return
				}
				c.Write(pattern(n))
			}()
		}
	}()
	return ln.Addr().String()
}

func pattern(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i * 7)
	}
	return b
}

func fetch(addr string) ([]byte, error) {
	c, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write([]byte{1}); err != nil {
		return nil, err
	}
	return io.ReadAll(c)
}

// TestFaults: the proxy passes bytes intact, cuts a reply after CutAfter
// bytes (the client sees a short body, never other bytes), refuses
// connections while dropping, delays, and recovers when the faults end.
func TestFaults(t *testing.T) {
	const n = 200 << 10
	p, err := Start(echoServer(t, n))
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	cases := []struct {
		name  string
		f     Faults
		check func(b []byte, err error) string
	}{
		{"pass", Faults{}, func(b []byte, err error) string {
			if err != nil || !bytes.Equal(b, pattern(n)) {
				return "want the whole reply"
			}
			return ""
		}},
		{"cut", Faults{CutAfter: 1000}, func(b []byte, err error) string {
			if len(b) != 1000 || !bytes.Equal(b, pattern(n)[:1000]) {
				return "want the first 1000 bytes only"
			}
			return ""
		}},
		{"cut request", Faults{CutRequestAfter: 1}, func(b []byte, err error) string {
			if len(b) != 0 {
				return "want nothing: the request was cut"
			}
			return ""
		}},
		{"drop", Faults{Drop: true}, func(b []byte, err error) string {
			if len(b) != 0 {
				return "want nothing"
			}
			return ""
		}},
		{"delay", Faults{Delay: 20 * time.Millisecond}, func(b []byte, err error) string {
			if err != nil || !bytes.Equal(b, pattern(n)) {
				return "want the whole reply"
			}
			return ""
		}},
		{"pass again", Faults{}, func(b []byte, err error) string {
			if err != nil || !bytes.Equal(b, pattern(n)) {
				return "want the whole reply"
			}
			return ""
		}},
	}
	for _, tc := range cases {
		p.Set(tc.f)
		b, err := fetch(p.Addr())
		if msg := tc.check(b, err); msg != "" {
			t.Fatalf("%s: got %d bytes, err %v: %s", tc.name, len(b), err, msg)
		}
	}
	if p.Cuts() != 2 {
		t.Fatalf("cuts %d, want 2", p.Cuts())
	}
}
