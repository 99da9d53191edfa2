package gpu

import (
	"errors"
	"fmt"
	"math/rand"
	"strings"
	"testing"

	"github.com/hcache/hcache/internal/testseed"
	"github.com/hcache/hcache/model"
)

// TestCPURestoreMixedPlan: through the Backend interface, a restore that
// recomputes the first layers from token ids and projects or loads the
// rest writes exactly the forward pass's K and V, for every family; each
// release is called once; Timing counts every layer.
func TestCPURestoreMixedPlan(t *testing.T) {
	seed := testseed.Seed(t)
	for _, preset := range []string{"tiny-llama", "tiny-gqa", "tiny-qwen2", "tiny-opt", "tiny-linear-rope"} {
		t.Run(preset, func(t *testing.T) {
			rng := rand.New(rand.NewSource(seed))
			c, m, kvw := loadTiny(t, preset, seed)
			var b Backend
			cpu, err := NewCPU(c, kvw)
			if err != nil {
				t.Fatal(err)
			}
			b = cpu
			tokens := make([]int, 29)
			for i := range tokens {
				tokens[i] = rng.Intn(c.Vocab)
			}
			hidden, kv := make([][]byte, c.Layers), make([][]byte, c.Layers)
			cache := model.NewKVCache(c)
			kvd, half := c.KVDim(), c.KVRowBytes()/2
			if _, err := m.Forward(tokens, cache, func(l int, h, k, v []float32) {
				hidden[l] = make([]byte, len(h)*c.ElemBytes())
				c.EncodeRow(hidden[l], h)
				kv[l] = make([]byte, len(tokens)*c.KVRowBytes())
				for i := range tokens {
					c.EncodeRow(kv[l][i*2*half:], k[i*kvd:(i+1)*kvd])
					c.EncodeRow(kv[l][i*2*half+half:], v[i*kvd:(i+1)*kvd])
				}
			}); err != nil {
				t.Fatal(err)
			}
			dst := make(HostCache, c.Layers)
			for l := range dst {
				dst[l], _ = NewPagedKV(c, 8, (len(tokens)+7)/8)
			}
			positions := make([]int, len(tokens))
			for i := range positions {
				positions[i] = i
			}
			r, err := b.BeginRestore(dst, positions)
			if err != nil {
				t.Fatal(err)
			}
			if err := r.Recompute(tokens, 1, nil); err == nil || !strings.Contains(err.Error(), "LoadRecompute") {
				t.Fatalf("recompute before LoadRecompute: %v", err)
			}
			r.Wait()
			if err := b.LoadRecompute(m.W, 2); err != nil {
				t.Fatal(err)
			}
			if r, err = b.BeginRestore(dst, positions); err != nil {
				t.Fatal(err)
			}
			var done []int
			if err := r.Recompute(tokens, 2, func(l int) { done = append(done, l) }); err != nil {
				t.Fatal(err)
			}
			released := 0
			for l := 2; l < c.Layers; l++ {
				if l%2 == 0 {
					err = r.Hidden(l, hidden[l], func() { released++ })
				} else {
					err = r.KV(l, kv[l], func() { released++ })
				}
				if err != nil {
					t.Fatal(err)
				}
			}
			tm, err := r.Wait()
			if err != nil || tm.Layers != c.Layers || released != c.Layers-2 || fmt.Sprint(done) != "[0 1]" {
				t.Fatalf("wait: %v, %d layers timed, %d released, done %v", err, tm.Layers, released, done)
			}
			row := make([]byte, kvd*c.ElemBytes())
			for l := 0; l < c.Layers; l++ {
				for p := range tokens {
					k, v, _ := dst[l].Token(p)
					c.EncodeRow(row, cache.K[l][p*kvd:(p+1)*kvd])
					if string(k) != string(row) {
						t.Fatalf("layer %d position %d: K differs from the forward pass's", l, p)
					}
					c.EncodeRow(row, cache.V[l][p*kvd:(p+1)*kvd])
					if string(v) != string(row) {
						t.Fatalf("layer %d position %d: V differs", l, p)
					}
				}
			}
		})
	}
}

// TestCPURestoreRefuses: what a restore cannot do is refused with an error
// naming it; a layer's release is called even then; Abort stops the
// restore's work.
func TestCPURestoreRefuses(t *testing.T) {
	c, m, kvw := loadTiny(t, "tiny-llama", 1)
	b, _ := NewCPU(c, kvw)
	if err := b.LoadRecompute(m.W, c.Layers); err != nil {
		t.Fatal(err)
	}
	dst := make(HostCache, c.Layers)
	for l := range dst {
		dst[l], _ = NewPagedKV(c, 16, 1)
	}
	if _, err := b.BeginRestore(dst[1:], []int{0}); err == nil || !strings.Contains(err.Error(), "3-layer cache") {
		t.Errorf("short cache: %v", err)
	}
	if _, err := b.BeginRestore(struct{ HostCache }{dst}, []int{0}); err == nil || !strings.Contains(err.Error(), "restores into a HostCache") {
		t.Errorf("foreign cache: %v", err)
	}
	if _, err := b.BeginRestore(dst, nil); err == nil {
		t.Error("no positions accepted")
	}
	if err := b.LoadRecompute(m.W, c.Layers+1); err == nil {
		t.Error("LoadRecompute of more layers than the model accepted")
	}
	cases := []struct {
		name string
		run  func(r Restore) error
		want string
	}{
		{"recompute from position 3", func(r Restore) error { return r.Recompute([]int{1}, 1, nil) }, "0..n-1"},
		{"recompute of other tokens", func(r Restore) error { return r.Recompute([]int{1, 2}, 1, nil) }, "2 tokens in a restore of 1"},
		{"layer out of range", func(r Restore) error { return r.KV(9, nil, nil) }, "layer 9 out of range"},
		{"short rows", func(r Restore) error { return r.Hidden(0, make([]byte, 3), nil) }, "3 hidden bytes"},
		{"after abort", func(r Restore) error { r.Abort(); r.Abort(); return r.KV(0, make([]byte, c.KVRowBytes()), nil) }, ErrAborted.Error()},
	}
	for _, tc := range cases {
		r, err := b.BeginRestore(dst, []int{3})
		if err != nil {
			t.Fatal(err)
		}
		err = tc.run(r)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want an error containing %q", tc.name, err, tc.want)
		}
		released := false
		r.KV(0, nil, func() { released = true })
		if !released {
			t.Errorf("%s: a layer after the error was not released", tc.name)
		}
		if _, err := r.Wait(); err == nil {
			t.Errorf("%s: Wait reported no error", tc.name)
		}
		if _, err := r.Wait(); err == nil || !strings.Contains(err.Error(), "already waited") {
			t.Errorf("%s: a second Wait: %v", tc.name, err)
		}
	}
}

// TestSelect: "cpu" is always there; with no device backend linked (this
// package's tests link none), "cuda" fails with ErrNoDevice saying so and
// "auto" falls back to the CPU backend; a registered backend is used and
// "auto" tries it; unknown names are refused.
func TestSelect(t *testing.T) {
	c, _, kvw := loadTiny(t, "tiny-llama", 1)
	b, note, err := Select(SelectCPU, c, kvw, nil)
	if err != nil || b.Name() != "cpu" || !strings.Contains(note, "chosen") {
		t.Fatalf("cpu: %q %v", note, err)
	}
	if _, _, err := Select(SelectCUDA, c, kvw, nil); !errors.Is(err, ErrNoDevice) || !strings.Contains(err.Error(), "not linked") {
		t.Fatalf("cuda without gpu/cuda linked: %v", err)
	}
	b, note, err = Select(SelectAuto, c, kvw, nil)
	if err != nil || b.Name() != "cpu" || !strings.Contains(note, "no device backend linked") {
		t.Fatalf("auto: %q %v", note, err)
	}
	if _, _, err := Select("tpu", c, kvw, nil); err == nil || !strings.Contains(err.Error(), "unknown backend") {
		t.Fatalf("tpu: %v", err)
	}
	// A registered device backend that cannot run here: auto falls back
	// with its reason; one that fails otherwise is an error.
	var gotOpts any
	Register("test-nodev", func(c *model.Config, w *model.Weights, opts any) (Backend, string, error) {
		gotOpts = opts
		return nil, "", fmt.Errorf("%w: test device unplugged", ErrNoDevice)
	})
	b, note, err = Select(SelectAuto, c, kvw, 7)
	if err != nil || b.Name() != "cpu" || !strings.Contains(note, "test device unplugged") || gotOpts != 7 {
		t.Fatalf("auto with an unplugged device: %q %v (opts %v)", note, err, gotOpts)
	}
	Register("test-dev", func(c *model.Config, w *model.Weights, opts any) (Backend, string, error) {
		cpu, err := NewCPU(c, w)
		return cpu, "test device", err
	})
	if b, note, err = Select(SelectAuto, c, kvw, nil); err != nil || note != "test device" {
		t.Fatalf("auto with a device: %q %v", note, err)
	}
	if got := fmt.Sprint(Registered()); got != "[test-nodev test-dev]" {
		t.Fatalf("registered %s", got)
	}
	defer func() {
		if recover() == nil {
			t.Fatal("registering a name twice did not panic")
		}
	}()
	Register("test-dev", func(*model.Config, *model.Weights, any) (Backend, string, error) { return nil, "", nil })
}
