package state

import (
	"fmt"
	"strings"
)

// MaxNameBytes bounds namespace and context id lengths.
const MaxNameBytes = 255

// ValidateName checks a namespace or context id: 1..MaxNameBytes bytes and no
// NUL (the index separates a context's key parts with 0x00). what names the
// field in the error ("namespace", "context id").
func ValidateName(what, s string) error {
	if len(s) == 0 || len(s) > MaxNameBytes {
		return fmt.Errorf("%s %q: length %d not in [1, %d]", what, s, len(s), MaxNameBytes)
	}
	if strings.IndexByte(s, 0) >= 0 {
		return fmt.Errorf("%s %q: contains a NUL byte", what, s)
	}
	return nil
}
