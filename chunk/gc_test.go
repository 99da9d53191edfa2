package chunk

import (
	"errors"
	"fmt"
	"testing"

	"github.com/hcache/hcache/lsm"
)

// TestUndecodableChunkValueIsAnError: a chunk value in the index that does
// not decode fails the GC of its segment and the delete of its context;
// neither skips it (a GC that skipped it dropped the segment holding the
// record, and a delete that skipped it left the segment's live count
// wrong). The store keeps everything it held.
func TestUndecodableChunkValueIsAnError(t *testing.T) {
	ident := testIdentity("m")
	for _, op := range []string{"gc", "delete"} {
		t.Run(op, func(t *testing.T) {
			e := newEnv(t, "mem", func(o *Options) { o.SegmentBytes = 1 << 20; o.GCInterval = -1 })
			s := e.open()
			defer s.Close()
			for _, id := range []string{"keep", "gone"} {
				w, _ := s.Create("ns", id, ident, CreateOptions{})
				appendPrefill(t, w, ident, id, 0, 48)
				if err := w.Close(); err != nil {
					t.Fatal(err)
				}
			}
			good := chunkOf(t, s, "keep", 1)
			// Seal the first segment and leave it mostly dead.
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
			// A value that frames and checksums but does not decode: its
			// slice lies outside its record.
			bad := *good
			bad.Slices = append([]lsm.Slice(nil), good.Slices...)
			bad.Slices[0].Off = bad.Length
			b := s.db.NewBatch()
			b.PutChunk("ns", "keep", 1, &bad)
			if err := b.Commit(true); err != nil {
				t.Fatal(err)
			}
			segsBefore := len(s.Segments())
			var err error
			switch op {
			case "gc":
				err = s.GC().Err
			case "delete":
				err = s.Delete("ns", "keep")
			}
			if !errors.Is(err, lsm.ErrCorrupt) {
				t.Fatalf("%s with an undecodable chunk value: %v, want an error wrapping lsm.ErrCorrupt", op, err)
			}
			if n := len(s.Segments()); n != segsBefore {
				t.Fatalf("%d segments after the failed %s, want %d", n, op, segsBefore)
			}
			if _, err := s.lookup("ns", "keep"); err != nil {
				t.Fatalf("keep after the failed %s: %v", op, err)
			}
			// Put the value back: the data was never touched.
			b = s.db.NewBatch()
			b.PutChunk("ns", "keep", 1, good)
			if err := b.Commit(true); err != nil {
				t.Fatal(err)
			}
			verify(t, s, "ns", "keep", ident, 48)
		})
	}
}
