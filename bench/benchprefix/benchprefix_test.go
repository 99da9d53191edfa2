package benchprefix

import (
	"strings"
	"testing"

	"github.com/hcache/hcache/bench/peer"
	"github.com/hcache/hcache/bench/prefixwl"
	"github.com/hcache/hcache/internal/testseed"
	"github.com/hcache/hcache/state"
)

func tiny(t *testing.T, wl string, systems ...string) Options {
	return Options{Dir: t.TempDir(), Workload: wl, Seed: testseed.Seed(t), Scale: 0.05, Layers: 2, RowBytes: 64,
		Systems: systems, LookupGroups: 1000, LookupPromptTokens: 2048, LookupRounds: 5, VerifyEvery: 1}
}

// TestRunPeer: every workload through the peer: on disk equals the unique
// groups' bytes, lookups equal the workload's hits, restores verify.
func TestRunPeer(t *testing.T) {
	for _, wl := range prefixwl.Names() {
		t.Run(wl, func(t *testing.T) {
			o := tiny(t, wl, "file-per-chunk-hash")
			o.VerifyEvery = 3
			if wl == "docqa" {
				o.Scale = 0.25
			}
			res, err := Run(o)
			if err != nil {
				t.Fatal(err)
			}
			s := res.Systems[0]
			t.Logf("%+v", s)
			if s.DiskOverUnique != 1 || s.GroupsWritten != s.UniqueGroups || s.GroupsStored != s.UniqueGroups || s.BytesOnDisk != s.UniqueBytes {
				t.Errorf("on disk %d bytes, %d groups written; unique %d groups, %d bytes", s.BytesOnDisk, s.GroupsWritten, s.UniqueGroups, s.UniqueBytes)
			}
			if s.HitRate != s.ExpectedHitRate || s.HitRate <= 0 || s.Restores == 0 || s.Verified != (s.Restores+2)/3 {
				t.Errorf("hit rate %.3f (expected %.3f), %d restores, %d verified", s.HitRate, s.ExpectedHitRate, s.Restores, s.Verified)
			}
			if s.DedupRatio <= 1 || s.LogicalBytes <= s.BytesOnDisk {
				t.Errorf("dedup %.2f: logical %d, on disk %d", s.DedupRatio, s.LogicalBytes, s.BytesOnDisk)
			}
			l := s.LookupAtScale
			if l == nil || l.IndexGroups != 1000 || l.HitTokens != 2048 || l.P50US <= 0 || l.P99US < l.P50US {
				t.Errorf("lookup at scale %+v", l)
			}
		})
	}
}

// broken wraps the peer with one fault.
type broken struct {
	*peer.ChainFiles
	fault string
}

func (b *broken) Lookup(ctx string, tokens []uint32) (int, error) {
	n, err := b.ChainFiles.Lookup(ctx, tokens)
	if b.fault == "lookup" && n > 0 {
		n -= b.GroupTokens()
	}
	return n, err
}

func (b *broken) RestoreTokens(ctx string, tokens []uint32, n int, fn peer.Deliver) error {
	return b.ChainFiles.RestoreTokens(ctx, tokens, n, func(l, first int, rows []byte) error {
		if b.fault == "rows" && first > 0 {
			rows[0] ^= 1 // a byte of another prompt's state
		}
		if b.fault == "short" && l == 0 {
			return nil
		}
		return fn(l, first, rows)
	})
}

// TestRunCatchesFaults: a store that misses stored prefixes, serves wrong
// rows or drops a layer fails the run with an error naming the request.
func TestRunCatchesFaults(t *testing.T) {
	for _, c := range []struct{ fault, want string }{
		{"lookup", "the workload says"},
		{"rows", "differs from the saved row"},
		{"short", "restore handed over"},
	} {
		openers["broken"] = func(dir string, o Options, chain state.Chain) (*system, error) {
			cf, err := peer.NewChainFiles(peer.Spec{Dir: dir, Layers: o.Layers, RowBytes: o.RowBytes, ChunkTokens: peer.DefaultChunkTokens}, chain)
			if err != nil {
				return nil, err
			}
			return &system{PrefixSystem: &broken{cf, c.fault}, close: cf.Close}, nil
		}
		o := tiny(t, "agent", "broken")
		_, err := Run(o)
		if err == nil || !strings.Contains(err.Error(), c.want) || !strings.Contains(err.Error(), "request ") {
			t.Errorf("fault %s: err %v, want one naming a request and %q", c.fault, err, c.want)
		}
	}
	delete(openers, "broken")
}

// TestOptionsRejected: bad options are errors naming them.
func TestOptionsRejected(t *testing.T) {
	cases := []struct {
		o    Options
		want string
	}{
		{Options{Dir: t.TempDir(), Workload: "long"}, "unknown workload \"long\""},
		{Options{Dir: t.TempDir(), Workload: "chat", Systems: []string{"redis"}}, "unknown system \"redis\""},
		{Options{Dir: t.TempDir(), Workload: "chat", RowBytes: 3}, "3-byte rows"},
		{Options{Workload: "chat"}, "no directory"},
		{Options{Dir: t.TempDir(), Workload: "chat", LookupGroups: -1}, "negative"},
	}
	for _, c := range cases {
		if _, err := Run(c.o); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%+v: err %v, want one naming %q", c.o, err, c.want)
		}
	}
}
