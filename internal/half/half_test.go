package half

import (
	"math"
	"testing"
)

func TestKnownValues(t *testing.T) {
	cases := []struct {
		f    float32
		bits uint16
	}{
		{0, 0}, {1, 0x3c00}, {-2, 0xc000}, {65504, 0x7bff}, {65520, 0x7c00}, // rounds to inf
		{float32(math.Inf(1)), 0x7c00}, {5.960464477539063e-08, 0x0001}, {6.103515625e-05, 0x0400},
		{0.333251953125, 0x3555}, {1.0009765625, 0x3c01}, {1.00048828125, 0x3c00}, // tie to even
		{1.00146484375, 0x3c02}, // tie to even (up)
	}
	for _, c := range cases {
		if got := FromFloat32(c.f); got != c.bits {
			t.Errorf("FromFloat32(%v) = %#04x, want %#04x", c.f, got, c.bits)
		}
	}
}

func TestRoundTripAllHalves(t *testing.T) {
	for h := 0; h < 1<<16; h++ {
		f := ToFloat32(uint16(h))
		if f != f { // NaN
			if FromFloat32(f)&0x7c00 != 0x7c00 || FromFloat32(f)&0x3ff == 0 {
				t.Fatalf("NaN %#04x did not stay NaN", h)
			}
			continue
		}
		if got := FromFloat32(f); got != uint16(h) {
			t.Fatalf("half %#04x -> %v -> %#04x", h, f, got)
		}
	}
}

func TestBF16(t *testing.T) {
	for _, f := range []float32{0, 1, -3.5, 1e30, 3.14159} {
		if got := RoundBF16(f); math.Abs(float64(got-f)) > math.Abs(float64(f))/128 {
			t.Errorf("RoundBF16(%v) = %v", f, got)
		}
	}
	if BF16FromFloat32(1) != 0x3f80 {
		t.Fatal("bf16(1) != 0x3f80")
	}
}
