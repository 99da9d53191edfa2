package rows

import (
	"bytes"
	"testing"
)

func TestRowsDifferByPlace(t *testing.T) {
	base := Row("ctx", 1, 2, 64)
	if !bytes.Equal(base, Row("ctx", 1, 2, 64)) {
		t.Fatal("the same place gave other bytes")
	}
	for _, other := range [][]byte{Row("ctx2", 1, 2, 64), Row("ctx", 0, 2, 64), Row("ctx", 1, 3, 64), Row("ct", 1, 2, 64)} {
		if bytes.Equal(base, other) {
			t.Fatal("two places gave the same bytes")
		}
	}
}
