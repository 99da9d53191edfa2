package chunk

import (
	"errors"
	"fmt"
	"io"
	"testing"
)

// TestMoveSegment: a sealed segment copied to a provider through
// OpenSealedSegment and switched by MoveSegment serves restores and fsck,
// its local file goes, and the move survives a reopen; a truncated or
// foreign object, the active segment and an unknown provider are refused
// and change nothing.
func TestMoveSegment(t *testing.T) {
	ident := testIdentity("m")
	for _, backend := range backends {
		t.Run(backend, func(t *testing.T) {
			mem := &memProvider{name: "mem", objs: map[uint32][]byte{}}
			e := newEnv(t, backend, func(o *Options) {
				o.SegmentBytes = 1 << 20
				o.GCInterval = -1
				o.Providers = []ObjectProvider{mem}
			})
			s := e.open()
			w, _ := s.Create("ns", "a", ident, CreateOptions{})
			appendPrefill(t, w, ident, "a", 0, 48)
			if err := w.Close(); err != nil {
				t.Fatal(err)
			}
			for i := 0; len(s.Segments()) < 2; i++ {
				id := fmt.Sprintf("fill%d", i)
				w, _ := s.Create("ns", id, ident, CreateOptions{})
				appendPrefill(t, w, ident, id, 0, 64)
				if err := w.Close(); err != nil {
					t.Fatal(err)
				}
			}
			active := s.Segments()[1].ID
			if _, err := s.OpenSealedSegment(active); !errors.Is(err, ErrNotSealed) {
				t.Fatalf("OpenSealedSegment(active): %v, want ErrNotSealed", err)
			}
			if err := s.MoveSegment(active, "mem"); !errors.Is(err, ErrNotSealed) {
				t.Fatalf("MoveSegment(active): %v, want ErrNotSealed", err)
			}
			r, err := s.OpenSealedSegment(1)
			if err != nil {
				t.Fatal(err)
			}
			obj, err := io.ReadAll(io.NewSectionReader(r, 0, r.Size()))
			r.Close()
			if err != nil {
				t.Fatal(err)
			}
			if int64(len(obj)) != int64(s.Segments()[0].Written) {
				t.Fatalf("read %d bytes, segment written %d", len(obj), s.Segments()[0].Written)
			}
			path := e.fs.PathJoin(e.dir, "segments", segName(1))
			// Refused, changing nothing: no provider, a truncated object,
			// another segment's object.
			if err := s.MoveSegment(1, "nowhere"); err == nil {
				t.Fatal("MoveSegment to an unknown provider succeeded")
			}
			mem.objs[1] = obj[:len(obj)-BlockBytes]
			if err := s.MoveSegment(1, "mem"); !errors.Is(err, ErrCorrupt) {
				t.Fatalf("MoveSegment of a truncated object: %v, want ErrCorrupt", err)
			}
			other := append([]byte(nil), obj...)
			copy(other, make([]byte, BlockBytes))
			mem.objs[1] = other
			if err := s.MoveSegment(1, "mem"); !errors.Is(err, ErrCorrupt) {
				t.Fatalf("MoveSegment of an object without the header: %v, want ErrCorrupt", err)
			}
			if seg := s.Segments()[0]; seg.Location != "" {
				t.Fatalf("a refused move left location %q", seg.Location)
			}
			if _, err := e.fs.Stat(path); err != nil {
				t.Fatalf("a refused move removed the local file: %v", err)
			}
			mem.objs[1] = obj
			if err := s.MoveSegment(1, "mem"); err != nil {
				t.Fatal(err)
			}
			if seg := s.Segments()[0]; seg.Location != "mem" || !seg.Sealed {
				t.Fatalf("segment 1 after the move: %+v", seg)
			}
			if _, err := e.fs.Stat(path); err == nil {
				t.Fatal("the local file of a moved segment is still there")
			}
			before := mem.reads.Load()
			verify(t, s, "ns", "a", ident, 48)
			if mem.reads.Load() == before {
				t.Fatal("the restore read nothing through the provider")
			}
			if err := s.MoveSegment(1, "mem"); !errors.Is(err, ErrNotSealed) {
				t.Fatalf("second MoveSegment: %v, want ErrNotSealed", err)
			}
			if rep := s.Check(nil); !rep.OK() {
				t.Fatalf("fsck: %v", rep.Errors)
			}
			s.Close()
			s = e.open()
			defer s.Close()
			verify(t, s, "ns", "a", ident, 48)
			if seg := s.Segments()[0]; seg.Location != "mem" {
				t.Fatalf("after reopen: %+v", seg)
			}
		})
	}
}
