package stat

import "testing"

func TestMedianMean(t *testing.T) {
	cases := []struct {
		v            []float64
		median, mean float64
	}{
		{nil, 0, 0}, {[]float64{3}, 3, 3}, {[]float64{5, 1, 3}, 3, 3}, {[]float64{4, 1, 3, 2}, 3, 2.5},
	}
	for _, c := range cases {
		if m := Median(c.v); m != c.median {
			t.Errorf("Median(%v) = %v, want %v", c.v, m, c.median)
		}
		if m := Mean(c.v); m != c.mean {
			t.Errorf("Mean(%v) = %v, want %v", c.v, m, c.mean)
		}
	}
}
