package benchsave

import (
	"strings"
	"testing"
)

// TestRunSmall: a small run completes with every round measured on every
// side, the background prefill flushed during it, and every decode token
// the device saver took written; bad options are refused.
func TestRunSmall(t *testing.T) {
	r, err := Run(Options{Dir: t.TempDir(), Model: "tiny-llama", Rounds: 3, Tokens: 8, Prefill: 16, Seed: 1})
	if err != nil {
		t.Fatal(err)
	}
	for name, s := range map[string]Spread{"copy": r.CopyNS, "append": r.AppendNS, "save call": r.SaveCallNS, "save done": r.SaveDoneNS, "append ratio": r.AppendRatio} {
		if len(s.Rounds) != 3 || s.Median <= 0 || s.Min > s.Median || s.Max < s.Median {
			t.Errorf("%s: %+v: want 3 positive rounds, min <= median <= max", name, s)
		}
	}
	if len(r.FlushesPerRound) != 3 || r.BackgroundFlushes < 1 || r.Layers == 0 || r.TokenBytes == 0 {
		t.Errorf("result %+v: want 3 rounds of background flushes, at least one flush", r)
	}
	if s := r.SaverStats; s.Calls != 3*8 || s.Written != s.Calls || s.Full != 0 || s.InUse != 0 {
		t.Errorf("saver stats %+v: want 24 tokens saved and written, none refused", s)
	}
	if _, err := Run(Options{Dir: t.TempDir(), Rounds: -1}); err == nil || !strings.Contains(err.Error(), "must be positive") {
		t.Errorf("negative rounds: %v", err)
	}
}
