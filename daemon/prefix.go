package daemon

import (
	"context"
	"errors"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/hcache/hcache/chunk"
	hcachev1 "github.com/hcache/hcache/proto/hcache/v1"
)

// DefaultMaxRequestTokens bounds the token ids of one request (Lookup,
// OpenContext, Restore by tokens, AppendTokens): --max-request-tokens.
const DefaultMaxRequestTokens = 1 << 20

// MaxSaltBytes bounds a salt (a salt is a tenant's secret or a hash of
// one, not data).
const MaxSaltBytes = 256

// targetPrefix authenticates the caller and checks a request addressed by
// tokens: a granted namespace (PERMISSION_DENIED otherwise, before anything
// of the namespace is looked at), an optional context id, the token list
// (what says which of the two), the salt and the identity.
func (s *Server) targetPrefix(ctx context.Context, ns, id string, tokens []uint32, salt []byte, ident *hcachev1.Identity) (*caller, *chunk.Identity, error) {
	c, err := s.authenticate(ctx)
	if err != nil {
		return nil, nil, err
	}
	if err := ValidNamespace(ns); err != nil {
		return nil, nil, status.Error(codes.InvalidArgument, err.Error())
	}
	if err := c.check(ns); err != nil {
		return nil, nil, err
	}
	if id != "" {
		if err := validName("context id", id); err != nil {
			return nil, nil, status.Error(codes.InvalidArgument, err.Error())
		}
	}
	if err := s.checkTokens("tokens", tokens); err != nil {
		return nil, nil, err
	}
	if len(tokens) == 0 {
		return nil, nil, status.Error(codes.InvalidArgument, "tokens is empty: a request by tokens needs the prompt's token ids")
	}
	if err := checkSalt(salt); err != nil {
		return nil, nil, err
	}
	ci, err := identityFrom(ident)
	if err != nil {
		return nil, nil, err
	}
	return c, ci, nil
}

// checkTokens bounds a token list by --max-request-tokens.
func (s *Server) checkTokens(what string, tokens []uint32) error {
	if uint64(len(tokens)) > s.cfg.MaxRequestTokens {
		return status.Errorf(codes.InvalidArgument, "%s: %d token ids, more than --max-request-tokens %d", what, len(tokens), s.cfg.MaxRequestTokens)
	}
	return nil
}

func checkSalt(salt []byte) error {
	if len(salt) > MaxSaltBytes {
		return status.Errorf(codes.InvalidArgument, "salt of %d bytes: at most %d", len(salt), MaxSaltBytes)
	}
	return nil
}

// prefixErr maps a store error of a request by tokens or a fork: token
// lists that do not fit the context (ErrTokens: a fork of a context not
// created with tokens, an append whose ids differ) are FAILED_PRECONDITION,
// the rest as storeErr (a collision is ABORTED: nothing served or written).
func (s *Server) prefixErr(err error) error {
	if err != nil && errors.Is(err, chunk.ErrTokens) {
		return status.Error(codes.FailedPrecondition, err.Error())
	}
	return s.storeErr(err)
}

// Lookup answers how many leading tokens of a prompt have stored state in
// a granted namespace: it reads the index only.
func (s *Server) Lookup(ctx context.Context, req *hcachev1.LookupRequest) (*hcachev1.LookupReply, error) {
	_, ident, err := s.targetPrefix(ctx, req.GetNamespace(), req.GetId(), req.GetTokens(), req.GetSalt(), req.GetIdentity())
	if err != nil {
		return nil, err
	}
	p := chunk.Prefix{Namespace: req.GetNamespace(), Salt: req.GetSalt(), Identity: ident, Tokens: req.GetTokens(), Context: req.GetId()}
	n, err := s.store.Lookup(p)
	if err != nil {
		return nil, s.prefixErr(err)
	}
	// Past the local match, the shared tier (remote.go).
	n += s.remoteTokens(ctx, p, n, false)
	res := "miss"
	if n > 0 {
		res = "hit"
	}
	s.metrics.lookups.WithLabelValues(res).Inc()
	s.metrics.lookupTokens.Add(float64(n))
	return &hcachev1.LookupReply{Tokens: uint64(n), ChunkTokens: uint32(s.store.ChunkTokens())}, nil
}

// Fork starts context dst_id from the first tokens of src: shared groups
// are referenced, only a partial tail is copied.
func (s *Server) Fork(ctx context.Context, req *hcachev1.ForkRequest) (*hcachev1.ForkReply, error) {
	_, ns, src, err := s.target(ctx, req.GetSrc())
	if err != nil {
		return nil, err
	}
	dst := req.GetDstId()
	if err := validName("dst_id", dst); err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	if dst == src {
		return nil, status.Errorf(codes.InvalidArgument, "dst_id %q is the source context", dst)
	}
	s.admin.RLock()
	defer s.admin.RUnlock()
	s.mu.Lock()
	_, open := s.writers[key(ns, src)]
	s.mu.Unlock()
	if open {
		return nil, status.Errorf(codes.FailedPrecondition, "fork of %s/%s: it has an open writer; close it first", ns, src)
	}
	info, err := s.store.Context(ns, src)
	if err != nil {
		return nil, s.storeErr(err)
	}
	if req.GetTokens() > info.Tokens {
		return nil, status.Errorf(codes.InvalidArgument, "fork of %d tokens of %s/%s, which holds %d", req.GetTokens(), ns, src, info.Tokens)
	}
	if err := forkCutsGroup(info, req.GetTokens()); err != nil {
		return nil, err
	}
	done, serr := s.takeContextSlot(ns)
	if serr != nil {
		return nil, serr
	}
	// The fork's tokens count toward the quota like any context's
	// (shared groups included; daemon doc, Tenancy).
	held := int64(req.GetTokens()) * rowSum(info.Identity)
	if err := s.reserve(ns, held); err != nil {
		done(false)
		return nil, err
	}
	err = s.store.Fork(ns, src, dst, int(req.GetTokens()))
	done(err == nil)
	s.unreserve(ns, held) // recount counts the fork from the store
	if err != nil {
		return nil, s.prefixErr(err)
	}
	s.recount(ns)
	return &hcachev1.ForkReply{Tokens: req.GetTokens()}, nil
}

// tokenContext checks that a context named by a restore by tokens exists
// (NOT_FOUND otherwise) and is token-addressed (FAILED_PRECONDITION
// otherwise: its rows carry no token ids to check against the request).
func (s *Server) tokenContext(ns, id string) error {
	info, err := s.store.Context(ns, id)
	if err != nil {
		return s.storeErr(err)
	}
	if !info.TokenAddressed {
		return status.Errorf(codes.FailedPrecondition, "context %s/%s was not created with tokens: restore it by its id, without tokens", ns, id)
	}
	return nil
}

// continueTokens checks an APPEND with tokens against the context: it must
// be token-addressed, under the same salt, and its stored tokens must be
// the leading tokens given; the writer then learns the ids of the rest.
func (s *Server) continueTokens(w *chunk.Writer, ns, id string, ident *chunk.Identity, tokens []uint32, salt []byte) error {
	if err := w.ExtendTokens(nil); err != nil {
		return status.Errorf(codes.FailedPrecondition, "context %s/%s was not created with tokens; append to it without tokens", ns, id)
	}
	base := w.Tokens()
	if len(tokens) < base {
		return status.Errorf(codes.InvalidArgument, "tokens: %d ids, but %s/%s already holds %d tokens (give the stored tokens followed by this turn's)", len(tokens), ns, id, base)
	}
	if base > 0 {
		n, err := s.store.Lookup(chunk.Prefix{Namespace: ns, Salt: salt, Identity: ident, Tokens: tokens[:base], Context: id})
		if err != nil {
			return s.prefixErr(err)
		}
		if n != base {
			return status.Errorf(codes.FailedPrecondition, "tokens: %s/%s holds %d tokens, and the given ids (under this salt) match only its first %d", ns, id, base, n)
		}
	}
	if err := w.ExtendTokens(tokens[base:]); err != nil {
		return s.prefixErr(err)
	}
	return nil
}

// reserveShared reserves, against the namespace's quota, the rows of the
// leading tokens a create by tokens will share (what a lookup finds now)
// and returns the bytes held.
func (s *Server) reserveShared(ns string, ident *chunk.Identity, tokens []uint32, salt []byte) (int64, error) {
	n, err := s.store.Lookup(chunk.Prefix{Namespace: ns, Salt: salt, Identity: ident, Tokens: tokens})
	if err != nil {
		return 0, s.prefixErr(err)
	}
	held := int64(n) * rowSum(ident)
	if err := s.reserve(ns, held); err != nil {
		return 0, err
	}
	return held, nil
}
