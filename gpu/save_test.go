package gpu

import (
	"bytes"
	"context"
	"errors"
	"strings"
	"testing"
)

// TestCPUDeviceCopyToHost: the CPU device's copy runs after the work queued
// on the caller's stream before the call (a held kernel: the call returns,
// the event is not done, the copy sees the kernel's bytes), is cancelled by
// its context while it waits, and refuses copies outside an allocation.
func TestCPUDeviceCopyToHost(t *testing.T) {
	d := NewCPUDevice()
	defer d.Close()
	s, err := d.NewStream()
	if err != nil {
		t.Fatal(err)
	}
	p, mem, err := d.Alloc(64)
	if err != nil {
		t.Fatal(err)
	}
	gate := make(chan struct{})
	if err := d.Launch(s, func() { <-gate; copy(mem, bytes.Repeat([]byte{9}, 64)) }); err != nil {
		t.Fatal(err)
	}
	dst := make([]byte, 48)
	ev, err := d.CopyToHost(context.Background(), s, Copy{Src: p + 16, Bytes: 48, Dst: dst})
	if err != nil {
		t.Fatal(err)
	}
	if done, err := ev.Query(); done || err != nil {
		t.Fatalf("copy complete (%v, %v) while the caller's kernel is held", done, err)
	}
	close(gate)
	if err := ev.Wait(); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(dst, bytes.Repeat([]byte{9}, 48)) {
		t.Fatal("the copy did not see the kernel queued before it")
	}
	ev.Release()

	// Cancelled while waiting for the caller's stream.
	gate = make(chan struct{})
	d.Launch(s, func() { <-gate })
	ctx, cancel := context.WithCancel(context.Background())
	ev, err = d.CopyToHost(ctx, s, Copy{Src: p, Bytes: 8, Dst: make([]byte, 8)})
	if err != nil {
		t.Fatal(err)
	}
	cancel()
	if err := ev.Wait(); !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled copy: %v", err)
	}
	close(gate)

	for _, c := range []struct {
		name string
		cp   Copy
		s    Stream
		want string
	}{
		{"past the end", Copy{Src: p + 60, Bytes: 8, Dst: make([]byte, 8)}, s, "runs past the end"},
		{"before any allocation", Copy{Src: 8, Bytes: 8, Dst: make([]byte, 8)}, s, "not inside an allocation"},
		{"short destination", Copy{Src: p, Bytes: 8, Dst: make([]byte, 4)}, s, "4-byte destination"},
		{"unknown stream", Copy{Src: p, Bytes: 8, Dst: make([]byte, 8)}, 77, "stream 77"},
	} {
		if _, err := d.CopyToHost(context.Background(), c.s, c.cp); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want an error saying %q", c.name, err, c.want)
		}
	}
	if err := d.Free(p + 1); err == nil {
		t.Error("Free of an address inside an allocation succeeded")
	}
	if err := d.Free(p); err != nil {
		t.Fatal(err)
	}
	if _, err := d.CopyToHost(context.Background(), s, Copy{Src: p, Bytes: 8, Dst: make([]byte, 8)}); err == nil {
		t.Error("copy from freed memory accepted")
	}
}
