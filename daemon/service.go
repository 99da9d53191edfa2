package daemon

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unicode/utf8"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/hcache/hcache/chunk"
	hcachev1 "github.com/hcache/hcache/proto/hcache/v1"
	"github.com/hcache/hcache/serve"
	"github.com/hcache/hcache/state"
)

// openWriter is a context's writer, owned by the connection that opened it.
type openWriter struct {
	mu       sync.Mutex
	ns, id   string
	conn     uint64
	w        *chunk.Writer
	ident    *chunk.Identity
	layerTok []uint64 // rows appended per layer (durable base included)
	tokenRow int      // bytes of one token over the stored layers
	appended atomic.Int64
	closed   bool // closed or abandoned (guarded by mu)
	// A token-addressed writer: the salt and the ids of its tokens known
	// so far (for its publish by tokens; remote.go).
	byTokens bool
	salt     []byte
	ids      []uint32
}

// lock takes the writer for an append or flush, refusing one that was
// closed meanwhile (by CloseContext on another goroutine, or because its
// connection ended).
func (w *openWriter) lock() error {
	w.mu.Lock()
	if w.closed {
		w.mu.Unlock()
		return status.Errorf(codes.FailedPrecondition, "context %s/%s: the writer was closed", w.ns, w.id)
	}
	return nil
}

func key(ns, id string) string { return ns + "\x00" + id }

// validName checks a namespace or context id: the store's rules (1..255
// bytes, no NUL) plus valid UTF-8 without control characters, so that ids
// are safe in logs and terminals.
func validName(what, s string) error {
	if err := state.ValidateName(what, s); err != nil {
		return err
	}
	if !utf8.ValidString(s) {
		return fmt.Errorf("%s %q: not valid UTF-8", what, s)
	}
	for _, r := range s {
		if r < 0x20 || r == 0x7f {
			return fmt.Errorf("%s %q: contains control character %U", what, s, r)
		}
	}
	return nil
}

// ValidNamespace checks a namespace name: validName's rules, and not "*",
// which grants, quotas and token files read as "every namespace".
func ValidNamespace(ns string) error {
	if ns == All {
		return fmt.Errorf("namespace %q is reserved: grants, quotas and token files read it as every namespace", ns)
	}
	return validName("namespace", ns)
}

// target authenticates the caller, validates the context reference and
// checks the caller's grant on its namespace.
func (s *Server) target(ctx context.Context, ref *hcachev1.ContextRef) (*caller, string, string, error) {
	c, err := s.authenticate(ctx)
	if err != nil {
		return nil, "", "", err
	}
	if ref == nil {
		return nil, "", "", status.Error(codes.InvalidArgument, "ctx (namespace and id) is required")
	}
	if err := ValidNamespace(ref.GetNamespace()); err != nil {
		return nil, "", "", status.Error(codes.InvalidArgument, err.Error())
	}
	if err := validName("context id", ref.GetId()); err != nil {
		return nil, "", "", status.Error(codes.InvalidArgument, err.Error())
	}
	if err := c.check(ref.GetNamespace()); err != nil {
		return nil, "", "", err
	}
	return c, ref.GetNamespace(), ref.GetId(), nil
}

func identityFrom(p *hcachev1.Identity) (*chunk.Identity, error) {
	if p == nil {
		return nil, status.Error(codes.InvalidArgument, "identity is required")
	}
	id := &chunk.Identity{Model: p.GetModel(), Plan: make([]chunk.LayerPlan, len(p.GetPlan())), Codec: codecFrom(p.GetCodec())}
	for i, l := range p.GetPlan() {
		id.Plan[i] = chunk.LayerPlan{Kind: chunk.LayerKind(l.GetKind()), RowBytes: l.GetRowBytes()}
	}
	if err := id.Validate(); err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	return id, nil
}

func identityTo(id *chunk.Identity) *hcachev1.Identity {
	if id == nil {
		return nil
	}
	p := &hcachev1.Identity{Model: id.Model, Codec: hcachev1.Codec(id.Codec)}
	for _, l := range id.Plan {
		p.Plan = append(p.Plan, &hcachev1.LayerPlan{Kind: hcachev1.LayerKind(l.Kind), RowBytes: l.RowBytes})
	}
	return p
}

// storeErr maps a store error to a gRPC status.
func (s *Server) storeErr(err error) error {
	if err == nil {
		return nil
	}
	if _, ok := status.FromError(err); ok {
		return err
	}
	code := codes.Internal
	switch {
	case errors.Is(err, chunk.ErrNotFound):
		code = codes.NotFound
	case errors.Is(err, chunk.ErrExists):
		code = codes.AlreadyExists
	case errors.Is(err, chunk.ErrIdentityMismatch):
		code = codes.FailedPrecondition
	case errors.Is(err, chunk.ErrDamaged), errors.Is(err, chunk.ErrCorrupt):
		code = codes.DataLoss
		s.metrics.checksumFailures.Inc()
	case errors.Is(err, chunk.ErrBusy):
		code = codes.Aborted
	case errors.Is(err, chunk.ErrStagingFull), errors.Is(err, chunk.ErrDiskFull), errors.Is(err, syscall.ENOSPC):
		// A full disk is the store's capacity running out, not a fault of
		// the daemon's: the client may retry once contexts are deleted.
		code = codes.ResourceExhausted
	case errors.Is(err, chunk.ErrCollision):
		// A chain key stored for other tokens: nothing was served or
		// written over; the store counts it (hcache_chain_collisions_total).
		code = codes.Aborted
	case errors.Is(err, chunk.ErrRowSize), errors.Is(err, chunk.ErrIdentity), errors.Is(err, chunk.ErrIncompleteTokens), errors.Is(err, chunk.ErrTokens):
		code = codes.InvalidArgument
	case errors.Is(err, chunk.ErrClosed):
		code = codes.Unavailable
	case errors.Is(err, chunk.ErrInvariant):
		// The store found a bug of its own and refuses writes until it is
		// reopened; reads go on. Not the client's fault, and retrying
		// will not help until an operator restarts the daemon.
		code = codes.FailedPrecondition
	case errors.Is(err, context.Canceled):
		code = codes.Canceled
	default:
		// Anything else from the store is an I/O or index error.
		s.metrics.ioErrors.Inc()
	}
	return status.Error(code, err.Error())
}

// Info describes the daemon.
func (s *Server) Info(ctx context.Context, _ *hcachev1.InfoRequest) (*hcachev1.InfoReply, error) {
	c, err := s.authenticate(ctx)
	if err != nil {
		return nil, err
	}
	r := &hcachev1.InfoReply{Version: Version, ChunkTokens: uint32(s.store.ChunkTokens()), Namespaces: c.namespaces,
		MaxMessageBytes: uint64(s.cfg.MaxMessageBytes), MaxRegionBytes: uint64(s.cfg.MaxRegionBytes),
		MaxTokensPerContext: s.cfg.MaxTokensPerContext, Models: s.modelInfos()}
	if c.unix {
		r.ShmSocket = s.cfg.Shm
	}
	return r, nil
}

// OpenContext creates or reopens a context and registers its writer.
func (s *Server) OpenContext(ctx context.Context, req *hcachev1.OpenContextRequest) (*hcachev1.OpenContextReply, error) {
	c, ns, id, err := s.target(ctx, req.GetCtx())
	if err != nil {
		return nil, err
	}
	ident, err := identityFrom(req.GetIdentity())
	if err != nil {
		return nil, err
	}
	tokens, salt := req.GetTokens(), req.GetSalt()
	if err := s.checkTokens("tokens", tokens); err != nil {
		return nil, err
	}
	if uint64(len(tokens)) > s.cfg.MaxTokensPerContext {
		return nil, status.Errorf(codes.ResourceExhausted, "tokens: %d token ids, more than a context holds (--max-tokens %d)", len(tokens), s.cfg.MaxTokensPerContext)
	}
	if err := checkSalt(salt); err != nil {
		return nil, err
	}
	if len(salt) > 0 && len(tokens) == 0 {
		return nil, status.Error(codes.InvalidArgument, "salt without tokens: a salt joins the chain keys of a token-addressed context")
	}
	s.admin.RLock()
	defer s.admin.RUnlock()
	s.mu.Lock()
	if w := s.writers[key(ns, id)]; w != nil {
		s.mu.Unlock()
		where := "another connection"
		if w.conn == c.conn {
			where = "this connection already"
		}
		return nil, status.Errorf(codes.Aborted, "context %s/%s is open for writing on %s", ns, id, where)
	}
	s.mu.Unlock()
	var w *chunk.Writer
	switch req.GetMode() {
	case hcachev1.OpenMode_CREATE:
		done, serr := s.takeContextSlot(ns)
		if serr != nil {
			return nil, serr
		}
		if len(tokens) > 0 {
			// The shared groups count toward the quota as the context's
			// own tokens (daemon doc, Tenancy): reserve them first.
			var held int64
			if held, err = s.reserveShared(ns, ident, tokens, salt); err != nil {
				done(false)
				return nil, err
			}
			var stored int
			w, stored, err = s.store.CreateTokens(ns, id, ident, tokens, chunk.CreateOptions{Pinned: req.GetPinned(), Salt: salt})
			got := int64(0)
			if err == nil {
				got = int64(stored) * rowSum(ident)
			}
			s.unreserve(ns, held-got) // what was reserved and not shared (or all, on failure)
		} else {
			w, err = s.store.Create(ns, id, ident, chunk.CreateOptions{Pinned: req.GetPinned()})
		}
		done(err == nil)
	case hcachev1.OpenMode_APPEND:
		s.remoteRefresh(ctx, ns, id)
		w, err = s.store.Append(ns, id, ident)
		if err == nil && len(tokens) > 0 {
			if err = s.continueTokens(w, ns, id, ident, tokens, salt); err != nil {
				w.Abandon()
				return nil, err
			}
		}
	default:
		return nil, status.Errorf(codes.InvalidArgument, "mode %v: want CREATE or APPEND", req.GetMode())
	}
	if err != nil {
		if errors.Is(err, chunk.ErrIdentityMismatch) {
			s.metrics.identityMismatch.Inc()
		}
		return nil, s.storeErr(s.mismatchErr(err, ns, id, ident))
	}
	ow := &openWriter{ns: ns, id: id, conn: c.conn, w: w, ident: ident, layerTok: make([]uint64, len(ident.Plan))}
	if len(tokens) > 0 {
		ow.byTokens, ow.salt, ow.ids = true, salt, append([]uint32(nil), tokens...)
	}
	base := uint64(w.Tokens())
	for l, p := range ident.Plan {
		ow.tokenRow += int(p.RowBytes)
		if p.Kind != chunk.LayerNone {
			ow.layerTok[l] = base
		}
	}
	ow.appended.Store(int64(base) * int64(ow.tokenRow))
	s.mu.Lock()
	if cs := s.conns[c.conn]; (cs == nil && c.conn != 0) || s.stopping {
		// The client went away (or we are stopping) while this was opened.
		s.mu.Unlock()
		w.Abandon()
		return nil, status.Error(codes.Unavailable, "connection ended")
	}
	s.writers[key(ns, id)] = ow
	s.mu.Unlock()
	return &hcachev1.OpenContextReply{Tokens: base, ChunkTokens: uint32(s.store.ChunkTokens())}, nil
}

// writerOf finds the caller's writer of a context.
func (s *Server) writerOf(c *caller, ns, id string) (*openWriter, error) {
	s.mu.Lock()
	w := s.writers[key(ns, id)]
	s.mu.Unlock()
	if w == nil {
		return nil, status.Errorf(codes.FailedPrecondition, "context %s/%s has no open writer: call OpenContext first", ns, id)
	}
	if w.conn != c.conn {
		return nil, status.Errorf(codes.FailedPrecondition, "context %s/%s is open for writing on another connection", ns, id)
	}
	return w, nil
}

// rows resolves bulk bytes: inline, or a slice of a shared region (release
// must be called after use).
func (s *Server) rows(c *caller, r *hcachev1.Rows) ([]byte, func(), error) {
	switch w := r.GetWhere().(type) {
	case *hcachev1.Rows_Inline:
		return w.Inline, func() {}, nil
	case *hcachev1.Rows_Region:
		g, b, err := s.regions.acquire(c, w.Region)
		if err != nil {
			return nil, nil, err
		}
		return b, func() { s.regions.release(g) }, nil
	}
	return nil, nil, status.Error(codes.InvalidArgument, "rows are required (inline or a shared region slice)")
}

// appendPreamble is what both append RPCs do first: authenticate and
// resolve the target, find the caller's open writer of it, take the rows
// (inline or from a shared region), then hold the admin lock for reading
// and the writer's lock. unlock releases them in the reverse order.
func (s *Server) appendPreamble(ctx context.Context, target *hcachev1.ContextRef, r *hcachev1.Rows) (w *openWriter, ns string, rows []byte, unlock func(), err error) {
	c, ns, id, err := s.target(ctx, target)
	if err != nil {
		return nil, "", nil, nil, err
	}
	if w, err = s.writerOf(c, ns, id); err != nil {
		return nil, "", nil, nil, err
	}
	rows, release, err := s.rows(c, r)
	if err != nil {
		return nil, "", nil, nil, err
	}
	s.admin.RLock()
	if err := w.lock(); err != nil {
		s.admin.RUnlock()
		release()
		return nil, "", nil, nil, err
	}
	return w, ns, rows, func() {
		w.mu.Unlock()
		s.admin.RUnlock()
		release()
	}, nil
}

// AppendLayer appends rows of one layer.
func (s *Server) AppendLayer(ctx context.Context, req *hcachev1.AppendLayerRequest) (*hcachev1.AppendReply, error) {
	w, ns, rows, unlock, err := s.appendPreamble(ctx, req.GetCtx(), req.GetRows())
	if err != nil {
		return nil, err
	}
	defer unlock()
	l := int(req.GetLayer())
	if l >= len(w.ident.Plan) {
		return nil, status.Errorf(codes.InvalidArgument, "layer %d out of range [0, %d)", l, len(w.ident.Plan))
	}
	rb := int(w.ident.Plan[l].RowBytes)
	if rb == 0 {
		return nil, status.Errorf(codes.InvalidArgument, "layer %d stores nothing in this context's plan", l)
	}
	if len(rows)%rb != 0 {
		return nil, status.Errorf(codes.InvalidArgument, "layer %d: %d bytes is not a whole number of %d-byte rows", l, len(rows), rb)
	}
	n := uint64(len(rows) / rb)
	if w.layerTok[l]+n > s.cfg.MaxTokensPerContext {
		return nil, status.Errorf(codes.ResourceExhausted, "layer %d would hold %d tokens (--max-tokens %d)", l, w.layerTok[l]+n, s.cfg.MaxTokensPerContext)
	}
	if err := s.reserve(ns, int64(len(rows))); err != nil {
		return nil, err
	}
	if err := w.w.AppendLayer(l, rows); err != nil {
		s.unreserve(ns, int64(len(rows)))
		return nil, s.storeErr(err)
	}
	w.layerTok[l] += n
	w.appended.Add(int64(len(rows)))
	s.metrics.appendBytes.Add(float64(len(rows)))
	return &hcachev1.AppendReply{Tokens: uint64(w.w.Tokens())}, nil
}

// AppendTokens appends whole tokens.
func (s *Server) AppendTokens(ctx context.Context, req *hcachev1.AppendTokensRequest) (*hcachev1.AppendReply, error) {
	w, ns, rows, unlock, err := s.appendPreamble(ctx, req.GetCtx(), req.GetRows())
	if err != nil {
		return nil, err
	}
	defer unlock()
	n := int(req.GetCount())
	if n < 1 {
		return nil, status.Error(codes.InvalidArgument, "count must be at least 1")
	}
	ids := req.GetTokenIds()
	if len(ids) != 0 && len(ids) != n {
		return nil, status.Errorf(codes.InvalidArgument, "token_ids: %d ids for count %d tokens (give one per token, or none)", len(ids), n)
	}
	if len(rows) != n*w.tokenRow {
		return nil, status.Errorf(codes.InvalidArgument, "%d tokens need %d bytes (%d per token over the stored layers), got %d", n, n*w.tokenRow, w.tokenRow, len(rows))
	}
	t := uint64(w.w.Tokens())
	if t+uint64(n) > s.cfg.MaxTokensPerContext {
		return nil, status.Errorf(codes.ResourceExhausted, "context would hold %d tokens (--max-tokens %d)", t+uint64(n), s.cfg.MaxTokensPerContext)
	}
	for l, lt := range w.layerTok {
		if w.ident.Plan[l].RowBytes != 0 && lt != t {
			return nil, status.Errorf(codes.FailedPrecondition, "AppendTokens while a prefill is incomplete (layer %d holds %d tokens, the context %d)", l, lt, t)
		}
	}
	if err := s.reserve(ns, int64(len(rows))); err != nil {
		return nil, err
	}
	per := make([][]byte, len(w.ident.Plan))
	done := 0
	for i := 0; i < n; i++ {
		tok := rows[i*w.tokenRow:]
		off := 0
		for l, p := range w.ident.Plan {
			per[l] = nil
			if p.RowBytes != 0 {
				per[l] = tok[off : off+int(p.RowBytes)]
				off += int(p.RowBytes)
			}
		}
		if len(ids) > 0 {
			err = w.w.AppendTokenID(ids[i], per)
		} else {
			err = w.w.AppendToken(per)
		}
		if err != nil {
			s.unreserve(ns, int64((n-done)*w.tokenRow))
			s.advance(w, done)
			if errors.Is(err, chunk.ErrTokens) {
				return nil, status.Errorf(codes.InvalidArgument, "token %d of this append: %v", i, err)
			}
			return nil, s.storeErr(err)
		}
		done++
	}
	if w.byTokens && len(ids) > 0 {
		for i := range done {
			if int(t)+i >= len(w.ids) {
				w.ids = append(w.ids, ids[i])
			}
		}
	}
	s.advance(w, done)
	s.metrics.appendBytes.Add(float64(len(rows)))
	return &hcachev1.AppendReply{Tokens: uint64(w.w.Tokens())}, nil
}

func (s *Server) advance(w *openWriter, tokens int) {
	for l, p := range w.ident.Plan {
		if p.RowBytes != 0 {
			w.layerTok[l] += uint64(tokens)
		}
	}
	w.appended.Add(int64(tokens * w.tokenRow))
}

// Flush makes the writer's complete tokens durable.
func (s *Server) Flush(ctx context.Context, req *hcachev1.FlushRequest) (*hcachev1.FlushReply, error) {
	c, ns, id, err := s.target(ctx, req.GetCtx())
	if err != nil {
		return nil, err
	}
	w, err := s.writerOf(c, ns, id)
	if err != nil {
		return nil, err
	}
	s.admin.RLock()
	defer s.admin.RUnlock()
	if err := w.lock(); err != nil {
		return nil, err
	}
	defer w.mu.Unlock()
	start := time.Now()
	if err := w.w.Flush(); err != nil {
		return nil, s.storeErr(err)
	}
	s.metrics.flushSeconds.Observe(time.Since(start).Seconds())
	return &hcachev1.FlushReply{Tokens: uint64(w.w.Tokens())}, nil
}

// CloseContext flushes (or abandons) and releases the writer.
func (s *Server) CloseContext(ctx context.Context, req *hcachev1.CloseContextRequest) (*hcachev1.FlushReply, error) {
	c, ns, id, err := s.target(ctx, req.GetCtx())
	if err != nil {
		return nil, err
	}
	w, err := s.writerOf(c, ns, id)
	if err != nil {
		return nil, err
	}
	s.admin.RLock()
	defer s.admin.RUnlock()
	if err := w.lock(); err != nil {
		return nil, err
	}
	w.closed = true
	var cerr error
	if req.GetAbandon() {
		w.w.Abandon()
	} else {
		cerr = w.w.Close()
	}
	tokens := w.w.Tokens()
	var tp *tokPublish
	if w.byTokens && len(w.ids) >= tokens {
		tp = &tokPublish{ident: w.ident, salt: w.salt, ids: w.ids[:tokens]}
	}
	w.mu.Unlock()
	s.mu.Lock()
	if s.writers[key(ns, id)] == w {
		delete(s.writers, key(ns, id))
	}
	s.mu.Unlock()
	s.recount(ns)
	if cerr != nil {
		return nil, s.storeErr(cerr)
	}
	if req.GetAbandon() {
		info, err := s.store.Context(ns, id)
		if err != nil {
			return nil, s.storeErr(err)
		}
		return &hcachev1.FlushReply{Tokens: info.Tokens}, nil
	}
	s.remotePublish(ns, id, tp)
	return &hcachev1.FlushReply{Tokens: uint64(tokens)}, nil
}

// Restore streams a context's stored layers (projected to K|V rows on the
// daemon when project is set) through serve's restore pipeline: the store
// reads the next layers (its --restore-ahead bound) while the pipeline
// projects one and this handler sends it, inline or into a shared region.
func (s *Server) Restore(req *hcachev1.RestoreRequest, stream grpc.ServerStreamingServer[hcachev1.RestoreChunk]) error {
	ctx := stream.Context()
	var (
		c      *caller
		ns, id string
		ident  *chunk.Identity
		err    error
	)
	byTokens := len(req.GetTokens()) > 0
	if byTokens {
		ns, id = req.GetCtx().GetNamespace(), req.GetCtx().GetId()
		if c, ident, err = s.targetPrefix(ctx, ns, id, req.GetTokens(), req.GetSalt(), req.GetIdentity()); err != nil {
			return err
		}
		if id != "" {
			if err := s.tokenContext(ns, id); err != nil {
				return err
			}
		}
	} else {
		if len(req.GetSalt()) > 0 {
			return status.Error(codes.InvalidArgument, "salt without tokens: a salt only joins a restore by tokens")
		}
		if c, ns, id, err = s.target(ctx, req.GetCtx()); err != nil {
			return err
		}
		if ident, err = identityFrom(req.GetIdentity()); err != nil {
			return err
		}
	}
	// The slot is held until the restore's goroutine ends, which may be
	// after the stream (--restore-timeout): what it holds is what counts.
	releaseSlot, err := s.takeRestore(c)
	if err != nil {
		return err
	}
	handed := false
	defer func() {
		if !handed {
			releaseSlot()
		}
	}()
	rest, err := s.restorerFor(ident, req.GetProject())
	if err != nil {
		return err
	}
	decode, err := s.layerDecoder(ident, req.GetDecode(), req.GetProject())
	if err != nil {
		return err
	}
	rowsCd := rowsCodec(ident, req.GetDecode(), req.GetProject())
	if id != "" {
		s.remoteRefresh(ctx, ns, id)
	}
	if byTokens && s.cfg.Remote != nil {
		p := chunk.Prefix{Namespace: ns, Salt: req.GetSalt(), Identity: ident, Tokens: req.GetTokens()}
		if local, err := s.store.Lookup(p); err == nil {
			s.remoteTokens(ctx, p, local, true)
		}
	}
	var dst []byte
	var dstOff uint64
	releaseRegion := func() {}
	if r := req.GetRegion(); r != nil {
		g, b, err := s.regions.acquire(c, r)
		if err != nil {
			return err
		}
		releaseRegion = func() { s.regions.release(g) }
		dst, dstOff = b, r.GetOffset()
	}
	piece := int(req.GetMaxPieceBytes())
	if piece <= 0 || piece > s.cfg.RestorePieceBytes {
		piece = s.cfg.RestorePieceBytes
	}
	placed := 0
	// send hands one layer to the client.
	send := func(l serve.StreamLayer) error {
		if err := ctx.Err(); err != nil {
			return err
		}
		if decode != nil && l.Tokens > 0 {
			if err := decode(&l); err != nil {
				return err
			}
		}
		rows, layer, tok, rb := l.Rows, l.Layer, uint64(l.Tokens), uint32(l.RowBytes)
		kind := hcachev1.LayerKind(l.Kind)
		if dst != nil {
			if len(rows) > len(dst)-placed {
				return status.Errorf(codes.OutOfRange, "shared region slice of %d bytes too small: layer %d needs bytes [%d, %d)", len(dst), layer, placed, placed+len(rows))
			}
			copy(dst[placed:], rows)
			m := &hcachev1.RestoreChunk{Layer: uint32(layer), Tokens: tok, RowBytes: rb, LayerDone: true, Kind: kind, Codec: rowsCd,
				Region: &hcachev1.RegionSlice{Region: req.GetRegion().GetRegion(), Offset: dstOff + uint64(placed), Length: uint64(len(rows))}}
			placed += len(rows)
			return stream.Send(m)
		}
		for off := 0; off < len(rows) || off == 0; off += piece {
			end := min(off+piece, len(rows))
			m := &hcachev1.RestoreChunk{Layer: uint32(layer), Tokens: tok, RowBytes: rb, Offset: uint64(off), Kind: kind, Codec: rowsCd,
				Inline: rows[off:end], LayerDone: end == len(rows)}
			if err := stream.Send(m); err != nil {
				return err
			}
			if end == len(rows) {
				break
			}
		}
		return nil
	}
	start := time.Now()
	var lastRead time.Duration
	first := true
	// The restore runs on its own goroutine so that a client that stops
	// reading is cut off after --restore-timeout: returning ends the stream,
	// which fails the blocked send, and the goroutine then winds down and
	// only then lets go of the shared region it writes into.
	type result struct {
		tokens int
		err    error
	}
	done := make(chan result, 1)
	s.restoring.Add(1)
	handed = true
	go func() {
		defer s.restoring.Done()
		defer releaseSlot()
		defer releaseRegion()
		sr := serve.StreamRequest{NS: ns, ID: id, Ident: ident, Project: req.GetProject()}
		if byTokens {
			sr.ByTokens, sr.Salt = true, req.GetSalt()
			sr.Tokens = make([]int, len(req.GetTokens()))
			for i, t := range req.GetTokens() {
				sr.Tokens[i] = int(t)
			}
		}
		rs, err := rest.Stream(sr, func(l serve.StreamLayer) error {
			if first {
				s.metrics.restoreStage.WithLabelValues("first_layer").Observe(l.ReadDone.Seconds())
				first = false
			} else {
				s.metrics.restoreStage.WithLabelValues("layer_wait").Observe(max(0, l.ReadDone-lastRead).Seconds())
			}
			lastRead = l.ReadDone
			if l.Compute > 0 {
				s.metrics.restoreStage.WithLabelValues("project").Observe(l.Compute.Seconds())
			}
			t0 := time.Now()
			err := send(l)
			s.metrics.restoreStage.WithLabelValues("layer_send").Observe(time.Since(t0).Seconds())
			return err
		})
		done <- result{rs.Tokens, restoreErr(err)}
	}()
	var res result
	timeout := time.NewTimer(s.cfg.RestoreTimeout)
	defer timeout.Stop()
	select {
	case res = <-done:
	case <-timeout.C:
		s.metrics.restores.WithLabelValues("timeout").Inc()
		return status.Errorf(codes.DeadlineExceeded, "restore of %s/%s took longer than --restore-timeout %v (is the client reading?)", ns, id, s.cfg.RestoreTimeout)
	}
	tokens, err := res.tokens, res.err
	if err != nil {
		switch {
		case errors.Is(err, chunk.ErrNotFound):
			s.metrics.restores.WithLabelValues("miss").Inc()
		case errors.Is(err, chunk.ErrIdentityMismatch):
			s.metrics.identityMismatch.Inc()
			s.metrics.restores.WithLabelValues("identity_mismatch").Inc()
		default:
			s.metrics.restores.WithLabelValues("error").Inc()
		}
		err = s.mismatchErr(err, ns, id, ident)
		if byTokens {
			return s.prefixErr(err)
		}
		return s.storeErr(err)
	}
	if byTokens && tokens == 0 { // nothing stored: an empty stream
		s.metrics.restores.WithLabelValues("miss").Inc()
		return nil
	}
	s.metrics.restores.WithLabelValues("hit").Inc()
	s.metrics.restoreStage.WithLabelValues("total").Observe(time.Since(start).Seconds())
	s.metrics.restoreTokens.Add(float64(tokens))
	return nil
}

func (s *Server) infoOf(ci chunk.ContextInfo) *hcachev1.ContextInfo {
	s.mu.Lock()
	_, open := s.writers[key(ci.Namespace, ci.ID)]
	s.mu.Unlock()
	return &hcachev1.ContextInfo{Namespace: ci.Namespace, Id: ci.ID, Tokens: ci.Tokens, LiveBytes: ci.LiveBytes,
		Pinned: ci.Pinned, Damaged: ci.Damaged, LastUseUnixNanos: ci.LastUse.UnixNano(), Identity: identityTo(ci.Identity),
		WriterOpen: open}
}

// Stat describes one context.
func (s *Server) Stat(ctx context.Context, req *hcachev1.StatRequest) (*hcachev1.ContextInfo, error) {
	_, ns, id, err := s.target(ctx, req.GetCtx())
	if err != nil {
		return nil, err
	}
	ci, err := s.store.Context(ns, id)
	if err != nil {
		return nil, s.storeErr(err)
	}
	return s.infoOf(ci), nil
}

// List lists the contexts of the granted namespaces.
func (s *Server) List(ctx context.Context, req *hcachev1.ListRequest) (*hcachev1.ListReply, error) {
	c, err := s.authenticate(ctx)
	if err != nil {
		return nil, err
	}
	if ns := req.GetNamespace(); ns != "" {
		if err := ValidNamespace(ns); err != nil {
			return nil, status.Error(codes.InvalidArgument, err.Error())
		}
		if err := c.check(ns); err != nil {
			return nil, err
		}
	}
	r := &hcachev1.ListReply{}
	for _, ci := range s.store.Contexts() {
		if (req.GetNamespace() != "" && ci.Namespace != req.GetNamespace()) || !c.may(ci.Namespace) {
			continue
		}
		r.Contexts = append(r.Contexts, s.infoOf(ci))
	}
	return r, nil
}

// Delete removes a context durably.
func (s *Server) Delete(ctx context.Context, req *hcachev1.DeleteRequest) (*hcachev1.DeleteReply, error) {
	_, ns, id, err := s.target(ctx, req.GetCtx())
	if err != nil {
		return nil, err
	}
	s.admin.RLock()
	defer s.admin.RUnlock()
	s.mu.Lock()
	_, open := s.writers[key(ns, id)]
	s.mu.Unlock()
	if open {
		return nil, status.Errorf(codes.FailedPrecondition, "context %s/%s has an open writer: close it first", ns, id)
	}
	if err := s.store.Delete(ns, id); err != nil {
		return nil, s.storeErr(err)
	}
	s.contextGone(ns)
	s.recount(ns)
	return &hcachev1.DeleteReply{}, nil
}

// Pin exempts a context from eviction, or lifts the exemption.
func (s *Server) Pin(ctx context.Context, req *hcachev1.PinRequest) (*hcachev1.PinReply, error) {
	_, ns, id, err := s.target(ctx, req.GetCtx())
	if err != nil {
		return nil, err
	}
	s.admin.RLock()
	defer s.admin.RUnlock()
	if err := s.store.Pin(ns, id, req.GetPinned()); err != nil {
		return nil, s.storeErr(err)
	}
	return &hcachev1.PinReply{}, nil
}

func (s *Server) adminCaller(ctx context.Context) error {
	c, err := s.authenticate(ctx)
	if err != nil {
		return err
	}
	if !c.admin() {
		return status.Error(codes.PermissionDenied, "fsck and gc need the grant of every namespace (\"*\")")
	}
	return nil
}

// Fsck checks the store; it waits for running mutations and refuses while
// writers are open.
func (s *Server) Fsck(ctx context.Context, _ *hcachev1.FsckRequest) (*hcachev1.FsckReply, error) {
	if err := s.adminCaller(ctx); err != nil {
		return nil, err
	}
	s.admin.Lock()
	defer s.admin.Unlock()
	s.mu.Lock()
	n := len(s.writers)
	s.mu.Unlock()
	if n > 0 {
		return nil, status.Errorf(codes.FailedPrecondition, "%d writers are open; fsck needs a still store", n)
	}
	rep := s.store.Check(nil)
	return &hcachev1.FsckReply{Contexts: int64(rep.Contexts), Chunks: int64(rep.Chunks), Slices: int64(rep.Slices),
		Segments: int64(rep.Segments), Errors: rep.Errors, DamagedContexts: rep.DamagedContexts, Orphans: rep.Orphans}, nil
}

// Gc compacts segments now.
func (s *Server) Gc(ctx context.Context, _ *hcachev1.GcRequest) (*hcachev1.GcReply, error) {
	if err := s.adminCaller(ctx); err != nil {
		return nil, err
	}
	s.admin.RLock()
	defer s.admin.RUnlock()
	res := s.store.GC()
	if res.Err != nil {
		return nil, s.storeErr(res.Err)
	}
	return &hcachev1.GcReply{Segments: int64(res.Segments), MovedRecords: int64(res.MovedRecords), MovedBytes: res.MovedBytes}, nil
}

// OnEvict is to be set as the store's Options.OnEvict: it recounts the
// namespace's usage.
func (s *Server) OnEvict(ns, id string) {
	go func() {
		s.contextGone(ns)
		s.recount(ns)
	}()
}

// takeContextSlot reserves room for one more context in ns (empty contexts
// count: each holds an index entry and a slot of --max-contexts), or refuses
// with RESOURCE_EXHAUSTED naming the limit. The message tells nothing about
// other namespaces. done(true) turns the reservation into a context,
// done(false) gives it back.
func (s *Server) takeContextSlot(ns string) (func(created bool), error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ctxTotal+s.creatingTotal >= s.cfg.MaxContexts {
		return nil, status.Errorf(codes.ResourceExhausted, "the store is full: it holds --max-contexts %d contexts (empty ones included)", s.cfg.MaxContexts)
	}
	if n := s.nsCtx[ns] + s.creating[ns]; n >= s.cfg.MaxContextsPerNamespace {
		return nil, status.Errorf(codes.ResourceExhausted, "namespace %q holds %d contexts (empty ones included): --max-contexts-per-namespace %d", ns, n, s.cfg.MaxContextsPerNamespace)
	}
	s.creating[ns]++
	s.creatingTotal++
	return func(created bool) {
		s.mu.Lock()
		defer s.mu.Unlock()
		s.creating[ns]--
		s.creatingTotal--
		if s.creating[ns] == 0 {
			delete(s.creating, ns)
		}
		if created {
			s.nsCtx[ns]++
			s.ctxTotal++
			s.ctxGen[ns]++
		}
	}, nil
}

// contextGone counts a context deleted or evicted.
func (s *Server) contextGone(ns string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.ctxGen[ns]++
	if s.nsCtx[ns] > 0 {
		s.nsCtx[ns]--
		s.ctxTotal--
	}
	if s.nsCtx[ns] == 0 {
		delete(s.nsCtx, ns)
	}
}
