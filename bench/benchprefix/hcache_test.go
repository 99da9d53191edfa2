package benchprefix

import (
	"testing"

	"github.com/hcache/hcache/bench/prefixwl"
)

// TestRunHcache: every workload through hcache: it writes and keeps
// exactly the unique groups, its lookups equal the workload's best hits
// (the harness fails the run otherwise), restores verify, and its live
// record bytes cover the unique groups and tails.
func TestRunHcache(t *testing.T) {
	for _, wl := range prefixwl.Names() {
		t.Run(wl, func(t *testing.T) {
			o := tiny(t, wl, "hcache")
			o.VerifyEvery, o.LookupGroups = 3, 2048
			if wl == "docqa" {
				o.Scale = 0.25
			}
			res, err := Run(o)
			if err != nil {
				t.Fatal(err)
			}
			s := res.Systems[0]
			t.Logf("%+v", s)
			if s.GroupsWritten != s.UniqueGroups || s.GroupsStored != s.UniqueGroups {
				t.Errorf("%d groups written, %d stored; %d unique", s.GroupsWritten, s.GroupsStored, s.UniqueGroups)
			}
			if s.HitRate != s.ExpectedHitRate || s.Restores == 0 || s.Verified != (s.Restores+2)/3 {
				t.Errorf("hit rate %.3f (expected %.3f), %d restores, %d verified", s.HitRate, s.ExpectedHitRate, s.Restores, s.Verified)
			}
			if s.BytesOnDisk-s.IndexBytes < s.UniqueBytes+s.TailBytes {
				t.Errorf("records take %d bytes, less than the unique groups and tails (%d + %d)", s.BytesOnDisk-s.IndexBytes, s.UniqueBytes, s.TailBytes)
			}
			if l := s.LookupAtScale; l == nil || l.HitTokens != 2048 {
				t.Errorf("lookup at scale %+v", l)
			}
		})
	}
}
