package lsm

import (
	"errors"
	"strings"
	"testing"

	"github.com/cockroachdb/pebble/v2/vfs"
)

// TestFatalfNeverEndsTheProcess: Pebble's Fatalf inside an operation
// becomes that operation's error; on one of Pebble's own goroutines it ends
// that goroutine, not the process; either way every later operation fails
// with Pebble's message and the index fails closed.
func TestFatalfNeverEndsTheProcess(t *testing.T) {
	cases := []struct {
		name string
		hit  func(db *DB) error
	}{
		{"inside an operation", func(db *DB) error {
			return db.fatalInOperation("MANIFEST sync failed: %s", "EIO")
		}},
		{"on a background goroutine", func(db *DB) error {
			// Started like Pebble's own goroutines: no DB operation on
			// its stack.
			ended := make(chan struct{})
			go func() {
				defer close(ended)
				backgroundFatal(db.log)
			}()
			<-ended
			return nil
		}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			db, err := Open(vfs.NewMem(), "/idx", Options{})
			if err != nil {
				t.Fatal(err)
			}
			b := db.NewBatch()
			b.set([]byte("a"), []byte("1"))
			if err := b.Commit(true); err != nil {
				t.Fatal(err)
			}
			if err := c.hit(db); err != nil && !errors.Is(err, ErrFatal) {
				t.Fatalf("the operation that hit Fatalf: %v, want ErrFatal", err)
			}
			if _, err := db.get([]byte("a")); !errors.Is(err, ErrFatal) || !strings.Contains(err.Error(), "MANIFEST sync failed: EIO") {
				t.Fatalf("Get after Fatalf: %v, want ErrFatal with Pebble's message", err)
			}
			b = db.NewBatch()
			b.set([]byte("b"), []byte("2"))
			if err := b.Commit(true); !errors.Is(err, ErrFatal) {
				t.Fatalf("Commit after Fatalf: %v", err)
			}
			if err := db.scan(nil, nil, func(k, v []byte) error { return nil }); !errors.Is(err, ErrFatal) {
				t.Fatalf("Scan after Fatalf: %v", err)
			}
			if err := db.Close(); err != nil {
				t.Fatalf("Close of a failed index: %v", err)
			}
		})
	}
	// Another index in the process is unaffected.
	db, err := Open(vfs.NewMem(), "/other", Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	b := db.NewBatch()
	b.set([]byte("x"), []byte("y"))
	if err := b.Commit(true); err != nil {
		t.Fatalf("another index after the failures: %v", err)
	}
}

// fatalInOperation is Fatalf reached inside a DB operation.
func (d *DB) fatalInOperation(format string, args ...any) (err error) {
	defer catchFatal(&err)
	d.log.Fatalf(format, args...)
	return nil
}

func backgroundFatal(l *fatalLogger) { l.Fatalf("MANIFEST sync failed: %s", "EIO") }
