// Package testseed gives randomized tests a seed that a failure prints and a
// rerun replays: the -seed test flag, else the HCACHE_SEED environment
// variable, else the clock. Tests only; it imports nothing of hcache.
package testseed

import (
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"
)

// Env is the environment variable that replays a seed.
const Env = "HCACHE_SEED"

var seedFlag = flag.String("seed", "", "seed of the randomized tests (default: $"+Env+", else the clock)")

// Seed returns the seed for t's randomness and logs it with the command
// that replays it. A -seed flag or HCACHE_SEED that is not an integer fails
// the test (a typo must not silently become a fresh clock seed).
func Seed(t testing.TB) int64 {
	t.Helper()
	seed, src, err := choose(*seedFlag, os.Getenv(Env), time.Now)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("seed %d from %s (replay: %s)", seed, src, Replay(t.Name(), seed, callerDir()))
	return seed
}

// choose picks the seed: flag, then environment, then clock.
func choose(flagVal, envVal string, now func() time.Time) (int64, string, error) {
	for _, c := range []struct{ what, v string }{{"-seed", flagVal}, {Env, envVal}} {
		if c.v == "" {
			continue
		}
		s, err := strconv.ParseInt(strings.TrimSpace(c.v), 10, 64)
		if err != nil {
			return 0, "", fmt.Errorf("testseed: %s=%q is not a decimal int64 seed", c.what, c.v)
		}
		return s, c.what, nil
	}
	return now().UnixNano(), "the clock", nil
}

// Replay is the command that reruns test name (a subtest's full name too)
// of the package in dir with seed.
func Replay(name string, seed int64, dir string) string {
	parts := strings.Split(name, "/")
	for i, p := range parts {
		parts[i] = "^" + regexp.QuoteMeta(p) + "$"
	}
	if dir == "" {
		dir = "."
	}
	return fmt.Sprintf("%s=%d go test -count=1 -run '%s' %s", Env, seed, strings.Join(parts, "/"), dir)
}

// callerDir is the package directory of the test that called Seed, relative
// to the module root (./chunk), or "." when it cannot be told.
func callerDir() string {
	_, file, _, ok := runtime.Caller(2)
	if !ok {
		return "."
	}
	dir := filepath.Dir(file)
	for root := dir; ; {
		if _, err := os.Stat(filepath.Join(root, "go.mod")); err == nil {
			rel, err := filepath.Rel(root, dir)
			if err != nil || rel == "." {
				return "."
			}
			return "./" + filepath.ToSlash(rel)
		}
		up := filepath.Dir(root)
		if up == root {
			return "."
		}
		root = up
	}
}
