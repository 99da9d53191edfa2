package chunk

import (
	"errors"
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hcache/hcache/internal/testseed"
	"github.com/hcache/hcache/lsm"
)

// Each test here is a regression test for a race or hang; run with -race.
// Watchdogs detect hangs (generous, never a speed limit).

func within(t *testing.T, what string, d time.Duration, fn func()) {
	t.Helper()
	done := make(chan struct{})
	go func() { fn(); close(done) }()
	select {
	case <-done:
	case <-time.After(d):
		t.Fatalf("%s did not return within %v (hang)", what, d)
	}
}

// TestEvictionRacesRestore: eviction ranks contexts by last use while
// restores update it (the race detector flagged the unlocked read).
func TestEvictionRacesRestore(t *testing.T) {
	seed := testseed.Seed(t)
	rng := rand.New(rand.NewSource(seed))
	ident := testIdentity("m")
	e := newEnv(t, "mem", func(o *Options) { o.CapacityBytes = 6 * 2 * (4096 + 3*16*256) })
	s := e.open()
	defer s.Close()
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			id := fmt.Sprintf("c%d", rng.Intn(40))
			_, err := s.Restore("ns", id, ident, func(int, []byte) error { return nil })
			if err != nil && !errors.Is(err, ErrNotFound) {
				t.Errorf("restore %s: %v", id, err)
				return
			}
		}
	}()
	go func() {
		defer wg.Done()
		defer close(stop)
		for i := 0; i < 40; i++ {
			id := fmt.Sprintf("c%d", i)
			w, err := s.Create("ns", id, ident, CreateOptions{})
			if err != nil {
				t.Errorf("create: %v", err)
				return
			}
			appendPrefill(t, w, ident, id, 0, 20)
			if err := w.Close(); err != nil {
				t.Errorf("close %s: %v", id, err)
				return
			}
		}
	}()
	within(t, "eviction under restores", 60*time.Second, wg.Wait)
	if n := len(s.Contexts()); n >= 40 || n == 0 {
		t.Fatalf("%d contexts left of 40: eviction did not run", n)
	}
}

// TestCloseWaitsForRestore: Close returns only after a restore in flight
// finished with the files it reads; the restore stops at its next layer.
func TestCloseWaitsForRestore(t *testing.T) {
	for _, backend := range backends {
		t.Run(backend, func(t *testing.T) {
			ident := testIdentity("m")
			e := newEnv(t, backend, nil)
			s := e.open()
			w, _ := s.Create("ns", "c", ident, CreateOptions{})
			appendPrefill(t, w, ident, "c", 0, 40)
			if err := w.Close(); err != nil {
				t.Fatal(err)
			}
			inside, release := make(chan struct{}), make(chan struct{})
			restored := make(chan error, 1)
			layers := 0
			go func() {
				_, err := s.Restore("ns", "c", ident, func(layer int, rows []byte) error {
					layers++
					if layers == 1 {
						close(inside)
						<-release
					}
					if !equalBytes(rows, expectLayer("c", layer, 40, int(ident.Plan[layer].RowBytes))) {
						return fmt.Errorf("layer %d rows differ", layer)
					}
					return nil
				})
				restored <- err
			}()
			<-inside
			closed := make(chan error, 1)
			go func() { closed <- s.Close() }()
			select {
			case <-closed:
				t.Fatal("Close returned while a restore was inside its callback")
			case <-time.After(100 * time.Millisecond):
			}
			close(release)
			within(t, "Close after the restore", 30*time.Second, func() {
				if err := <-closed; err != nil {
					t.Errorf("Close: %v", err)
				}
			})
			if err := <-restored; err != nil && !errors.Is(err, ErrClosed) {
				t.Fatalf("restore during Close: %v (want nil or ErrClosed)", err)
			}
			if layers != 1 {
				t.Fatalf("the restore went on for %d layers after Close began", layers)
			}
		})
	}
}

func equalBytes(a, b []byte) bool { return string(a) == string(b) }

// TestSubmitRacesClose: writers flushing and deleting while the store
// closes all return (nil or ErrClosed), none hangs on an op the stopped
// flusher never answers.
func TestSubmitRacesClose(t *testing.T) {
	for round := 0; round < 20; round++ {
		ident := testIdentity("m")
		e := newEnv(t, "mem", nil)
		s := e.open()
		var wg sync.WaitGroup
		for g := 0; g < 4; g++ {
			wg.Add(1)
			go func(g int) {
				defer wg.Done()
				for i := 0; ; i++ {
					id := fmt.Sprintf("g%d-%d", g, i)
					w, err := s.Create("ns", id, ident, CreateOptions{})
					if err != nil {
						if !errors.Is(err, ErrClosed) {
							t.Errorf("create: %v", err)
						}
						return
					}
					rows := make([][]byte, len(ident.Plan))
					for l, p := range ident.Plan {
						rows[l] = make([]byte, p.RowBytes)
					}
					for k := 0; k < 20; k++ {
						if err := w.AppendToken(rows); err != nil {
							break
						}
					}
					if err := w.Flush(); err != nil && !errors.Is(err, ErrClosed) {
						t.Errorf("flush: %v", err)
					}
					if err := s.Delete("ns", id); err != nil && !errors.Is(err, ErrClosed) && !errors.Is(err, ErrNotFound) {
						t.Errorf("delete: %v", err)
					}
				}
			}(g)
		}
		time.Sleep(time.Duration(round) * time.Millisecond)
		within(t, "Close with submitters racing it", 30*time.Second, func() { s.Close() })
		within(t, "submitters after Close", 30*time.Second, wg.Wait)
	}
}

// TestGCUnreadableHeaderMarksDamaged: GC meets a record whose header does
// not decode; the context is marked damaged durably (in GC's own batch: GC
// runs on the flusher, which used to submit the mark to itself) and the
// other contexts move intact.
func TestGCUnreadableHeaderMarksDamaged(t *testing.T) {
	ident := testIdentity("m")
	e := newEnv(t, "disk", func(o *Options) { o.SegmentBytes = 1 << 20; o.GCInterval = -1 })
	s := e.open()
	for _, id := range []string{"keep", "victim", "gone"} {
		w, _ := s.Create("ns", id, ident, CreateOptions{})
		appendPrefill(t, w, ident, id, 0, 48)
		if err := w.Close(); err != nil {
			t.Fatal(err)
		}
	}
	victim := chunkOf(t, s, "victim", 1)
	// Seal the first segment: fill until a second one exists.
	for i := 0; len(s.Segments()) < 2; i++ {
		id := fmt.Sprintf("fill%d", i)
		w, _ := s.Create("ns", id, ident, CreateOptions{})
		appendPrefill(t, w, ident, id, 0, 64)
		w.Close()
		s.Delete("ns", id)
	}
	if err := s.Delete("ns", "gone"); err != nil {
		t.Fatal(err)
	}
	// Zero the victim's record header and flip a byte in one of its
	// slices: GC can neither read the header nor rebuild it from the index.
	f, _ := os.OpenFile(filepath.Join(e.dir, "segments", segName(victim.Segment)), os.O_RDWR, 0)
	f.WriteAt(make([]byte, 64), int64(victim.Offset))
	f.WriteAt([]byte{0xff, 0x00, 0xff}, int64(victim.Offset)+int64(victim.Slices[1].Off)+5)
	f.Close()
	// Another context's header alone is zeroed: GC rebuilds it from the
	// index (its slices verify) and the context survives.
	rebuilt := chunkOf(t, s, "keep", 0)
	f, _ = os.OpenFile(filepath.Join(e.dir, "segments", segName(rebuilt.Segment)), os.O_RDWR, 0)
	f.WriteAt(make([]byte, 64), int64(rebuilt.Offset))
	f.Close()
	var res GCResult
	within(t, "GC", 30*time.Second, func() { res = s.GC() })
	if res.Err != nil || res.Segments == 0 {
		t.Fatalf("GC: %+v", res)
	}
	if _, err := s.Restore("ns", "victim", ident, func(int, []byte) error { return nil }); !errors.Is(err, ErrDamaged) {
		t.Fatalf("victim after GC: %v, want ErrDamaged", err)
	}
	verify(t, s, "ns", "keep", ident, 48)
	s.Close()
	s = e.open()
	defer s.Close()
	if _, err := s.Restore("ns", "victim", ident, func(int, []byte) error { return nil }); !errors.Is(err, ErrDamaged) {
		t.Fatalf("victim after reopen: %v, want ErrDamaged (the mark is durable)", err)
	}
	verify(t, s, "ns", "keep", ident, 48)
	// With the damaged context gone, fsck finds the rebuilt header sound.
	if err := s.Delete("ns", "victim"); err != nil {
		t.Fatal(err)
	}
	if r := s.Check(nil); !r.OK() {
		t.Fatalf("fsck after GC rebuilt a header: %v", r.Errors)
	}
}

// TestIndexReadErrorIsNotCorruption: an index read that fails during a
// restore's snapshot marks the context damaged only when what it read is
// corrupt; an I/O error (or a failed index) fails that restore and the
// context restores once the fault clears.
func TestIndexReadErrorIsNotCorruption(t *testing.T) {
	ident := testIdentity("m")
	cases := []struct {
		name    string
		fault   error
		damaged bool
	}{
		{"EIO", fmt.Errorf("pebble: read 000005.sst: %w", syscall.EIO), false},
		{"failed index", fmt.Errorf("%w: MANIFEST sync failed", lsm.ErrFatal), false},
		{"corrupt index record", fmt.Errorf("%w: chunk record checksum", lsm.ErrCorrupt), true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			e := newEnv(t, "mem", func(o *Options) { o.GCInterval = -1 })
			s := e.open()
			defer s.Close()
			w, _ := s.Create("ns", "c", ident, CreateOptions{})
			appendPrefill(t, w, ident, "c", 0, 40)
			if err := w.Close(); err != nil {
				t.Fatal(err)
			}
			s.snapFault = func() error { return c.fault }
			if _, err := s.Restore("ns", "c", ident, func(int, []byte) error { return nil }); !errors.Is(err, c.fault) {
				t.Fatalf("restore under the fault: %v, want it", err)
			}
			s.snapFault = nil
			if got := s.Contexts()[0].Damaged; got != c.damaged {
				t.Fatalf("damaged = %v after %v, want %v", got, c.fault, c.damaged)
			}
			if !c.damaged {
				verify(t, s, "ns", "c", ident, 40)
			}
		})
	}
}

// TestDeleteDuringRestoreScan: a context deleted after a restore looked it
// up but before it scanned its chunk keys is gone (ErrNotFound), not
// corrupt, and nothing is marked damaged. (Eviction racing restores hit
// this as "index holds 0 tokens".)
func TestDeleteDuringRestoreScan(t *testing.T) {
	e := newEnv(t, "disk", nil)
	s := e.open()
	defer s.Close()
	ident := testIdentity("m")
	createFilled(t, s, ident, "c", 20)
	s.snapFault = func() error {
		s.snapFault = nil
		return s.Delete("ns", "c")
	}
	_, err := s.Restore("ns", "c", ident, func(int, []byte) error { return nil })
	if !errors.Is(err, ErrNotFound) {
		t.Fatalf("restore of a context deleted before its scan: %v, want ErrNotFound", err)
	}
	if d := s.Stats().Damaged; d != 0 {
		t.Fatalf("%d contexts marked damaged", d)
	}
}
