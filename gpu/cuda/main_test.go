package cuda

import (
	"os"
	"testing"
)

// TestMain removes the host kernels' library the tests build, so that no
// hcache-kernels* directory is left in the system temp directory.
func TestMain(m *testing.M) {
	code := m.Run()
	if hostDir != "" {
		os.RemoveAll(hostDir)
	}
	os.Exit(code)
}
