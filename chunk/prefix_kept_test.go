package chunk

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"
)

// TestPrefixKeptRecordSurvivesGC: a token-addressed context's tail record
// (or tip record, its first group stored already) is superseded by a group
// that became whole; it stays live, the only record naming the context,
// until a later record is durable: GC moves it (rebuilding its header from
// the index, chain section included, when the header is damaged), fsck
// accepts it, and after the writer is abandoned and the index lost, repair
// adopts the context from it with its acknowledged tokens. The old code
// made it dead at once and GC reclaimed it (repair dropped the context);
// a header rebuilt from the context's current tip and tail ids would name
// a chain repair cannot walk.
func TestPrefixKeptRecordSurvivesGC(t *testing.T) {
	cases := []struct {
		name    string
		acked   int  // tokens acknowledged by the first writer
		other   bool // another context stored group 0 already (c's record is a tip record)
		damaged bool // the kept record's header is zeroed before GC
	}{
		{"tail", 7, false, false},
		{"tip", 16, true, false},
		{"tail/damaged header", 7, false, true},
		{"tip/damaged header", 16, true, true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			ident := testIdentity("m")
			e := newEnv(t, "disk", func(o *Options) { o.SegmentBytes = 1 << 20; o.GCInterval = -1; o.CapacityBytes = -1 })
			s := e.open()
			toks := promptTokens(1, 40)
			if c.other {
				saveTokens(t, s, "ns", "a", ident, nil, toks[:16])
			}
			saveTokens(t, s, "ns", "c", ident, nil, toks[:c.acked])
			w, err := s.Append("ns", "c", ident)
			if err != nil {
				t.Fatal(err)
			}
			if err := w.ExtendTokens(toks[c.acked:40]); err != nil {
				t.Fatal(err)
			}
			for l, p := range ident.Plan {
				if p.Kind != LayerNone {
					if err := w.AppendLayer(l, prefixLayer(toks, l, c.acked, 40, int(p.RowBytes))); err != nil {
						t.Fatal(err)
					}
				}
			}
			_ = s.barrier(nil) // groups 0 and 1 committed, the writer open
			kg := uint32(c.acked / 16)
			kept, err := s.db.GetChunk("ns", "c", kg)
			if err != nil {
				t.Fatalf("the superseded record at group %d is not indexed: %v", kg, err)
			}
			// Seal its segment: fill until a second one exists.
			for i := 0; len(s.Segments()) < 2; i++ {
				id := fmt.Sprintf("fill%d", i)
				fw, _ := s.Create("ns", id, ident, CreateOptions{})
				appendPrefill(t, fw, ident, id, 0, 64)
				if err := fw.Close(); err != nil {
					t.Fatal(err)
				}
				if err := s.Delete("ns", id); err != nil {
					t.Fatal(err)
				}
			}
			if c.damaged {
				f, err := os.OpenFile(filepath.Join(e.dir, "segments", segName(kept.Segment)), os.O_RDWR, 0)
				if err != nil {
					t.Fatal(err)
				}
				f.WriteAt(make([]byte, 64), int64(kept.Offset))
				f.Close()
			}
			if res := s.GC(); res.Err != nil || res.Segments == 0 {
				t.Fatalf("GC: %+v", res)
			}
			moved, err := s.db.GetChunk("ns", "c", kg)
			if err != nil || moved.Segment == kept.Segment {
				t.Fatalf("the kept record after GC: %+v, %v (it was in segment %d)", moved, err, kept.Segment)
			}
			w.Abandon()
			if r := s.Check(nil); !r.OK() {
				t.Fatalf("fsck: %q", r.Errors)
			}
			verifyName(t, s, "ns", "c", ident, toks, 32)
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			loseIndexAndRepair(t, e.opts)
			s = e.open()
			defer s.Close()
			verifyName(t, s, "ns", "c", ident, toks, c.acked)
			if r := s.Check(nil); !r.OK() {
				t.Fatalf("fsck after repair: %q", r.Errors)
			}
		})
	}
}
