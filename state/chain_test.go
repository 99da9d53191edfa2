package state

import (
	"encoding/hex"
	"errors"
	"testing"
)

// TestChainKeyVectors pins chain keys: they must never change, since stores
// and other implementations address state by them. The expected values were
// computed with Python's hashlib from the spec in chain.go, not by this code.
func TestChainKeyVectors(t *testing.T) {
	hidden2 := []LayerPlan{{Kind: LayerHidden, RowBytes: 8192}, {Kind: LayerHidden, RowBytes: 8192}}
	cases := []struct {
		ns, salt, model string
		plan            []LayerPlan
		k0, k1          string
	}{
		{"ns", "", "llama2-7b", hidden2,
			"356b8828e06a6438090852ee962ec7ef277a9e94edacb7b6b8dd17c319985f8e",
			"34ac9787a48a4fef1d15ba1f282f2dc548ee592ee14addbe4c1c3afff95bf8d9"},
		{"tenant-a", "salt", "llama2-7b", hidden2,
			"973374888079daaee17f2fd632b6c03693b1a21b39e5fe91905c4c8079a36e7f",
			"e5b41a1e71a40050b7aee5c892994ec6826d3b5d3365e0ea57ecaee50d0b7a1b"},
		{"tenant-b", "", "m", []LayerPlan{{Kind: LayerNone}, {Kind: LayerKV, RowBytes: 1024}},
			"21b6b6628fa12fc684e8363fd9e41a77d6ace5a825c4870572206a1d6f10b5ee",
			"ac8c86d85eec7b50a9e7ac6dfed1a9ef9b69ae790518046149951f321e4bca72"},
	}
	toks := []uint32{1, 2, 3, 4, 5, 6, 7, 8, 9}
	for _, tc := range cases {
		var salt []byte
		if tc.salt != "" {
			salt = []byte(tc.salt)
		}
		c, err := NewChain(tc.ns, salt, &Identity{Model: []byte(tc.model), Plan: tc.plan})
		if err != nil {
			t.Fatal(err)
		}
		keys, err := c.Keys(toks, 4) // the ninth token is a partial group: no key
		if err != nil {
			t.Fatal(err)
		}
		if len(keys) != 2 {
			t.Fatalf("%s: %d keys for 9 tokens in groups of 4, want 2", tc.ns, len(keys))
		}
		for i, want := range []string{tc.k0, tc.k1} {
			if got := hex.EncodeToString(keys[i][:]); got != want {
				t.Errorf("%s/%q: key %d = %s, want %s", tc.ns, tc.salt, i, got, want)
			}
		}
		if next := c.Next(keys[0], toks[4:8]); next != keys[1] {
			t.Errorf("%s: Next(key0, group 1) = %s, Keys gave %s", tc.ns, next, keys[1])
		}
	}
	for _, tc := range []struct {
		toks []uint32
		want string
	}{{[]uint32{1, 2, 3, 4}, "322161cc25512f4e88606d1b8edcfd4b"}, {nil, "39256b5e62137b7c69f4394c58ef3d50"}} {
		d := TokensDigest(tc.toks)
		if got := hex.EncodeToString(d[:]); got != tc.want {
			t.Errorf("TokensDigest(%v) = %s, want %s", tc.toks, got, tc.want)
		}
	}
}

// TestChainSeparates checks that every input of a key changes it.
func TestChainSeparates(t *testing.T) {
	id := &Identity{Model: []byte("m"), Plan: []LayerPlan{{Kind: LayerHidden, RowBytes: 64}}}
	other := &Identity{Model: []byte("m"), Plan: []LayerPlan{{Kind: LayerKV, RowBytes: 64}}}
	base, _ := NewChain("a", nil, id)
	toks := []uint32{7, 8, 9, 10}
	k := base.Next(ChainKey{}, toks)
	variants := map[string]ChainKey{}
	c, _ := NewChain("b", nil, id)
	variants["namespace"] = c.Next(ChainKey{}, toks)
	c, _ = NewChain("a", []byte("s"), id)
	variants["salt"] = c.Next(ChainKey{}, toks)
	c, _ = NewChain("a", nil, other)
	variants["identity"] = c.Next(ChainKey{}, toks)
	variants["parent"] = base.Next(k, toks)
	variants["tokens"] = base.Next(ChainKey{}, []uint32{7, 8, 9, 11})
	variants["length"] = base.Next(ChainKey{}, toks[:3])
	for what, v := range variants {
		if v == k {
			t.Errorf("changing the %s left the key unchanged", what)
		}
	}
}

func TestChainRejects(t *testing.T) {
	id := &Identity{Model: []byte("m"), Plan: []LayerPlan{{Kind: LayerHidden, RowBytes: 64}}}
	cases := []struct {
		name string
		ns   string
		salt []byte
		id   *Identity
	}{
		{"nil identity", "a", nil, nil},
		{"bad identity", "a", nil, &Identity{Model: []byte("m")}},
		{"empty namespace", "", nil, id},
		{"long salt", "a", make([]byte, MaxSaltBytes+1), id},
	}
	for _, tc := range cases {
		if _, err := NewChain(tc.ns, tc.salt, tc.id); err == nil {
			t.Errorf("%s: NewChain accepted it", tc.name)
		}
	}
	c, _ := NewChain("a", nil, id)
	if _, err := c.Keys([]uint32{1}, 0); !errors.Is(err, ErrChain) {
		t.Errorf("Keys with a group of 0 tokens: %v, want ErrChain", err)
	}
}
