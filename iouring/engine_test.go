package iouring

import (
	"bytes"
	"errors"
	"io"
	"math/rand"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/hcache/hcache/internal/testseed"
)

// engines lists both engines; every test runs against each.
var engines = []struct {
	name string
	kind string
}{
	{"io_uring", "io_uring"},
	{"fallback", "fallback"},
}

func newEngine(t *testing.T, kind string, entries int) Engine {
	t.Helper()
	e, err := New(Config{Kind: kind, Entries: entries, Logf: t.Logf})
	if err != nil {
		t.Fatalf("New(%s): %v", kind, err)
	}
	t.Cleanup(func() { e.Close() })
	return e
}

func seed(t *testing.T) *rand.Rand {
	s := testseed.Seed(t)
	return rand.New(rand.NewSource(s))
}

func directFile(t *testing.T, size int) (int, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "data")
	fd, err := OpenDirect(path, unix.O_RDWR|unix.O_CREAT, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Ftruncate(fd, int64(size)); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	return fd, path
}

func TestRoundTripRandomAlignedOffsets(t *testing.T) {
	for _, ec := range engines {
		for _, registered := range []bool{false, true} {
			t.Run(ec.name+map[bool]string{false: "/plain", true: "/fixed"}[registered], func(t *testing.T) {
				rng := seed(t)
				e := newEngine(t, ec.kind, 64)
				const fileBytes = 8 << 20
				fd, _ := directFile(t, fileBytes)
				pool, err := NewPool(256<<10, 8)
				if err != nil {
					t.Fatal(err)
				}
				defer pool.Free()
				if registered && !RegisterPool(e, pool, t.Logf) && ec.kind == "io_uring" {
					t.Fatal("registering the pool failed")
				}
				shadow := make([]byte, fileBytes)
				for iter := 0; iter < 50; iter++ {
					// A batch of non-overlapping writes.
					var reqs []*Request
					var bufs [][]byte
					used := map[int]bool{}
					for k := 0; k < 4; k++ {
						n := (1 + rng.Intn(64)) * Alignment
						blk := rng.Intn((fileBytes - n) / Alignment)
						if used[blk] {
							continue
						}
						used[blk] = true
						b := pool.Get()[:n]
						rng.Read(b)
						bufs = append(bufs, b)
						reqs = append(reqs, &Request{Op: OpWrite, Fd: fd, Buf: b, Off: int64(blk * Alignment)})
					}
					// Overlaps inside a batch have no defined order: apply
					// to the shadow only when disjoint.
					if disjoint(reqs) {
						if err := e.Do(reqs...); err != nil {
							t.Fatal(err)
						}
						for _, r := range reqs {
							copy(shadow[r.Off:], r.Buf)
							if r.N != len(r.Buf) {
								t.Fatalf("write N = %d, want %d", r.N, len(r.Buf))
							}
						}
					}
					for _, b := range bufs {
						pool.Put(b)
					}
					// Read back a random aligned range and compare.
					n := (1 + rng.Intn(64)) * Alignment
					off := rng.Intn((fileBytes-n)/Alignment) * Alignment
					b := pool.Get()[:n]
					r := &Request{Op: OpRead, Fd: fd, Buf: b, Off: int64(off)}
					if err := e.Do(r); err != nil {
						t.Fatal(err)
					}
					if !bytes.Equal(b, shadow[off:off+n]) {
						t.Fatalf("iteration %d: read at %d len %d differs from what was written", iter, off, n)
					}
					pool.Put(b)
				}
				if registered && ec.kind == "io_uring" && e.Stats().FixedIO == 0 {
					t.Fatal("registered pool but no request used READ_FIXED/WRITE_FIXED")
				}
			})
		}
	}
}

func disjoint(reqs []*Request) bool {
	for i, a := range reqs {
		for _, b := range reqs[i+1:] {
			if a.Off < b.Off+int64(len(b.Buf)) && b.Off < a.Off+int64(len(a.Buf)) {
				return false
			}
		}
	}
	return true
}

func TestVectoredAndLinkedFsync(t *testing.T) {
	for _, ec := range engines {
		t.Run(ec.name, func(t *testing.T) {
			rng := seed(t)
			e := newEngine(t, ec.kind, 16)
			fd, _ := directFile(t, 1<<20)
			a, _ := Alloc(3 * Alignment)
			defer a.Free()
			rng.Read(a.Bytes())
			mem := a.Bytes()
			iov := [][]byte{mem[:Alignment], mem[Alignment : 3*Alignment]}
			w := &Request{Op: OpWritev, Fd: fd, Iovecs: iov, Off: 8 * Alignment, Link: true}
			s := &Request{Op: OpFdatasync, Fd: fd}
			if err := e.Do(w, s); err != nil {
				t.Fatal(err)
			}
			if w.N != 3*Alignment {
				t.Fatalf("writev N = %d", w.N)
			}
			out, _ := Alloc(3 * Alignment)
			defer out.Free()
			ob := out.Bytes()
			rv := &Request{Op: OpReadv, Fd: fd, Iovecs: [][]byte{ob[:2*Alignment], ob[2*Alignment:]}, Off: 8 * Alignment}
			if err := e.Do(rv); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(ob, mem) {
				t.Fatal("readv returned other bytes than writev wrote")
			}
		})
	}
}

func TestReadPastEOFIsUnexpectedEOF(t *testing.T) {
	for _, ec := range engines {
		t.Run(ec.name, func(t *testing.T) {
			e := newEngine(t, ec.kind, 8)
			// Buffered file of 5000 bytes: a 8192-byte read is short
			// (5000 - 4096 bytes) and must not be reported as success.
			path := filepath.Join(t.TempDir(), "f")
			if err := os.WriteFile(path, bytes.Repeat([]byte{7}, 5000), 0o644); err != nil {
				t.Fatal(err)
			}
			f, _ := os.Open(path)
			defer f.Close()
			buf := make([]byte, 8192)
			r := &Request{Op: OpRead, Fd: int(f.Fd()), Buf: buf, Off: 4096}
			err := e.Do(r)
			var ioe *IOError
			if !errors.As(err, &ioe) || !errors.Is(err, io.ErrUnexpectedEOF) {
				t.Fatalf("err = %v, want IOError wrapping io.ErrUnexpectedEOF", err)
			}
			if ioe.Off != 4096 || r.N != 5000-4096 {
				t.Fatalf("offset %d, N %d; want 4096 and %d", ioe.Off, r.N, 5000-4096)
			}
		})
	}
}

func TestErrorPaths(t *testing.T) {
	for _, ec := range engines {
		t.Run(ec.name, func(t *testing.T) {
			e := newEngine(t, ec.kind, 8)
			fd, _ := directFile(t, 1<<20)
			aligned, _ := Alloc(2 * Alignment)
			defer aligned.Free()
			cases := []struct {
				name  string
				req   *Request
				errno syscall.Errno
				hint  bool
			}{
				{"bad fd", &Request{Op: OpRead, Fd: 1 << 20, Buf: aligned.Bytes()[:Alignment], Off: 0}, syscall.EBADF, false},
				{"unaligned buffer", &Request{Op: OpRead, Fd: fd, Buf: aligned.Bytes()[1 : 1+Alignment], Off: 0}, syscall.EINVAL, true},
				{"unaligned offset", &Request{Op: OpWrite, Fd: fd, Buf: aligned.Bytes()[:Alignment], Off: 100}, syscall.EINVAL, true},
			}
			for _, c := range cases {
				err := e.Do(c.req)
				var ioe *IOError
				if !errors.As(err, &ioe) || !errors.Is(err, c.errno) {
					t.Fatalf("%s: err = %v, want IOError wrapping %v", c.name, err, c.errno)
				}
				if ioe.Off != c.req.Off {
					t.Fatalf("%s: error names offset %d, want %d", c.name, ioe.Off, c.req.Off)
				}
				if c.hint && ioe.Hint == "" {
					t.Fatalf("%s: error %q lacks the O_DIRECT alignment explanation", c.name, err)
				}
			}
		})
	}
}

func TestLinkedChainCancelsAfterFailure(t *testing.T) {
	for _, ec := range engines {
		t.Run(ec.name, func(t *testing.T) {
			e := newEngine(t, ec.kind, 8)
			fd, _ := directFile(t, 1<<20)
			a, _ := Alloc(Alignment)
			defer a.Free()
			bad := &Request{Op: OpWrite, Fd: 1 << 20, Buf: a.Bytes(), Link: true}
			next := &Request{Op: OpWrite, Fd: fd, Buf: a.Bytes()}
			if err := e.Do(bad, next); err == nil {
				t.Fatal("chain with a failing head succeeded")
			}
			if !errors.Is(bad.Err, syscall.EBADF) || !errors.Is(next.Err, syscall.ECANCELED) {
				t.Fatalf("head err %v (want EBADF), next err %v (want ECANCELED)", bad.Err, next.Err)
			}
		})
	}
}

func TestConcurrentHammer(t *testing.T) {
	for _, ec := range engines {
		t.Run(ec.name, func(t *testing.T) {
			e := newEngine(t, ec.kind, 32)
			const goroutines, perG, blk = 16, 40, Alignment
			fd, _ := directFile(t, goroutines*perG*blk)
			var wg sync.WaitGroup
			errs := make(chan error, goroutines)
			for g := 0; g < goroutines; g++ {
				wg.Add(1)
				go func(g int) {
					defer wg.Done()
					b, err := Alloc(blk)
					if err != nil {
						errs <- err
						return
					}
					defer b.Free()
					out, _ := Alloc(blk)
					defer out.Free()
					for i := 0; i < perG; i++ {
						off := int64((g*perG + i) * blk)
						for j := range b.Bytes() {
							b.Bytes()[j] = byte(g*31 + i + j)
						}
						if err := e.Do(&Request{Op: OpWrite, Fd: fd, Buf: b.Bytes(), Off: off}); err != nil {
							errs <- err
							return
						}
						if err := e.Do(&Request{Op: OpRead, Fd: fd, Buf: out.Bytes(), Off: off}); err != nil {
							errs <- err
							return
						}
						if !bytes.Equal(out.Bytes(), b.Bytes()) {
							errs <- errors.New("read back other bytes")
							return
						}
					}
				}(g)
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Fatal(err)
			}
			st := e.Stats()
			if st.Completed != st.Submitted || st.Completed < goroutines*perG*2 {
				t.Fatalf("stats %+v: completions do not match submissions", st)
			}
		})
	}
}

func TestBatchLargerThanRing(t *testing.T) {
	for _, ec := range engines {
		t.Run(ec.name, func(t *testing.T) {
			e := newEngine(t, ec.kind, 4)
			fd, _ := directFile(t, 64*Alignment)
			b, _ := Alloc(64 * Alignment)
			defer b.Free()
			var reqs []*Request
			for i := 0; i < 64; i++ {
				reqs = append(reqs, &Request{Op: OpRead, Fd: fd, Buf: b.Bytes()[i*Alignment : (i+1)*Alignment], Off: int64(i * Alignment)})
			}
			if err := e.Do(reqs...); err != nil {
				t.Fatal(err)
			}
		})
	}
}

func TestFileClosedMidFlight(t *testing.T) {
	for _, ec := range engines {
		t.Run(ec.name, func(t *testing.T) {
			e := newEngine(t, ec.kind, 64)
			path := filepath.Join(t.TempDir(), "f")
			fd, err := OpenDirect(path, unix.O_RDWR|unix.O_CREAT, 0o644)
			if err != nil {
				t.Fatal(err)
			}
			unix.Ftruncate(fd, 64*Alignment)
			b, _ := Alloc(64 * Alignment)
			defer b.Free()
			var reqs []*Request
			for i := 0; i < 64; i++ {
				reqs = append(reqs, &Request{Op: OpRead, Fd: fd, Buf: b.Bytes()[i*Alignment : (i+1)*Alignment], Off: int64(i * Alignment)})
			}
			var wg sync.WaitGroup
			wg.Add(len(reqs))
			if err := e.Submit(reqs, func(*Request) { wg.Done() }); err != nil {
				t.Fatal(err)
			}
			unix.Close(fd)
			wg.Wait()
			// Every request completed; each either read its block or
			// failed with EBADF naming its offset.
			for _, r := range reqs {
				if r.Err != nil && !errors.Is(r.Err, syscall.EBADF) {
					t.Fatalf("request at %d: %v", r.Off, r.Err)
				}
			}
			// After the close, a submission fails cleanly.
			r := &Request{Op: OpRead, Fd: fd, Buf: b.Bytes()[:Alignment]}
			if err := e.Do(r); !errors.Is(err, syscall.EBADF) {
				t.Fatalf("read on closed fd: %v, want EBADF", err)
			}
		})
	}
}

func TestConfigValidation(t *testing.T) {
	cases := []Config{{Kind: "spdk"}, {Entries: 3}, {Entries: 1 << 20}, {Workers: -1}}
	for _, c := range cases {
		if e, err := New(c); err == nil {
			e.Close()
			t.Fatalf("New(%+v) accepted a bad config", c)
		}
	}
	e, err := New(Config{})
	if err != nil {
		t.Fatal(err)
	}
	if e.Name() != "io_uring" {
		t.Logf("auto chose %s", e.Name())
	}
	e.Close()
	if err := e.Submit([]*Request{{Op: OpNop}}, func(*Request) {}); !errors.Is(err, ErrClosed) {
		t.Fatalf("submit after close: %v", err)
	}
}

func TestRegisteredFiles(t *testing.T) {
	r, err := NewRing(8)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	fd, _ := directFile(t, 1<<20)
	if err := r.RegisterFiles([]int{fd}); err != nil {
		t.Fatal(err)
	}
	a, _ := Alloc(Alignment)
	defer a.Free()
	copy(a.Bytes(), "registered file")
	if err := r.Do(&Request{Op: OpWrite, Fd: 0, Fixed: true, Buf: a.Bytes(), Off: 8192}); err != nil {
		t.Fatal(err)
	}
	back, _ := Alloc(Alignment)
	defer back.Free()
	if _, err := unix.Pread(fd, back.Bytes(), 8192); err != nil || string(back.Bytes()[:15]) != "registered file" {
		t.Fatalf("pread after a write through registered file 0: %q, %v", back.Bytes()[:15], err)
	}
	// An index past the table fails cleanly.
	if err := r.Do(&Request{Op: OpRead, Fd: 5, Fixed: true, Buf: a.Bytes()}); !errors.Is(err, syscall.EBADF) {
		t.Fatalf("read through an unregistered index: %v, want EBADF", err)
	}
}

// TestSubmitSliceReuse: a caller may reuse its slice of requests as soon as
// Submit returns.
func TestSubmitSliceReuse(t *testing.T) {
	for _, ec := range engines {
		t.Run(ec.name, func(t *testing.T) {
			e := newEngine(t, ec.kind, 16)
			fd, _ := directFile(t, 64*Alignment)
			b, _ := Alloc(64 * Alignment)
			defer b.Free()
			done := make(chan *Request, 64)
			batch := make([]*Request, 0, 8)
			for round := 0; round < 8; round++ {
				batch = batch[:0]
				for i := 0; i < 8; i++ {
					k := round*8 + i
					batch = append(batch, &Request{Op: OpRead, Fd: fd, Buf: b.Bytes()[k*Alignment : (k+1)*Alignment], Off: int64(k * Alignment)})
				}
				if err := e.Submit(batch, func(r *Request) { done <- r }); err != nil {
					t.Fatal(err)
				}
				for i := range batch {
					batch[i] = nil // reuse
				}
			}
			for i := 0; i < 64; i++ {
				if r := <-done; r.Err != nil {
					t.Fatal(r.Err)
				}
			}
		})
	}
}
