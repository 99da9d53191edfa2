package hcacheclient_test

import (
	"context"
	"fmt"
	"io"
	"log"
	"log/slog"
	"os"
	"path/filepath"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/hcache/hcache/chunk"
	hc "github.com/hcache/hcache/clients/hcacheclient"
	"github.com/hcache/hcache/daemon"
)

// startDaemon runs a daemon in this process on a temporary store (what
// `hcached --dir DIR --listen SOCK` does in its own process).
func startDaemon() (sock string, stop func()) {
	dir, err := os.MkdirTemp("", "hcache-example")
	if err != nil {
		log.Fatal(err)
	}
	st, err := chunk.Open(chunk.Options{Dir: filepath.Join(dir, "store"), GCInterval: -1, Logf: func(string, ...any) {}})
	if err != nil {
		log.Fatal(err)
	}
	sock = filepath.Join(dir, "hcache.sock")
	srv, err := daemon.New(daemon.Config{Store: st, Listen: sock, Shm: sock + ".shm", Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		log.Fatal(err)
	}
	return sock, func() { srv.Stop(); st.Close(); os.RemoveAll(dir) }
}

// conversation saves one conversation's states through the daemon at addr
// (a socket path, unix:///path or host:port) and restores them twice:
// inline and through shared memory. Every call's error is checked, and it
// can run again against the same daemon: the conversation it saved last
// time is replaced.
func conversation(addr string, out io.Writer) error {
	ctx := context.Background()
	c, err := hc.Dial(addr)
	if err != nil {
		return err
	}
	defer c.Close()
	// Two layers: the first keeps its hidden state (8 bytes a token here),
	// the second K and V (4 bytes). The model bytes fingerprint the weights.
	ident := hc.Identity{Model: []byte("my-model sha256:..."), Plan: []hc.LayerPlan{
		{Kind: hc.LayerHidden, RowBytes: 8}, {Kind: hc.LayerKV, RowBytes: 4}}}

	// Create refuses an id that exists (AlreadyExists): a new conversation
	// under an old id deletes the old one first (NotFound the first time).
	if err := c.Delete(ctx, "engine-a", "conversation-1"); err != nil && status.Code(err) != codes.NotFound {
		return err
	}
	w, err := c.Create(ctx, "engine-a", "conversation-1", ident, false)
	if err != nil {
		return err
	}
	prompt := 100
	if err := w.AppendLayer(ctx, 0, make([]byte, prompt*8)); err != nil { // prefill, layer 0
		return err
	}
	if err := w.AppendLayer(ctx, 1, make([]byte, prompt*4)); err != nil { // prefill, layer 1
		return err
	}
	for i := 0; i < 5; i++ { // decode: one token of both layers
		if err := w.AppendTokens(ctx, 1, make([]byte, 8+4)); err != nil {
			return err
		}
	}
	// Close flushes: the tokens are durable when it returns nil. It fails
	// (and names them) when tokens were appended in only some layers.
	if err := w.Close(ctx); err != nil {
		return err
	}

	tokens, err := c.Restore(ctx, "engine-a", "conversation-1", ident, func(layer int, rows []byte) error {
		fmt.Fprintf(out, "layer %d: %d bytes\n", layer, len(rows))
		return nil
	})
	if err != nil {
		return err
	}
	fmt.Fprintln(out, "restored", tokens, "tokens")

	// The same through shared memory: the daemon writes the layers into the
	// region and the callback sees them in place.
	g, err := c.NewRegion(ctx, 1<<20)
	if err != nil {
		return err
	}
	defer g.Close()
	tokens, err = c.RestoreInto(ctx, "engine-a", "conversation-1", ident, g, 0, uint64(len(g.Mem)), func(layer int, rows []byte) error {
		fmt.Fprintf(out, "layer %d: %d bytes in the region\n", layer, len(rows))
		return nil
	})
	if err != nil {
		return err
	}
	fmt.Fprintln(out, "restored", tokens, "tokens")
	return nil
}

// A conversation's states are saved layer by layer during prefill, token by
// token during decode, flushed, and restored layer by layer on the next turn.
func Example() {
	sock, stop := startDaemon()
	defer stop()
	if err := conversation(sock, os.Stdout); err != nil {
		log.Fatal(err)
	}
	// Output:
	// layer 0: 840 bytes
	// layer 1: 420 bytes
	// restored 105 tokens
	// layer 0: 840 bytes in the region
	// layer 1: 420 bytes in the region
	// restored 105 tokens
}
