package chunk

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand"
	randv2 "math/rand/v2"
	"sync"
	"testing"
	"time"
	"unsafe"

	"github.com/cockroachdb/pebble/v2/vfs"

	"github.com/hcache/hcache/internal/rows"
	"github.com/hcache/hcache/internal/testseed"
)

// backends runs each test on the crashable in-memory FS and on real files
// (O_DIRECT through io_uring).
var backends = []string{"mem", "disk"}

type env struct {
	t    *testing.T
	fs   vfs.FS
	dir  string
	opts Options
}

func newEnv(t *testing.T, backend string, mod func(*Options)) *env {
	t.Helper()
	e := &env{t: t}
	if backend == "mem" {
		e.fs, e.dir = vfs.NewCrashableMem(), "/store"
	} else {
		e.fs, e.dir = vfs.Default, t.TempDir()
	}
	e.opts = Options{FS: e.fs, Dir: e.dir, ChunkTokens: 16, SegmentBytes: 4 << 20, CacheBytes: 0, Logf: t.Logf}
	if mod != nil {
		mod(&e.opts)
	}
	return e
}

func (e *env) open() *Store {
	e.t.Helper()
	s, err := Open(e.opts)
	if err != nil {
		e.t.Fatalf("Open: %v", err)
	}
	return s
}

// testIdentity: layers alternate hidden (64 fp16 = 128 bytes) and KV rows;
// layer 2 stores nothing.
func testIdentity(model string) *Identity {
	return &Identity{Model: []byte(model), Plan: []LayerPlan{
		{Kind: LayerHidden, RowBytes: 128}, {Kind: LayerKV, RowBytes: 256}, {Kind: LayerNone, RowBytes: 0}, {Kind: LayerHidden, RowBytes: 128},
	}}
}

// row returns the deterministic row of (ctx, layer, token).
func row(ctx string, layer, token, n int) []byte { return rows.Row(ctx, layer, token, n) }

// expectLayer is the rows of tokens [0, n) of a layer.
func expectLayer(ctx string, layer, n, rb int) []byte {
	var out []byte
	for t := 0; t < n; t++ {
		out = append(out, row(ctx, layer, t, rb)...)
	}
	return out
}

// appendTokens appends tokens [from, to) decode-style.
func appendTokens(t *testing.T, w *Writer, ident *Identity, ctx string, from, to int) {
	t.Helper()
	for tok := from; tok < to; tok++ {
		rows := make([][]byte, len(ident.Plan))
		for l, p := range ident.Plan {
			if p.Kind != LayerNone {
				rows[l] = row(ctx, l, tok, int(p.RowBytes))
			}
		}
		if err := w.AppendToken(rows); err != nil {
			t.Fatalf("AppendToken %s token %d: %v", ctx, tok, err)
		}
	}
}

// appendPrefill appends tokens [from, to) layer by layer.
func appendPrefill(t *testing.T, w *Writer, ident *Identity, ctx string, from, to int) {
	t.Helper()
	for l, p := range ident.Plan {
		if p.Kind == LayerNone {
			continue
		}
		var rows []byte
		for tok := from; tok < to; tok++ {
			rows = append(rows, row(ctx, l, tok, int(p.RowBytes))...)
		}
		if err := w.AppendLayer(l, rows); err != nil {
			t.Fatalf("AppendLayer %s layer %d: %v", ctx, l, err)
		}
	}
}

// verify restores ctx and checks it holds exactly tokens tokens of its rows.
func verify(t *testing.T, s *Store, ns, ctx string, ident *Identity, tokens int) {
	t.Helper()
	seen := map[int]bool{}
	n, err := s.Restore(ns, ctx, ident, func(layer int, rows []byte) error {
		seen[layer] = true
		rb := int(ident.Plan[layer].RowBytes)
		if want := expectLayer(ctx, layer, tokens, rb); !bytes.Equal(rows, want) {
			return fmt.Errorf("layer %d: restored %d bytes differ from the %d appended", layer, len(rows), len(want))
		}
		return nil
	})
	if err != nil {
		t.Fatalf("Restore %s/%s: %v", ns, ctx, err)
	}
	if n != tokens {
		t.Fatalf("Restore %s/%s: %d tokens, want %d", ns, ctx, n, tokens)
	}
	for l, p := range ident.Plan {
		if (p.Kind != LayerNone) != seen[l] {
			t.Fatalf("Restore %s/%s: layer %d (%s) delivered = %v", ns, ctx, l, p.Kind, seen[l])
		}
	}
}

func TestRoundTripProducers(t *testing.T) {
	for _, backend := range backends {
		for _, comp := range []string{"none", "lz4"} {
			t.Run(backend+"/"+comp, func(t *testing.T) {
				e := newEnv(t, backend, func(o *Options) { o.Compression = comp })
				s := e.open()
				defer s.Close()
				ident := testIdentity("m1")
				cases := []struct {
					name    string
					prefill int // tokens appended layer by layer first
					decode  int // then token by token
				}{
					{"empty", 0, 0}, {"one", 0, 1}, {"partial", 5, 0}, {"exact", 16, 0},
					{"prefill+decode", 40, 9}, {"decode-only", 0, 33}, {"long", 100, 28},
				}
				writers := map[string]*Writer{}
				for _, c := range cases {
					w, err := s.Create("ns", c.name, ident, CreateOptions{})
					if err != nil {
						t.Fatal(err)
					}
					writers[c.name] = w
					appendPrefill(t, w, ident, c.name, 0, c.prefill)
				}
				// Decode steps interleaved across contexts.
				for step := 0; ; step++ {
					any := false
					for _, c := range cases {
						if step < c.decode {
							appendTokens(t, writers[c.name], ident, c.name, c.prefill+step, c.prefill+step+1)
							any = true
						}
					}
					if !any {
						break
					}
				}
				for _, c := range cases {
					if err := writers[c.name].Close(); err != nil {
						t.Fatalf("%s: Close: %v", c.name, err)
					}
				}
				for _, c := range cases {
					verify(t, s, "ns", c.name, ident, c.prefill+c.decode)
				}
				if r := s.Check(nil); !r.OK() {
					t.Fatalf("fsck: %v", r.Errors)
				}
				// Reopen after a clean close: everything is still there.
				s.Close()
				s = e.open()
				for _, c := range cases {
					verify(t, s, "ns", c.name, ident, c.prefill+c.decode)
				}
			})
		}
	}
}

func TestAppendContinuesPartialTail(t *testing.T) {
	for _, backend := range backends {
		t.Run(backend, func(t *testing.T) {
			e := newEnv(t, backend, nil)
			s := e.open()
			defer s.Close()
			ident := testIdentity("m")
			w, _ := s.Create("ns", "c", ident, CreateOptions{})
			appendPrefill(t, w, ident, "c", 0, 21)
			if err := w.Close(); err != nil {
				t.Fatal(err)
			}
			for turn := 0; turn < 3; turn++ {
				w, err := s.Append("ns", "c", ident)
				if err != nil {
					t.Fatal(err)
				}
				from := w.Tokens()
				appendTokens(t, w, ident, "c", from, from+7)
				if err := w.Close(); err != nil {
					t.Fatal(err)
				}
				verify(t, s, "ns", "c", ident, from+7)
			}
			if _, err := s.Append("ns", "c", testIdentity("other")); !errors.Is(err, ErrIdentityMismatch) {
				t.Fatalf("Append with another identity: %v", err)
			}
			if r := s.Check(nil); !r.OK() {
				t.Fatalf("fsck: %v", r.Errors)
			}
		})
	}
}

func TestIdentityMismatchRefused(t *testing.T) {
	e := newEnv(t, "mem", nil)
	s := e.open()
	defer s.Close()
	ident := testIdentity("llama")
	w, _ := s.Create("tenant-a", "c", ident, CreateOptions{})
	appendTokens(t, w, ident, "c", 0, 20)
	w.Close()
	other := testIdentity("llama")
	other.Plan[0].Kind = LayerKV
	cases := []struct {
		name  string
		ns    string
		ident *Identity
		want  error
	}{
		{"model", "tenant-a", testIdentity("llama-other-weights"), ErrIdentityMismatch},
		{"plan", "tenant-a", other, ErrIdentityMismatch},
		{"namespace", "tenant-b", ident, ErrNotFound},
	}
	for _, c := range cases {
		called := false
		_, err := s.Restore(c.ns, "c", c.ident, func(int, []byte) error { called = true; return nil })
		if !errors.Is(err, c.want) || called {
			t.Fatalf("%s: err %v (want %v), consumer called %v", c.name, err, c.want, called)
		}
	}
	verify(t, s, "tenant-a", "c", ident, 20)
}

func TestBadInputErrors(t *testing.T) {
	e := newEnv(t, "mem", nil)
	s := e.open()
	defer s.Close()
	ident := testIdentity("m")
	w, err := s.Create("ns", "c", ident, CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name string
		err  error
	}{
		{"short row", w.AppendToken([][]byte{make([]byte, 127), make([]byte, 256), nil, make([]byte, 128)})},
		{"missing layers", w.AppendToken([][]byte{make([]byte, 128)})},
		{"ragged prefill", w.AppendLayer(0, make([]byte, 129))},
		{"layer out of range", w.AppendLayer(9, make([]byte, 128))},
		{"layer stores nothing", w.AppendLayer(2, make([]byte, 128))},
	}
	for _, c := range cases {
		if c.err == nil {
			t.Fatalf("%s: accepted", c.name)
		}
	}
	if !errors.Is(cases[0].err, ErrRowSize) {
		t.Fatalf("short row: %v, want ErrRowSize", cases[0].err)
	}
	if _, err := s.Create("ns", "c", ident, CreateOptions{}); !errors.Is(err, ErrExists) {
		t.Fatalf("duplicate create: %v", err)
	}
	for _, bad := range []struct{ ns, id string }{{"", "x"}, {"ns", ""}, {"n\x00s", "x"}} {
		if _, err := s.Create(bad.ns, bad.id, ident, CreateOptions{}); err == nil {
			t.Fatalf("Create(%q, %q) accepted", bad.ns, bad.id)
		}
	}
	if _, err := s.Create("ns", "d", &Identity{Model: []byte("m"), Plan: []LayerPlan{{Kind: LayerHidden, RowBytes: 3}}}, CreateOptions{}); !errors.Is(err, ErrIdentity) {
		t.Fatalf("odd row bytes: %v", err)
	}
	w.Close()
	// Reopening with another chunk size is refused.
	s.Close()
	e.opts.ChunkTokens = 32
	if _, err := Open(e.opts); err == nil {
		t.Fatal("reopen with another ChunkTokens succeeded")
	}
}

func TestChecksumFailureOnFlippedByte(t *testing.T) {
	e := newEnv(t, "mem", nil)
	s := e.open()
	ident := testIdentity("m")
	for _, id := range []string{"victim", "bystander"} {
		w, _ := s.Create("ns", id, ident, CreateOptions{})
		appendTokens(t, w, ident, id, 0, 40)
		if err := w.Close(); err != nil {
			t.Fatal(err)
		}
	}
	// Find the victim's group 1, layer 3 slice and flip one byte in it.
	s.mu.Lock()
	c := s.ctxs[ctxMapKey("ns", "victim")]
	s.mu.Unlock()
	sn, err := s.snap(c)
	if err != nil {
		t.Fatal(err)
	}
	s.mu.Lock()
	s.unref(sn.segs)
	s.mu.Unlock()
	ch := sn.chunks[1]
	sl := ch.Slices[2] // layer 3
	f, err := e.fs.OpenReadWrite(e.fs.PathJoin(e.dir, "segments", segName(ch.Segment)), vfs.WriteCategoryUnspecified)
	if err != nil {
		t.Fatal(err)
	}
	pos := int64(ch.Offset) + int64(sl.Off) + 77
	b := []byte{0}
	f.ReadAt(b, pos)
	b[0] ^= 0x10
	f.WriteAt(b, pos)
	f.Close()
	delivered := []int{}
	_, err = s.Restore("ns", "victim", ident, func(layer int, rows []byte) error {
		delivered = append(delivered, layer)
		return nil
	})
	if !errors.Is(err, ErrCorrupt) {
		t.Fatalf("restore of flipped data: %v, want ErrCorrupt", err)
	}
	for _, want := range []string{"victim", "layer 3", "group 1"} {
		if !bytes.Contains([]byte(err.Error()), []byte(want)) {
			t.Fatalf("error %q does not name %q", err, want)
		}
	}
	for _, l := range delivered {
		if l == 3 {
			t.Fatal("the corrupt layer was handed to the consumer")
		}
	}
	// Marked damaged, refused from now on; the bystander is unaffected.
	if _, err := s.Restore("ns", "victim", ident, func(int, []byte) error { return nil }); !errors.Is(err, ErrDamaged) {
		t.Fatalf("second restore: %v, want ErrDamaged", err)
	}
	verify(t, s, "ns", "bystander", ident, 40)
	if r := s.Check(nil); r.OK() {
		t.Fatal("fsck found nothing wrong with a flipped byte")
	}
	s.Close()
	// Still damaged after reopen.
	s = e.open()
	defer s.Close()
	if _, err := s.Restore("ns", "victim", ident, func(int, []byte) error { return nil }); !errors.Is(err, ErrDamaged) {
		t.Fatalf("restore after reopen: %v, want ErrDamaged", err)
	}
}

func TestEvictionOrder(t *testing.T) {
	e := newEnv(t, "mem", nil)
	var mu sync.Mutex
	var evicted []string
	e.opts.OnEvict = func(ns, id string) { mu.Lock(); evicted = append(evicted, id); mu.Unlock() }
	// Each context below takes one 16-token group record: header + 4
	// slices of 16 rows, padded (4096 + 2048->4096 + 4096 + 0 + 4096).
	ident := testIdentity("m")
	w0 := newEnv(t, "mem", nil).open()
	probe, _ := w0.Create("ns", "probe", ident, CreateOptions{})
	appendTokens(t, probe, ident, "probe", 0, 16)
	probe.Close()
	recBytes := w0.Contexts()[0].LiveBytes
	w0.Close()
	e.opts.CapacityBytes = 3 * recBytes
	s := e.open()
	defer s.Close()
	mk := func(id string, pinned bool) {
		w, err := s.Create("ns", id, ident, CreateOptions{Pinned: pinned})
		if err != nil {
			t.Fatal(err)
		}
		appendTokens(t, w, ident, id, 0, 16)
		if err := w.Close(); err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Millisecond) // distinct last-use times
	}
	mk("a", true) // pinned: never evicted
	mk("b", false)
	mk("c", false)
	verify(t, s, "ns", "b", ident, 16) // b is now more recent than c
	mk("d", false)                     // over capacity: c goes
	mk("e", false)                     // then b
	// Eviction runs after the commit answers its waiters: wait for it.
	var got string
	for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
		mu.Lock()
		got = fmt.Sprint(evicted)
		mu.Unlock()
		if len(got) >= len("[c b]") {
			break
		}
	}
	if got != "[c b]" {
		t.Fatalf("evicted %s, want [c b]", got)
	}
	for _, id := range []string{"a", "d", "e"} {
		verify(t, s, "ns", id, ident, 16)
	}
	if _, err := s.Restore("ns", "c", ident, func(int, []byte) error { return nil }); !errors.Is(err, ErrNotFound) {
		t.Fatalf("evicted context: %v", err)
	}
	if r := s.Check(nil); !r.OK() {
		t.Fatalf("fsck: %v", r.Errors)
	}
}

func TestGCUnderConcurrentReads(t *testing.T) {
	for _, backend := range backends {
		t.Run(backend, func(t *testing.T) {
			e := newEnv(t, backend, func(o *Options) { o.SegmentBytes = 1 << 20 })
			s := e.open()
			defer s.Close()
			ident := testIdentity("m")
			const n = 24
			for i := 0; i < n; i++ {
				id := fmt.Sprint("c", i)
				w, _ := s.Create("ns", id, ident, CreateOptions{})
				appendPrefill(t, w, ident, id, 0, 48)
				if err := w.Close(); err != nil {
					t.Fatal(err)
				}
			}
			// Delete two thirds: early segments become mostly dead.
			for i := 0; i < n; i++ {
				if i%3 != 0 {
					if err := s.Delete("ns", fmt.Sprint("c", i)); err != nil {
						t.Fatal(err)
					}
				}
			}
			before := len(s.Segments())
			stop := make(chan struct{})
			errs := make(chan error, 4)
			var wg sync.WaitGroup
			for r := 0; r < 3; r++ {
				wg.Add(1)
				go func(r int) {
					defer wg.Done()
					for k := 0; ; k++ {
						select {
						case <-stop:
							return
						default:
						}
						i := 3 * ((k + r) % (n / 3))
						id := fmt.Sprint("c", i)
						_, err := s.Restore("ns", id, ident, func(layer int, rows []byte) error {
							if !bytes.Equal(rows, expectLayer(id, layer, 48, int(ident.Plan[layer].RowBytes))) {
								return fmt.Errorf("%s layer %d differs during GC", id, layer)
							}
							return nil
						})
						if err != nil {
							errs <- err
							return
						}
					}
				}(r)
			}
			res := s.GC()
			close(stop)
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Fatal(err)
			}
			if res.Err != nil || res.Segments == 0 {
				t.Fatalf("GC: %+v (segments before: %d)", res, before)
			}
			if after := len(s.Segments()); after >= before {
				t.Fatalf("GC left %d segments of %d", after, before)
			}
			if r := s.Check(nil); !r.OK() {
				t.Fatalf("fsck after GC: %v", r.Errors)
			}
			s.Close()
			s = e.open()
			for i := 0; i < n; i += 3 {
				verify(t, s, "ns", fmt.Sprint("c", i), ident, 48)
			}
		})
	}
}

func TestCrashKeepsAcknowledged(t *testing.T) {
	seed := testseed.Seed(t)
	rng := rand.New(rand.NewSource(seed))
	crashRNG := randv2.New(randv2.NewPCG(uint64(seed), 1))
	fs := vfs.NewCrashableMem()
	opts := Options{FS: fs, Dir: "/s", ChunkTokens: 8, SegmentBytes: 1 << 20, Logf: t.Logf}
	s, err := Open(opts)
	if err != nil {
		t.Fatal(err)
	}
	ident := testIdentity("m")
	acked := map[string]int{}
	appended := map[string]int{}
	writers := map[string]*Writer{}
	for step := 0; step < 60; step++ {
		id := fmt.Sprint("c", rng.Intn(6))
		w := writers[id]
		if w == nil {
			if _, ok := appended[id]; ok {
				w, err = s.Append("ns", id, ident)
			} else {
				w, err = s.Create("ns", id, ident, CreateOptions{})
			}
			if err != nil {
				t.Fatal(err)
			}
			writers[id] = w
		}
		n := 1 + rng.Intn(20)
		appendTokens(t, w, ident, id, appended[id], appended[id]+n)
		appended[id] += n
		if rng.Intn(3) == 0 {
			if err := w.Flush(); err != nil {
				t.Fatal(err)
			}
			acked[id] = appended[id]
		}
		if rng.Intn(4) == 0 {
			// Crash now: keep a random part of unsynced data.
			clone := fs.CrashClone(vfs.CrashCloneCfg{UnsyncedDataPercent: rng.Intn(100), RNG: crashRNG})
			o := opts
			o.FS = clone
			s2, err := Open(o)
			if err != nil {
				t.Fatalf("step %d: open after crash: %v", step, err)
			}
			for id, want := range acked {
				got, err := s2.Restore("ns", id, ident, func(layer int, rows []byte) error {
					n := len(rows) / int(ident.Plan[layer].RowBytes)
					if n < want || n > appended[id] {
						return fmt.Errorf("%d tokens: want between %d and %d", n, want, appended[id])
					}
					if !bytes.Equal(rows, expectLayer(id, layer, n, int(ident.Plan[layer].RowBytes))) {
						return fmt.Errorf("layer %d torn", layer)
					}
					return nil
				})
				if err != nil || got < want {
					t.Fatalf("step %d: acknowledged %s (%d tokens) after crash: %d, %v", step, id, want, got, err)
				}
			}
			if r := s2.Check(nil); !r.OK() {
				t.Fatalf("step %d: fsck after crash: %v", step, r.Errors)
			}
			s2.Close()
		}
	}
	for _, w := range writers {
		w.Close()
	}
	s.Close()
}

// TestConcurrentWritersAndReaders: many goroutines, each with its own
// contexts, append both ways, flush, restore and delete at once (run under
// -race), and a store closed under an open writer refuses it cleanly.
func TestConcurrentWritersAndReaders(t *testing.T) {
	for _, backend := range backends {
		t.Run(backend, func(t *testing.T) {
			seed := testseed.Seed(t)
			e := newEnv(t, backend, func(o *Options) { o.SegmentBytes = 1 << 20; o.CacheBytes = 1 << 20 })
			s := e.open()
			ident := testIdentity("m")
			var wg sync.WaitGroup
			errs := make(chan error, 8)
			for g := 0; g < 8; g++ {
				wg.Add(1)
				go func(g int) {
					defer wg.Done()
					rng := rand.New(rand.NewSource(seed + int64(g)))
					for k := 0; k < 4; k++ {
						id := fmt.Sprintf("g%d-%d", g, k)
						w, err := s.Create("ns", id, ident, CreateOptions{})
						if err != nil {
							errs <- err
							return
						}
						n := 0
						for step := 0; step < 6; step++ {
							m := 1 + rng.Intn(20)
							if rng.Intn(2) == 0 {
								appendTokens(t, w, ident, id, n, n+m)
							} else {
								appendPrefill(t, w, ident, id, n, n+m)
							}
							n += m
							if err := w.Flush(); err != nil {
								errs <- err
								return
							}
							if _, err := s.Restore("ns", id, ident, func(layer int, rows []byte) error {
								if !bytes.Equal(rows, expectLayer(id, layer, n, int(ident.Plan[layer].RowBytes))) {
									return fmt.Errorf("%s layer %d differs", id, layer)
								}
								return nil
							}); err != nil {
								errs <- err
								return
							}
						}
						if err := w.Close(); err != nil {
							errs <- err
							return
						}
						if k%2 == 1 {
							if err := s.Delete("ns", id); err != nil {
								errs <- err
								return
							}
						}
					}
				}(g)
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Fatal(err)
			}
			if r := s.Check(nil); !r.OK() {
				t.Fatal(r.Errors)
			}
			// A writer left open when the store closes fails afterwards.
			w, _ := s.Create("ns", "left-open", ident, CreateOptions{})
			appendTokens(t, w, ident, "left-open", 0, 70)
			s.Close()
			if err := w.AppendToken(make([][]byte, len(ident.Plan))); !errors.Is(err, ErrClosed) {
				t.Fatalf("append after store close: %v", err)
			}
			if err := w.Close(); !errors.Is(err, ErrClosed) {
				t.Fatalf("writer close after store close: %v", err)
			}
		})
	}
}

// TestReadBufferHooks: every buffer Restore hands rows over in was
// registered (as a GPU backend pins them), and each is unregistered once.
func TestReadBufferHooks(t *testing.T) {
	var mu sync.Mutex
	registered := map[*byte]int{}
	e := newEnv(t, "disk", func(o *Options) {
		o.ReadBuffers = BufferHooks{
			Register: func(m []byte) error {
				mu.Lock()
				registered[&m[0]] = len(m)
				mu.Unlock()
				return nil
			},
			Unregister: func(m []byte) {
				mu.Lock()
				if _, ok := registered[&m[0]]; !ok {
					t.Errorf("unregister of a buffer never registered")
				}
				delete(registered, &m[0])
				mu.Unlock()
			},
		}
	})
	s := e.open()
	ident := testIdentity("m")
	w, _ := s.Create("ns", "c", ident, CreateOptions{})
	appendTokens(t, w, ident, "c", 0, 50)
	w.Close()
	inside := func(rows []byte) bool {
		mu.Lock()
		defer mu.Unlock()
		p := uintptr(unsafe.Pointer(&rows[0]))
		for start, n := range registered {
			if a := uintptr(unsafe.Pointer(start)); p >= a && p+uintptr(len(rows)) <= a+uintptr(n) {
				return true
			}
		}
		return false
	}
	for i := 0; i < 3; i++ {
		if _, err := s.Restore("ns", "c", ident, func(layer int, rows []byte) error {
			if !inside(rows) {
				return fmt.Errorf("layer %d handed over outside a registered buffer", layer)
			}
			return nil
		}); err != nil {
			t.Fatal(err)
		}
	}
	s.Close()
	if len(registered) != 0 {
		t.Fatalf("%d buffers still registered after Close", len(registered))
	}
}

// TestBackgroundGC: with GCInterval set, mostly dead segments are compacted
// without anyone calling GC, and everything live still restores.
func TestBackgroundGC(t *testing.T) {
	e := newEnv(t, "mem", func(o *Options) { o.SegmentBytes = 1 << 20; o.GCInterval = 5 * time.Millisecond })
	s := e.open()
	defer func() { s.Close() }()
	ident := testIdentity("m")
	for i := 0; i < 24; i++ {
		id := fmt.Sprint("c", i)
		w, _ := s.Create("ns", id, ident, CreateOptions{})
		appendPrefill(t, w, ident, id, 0, 48)
		if err := w.Close(); err != nil {
			t.Fatal(err)
		}
	}
	before := len(s.Segments())
	for i := 0; i < 24; i++ {
		if i%4 != 0 {
			s.Delete("ns", fmt.Sprint("c", i))
		}
	}
	deadline := time.Now().Add(20 * time.Second)
	for s.Stats().GCRuns == 0 {
		if time.Now().After(deadline) {
			t.Fatalf("no background GC ran (%d segments)", before)
		}
		time.Sleep(5 * time.Millisecond)
	}
	for i := 0; i < 24; i += 4 {
		verify(t, s, "ns", fmt.Sprint("c", i), ident, 48)
	}
	// fsck wants a still store: reopen with GC off.
	s.Close()
	e.opts.GCInterval = -1
	s = e.open()
	if r := s.Check(nil); !r.OK() {
		t.Fatal(r.Errors)
	}
}

// TestPinSurvivesReopenAndEviction: Pin exempts a context from eviction,
// durably; unpinning makes it evictable again.
func TestPinSurvivesReopenAndEviction(t *testing.T) {
	e := newEnv(t, "mem", nil)
	s := e.open()
	ident := testIdentity("m")
	w, _ := s.Create("ns", "keep", ident, CreateOptions{})
	appendTokens(t, w, ident, "keep", 0, 16)
	w.Close()
	if err := s.Pin("ns", "keep", true); err != nil {
		t.Fatal(err)
	}
	if err := s.Pin("ns", "missing", true); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Pin of a missing context: %v", err)
	}
	s.Close()
	s = e.open()
	defer func() { s.Close() }()
	if c := s.Contexts(); len(c) != 1 || !c[0].Pinned {
		t.Fatalf("after reopen: %+v", c)
	}
	// Capacity below one context: only the pinned one is left, and it stays.
	s.Close()
	e.opts.CapacityBytes = 1
	s = e.open()
	w, _ = s.Create("ns", "other", ident, CreateOptions{})
	appendTokens(t, w, ident, "other", 0, 16)
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	// Eviction runs after a commit and spares contexts with an open writer.
	third, _ := s.Create("ns", "third", ident, CreateOptions{})
	appendTokens(t, third, ident, "third", 0, 16)
	if err := third.Flush(); err != nil {
		t.Fatal(err)
	}
	ids := []string{}
	for _, c := range s.Contexts() {
		ids = append(ids, c.ID)
	}
	if fmt.Sprint(ids) != "[keep third]" {
		t.Fatalf("contexts after eviction: %v, want [keep third]", ids)
	}
	verify(t, s, "ns", "keep", ident, 16)
	third.Close()
}
