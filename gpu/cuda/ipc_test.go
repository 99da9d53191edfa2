package cuda

import (
	"strings"
	"testing"
)

func TestIPCHandleText(t *testing.T) {
	var h IPCHandle
	for i := range h {
		h[i] = byte(i * 7)
	}
	got, err := ParseIPCHandle(h.String())
	if err != nil || got != h {
		t.Fatalf("round trip: %v, %x", err, got)
	}
	for _, bad := range []string{"", "zz", strings.Repeat("ab", 63), strings.Repeat("ab", 65)} {
		if _, err := ParseIPCHandle(bad); err == nil || !strings.Contains(err.Error(), "64 bytes") {
			t.Errorf("ParseIPCHandle(%q): %v, want an error naming the size", bad, err)
		}
	}
}
