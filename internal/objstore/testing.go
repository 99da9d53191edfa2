package objstore

import (
	"errors"
	"os"
	"testing"
)

// TestServer is a weed server of a test.
type TestServer struct {
	*Server
	t testing.TB
}

// Start starts a weed server for the test (killed at its end; its log's
// end printed if the test failed). Without a weed binary the test skips,
// naming scripts/seaweedfs.sh; with HCACHE_REQUIRE_S3=1 (CI) it fails.
func Start(t testing.TB) *TestServer {
	t.Helper()
	s, err := Launch("", t.TempDir())
	if errors.Is(err, ErrNoWeed) {
		if os.Getenv("HCACHE_REQUIRE_S3") != "" {
			t.Fatal(err.Error() + " (HCACHE_REQUIRE_S3 is set)")
		}
		t.Skip(err.Error())
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		s.Kill()
		if t.Failed() {
			t.Logf("the end of weed.log:\n%s", s.Tail())
		}
	})
	return &TestServer{Server: s, t: t}
}

// Restart starts the server again on the same ports and data.
func (s *TestServer) Restart() {
	s.t.Helper()
	if err := s.Server.Restart(); err != nil {
		s.t.Fatal(err)
	}
}
