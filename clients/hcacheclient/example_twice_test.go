package hcacheclient_test

import (
	"bytes"
	"testing"
)

// TestExampleRunsTwice: the Example's code runs twice against one daemon
// with the same output (it failed with AlreadyExists the second time).
func TestExampleRunsTwice(t *testing.T) {
	sock, stop := startDaemon()
	defer stop()
	var first, second bytes.Buffer
	if err := conversation(sock, &first); err != nil {
		t.Fatalf("first run: %v", err)
	}
	if err := conversation(sock, &second); err != nil {
		t.Fatalf("second run: %v", err)
	}
	if first.String() != second.String() {
		t.Fatalf("the runs differ:\n%s\n%s", first.String(), second.String())
	}
}
