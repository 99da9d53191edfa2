package crash

import (
	"errors"
	"testing"

	"github.com/cockroachdb/pebble/v2/vfs"

	"github.com/hcache/hcache/chunk"
)

// Three ways the simulation with token-addressed contexts found to lose an
// acknowledged context once the index is lost and repaired from the
// segments (chunk's, fixed there): no segment record named the context any
// more. Repair finds a context only through its own records (a tail, or a
// tip record); these check that one always names it. The simulated seeds
// that found them are in each test's comment.

// tokRows appends the rows of tokens [from, to) of toks to w, every layer.
func tokRows(t *testing.T, w *chunk.Writer, ident *chunk.Identity, toks []uint32, from, to int) {
	t.Helper()
	for l, p := range ident.Plan {
		if p.Kind == chunk.LayerNone {
			continue
		}
		if err := w.AppendLayer(l, TokLayerRows(ident, toks, l, from, to)); err != nil {
			t.Fatal(err)
		}
	}
}

// checked fails t unless fsck finds st consistent.
func checked(t *testing.T, st *chunk.Store, when string) {
	t.Helper()
	if r := st.Check(nil); !r.OK() {
		t.Fatalf("fsck %s: %q", when, r.Errors)
	}
}

// repairedHolds deletes the closed store's index, repairs it and requires
// id to restore at least want tokens, row for row, and fsck to pass.
func repairedHolds(t *testing.T, o chunk.Options, id string, want int) {
	t.Helper()
	if err := o.FS.RemoveAll(o.FS.PathJoin(o.Dir, "index")); err != nil {
		t.Fatal(err)
	}
	rr, err := chunk.Repair(chunk.RepairOptions{FS: o.FS, Dir: o.Dir, ChunkTokens: o.ChunkTokens})
	if err != nil {
		t.Fatal(err)
	}
	st, err := chunk.Open(o)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	ident := Identity()
	toks := PromptTokens(1, want)
	n, err := st.Restore(TokNamespace, id, ident, func(layer int, rows []byte) error {
		if string(rows) != string(TokLayerRows(ident, toks, layer, 0, len(rows)/int(ident.Plan[layer].RowBytes))) {
			return errors.New("torn")
		}
		return nil
	})
	if err != nil || n < want {
		t.Fatalf("after index loss and repair, %s restores %d tokens (%v), %d acknowledged; repair adopted %q, set aside %q", id, n, err, want, rr.Adopted, rr.SetAside)
	}
	checked(t, st, "after repair")
}

// TestRepairKeepsAbandonedDedupedCreate: a context saved by tokens whose
// groups were all stored already (CreateTokens references them, writes
// nothing), its writer abandoned, reopened by Append and closed: Close
// acknowledges 24 tokens, so a record must name the context (Close writes
// a tip record: none was). The old code took the chain's tip as recorded
// and wrote none, and repair dropped the context. Found by SimOptions{Seed:
// 3, Cycles: 2, Ops: 120, WriteProb: 0.02, SyncProb: 0.3, Prefix: true,
// Adversarial: true} (cycle 1, t0i21).
func TestRepairKeepsAbandonedDedupedCreate(t *testing.T) {
	ident := Identity()
	toks := PromptTokens(1, 40)
	o := chunk.Options{FS: vfs.NewMem(), Dir: "/db", ChunkTokens: 8, Logf: t.Logf}
	st, err := chunk.Open(o)
	if err != nil {
		t.Fatal(err)
	}
	w, _, err := st.CreateTokens(TokNamespace, "a", ident, toks[:24], chunk.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	tokRows(t, w, ident, toks, 0, 24)
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	w, stored, err := st.CreateTokens(TokNamespace, "b", ident, toks[:27], chunk.CreateOptions{})
	if err != nil || stored != 24 {
		t.Fatalf("CreateTokens of b: %d stored, %v", stored, err)
	}
	w.Abandon()
	if w, err = st.Append(TokNamespace, "b", ident); err != nil || w.Tokens() != 24 {
		t.Fatalf("Append of b after Abandon: %v", err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	checked(t, st, "after b's Close")
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}
	repairedHolds(t, o, "b", 24)
}

// TestRepairKeepsSupersededName: a context acknowledged with a record
// naming it (a tail record of a partial group; or a tip record, its groups
// all stored already) is appended to until new groups are whole, and a GC
// reclaims the segments with dead records before the writer flushes. The
// record a full group superseded must stay live until a later record names
// the context: the old code made it dead at once, the GC reclaimed it, and
// after the writer was gone (abandoned, or a crash) repair dropped the
// context, acknowledged 7 or 8 tokens and holding 16. Found by
// SimOptions{Seed: 11, Cycles: 2, Ops: 200, SyncProb: 0.05, Prefix: true}
// (cycle 1, t4i6: `hcache crashtest --prefix --seed 11 --cycles 6
// --sync-prob 0.05 --write-crash-prob 0`) and by TestSimulatedPrefixCrashes
// with HCACHE_SEED=22181 (cycle 2, t3i16: the tip record). The writer then
// ends in each of the ways a later record may (or may not) name the
// context: abandoned (the kept record names it), flushed (its tail
// replaces the kept record), or abandoned and reopened by Append and
// closed with no rows (a tip record replaces it).
func TestRepairKeepsSupersededName(t *testing.T) {
	cases := []struct {
		name  string
		acked int    // tokens of the first writer, acknowledged by its Close
		other bool   // another context stored the first group already
		end   string // how the second writer ends: abandon, flush, reopen
		want  int    // tokens repair must keep
	}{
		{"tail record/abandon", 7, false, "abandon", 7},
		{"tip record/abandon", 8, true, "abandon", 8},
		{"tail record/flush", 7, false, "flush", 20},
		{"tip record/flush", 8, true, "flush", 20},
		{"tail record/reopen", 7, false, "reopen", 16},
		{"tip record/reopen", 8, true, "reopen", 16},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			ident := Identity()
			toks := PromptTokens(1, 40)
			o := chunk.Options{FS: vfs.NewMem(), Dir: "/db", ChunkTokens: 8, Logf: t.Logf, SegmentBytes: chunk.MinSegmentBytes, GCInterval: -1, CapacityBytes: -1}
			st, err := chunk.Open(o)
			if err != nil {
				t.Fatal(err)
			}
			if c.other {
				w, _, err := st.CreateTokens(TokNamespace, "a", ident, toks[:8], chunk.CreateOptions{})
				if err != nil {
					t.Fatal(err)
				}
				tokRows(t, w, ident, toks, 0, 8)
				if err := w.Close(); err != nil {
					t.Fatal(err)
				}
			}
			w, stored, err := st.CreateTokens(TokNamespace, "c", ident, toks[:c.acked], chunk.CreateOptions{})
			if err != nil {
				t.Fatal(err)
			}
			tokRows(t, w, ident, toks, stored, c.acked)
			if err := w.Close(); err != nil {
				t.Fatal(err)
			}
			if w, err = st.Append(TokNamespace, "c", ident); err != nil {
				t.Fatal(err)
			}
			if err := w.ExtendTokens(toks[c.acked:20]); err != nil {
				t.Fatal(err)
			}
			tokRows(t, w, ident, toks, c.acked, 20) // groups 0 and 1 whole, handed
			// Another context fills the segment and the next ones; deleted,
			// its segments are reclaimed, with c's superseded record unless
			// it is kept live.
			x, err := st.Create("crash", "x", ident, chunk.CreateOptions{})
			if err != nil {
				t.Fatal(err)
			}
			for tok := 0; tok < 3000; tok++ {
				if err := x.AppendToken(TokenRows(ident, "x", tok)); err != nil {
					t.Fatal(err)
				}
			}
			if err := x.Close(); err != nil {
				t.Fatal(err)
			}
			if err := st.Delete("crash", "x"); err != nil {
				t.Fatal(err)
			}
			if res := st.GC(); res.Err != nil || res.Segments == 0 {
				t.Fatalf("GC reclaimed nothing: %+v", res)
			}
			checked(t, st, "after the GC")
			switch c.end {
			case "abandon":
				w.Abandon()
			case "flush":
				if err := w.Close(); err != nil {
					t.Fatal(err)
				}
			case "reopen":
				w.Abandon()
				if w, err = st.Append(TokNamespace, "c", ident); err != nil || w.Tokens() != 16 {
					t.Fatalf("Append of c after Abandon: %v", err)
				}
				if err := w.Close(); err != nil {
					t.Fatal(err)
				}
			}
			checked(t, st, "at the end")
			if res := st.GC(); res.Err != nil {
				t.Fatal(res.Err)
			}
			if err := st.Close(); err != nil {
				t.Fatal(err)
			}
			repairedHolds(t, o, "c", c.want)
		})
	}
}
