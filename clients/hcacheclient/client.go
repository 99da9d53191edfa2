// Package hcacheclient is the Go client of hcached, the hcache state-store
// daemon (see proto/hcache/v1 and the daemon package doc, go doc ./daemon).
//
// A client saves a context's per-layer rows through a Writer (AppendLayer for
// prefill, AppendTokens for decode, Flush to make them durable) and gets them
// back with Restore, layer by layer. On the local unix socket, bulk bytes can
// travel through a shared memory Region instead of the messages.
package hcacheclient

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"

	hcachev1 "github.com/hcache/hcache/proto/hcache/v1"
	"github.com/hcache/hcache/state"
)

// What a stored state is (layer kinds, plans, the identity) is package
// state's, shared with the daemon and the store; the client uses those types
// as they are, without linking the store.
type (
	// LayerKind says what a layer stores.
	LayerKind = state.LayerKind
	// LayerPlan is one layer's kind and row size in bytes.
	LayerPlan = state.LayerPlan
	// Identity is the model fingerprint, per-layer plan and codec a stored
	// state must match before it is served; Identity.TokenBytes is the bytes
	// of one token over the stored layers.
	Identity = state.Identity
	// Codec is how an identity's rows are encoded (state/codec). Under a
	// codec other than CodecNone the plan's row sizes are the encoded ones
	// (codec.HiddenRowBytes, codec.KVRowBytes) and the client appends rows
	// it encoded itself (codec.EncodeRows from the layer's position, which
	// int8's aligned groups need; codec.EncodeRow for one row): the daemon
	// stores them as given.
	// Restore hands them back as stored (codec.TranscodeRows decodes them);
	// RestoreDecoded and RestoreProjected in the model dtype.
	Codec = state.Codec
)

// Codecs.
const (
	CodecNone     = state.CodecNone
	CodecFP8      = state.CodecFP8Token
	CodecFP8Block = state.CodecFP8Block
	CodecInt8     = state.CodecInt8Channel
)

// Layer kinds.
const (
	LayerNone   = state.LayerNone
	LayerHidden = state.LayerHidden
	LayerKV     = state.LayerKV
)

func identityProto(id Identity) *hcachev1.Identity {
	p := &hcachev1.Identity{Model: id.Model, Codec: hcachev1.Codec(id.Codec)}
	for _, l := range id.Plan {
		p.Plan = append(p.Plan, &hcachev1.LayerPlan{Kind: hcachev1.LayerKind(l.Kind), RowBytes: l.RowBytes})
	}
	return p
}

// Client is a connection to hcached. Its methods are safe for concurrent
// use; a Writer is not (use one per context).
type Client struct {
	conn  *grpc.ClientConn
	API   hcachev1.HCacheClient // the raw API, for what the helpers do not cover
	token string
	addr  string
	tls   *tls.Config
}

// Option configures Dial.
type Option func(*Client)

// WithTLS connects over TLS (a TCP daemon started with --tls-cert and
// --tls-key); cfg holds the roots that verify its certificate.
func WithTLS(cfg *tls.Config) Option { return func(c *Client) { c.tls = cfg } }

// WithToken presents a bearer token (required over TCP; on the unix socket
// it narrows the user's grant to the token's namespaces).
func WithToken(tok string) Option { return func(c *Client) { c.token = tok } }

// Dial connects to a daemon: "unix:///path/hcache.sock", a bare socket path
// ("/path/hcache.sock" or "./hcache.sock", as hcached --listen takes it) or
// "host:port".
func Dial(addr string, opts ...Option) (*Client, error) {
	if strings.HasPrefix(addr, "/") || strings.HasPrefix(addr, "./") || strings.HasPrefix(addr, "../") {
		abs, err := filepath.Abs(addr)
		if err != nil {
			return nil, err
		}
		addr = "unix://" + abs
	}
	c := &Client{addr: addr}
	for _, o := range opts {
		o(c)
	}
	target := addr
	if !strings.HasPrefix(addr, "unix:") {
		target = "passthrough:///" + addr
	}
	creds := insecure.NewCredentials()
	if c.tls != nil {
		creds = credentials.NewTLS(c.tls)
	}
	gopts := []grpc.DialOption{grpc.WithTransportCredentials(creds),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(1<<30), grpc.MaxCallSendMsgSize(1<<30))}
	if c.token != "" {
		gopts = append(gopts, grpc.WithChainUnaryInterceptor(func(ctx context.Context, m string, req, reply any, cc *grpc.ClientConn, inv grpc.UnaryInvoker, o ...grpc.CallOption) error {
			return inv(c.auth(ctx), m, req, reply, cc, o...)
		}), grpc.WithChainStreamInterceptor(func(ctx context.Context, d *grpc.StreamDesc, cc *grpc.ClientConn, m string, s grpc.Streamer, o ...grpc.CallOption) (grpc.ClientStream, error) {
			return s(c.auth(ctx), d, cc, m, o...)
		}))
	}
	conn, err := grpc.NewClient(target, gopts...)
	if err != nil {
		return nil, err
	}
	c.conn, c.API = conn, hcachev1.NewHCacheClient(conn)
	return c, nil
}

func (c *Client) auth(ctx context.Context) context.Context {
	return metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+c.token)
}

// Close closes the connection; the daemon abandons writers left open on it
// (their unflushed rows are dropped).
func (c *Client) Close() error { return c.conn.Close() }

// Info describes the daemon.
func (c *Client) Info(ctx context.Context) (*hcachev1.InfoReply, error) {
	return c.API.Info(ctx, &hcachev1.InfoRequest{})
}

func ref(ns, id string) *hcachev1.ContextRef { return &hcachev1.ContextRef{Namespace: ns, Id: id} }

// Writer appends to one context.
type Writer struct {
	c      *Client
	ref    *hcachev1.ContextRef
	ident  Identity
	Tokens uint64 // complete tokens appended so far
}

// Create creates a context and returns its writer.
func (c *Client) Create(ctx context.Context, ns, id string, ident Identity, pinned bool) (*Writer, error) {
	return c.open(ctx, ns, id, ident, hcachev1.OpenMode_CREATE, pinned)
}

// Append reopens a context to add the next turn.
func (c *Client) Append(ctx context.Context, ns, id string, ident Identity) (*Writer, error) {
	return c.open(ctx, ns, id, ident, hcachev1.OpenMode_APPEND, false)
}

func (c *Client) open(ctx context.Context, ns, id string, ident Identity, mode hcachev1.OpenMode, pinned bool) (*Writer, error) {
	r, err := c.API.OpenContext(ctx, &hcachev1.OpenContextRequest{Ctx: ref(ns, id), Identity: identityProto(ident), Mode: mode, Pinned: pinned})
	if err != nil {
		return nil, err
	}
	return &Writer{c: c, ref: ref(ns, id), ident: ident, Tokens: r.GetTokens()}, nil
}

func inline(b []byte) *hcachev1.Rows { return &hcachev1.Rows{Where: &hcachev1.Rows_Inline{Inline: b}} }

// AppendLayer appends rows of one layer, inline.
func (w *Writer) AppendLayer(ctx context.Context, layer int, rows []byte) error {
	r, err := w.c.API.AppendLayer(ctx, &hcachev1.AppendLayerRequest{Ctx: w.ref, Layer: uint32(layer), Rows: inline(rows)})
	if err == nil {
		w.Tokens = r.GetTokens()
	}
	return err
}

// AppendLayerRegion appends rows of one layer that the caller placed in a
// shared region at [off, off+n).
func (w *Writer) AppendLayerRegion(ctx context.Context, layer int, g *Region, off, n uint64) error {
	r, err := w.c.API.AppendLayer(ctx, &hcachev1.AppendLayerRequest{Ctx: w.ref, Layer: uint32(layer), Rows: g.slice(off, n)})
	if err == nil {
		w.Tokens = r.GetTokens()
	}
	return err
}

// AppendTokens appends count whole tokens: for each token the rows of every
// stored layer in layer order.
func (w *Writer) AppendTokens(ctx context.Context, count int, rows []byte) error {
	r, err := w.c.API.AppendTokens(ctx, &hcachev1.AppendTokensRequest{Ctx: w.ref, Count: uint32(count), Rows: inline(rows)})
	if err == nil {
		w.Tokens = r.GetTokens()
	}
	return err
}

// Flush returns once every complete token appended is durable.
func (w *Writer) Flush(ctx context.Context) error {
	_, err := w.c.API.Flush(ctx, &hcachev1.FlushRequest{Ctx: w.ref})
	return err
}

// Close flushes and releases the writer.
func (w *Writer) Close(ctx context.Context) error {
	_, err := w.c.API.CloseContext(ctx, &hcachev1.CloseContextRequest{Ctx: w.ref})
	return err
}

// Restore streams a context's stored layers inline to fn (rows valid during
// the call) and returns the token count.
func (c *Client) Restore(ctx context.Context, ns, id string, ident Identity, fn func(layer int, rows []byte) error) (uint64, error) {
	return c.restore(ctx, &hcachev1.RestoreRequest{Ctx: ref(ns, id), Identity: identityProto(ident)}, fn)
}

// RestoreProjected is Restore with the hidden-state layers projected on the
// daemon's backend: every layer's rows come back as K|V rows
// ([tokens x 2 x kv_dim] in the model dtype, K after rope). The identity's
// model must be one the daemon loaded (Info lists them with their
// fingerprints).
func (c *Client) RestoreProjected(ctx context.Context, ns, id string, ident Identity, fn func(layer int, rows []byte) error) (uint64, error) {
	return c.restore(ctx, &hcachev1.RestoreRequest{Ctx: ref(ns, id), Identity: identityProto(ident), Project: true}, fn)
}

// RestoreDecoded is Restore with the rows of an identity under a codec
// decoded on the daemon into the model dtype (hidden rows as hidden_size
// values, KV rows as K then V of kv_dim values each); the identity's model
// must be one the daemon loaded. Under CodecNone it is Restore.
func (c *Client) RestoreDecoded(ctx context.Context, ns, id string, ident Identity, fn func(layer int, rows []byte) error) (uint64, error) {
	return c.restore(ctx, &hcachev1.RestoreRequest{Ctx: ref(ns, id), Identity: identityProto(ident), Decode: true}, fn)
}

func (c *Client) restore(ctx context.Context, req *hcachev1.RestoreRequest, fn func(layer int, rows []byte) error) (uint64, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	st, err := c.API.Restore(ctx, req)
	if err != nil {
		return 0, err
	}
	var buf []byte
	var tokens uint64
	for {
		m, err := st.Recv()
		if err == io.EOF {
			return tokens, nil
		}
		if err != nil {
			return 0, err
		}
		tokens = m.GetTokens()
		// One buffer, sized from the first piece, reused for every layer.
		need := m.GetTokens() * uint64(m.GetRowBytes())
		if need > 1<<40 || m.GetOffset()+uint64(len(m.GetInline())) > need {
			return 0, fmt.Errorf("hcacheclient: restore piece at %d+%d outside its layer of %d bytes", m.GetOffset(), len(m.GetInline()), need)
		}
		if uint64(cap(buf)) < need {
			buf = make([]byte, need)
		}
		buf = buf[:need]
		copy(buf[m.GetOffset():], m.GetInline())
		if m.GetLayerDone() {
			if err := fn(int(m.GetLayer()), buf); err != nil {
				return 0, err
			}
		}
	}
}

// RestoreInto restores into a shared region: layers are placed back to back
// from off (at most n bytes); fn sees each layer's rows in the region as soon
// as it is placed.
func (c *Client) RestoreInto(ctx context.Context, ns, id string, ident Identity, g *Region, off, n uint64, fn func(layer int, rows []byte) error) (uint64, error) {
	return c.restoreInto(ctx, &hcachev1.RestoreRequest{Ctx: ref(ns, id), Identity: identityProto(ident), Region: g.slice(off, n).GetRegion()}, g, fn)
}

func (c *Client) restoreInto(ctx context.Context, req *hcachev1.RestoreRequest, g *Region, fn func(layer int, rows []byte) error) (uint64, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	st, err := c.API.Restore(ctx, req)
	if err != nil {
		return 0, err
	}
	var tokens uint64
	for {
		m, err := st.Recv()
		if err == io.EOF {
			return tokens, nil
		}
		if err != nil {
			return 0, err
		}
		tokens = m.GetTokens()
		r := m.GetRegion()
		if r == nil || r.GetOffset()+r.GetLength() > uint64(len(g.Mem)) {
			return 0, fmt.Errorf("hcacheclient: restore piece without a region slice inside the region")
		}
		if err := fn(int(m.GetLayer()), g.Mem[r.GetOffset():r.GetOffset()+r.GetLength()]); err != nil {
			return 0, err
		}
	}
}

// Stat describes a context.
func (c *Client) Stat(ctx context.Context, ns, id string) (*hcachev1.ContextInfo, error) {
	return c.API.Stat(ctx, &hcachev1.StatRequest{Ctx: ref(ns, id)})
}

// List lists contexts (of one namespace, or of every granted one when ns is "").
func (c *Client) List(ctx context.Context, ns string) ([]*hcachev1.ContextInfo, error) {
	r, err := c.API.List(ctx, &hcachev1.ListRequest{Namespace: ns})
	return r.GetContexts(), err
}

// Delete removes a context.
func (c *Client) Delete(ctx context.Context, ns, id string) error {
	_, err := c.API.Delete(ctx, &hcachev1.DeleteRequest{Ctx: ref(ns, id)})
	return err
}

// Pin exempts a context from eviction (or lifts it).
func (c *Client) Pin(ctx context.Context, ns, id string, pinned bool) error {
	_, err := c.API.Pin(ctx, &hcachev1.PinRequest{Ctx: ref(ns, id), Pinned: pinned})
	return err
}

// Region is a shared memory region registered with the daemon: a sealed
// memfd mapped here and in the daemon. It lives until Close.
type Region struct {
	ID   string
	Mem  []byte
	side *net.UnixConn
}

func (g *Region) slice(off, n uint64) *hcachev1.Rows {
	return &hcachev1.Rows{Where: &hcachev1.Rows_Region{Region: &hcachev1.RegionSlice{Region: g.ID, Offset: off, Length: n}}}
}

// NewRegion creates a region of size bytes and registers it on the daemon's
// side socket (unix clients only).
func (c *Client) NewRegion(ctx context.Context, size int) (*Region, error) {
	info, err := c.Info(ctx)
	if err != nil {
		return nil, err
	}
	if info.GetShmSocket() == "" {
		return nil, errors.New("hcacheclient: the daemon offers no shared memory to this client")
	}
	fd, err := unix.MemfdCreate("hcache-region", unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
	if err != nil {
		return nil, err
	}
	defer unix.Close(fd)
	if err := unix.Ftruncate(fd, int64(size)); err != nil {
		return nil, err
	}
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_ADD_SEALS, unix.F_SEAL_SHRINK|unix.F_SEAL_SEAL); err != nil {
		return nil, err
	}
	mem, err := unix.Mmap(fd, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return nil, err
	}
	g, err := register(ctx, info.GetShmSocket(), fd, mem)
	if err != nil {
		unix.Munmap(mem)
		return nil, err
	}
	return g, nil
}

// RegisterTimeout bounds a region registration when the context passed to
// NewRegion has no earlier deadline (a daemon that never answers would
// otherwise hold the caller forever).
const RegisterTimeout = 10 * time.Second

func register(ctx context.Context, path string, fd int, mem []byte) (*Region, error) {
	deadline := time.Now().Add(RegisterTimeout)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	ctx, cancel := context.WithDeadline(ctx, deadline)
	defer cancel()
	var d net.Dialer
	nc, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, fmt.Errorf("hcacheclient: region registration: %w", err)
	}
	conn := nc.(*net.UnixConn)
	// The deadline covers the exchange; cancelling ctx cuts it short too.
	conn.SetDeadline(deadline)
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	if _, _, err := conn.WriteMsgUnix([]byte("HCSHM001"), unix.UnixRights(fd), nil); err != nil {
		conn.Close()
		return nil, err
	}
	line, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("hcacheclient: region registration: %w", err)
	}
	f := strings.Fields(line)
	if len(f) != 3 || f[0] != "OK" {
		conn.Close()
		return nil, fmt.Errorf("hcacheclient: region refused: %s", strings.TrimSpace(strings.TrimPrefix(line, "ERR")))
	}
	if n, err := strconv.Atoi(f[2]); err != nil || n != len(mem) {
		conn.Close()
		return nil, fmt.Errorf("hcacheclient: region registered with size %s, want %d", f[2], len(mem))
	}
	if !stop() {
		conn.Close()
		return nil, fmt.Errorf("hcacheclient: region registration: %w", ctx.Err())
	}
	conn.SetDeadline(time.Time{})
	return &Region{ID: f[1], Mem: mem, side: conn}, nil
}

// Close releases the region on the daemon (requests naming it fail from
// then on) and unmaps it here.
func (g *Region) Close() error {
	err := g.side.Close()
	if g.Mem != nil {
		unix.Munmap(g.Mem)
		g.Mem = nil
	}
	return err
}
