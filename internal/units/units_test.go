package units

import "testing"

func TestParseSize(t *testing.T) {
	cases := []struct {
		in   string
		want int64
		ok   bool
	}{
		{"4096", 4096, true},
		{"64K", 64 << 10, true},
		{"1M", 1 << 20, true},
		{"4G", 4 << 30, true},
		{"2TiB", 2 << 40, true},
		{"1MB", 1 << 20, true},
		{"0", 0, true},
		{"", 0, false},
		{"-1", 0, false},
		{"-1G", 0, false},
		{"1.5G", 0, false},
		{"G", 0, false},
		{"9000000000T", 0, false}, // would wrap past int64
		{"abc", 0, false},
	}
	for _, tc := range cases {
		got, err := ParseSize(tc.in)
		if (err == nil) != tc.ok || (tc.ok && got != tc.want) {
			t.Errorf("ParseSize(%q) = %d, %v; want %d, ok %v", tc.in, got, err, tc.want, tc.ok)
		}
	}
}

func TestFormatSize(t *testing.T) {
	cases := []struct {
		in   int64
		want string
	}{{0, "0"}, {4096, "4K"}, {64 << 20, "64M"}, {4 << 30, "4G"}, {1536 << 10, "1536K"}, {1000, "1000"}, {-1, "-1"}, {3 << 40, "3T"}}
	for _, c := range cases {
		got := FormatSize(c.in)
		if got != c.want {
			t.Errorf("FormatSize(%d) = %q; want %q", c.in, got, c.want)
		}
		if c.in >= 0 {
			if back, err := ParseSize(got); err != nil || back != c.in {
				t.Errorf("ParseSize(FormatSize(%d)) = %d, %v", c.in, back, err)
			}
		}
	}
}
