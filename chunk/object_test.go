package chunk

import (
	"bytes"
	"fmt"
	"io"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/hcache/hcache/lsm"
)

// memProvider is a test seam: an in-memory object provider standing for a
// remote tier (it holds segment objects in a map and counts its reads).
type memProvider struct {
	name  string
	mu    sync.Mutex
	objs  map[uint32][]byte
	reads atomic.Int64
}

func (p *memProvider) Name() string { return p.name }

func (p *memProvider) OpenForReading(seg uint32) (ObjectReader, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	b, ok := p.objs[seg]
	if !ok {
		return nil, fmt.Errorf("%s: no object for segment %d", p.name, seg)
	}
	return &memObject{p: p, b: b}, nil
}

type memObject struct {
	p *memProvider
	b []byte
}

func (o *memObject) ReadAt(p []byte, off int64) (int, error) {
	o.p.reads.Add(1)
	if off < 0 || off >= int64(len(o.b)) {
		return 0, io.EOF
	}
	n := copy(p, o.b[off:])
	if n < len(p) {
		return n, io.ErrUnexpectedEOF
	}
	return n, nil
}

func (o *memObject) Size() int64  { return int64(len(o.b)) }
func (o *memObject) Close() error { return nil }

// TestRestoreFromObjectProvider: a sealed segment moved to another
// provider (its object in an in-memory provider, its local file gone, the
// index recording the location) serves restores, fsck and deletes through
// the object seam, with no change to the writer, the reader or GC; the
// location survives the segment record being rewritten; a store whose
// index names a location no provider serves is refused at open.
func TestRestoreFromObjectProvider(t *testing.T) {
	ident := testIdentity("m")
	for _, backend := range backends {
		t.Run(backend, func(t *testing.T) {
			e := newEnv(t, backend, func(o *Options) { o.SegmentBytes = 1 << 20; o.GCInterval = -1 })
			s := e.open()
			w, _ := s.Create("ns", "a", ident, CreateOptions{})
			appendPrefill(t, w, ident, "a", 0, 48)
			if err := w.Close(); err != nil {
				t.Fatal(err)
			}
			// Seal segment 1: fill until a second segment exists.
			var fill []string
			for i := 0; len(s.Segments()) < 2; i++ {
				id := fmt.Sprintf("fill%d", i)
				w, _ := s.Create("ns", id, ident, CreateOptions{})
				appendPrefill(t, w, ident, id, 0, 64)
				if err := w.Close(); err != nil {
					t.Fatal(err)
				}
				fill = append(fill, id)
			}
			if seg := chunkOf(t, s, "a", 0).Segment; seg != 1 {
				t.Fatalf("a lives in segment %d, want 1", seg)
			}
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}

			// Move segment 1 to the provider: copy its bytes, record the
			// location in the index, remove the local file.
			mem := &memProvider{name: "mem", objs: map[uint32][]byte{}}
			path := e.fs.PathJoin(e.dir, "segments", segName(1))
			f, err := e.fs.Open(path)
			if err != nil {
				t.Fatal(err)
			}
			mem.objs[1], err = io.ReadAll(f)
			f.Close()
			if err != nil {
				t.Fatal(err)
			}
			db, err := lsm.Open(e.fs, e.fs.PathJoin(e.dir, "index"), lsm.Options{})
			if err != nil {
				t.Fatal(err)
			}
			var rec *lsm.Segment
			db.ScanSegments(func(id uint32, r *lsm.Segment) error {
				if id == 1 {
					rec = r
				}
				return nil
			})
			if rec == nil {
				t.Fatal("segment 1 is not indexed")
			}
			// Segment 2 is the active one: 1 takes no more appends (the
			// index records a seal only when the record is next written).
			rec.Sealed, rec.Location = true, mem.name
			b := db.NewBatch()
			b.PutSegment(1, rec)
			if err := b.Commit(true); err != nil {
				t.Fatal(err)
			}
			db.Close()
			if err := e.fs.Remove(path); err != nil {
				t.Fatal(err)
			}

			// Without the provider the store does not open.
			if _, err := Open(e.opts); err == nil || !strings.Contains(err.Error(), `"mem"`) {
				t.Fatalf("open without the provider: %v, want a refusal naming the location", err)
			}
			e.opts.Providers = []ObjectProvider{mem}
			s = e.open()
			verify(t, s, "ns", "a", ident, 48)
			if mem.reads.Load() == 0 {
				t.Fatal("the restore read nothing through the provider")
			}
			if r := s.Check(nil); !r.OK() {
				t.Fatalf("fsck: %v", r.Errors)
			}
			// Deleting a context with records in segment 1 rewrites its
			// record (live bytes): the location stays.
			if err := s.Delete("ns", fill[0]); err != nil {
				t.Fatal(err)
			}
			if res := s.GC(); res.Err != nil {
				t.Fatalf("GC: %v", res.Err)
			}
			s.Close()
			s = e.open()
			defer s.Close()
			verify(t, s, "ns", "a", ident, 48)
			if _, err := e.fs.Stat(path); err == nil {
				t.Fatal("a local segment 1 appeared")
			}
			if !bytes.Equal(mem.objs[1][:8], []byte("HCSEGMT1")) {
				t.Fatal("the object changed")
			}
		})
	}
}
