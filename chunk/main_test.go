package chunk

import (
	"os"
	"testing"
)

// TestMain runs the package's tests with invariants that panic: a violation
// anywhere fails the run loudly. Tests of the production behaviour (a
// broken store refusing writes) turn it off for their own duration.
func TestMain(m *testing.M) {
	invariantsPanic.Store(true)
	os.Exit(m.Run())
}
