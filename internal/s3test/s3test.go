// Package s3test starts a real S3-compatible object store for tests
// (internal/objstore: SeaweedFS's weed on loopback). No mock: the remote
// tier's tests talk S3 to it. Without a weed binary the test skips, naming
// scripts/seaweedfs.sh; with HCACHE_REQUIRE_S3=1 (CI) it fails instead.
package s3test

import (
	"errors"
	"os"
	"testing"

	"github.com/hcache/hcache/internal/objstore"
)

// Server is a running weed server.
type Server struct {
	*objstore.Server
	t testing.TB
}

// Start starts a weed server for the test (stopped at its end), or skips
// the test when no binary is found.
func Start(t testing.TB) *Server {
	t.Helper()
	s, err := objstore.Launch("", t.TempDir())
	if errors.Is(err, objstore.ErrNoWeed) {
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
	return &Server{Server: s, t: t}
}

// Restart starts the server again on the same ports and data.
func (s *Server) Restart() {
	s.t.Helper()
	if err := s.Server.Restart(); err != nil {
		s.t.Fatal(err)
	}
}
