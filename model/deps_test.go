package model

import (
	"os/exec"
	"strings"
	"testing"
)

// TestModelAndGPUDoNotLinkTheStore: model, gpu and gpu/cuda sit below the
// storage engine; none may depend (directly or through another package) on chunk,
// lsm or iouring. The plan helpers live in serve/sched for this reason.
func TestModelAndGPUDoNotLinkTheStore(t *testing.T) {
	goBin, err := exec.LookPath("go")
	if err != nil {
		t.Fatalf("the go command is needed to list dependencies: %v", err)
	}
	out, err := exec.Command(goBin, "list", "-deps", "github.com/hcache/hcache/model", "github.com/hcache/hcache/gpu", "github.com/hcache/hcache/gpu/cuda").CombinedOutput()
	if err != nil {
		t.Fatalf("go list: %v\n%s", err, out)
	}
	deps := strings.Fields(string(out))
	if len(deps) < 3 {
		t.Fatalf("go list returned %d packages, expected the standard library too: %q", len(deps), out)
	}
	for _, d := range deps {
		for _, banned := range []string{"chunk", "lsm", "iouring"} {
			if d == "github.com/hcache/hcache/"+banned {
				t.Errorf("model or gpu depends on %s", d)
			}
		}
	}
}
