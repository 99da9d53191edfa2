package profiles

import (
	"errors"
	"math"
	"strings"
	"testing"
)

func TestShippedProfilesLoad(t *testing.T) {
	names := Names()
	if len(names) < 2 {
		t.Fatalf("shipped profiles %v, want at least a100-pm9a3x4 and h200-nvme", names)
	}
	for _, n := range []string{"a100-pm9a3x4", "h200-nvme"} {
		p, err := Load(n)
		if err != nil {
			t.Fatal(err)
		}
		if p.Name != n {
			t.Errorf("%s: name %q", n, p.Name)
		}
	}
	p, _ := Load("h200-nvme")
	if p.H2DGBps.Value != 55 || p.Tiers[0].ReadGBps.Value != 1.9 || p.GemmTFLOPs.Value != 850 {
		t.Errorf("h200-nvme figures changed: %+v", p)
	}
	for _, c := range []struct {
		n  int
		ms float64
	}{{1024, 48.7}, {4096, 127.1}, {16384, 615.7}} {
		if got := p.Recompute.At(c.n); math.Abs(got-c.ms) > 1e-9 {
			t.Errorf("recompute at %d = %v, want the measured %v", c.n, got, c.ms)
		}
	}
	// Between points: a power law, so monotone and between the ends.
	if v := p.Recompute.At(2048); v <= 48.7 || v >= 127.1 {
		t.Errorf("recompute at 2048 = %v, not between its neighbours", v)
	}
	// Beyond the last point the last segment's exponent (> 1) carries on.
	if v := p.Recompute.At(32768); v <= 2*615.7 {
		t.Errorf("recompute at 32K = %v, want superlinear growth past 2 x 615.7", v)
	}
	if _, err := Load("no-such-profile"); err == nil || !strings.Contains(err.Error(), "h200-nvme") {
		t.Errorf("unknown profile: %v (want the list of shipped ones)", err)
	}
}

func TestValidationNamesTheBadField(t *testing.T) {
	base, err := shipped.ReadFile("h200-nvme.json")
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name, from, to, field string
	}{
		{"zero h2d", `"h2d_gbps": {"value": 55`, `"h2d_gbps": {"value": 0`, "h2d_gbps.value"},
		{"negative tier", `"value": 1.9`, `"value": -1`, "storage_tiers[0].read_gbps.value"},
		{"no source", `"source": "NVIDIA H200 data sheet: HBM3e 4.8 TB/s"`, `"source": ""`, "mem_gbps.source"},
		{"points out of order", `{"tokens": 4096, "ms": 127.1}`, `{"tokens": 512, "ms": 127.1}`, "recompute.points[1].tokens"},
		{"negative decode", `"layer_overhead_us":`, `"decode_gbps": {"value": -3, "source": "x"}, "layer_overhead_us":`, "decode_gbps.value"},
		{"decode without source", `"layer_overhead_us":`, `"decode_gbps": {"value": 3, "source": " "}, "layer_overhead_us":`, "decode_gbps.source"},
		{"fp8 in the codec map", `"layer_overhead_us":`, `"codec_decode_gbps": {"fp8": {"value": 3, "source": "x"}}, "layer_overhead_us":`, `codec_decode_gbps["fp8"]: fp8's decode rate is decode_gbps`},
		{"codec none", `"layer_overhead_us":`, `"codec_decode_gbps": {"none": {"value": 3, "source": "x"}}, "layer_overhead_us":`, `codec_decode_gbps["none"]: is not a codec with a decode`},
		{"unknown codec", `"layer_overhead_us":`, `"codec_decode_gbps": {"int4": {"value": 3, "source": "x"}}, "layer_overhead_us":`, `codec_decode_gbps["int4"]`},
		{"zero int8 decode", `"layer_overhead_us":`, `"codec_decode_gbps": {"int8": {"value": 0, "source": "x"}}, "layer_overhead_us":`, `codec_decode_gbps["int8"].value`},
		{"fp8-block decode without source", `"layer_overhead_us":`, `"codec_decode_gbps": {"int8": {"value": 1, "source": "x"}, "fp8-block": {"value": 2, "source": ""}}, "layer_overhead_us":`, `codec_decode_gbps["fp8-block"].source`},
		{"bad ms", `"ms": 615.7`, `"ms": 0`, "recompute.points[2].ms"},
		{"bad backend", `"backend": "cuda"`, `"backend": "tpu"`, "backend"},
		{"unknown field", `"backend": "cuda",`, `"backend": "cuda", "h2d": 3,`, `unknown field "h2d"`},
		{"no recompute cost", `"recompute": {`, `"recompute_x": {`, `unknown field "recompute_x"`},
		{"repeated tier", `{"name": "dram"`, `{"name": "nvme"`, "storage_tiers[1].name"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			s := string(base)
			if !strings.Contains(s, c.from) {
				t.Fatalf("test fixture lacks %q", c.from)
			}
			_, err := Parse([]byte(strings.Replace(s, c.from, c.to, 1)))
			if !errors.Is(err, ErrProfile) || !strings.Contains(err.Error(), c.field) {
				t.Fatalf("error %v, want ErrProfile naming %q", err, c.field)
			}
		})
	}
	// Neither a recompute curve nor an efficiency: refused.
	p, _ := Parse(base)
	p.Recompute = nil
	if err := p.Validate(); err == nil || !strings.Contains(err.Error(), "compute_efficiency") {
		t.Fatalf("no recompute cost: %v", err)
	}
}

// TestDecodeRates: a profile written before per-codec rates (decode_gbps
// alone) loads, and its figure is fp8's and no other codec's; rates by codec
// survive a round trip and are returned by name.
func TestDecodeRates(t *testing.T) {
	base, err := shipped.ReadFile("h200-nvme.json")
	if err != nil {
		t.Fatal(err)
	}
	with := func(fields string) *Profile {
		t.Helper()
		p, err := Parse([]byte(strings.Replace(string(base), `"layer_overhead_us":`, fields+` "layer_overhead_us":`, 1)))
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	old := with(`"decode_gbps": {"value": 1.5, "source": "old"},`)
	both := with(`"decode_gbps": {"value": 1.5, "source": "a"}, "codec_decode_gbps": {"int8": {"value": 0.4, "source": "b"}, "fp8-block": {"value": 0.7, "source": "c"}},`)
	b, err := both.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	trip, err := Parse(b)
	if err != nil {
		t.Fatalf("round trip: %v", err)
	}
	none, _ := Parse(base)
	for _, c := range []struct {
		name  string
		p     *Profile
		codec string
		want  float64 // 0: no figure
	}{
		{"old fp8", old, "fp8", 1.5},
		{"old fp8-block", old, "fp8-block", 0},
		{"old int8", old, "int8", 0},
		{"old none", old, "none", 0},
		{"both fp8", both, "fp8", 1.5},
		{"both fp8-block", both, "fp8-block", 0.7},
		{"both int8", both, "int8", 0.4},
		{"round trip int8", trip, "int8", 0.4},
		{"round trip fp8", trip, "fp8", 1.5},
		{"shipped fp8", none, "fp8", 0},
		{"shipped int8", none, "int8", 0},
	} {
		f := c.p.Decode(c.codec)
		switch {
		case c.want == 0 && f != nil:
			t.Errorf("%s: %s has rate %+v, want none", c.name, c.codec, *f)
		case c.want != 0 && (f == nil || f.Value != c.want):
			t.Errorf("%s: %s has rate %+v, want %v", c.name, c.codec, f, c.want)
		}
	}
}

// FuzzParse: any input either parses into a profile that validates and
// survives a round trip, or is refused with ErrProfile; never a panic.
func FuzzParse(f *testing.F) {
	for _, n := range Names() {
		b, err := shipped.ReadFile(n + ".json")
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Add([]byte(`{"name":"x"}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		p, err := Parse(data)
		if err != nil {
			if !errors.Is(err, ErrProfile) {
				t.Fatalf("error %v does not wrap ErrProfile", err)
			}
			return
		}
		b, err := p.Marshal()
		if err != nil {
			t.Fatal(err)
		}
		q, err := Parse(b)
		if err != nil {
			t.Fatalf("a valid profile does not parse back: %v", err)
		}
		if q.Name != p.Name || len(q.Tiers) != len(p.Tiers) {
			t.Fatalf("round trip changed the profile")
		}
		if p.Recompute != nil {
			for _, n := range []int{1, 1000, 1 << 20} {
				if v := p.Recompute.At(n); !(v > 0) || math.IsInf(v, 0) {
					// A huge exponent can overflow far beyond the points;
					// only the measured range must be finite.
					if n <= p.Recompute.Points[len(p.Recompute.Points)-1].Tokens && n >= p.Recompute.Points[0].Tokens {
						t.Fatalf("recompute at %d = %v", n, v)
					}
				}
			}
		}
	})
}
