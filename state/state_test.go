package state

import (
	"errors"
	"strings"
	"testing"
)

func goodIdentity() *Identity {
	return &Identity{Model: []byte("llama-7b@rev1"), Plan: []LayerPlan{{LayerHidden, 8192}, {LayerKV, 4096}, {LayerNone, 0}}}
}

func TestIdentityValidate(t *testing.T) {
	cases := []struct {
		name string
		id   Identity
		want string // substring of the error; "" means valid
	}{
		{"good", *goodIdentity(), ""},
		{"empty model", Identity{Plan: []LayerPlan{{LayerKV, 2}}}, "model fingerprint of 0 bytes"},
		{"model too long", Identity{Model: make([]byte, MaxModelBytes+1), Plan: []LayerPlan{{LayerKV, 2}}}, "model fingerprint of 4097 bytes"},
		{"no layers", Identity{Model: []byte("m")}, "plan of 0 layers"},
		{"too many layers", Identity{Model: []byte("m"), Plan: make([]LayerPlan, MaxLayers+1)}, "plan of 1025 layers"},
		{"none with row bytes", Identity{Model: []byte("m"), Plan: []LayerPlan{{LayerKV, 2}, {LayerNone, 4}}}, "layer 1 stores nothing but has row bytes 4"},
		{"odd row bytes", Identity{Model: []byte("m"), Plan: []LayerPlan{{LayerHidden, 3}}}, "layer 0 (hidden) row bytes 3"},
		{"zero row bytes", Identity{Model: []byte("m"), Plan: []LayerPlan{{LayerKV, 0}}}, "layer 0 (kv) row bytes 0"},
		{"row bytes too large", Identity{Model: []byte("m"), Plan: []LayerPlan{{LayerKV, MaxRowBytes + 2}}}, "row bytes 1048578"},
		{"unknown kind", Identity{Model: []byte("m"), Plan: []LayerPlan{{LayerKind(7), 2}}}, "unknown kind 7"},
		{"stores nothing", Identity{Model: []byte("m"), Plan: []LayerPlan{{LayerNone, 0}}}, "plan stores no layer"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			err := c.id.Validate()
			if c.want == "" {
				if err != nil {
					t.Fatalf("Validate: %v", err)
				}
				return
			}
			if !errors.Is(err, ErrIdentity) || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("Validate = %v, want ErrIdentity containing %q", err, c.want)
			}
		})
	}
}

func TestIdentityEncodeRoundTripAndCorruption(t *testing.T) {
	id := goodIdentity()
	enc := id.Encode()
	got, err := DecodeIdentity(enc)
	if err != nil {
		t.Fatalf("DecodeIdentity: %v", err)
	}
	if !got.Equal(id) {
		t.Fatalf("round trip: got %+v, want %+v", got, id)
	}
	// Every single flipped byte and every truncation is refused.
	for i := range enc {
		b := append([]byte(nil), enc...)
		b[i] ^= 0x40
		if _, err := DecodeIdentity(b); !errors.Is(err, ErrIdentity) {
			t.Errorf("byte %d flipped: err = %v, want ErrIdentity", i, err)
		}
	}
	for n := range enc {
		if _, err := DecodeIdentity(enc[:n]); !errors.Is(err, ErrIdentity) {
			t.Errorf("truncated to %d bytes: err = %v, want ErrIdentity", n, err)
		}
	}
}

func TestIdentityEqual(t *testing.T) {
	a := goodIdentity()
	cases := []struct {
		name string
		edit func(*Identity)
		eq   bool
	}{
		{"same", func(*Identity) {}, true},
		{"model", func(b *Identity) { b.Model = []byte("other") }, false},
		{"row bytes", func(b *Identity) { b.Plan[1].RowBytes = 2048 }, false},
		{"kind", func(b *Identity) { b.Plan[0].Kind = LayerKV }, false},
		{"layers", func(b *Identity) { b.Plan = b.Plan[:2] }, false},
	}
	for _, c := range cases {
		b := goodIdentity()
		c.edit(b)
		if got := a.Equal(b); got != c.eq {
			t.Errorf("%s: Equal = %v, want %v", c.name, got, c.eq)
		}
	}
}

// TestBindingSeparatesContexts: the binding changes with each of its inputs,
// and the 0x00 separators keep ("ab","c") apart from ("a","bc").
func TestBindingSeparatesContexts(t *testing.T) {
	id := goodIdentity()
	other := goodIdentity()
	other.Plan[0].RowBytes = 4096
	base := NewBinding("ns", "ctx", 1, id)
	if base != NewBinding("ns", "ctx", 1, goodIdentity()) {
		t.Fatal("binding is not deterministic")
	}
	cases := []struct {
		name string
		b    Binding
	}{
		{"namespace", NewBinding("nt", "ctx", 1, id)},
		{"context id", NewBinding("ns", "cty", 1, id)},
		{"generation", NewBinding("ns", "ctx", 2, id)},
		{"identity", NewBinding("ns", "ctx", 1, other)},
		{"separator", NewBinding("nsc", "tx", 1, id)},
	}
	for _, c := range cases {
		if c.b == base {
			t.Errorf("changing the %s left the binding unchanged", c.name)
		}
	}
}

func TestValidateName(t *testing.T) {
	cases := []struct {
		name string
		in   string
		want string // "" means valid
	}{
		{"short", "a", ""},
		{"longest", strings.Repeat("x", MaxNameBytes), ""},
		{"empty", "", "length 0 not in [1, 255]"},
		{"too long", strings.Repeat("x", MaxNameBytes+1), "length 256 not in [1, 255]"},
		{"nul", "a\x00b", "contains a NUL byte"},
	}
	for _, c := range cases {
		err := ValidateName("namespace", c.in)
		if c.want == "" {
			if err != nil {
				t.Errorf("%s: %v", c.name, err)
			}
			continue
		}
		if err == nil || !strings.Contains(err.Error(), c.want) || !strings.HasPrefix(err.Error(), "namespace ") {
			t.Errorf("%s: err = %v, want one naming the namespace and %q", c.name, err, c.want)
		}
	}
}

func TestTokenBytes(t *testing.T) {
	cases := []struct {
		name string
		id   *Identity
		want int
	}{
		{"nil", nil, 0},
		{"mixed plan", goodIdentity(), 8192 + 4096},
		{"one kv layer", &Identity{Model: []byte("m"), Plan: []LayerPlan{{Kind: LayerKV, RowBytes: 6}}}, 6},
	}
	for _, c := range cases {
		if got := c.id.TokenBytes(); got != c.want {
			t.Errorf("%s: TokenBytes = %d, want %d", c.name, got, c.want)
		}
	}
}
