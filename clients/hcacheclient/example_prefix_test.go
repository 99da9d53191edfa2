package hcacheclient_test

import (
	"context"
	"fmt"
	"log"

	hc "github.com/hcache/hcache/clients/hcacheclient"
)

// Two prompts share a system prompt: the first save stores it, the second
// sends only its own rows; a lookup says how much of a prompt is stored,
// a restore by tokens brings that prefix back, and a fork starts a branch
// without copying the shared groups.
func Example_prefix() {
	sock, stop := startDaemon()
	defer stop()
	ctx := context.Background()
	c, err := hc.Dial(sock)
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()
	ident := hc.Identity{Model: []byte("my-model sha256:..."), Plan: []hc.LayerPlan{
		{Kind: hc.LayerHidden, RowBytes: 8}, {Kind: hc.LayerKV, RowBytes: 4}}}
	info, err := c.Info(ctx)
	if err != nil {
		log.Fatal(err)
	}
	ct := int(info.GetChunkTokens())
	// Token ids: a system prompt of two chunk groups (the daemon's store
	// has 64-token groups here), then each user's turn.
	system := make([]uint32, 2*ct)
	for i := range system {
		system[i] = uint32(1000 + i)
	}
	promptA := append(append([]uint32(nil), system...), 7, 8, 9)
	promptB := append(append([]uint32(nil), system...), 4, 5)

	save := func(id string, prompt []uint32) {
		w, err := c.CreateTokens(ctx, "engine-a", id, ident, prompt, nil, false)
		if err != nil {
			log.Fatal(err)
		}
		// Rows from w.Tokens on: what the daemon does not hold yet.
		n := len(prompt) - int(w.Tokens)
		fmt.Printf("%s: %d tokens shared, %d sent\n", id, w.Tokens, n)
		if err := w.AppendLayer(ctx, 0, make([]byte, n*8)); err != nil {
			log.Fatal(err)
		}
		if err := w.AppendLayer(ctx, 1, make([]byte, n*4)); err != nil {
			log.Fatal(err)
		}
		// Decode: the next token with its id.
		if err := w.AppendTokenIDs(ctx, []uint32{42}, make([]byte, 8+4)); err != nil {
			log.Fatal(err)
		}
		if err := w.Close(ctx); err != nil {
			log.Fatal(err)
		}
	}
	save("a", promptA)
	save("b", promptB)

	// A new prompt with the same system prompt: its whole groups are stored.
	promptC := append(append([]uint32(nil), system...), 1, 2, 3)
	n, _, err := c.Lookup(ctx, hc.Prefix{Namespace: "engine-a", Identity: ident, Tokens: promptC})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("lookup: %d of %d tokens stored\n", n, len(promptC))
	n, err = c.RestoreTokens(ctx, hc.Prefix{Namespace: "engine-a", Identity: ident, Tokens: promptC}, func(layer int, rows []byte) error {
		fmt.Printf("layer %d: %d bytes\n", layer, len(rows))
		return nil
	})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("restored", n, "tokens")
	// Conversation a with its own tail: name it.
	n, _, err = c.Lookup(ctx, hc.Prefix{Namespace: "engine-a", Identity: ident, Tokens: append(promptA, 42), ID: "a"})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("lookup naming a: %d tokens\n", n)
	// Branch a after its system prompt and first user token.
	if err := c.Fork(ctx, "engine-a", "a", "a-branch", uint64(2*ct+1)); err != nil {
		log.Fatal(err)
	}
	st, err := c.Stat(ctx, "engine-a", "a-branch")
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("a-branch holds", st.GetTokens(), "tokens")
	// Output:
	// a: 0 tokens shared, 131 sent
	// b: 128 tokens shared, 2 sent
	// lookup: 128 of 131 tokens stored
	// layer 0: 1024 bytes
	// layer 1: 512 bytes
	// restored 128 tokens
	// lookup naming a: 132 tokens
	// a-branch holds 129 tokens
}
