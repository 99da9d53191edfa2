package chunk

import (
	"errors"
	"testing"
	"time"
)

// TestAPIMisuse: nil arguments are errors, a failed append changes
// nothing, Flush after Delete is ErrNotFound, and a panicking Restore
// callback neither escapes nor wedges the store.
func TestAPIMisuse(t *testing.T) {
	ident := testIdentity("m")
	e := newEnv(t, "mem", func(o *Options) {
		// Two group slabs: 16 tokens x (4096 + 4096 + 4096) bytes each.
		o.StagingBytes = 2 * 3 * BlockBytes
	})
	s := e.open()
	defer func() {
		within(t, "Close", 30*time.Second, func() { s.Close() })
	}()
	noop := func(int, []byte) error { return nil }

	t.Run("nil arguments", func(t *testing.T) {
		if _, err := s.Create("ns", "x", nil, CreateOptions{}); !errors.Is(err, ErrIdentity) {
			t.Fatalf("Create(nil identity): %v", err)
		}
		w, _ := s.Create("ns", "nil", ident, CreateOptions{})
		appendPrefill(t, w, ident, "nil", 0, 4)
		w.Close()
		if _, err := s.Append("ns", "nil", nil); !errors.Is(err, ErrIdentity) {
			t.Fatalf("Append(nil identity): %v", err)
		}
		if _, err := s.Restore("ns", "nil", nil, noop); err == nil {
			t.Fatal("Restore(nil identity) succeeded")
		}
		if _, err := s.Restore("ns", "nil", ident, nil); err == nil {
			t.Fatal("Restore(nil callback) succeeded")
		}
	})

	t.Run("ErrStagingFull appends nothing", func(t *testing.T) {
		w, err := s.Create("ns", "staged", ident, CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		big := expectLayer("staged", 0, 40, 128) // three groups: more than staging holds
		if err := w.AppendLayer(0, big); !errors.Is(err, ErrStagingFull) {
			t.Fatalf("AppendLayer past the staging bound: %v, want ErrStagingFull", err)
		}
		if w.Tokens() != 0 || w.layerTok[0] != 0 {
			t.Fatalf("a failed append moved the writer to %d tokens (layer 0 at %d)", w.Tokens(), w.layerTok[0])
		}
		// The retry in smaller steps stores every row where it belongs.
		appendPrefill(t, w, ident, "staged", 0, 20)
		if err := w.Flush(); err != nil {
			t.Fatal(err)
		}
		appendPrefill(t, w, ident, "staged", 20, 40)
		if err := w.Close(); err != nil {
			t.Fatal(err)
		}
		verify(t, s, "ns", "staged", ident, 40)
	})

	t.Run("Flush after Delete", func(t *testing.T) {
		w, _ := s.Create("ns", "del", ident, CreateOptions{})
		appendPrefill(t, w, ident, "del", 0, 10)
		if err := w.Flush(); err != nil {
			t.Fatal(err)
		}
		if err := s.Delete("ns", "del"); err != nil {
			t.Fatal(err)
		}
		appendPrefill(t, w, ident, "del", 10, 12)
		if err := w.Flush(); !errors.Is(err, ErrNotFound) {
			t.Fatalf("Flush after Delete: %v, want ErrNotFound", err)
		}
		if err := w.Close(); !errors.Is(err, ErrNotFound) {
			t.Fatalf("Close after Delete: %v, want ErrNotFound", err)
		}
	})

	t.Run("panicking callback", func(t *testing.T) {
		w, _ := s.Create("ns", "p", ident, CreateOptions{})
		appendPrefill(t, w, ident, "p", 0, 30)
		w.Close()
		for i := 0; i < 3; i++ {
			var err error
			within(t, "Restore with a panicking callback", 30*time.Second, func() {
				_, err = s.Restore("ns", "p", ident, func(layer int, rows []byte) error {
					if layer == 1 {
						panic("consumer bug")
					}
					return nil
				})
			})
			if !errors.Is(err, ErrCallbackPanic) {
				t.Fatalf("Restore whose callback panicked: %v, want ErrCallbackPanic", err)
			}
		}
		verify(t, s, "ns", "p", ident, 30)
	})
}
