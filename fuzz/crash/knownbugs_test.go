package crash

import (
	"errors"
	"os"
	"testing"

	"github.com/cockroachdb/pebble/v2/vfs"

	"github.com/hcache/hcache/chunk"
)

// Two ways the simulation with token-addressed contexts found to lose an
// acknowledged context once the index is lost and repaired from the
// segments (chunk's, not the harness's): no segment record names the
// context any more. They fail today, so they run only with
// HCACHE_KNOWN_BUGS=1; the simulated seeds that found them are in each.

func knownBug(t *testing.T) {
	t.Helper()
	if os.Getenv("HCACHE_KNOWN_BUGS") == "" {
		t.Skip("a known chunk bug (acknowledged token-addressed context lost by repair); HCACHE_KNOWN_BUGS=1 runs it")
	}
}

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

// lostByRepair deletes the closed store's index, repairs it and
// requires id to restore at least want tokens, row for row.
func lostByRepair(t *testing.T, o chunk.Options, id string, want int) {
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
}

// TestKnownBugAbandonedDedupedCreate: a context saved by tokens whose
// groups were all stored already (CreateTokens references them, writes
// nothing), its writer abandoned, reopened by Append and closed: Close
// acknowledges 24 tokens, yet no tail or tip record names the context (the
// reopened writer takes the chain's tip as recorded), so repair drops it.
// Found by SimOptions{Seed: 3, Cycles: 2, Ops: 120, WriteProb: 0.02,
// SyncProb: 0.3, Prefix: true, Adversarial: true} (cycle 1, t0i21).
func TestKnownBugAbandonedDedupedCreate(t *testing.T) {
	knownBug(t)
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
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}
	lostByRepair(t, o, "b", 24)
}

// TestKnownBugTailRecordReclaimed: a context acknowledged with a record
// naming it (a tail record of a partial group; or a tip record, its groups
// all stored already) is appended to until a new group is whole: that
// record is dead from then on, and a GC reclaims it before a newer one
// names the context (no Flush yet), so after the writer is gone (abandoned,
// or a crash) repair drops the context, acknowledged 7 or 8 tokens and
// holding 16. Found by SimOptions{Seed: 11, Cycles: 2, Ops: 200, SyncProb:
// 0.05, Prefix: true} (cycle 1, t4i6: `hcache crashtest --prefix --seed 11
// --cycles 6 --sync-prob 0.05 --write-crash-prob 0`) and by
// TestSimulatedPrefixCrashes with HCACHE_SEED=22181 (cycle 2, t3i16: the
// tip record).
func TestKnownBugTailRecordReclaimed(t *testing.T) {
	knownBug(t)
	cases := []struct {
		name  string
		acked int  // tokens of the first writer, acknowledged by its Close
		other bool // another context stored the first group already
	}{
		{"tail record", 7, false},
		{"tip record", 8, true},
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
			// its segments are reclaimed, with c's dead record.
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
			w.Abandon()
			if err := st.Close(); err != nil {
				t.Fatal(err)
			}
			lostByRepair(t, o, "c", c.acked)
		})
	}
}
