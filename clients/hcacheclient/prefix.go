package hcacheclient

import (
	"context"

	hcachev1 "github.com/hcache/hcache/proto/hcache/v1"
)

// Prefix names state by its tokens: a namespace, an identity and the token
// ids of a prompt. Salt (vLLM's cache_salt) joins the chain keys: state is
// shared only between requests of the same namespace, identity and salt.
// ID optionally names a context created with tokens whose own partial
// tail (past its last whole chunk group) counts too when its ids match.
type Prefix struct {
	Namespace string
	Identity  Identity
	Tokens    []uint32
	Salt      []byte
	ID        string
}

// Lookup returns how many leading tokens of p.Tokens have stored state
// (whole chunk groups of the daemon's ChunkTokens, plus p.ID's matching
// tail) and the daemon's chunk size. It reads only the daemon's index; a
// namespace not granted is PERMISSION_DENIED.
func (c *Client) Lookup(ctx context.Context, p Prefix) (tokens uint64, chunkTokens int, err error) {
	r, err := c.API.Lookup(ctx, &hcachev1.LookupRequest{Namespace: p.Namespace, Identity: identityProto(p.Identity),
		Tokens: p.Tokens, Salt: p.Salt, Id: p.ID})
	if err != nil {
		return 0, 0, err
	}
	return r.GetTokens(), int(r.GetChunkTokens()), nil
}

// CreateTokens creates a context addressed by its tokens (the prompt's ids)
// and returns its writer. The leading whole chunk groups already stored in
// the namespace (same identity and salt) are shared, not sent again: the
// writer's Tokens says where it continues, and the caller appends rows
// from that token on (AppendLayer's rows start there).
func (c *Client) CreateTokens(ctx context.Context, ns, id string, ident Identity, tokens []uint32, salt []byte, pinned bool) (*Writer, error) {
	return c.openReq(ctx, &hcachev1.OpenContextRequest{Ctx: ref(ns, id), Identity: identityProto(ident),
		Mode: hcachev1.OpenMode_CREATE, Pinned: pinned, Tokens: tokens, Salt: salt})
}

// AppendWithTokens reopens a context created with tokens for its next
// turn: tokens are the context's stored token ids followed by this turn's
// (FAILED_PRECONDITION when the stored ones differ, or the salt does). The
// writer continues from its Tokens.
func (c *Client) AppendWithTokens(ctx context.Context, ns, id string, ident Identity, tokens []uint32, salt []byte) (*Writer, error) {
	return c.openReq(ctx, &hcachev1.OpenContextRequest{Ctx: ref(ns, id), Identity: identityProto(ident),
		Mode: hcachev1.OpenMode_APPEND, Tokens: tokens, Salt: salt})
}

func (c *Client) openReq(ctx context.Context, req *hcachev1.OpenContextRequest) (*Writer, error) {
	r, err := c.API.OpenContext(ctx, req)
	if err != nil {
		return nil, err
	}
	return &Writer{c: c, ref: req.GetCtx(), Tokens: r.GetTokens()}, nil
}

// AppendTokenIDs appends len(ids) whole tokens with their ids (decode of a
// context created with tokens): for each token the rows of every stored
// layer in layer order.
func (w *Writer) AppendTokenIDs(ctx context.Context, ids []uint32, rows []byte) error {
	r, err := w.c.API.AppendTokens(ctx, &hcachev1.AppendTokensRequest{Ctx: w.ref, Count: uint32(len(ids)), Rows: inline(rows), TokenIds: ids})
	if err == nil {
		w.Tokens = r.GetTokens()
	}
	return err
}

// RestoreTokens streams the stored layers of the longest stored prefix of
// p.Tokens to fn (rows valid during the call) and returns its token count:
// 0, with fn never called, when nothing is stored. Every group's token ids
// are checked against p.Tokens before its rows are sent.
func (c *Client) RestoreTokens(ctx context.Context, p Prefix, fn func(layer int, rows []byte) error) (uint64, error) {
	return c.restore(ctx, restoreTokensReq(p), fn)
}

// RestoreTokensInto is RestoreTokens into a shared region (as RestoreInto).
func (c *Client) RestoreTokensInto(ctx context.Context, p Prefix, g *Region, off, n uint64, fn func(layer int, rows []byte) error) (uint64, error) {
	req := restoreTokensReq(p)
	req.Region = g.slice(off, n).GetRegion()
	return c.restoreInto(ctx, req, g, fn)
}

func restoreTokensReq(p Prefix) *hcachev1.RestoreRequest {
	return &hcachev1.RestoreRequest{Ctx: ref(p.Namespace, p.ID), Identity: identityProto(p.Identity), Tokens: p.Tokens, Salt: p.Salt}
}

// Fork creates context dst in ns holding the first tokens of src (a
// context created with tokens, no writer open): its whole chunk groups are
// shared, only a partial last group is copied.
func (c *Client) Fork(ctx context.Context, ns, src, dst string, tokens uint64) error {
	_, err := c.API.Fork(ctx, &hcachev1.ForkRequest{Src: ref(ns, src), DstId: dst, Tokens: tokens})
	return err
}
