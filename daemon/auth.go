package daemon

import (
	"bufio"
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"fmt"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
)

// All is the namespace grant that covers every namespace (and the admin
// operations fsck and gc).
const All = "*"

// peerAuth is the AuthInfo of a connection: the unix peer credentials
// (SO_PEERCRED) of a unix socket client, nothing for TCP.
type peerAuth struct {
	credentials.CommonAuthInfo
	unix          bool
	uid, gid, pid uint32
	tls           credentials.AuthInfo // TCP with TLS
	tcp           *tcpConn             // TCP: the tokens its requests are charged to
}

func (p peerAuth) AuthType() string {
	switch {
	case p.unix:
		return "unix-peercred"
	case p.tls != nil:
		return "tls"
	}
	return "tcp"
}

// peerCreds is the server's TransportCredentials. On a unix socket it
// performs no handshake on the wire and records the peer credentials of the
// connection, read with SO_PEERCRED when it is accepted. On TCP it runs the
// TLS handshake when tls is set (--tls-cert/--tls-key), and nothing
// otherwise.
type peerCreds struct {
	tls credentials.TransportCredentials
	s   *Server // counts connections per user (--max-conns)
}

// countedConn gives back its user's connection slot when closed.
type countedConn struct {
	net.Conn
	once    sync.Once
	release func()
}

func (c *countedConn) Close() error {
	c.once.Do(c.release)
	return c.Conn.Close()
}

func (peerCreds) ClientHandshake(ctx context.Context, _ string, c net.Conn) (net.Conn, credentials.AuthInfo, error) {
	return c, peerAuth{CommonAuthInfo: credentials.CommonAuthInfo{SecurityLevel: credentials.NoSecurity}}, nil
}

func (p peerCreds) ServerHandshake(c net.Conn) (net.Conn, credentials.AuthInfo, error) {
	a := peerAuth{CommonAuthInfo: credentials.CommonAuthInfo{SecurityLevel: credentials.NoSecurity}}
	uc, isUnix := c.(*net.UnixConn)
	if !isUnix {
		if p.s != nil {
			// Who a TCP client is shows only in its requests (the bearer
			// token), so its connection is pending until one charges it
			// to a token.
			t, err := p.s.newTCPConn(c)
			if err != nil {
				return nil, nil, err
			}
			a.tcp = t
		}
		if p.tls != nil {
			tc, info, err := p.tls.ServerHandshake(c)
			if err != nil {
				if a.tcp != nil {
					a.tcp.release()
				}
				return nil, nil, err
			}
			a.CommonAuthInfo = credentials.CommonAuthInfo{SecurityLevel: credentials.PrivacyAndIntegrity}
			a.tls = info
			c = tc
		}
		if a.tcp != nil {
			return &countedConn{Conn: c, release: a.tcp.release}, a, nil
		}
		return c, a, nil
	}
	if isUnix {
		cred, err := ucred(uc)
		if err != nil {
			return nil, nil, fmt.Errorf("SO_PEERCRED: %w", err)
		}
		a.unix, a.uid, a.gid, a.pid = true, cred.Uid, cred.Gid, uint32(cred.Pid)
		// Local connections are as private as the machine.
		a.SecurityLevel = credentials.PrivacyAndIntegrity
		if p.s != nil {
			release, err := p.s.takeConn(cred.Uid)
			if err != nil {
				return nil, nil, err
			}
			return &countedConn{Conn: c, release: release}, a, nil
		}
	}
	return c, a, nil
}

func (peerCreds) Info() credentials.ProtocolInfo {
	return credentials.ProtocolInfo{SecurityProtocol: "hcache-peercred"}
}
func (p peerCreds) Clone() credentials.TransportCredentials {
	if p.tls != nil {
		return peerCreds{tls: p.tls.Clone(), s: p.s}
	}
	return p
}
func (peerCreds) OverrideServerName(string) error { return nil }

func ucred(uc *net.UnixConn) (*unix.Ucred, error) {
	raw, err := uc.SyscallConn()
	if err != nil {
		return nil, err
	}
	var cred *unix.Ucred
	var cerr error
	if err := raw.Control(func(fd uintptr) {
		cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return nil, err
	}
	return cred, cerr
}

// Grants maps callers to the namespaces they may touch.
type Grants struct {
	// UIDs grants unix socket clients by user id. Empty: the daemon's own
	// user is granted every namespace, nobody else anything.
	UIDs map[uint32][]string
	// Tokens grants bearer tokens (the "authorization: Bearer TOKEN"
	// metadata). TCP clients must present one; a unix client may, to narrow
	// its uid's grant to the token's (several engines under one user).
	Tokens map[string][]string
}

// named returns the distinct namespaces the grants name ("*" not counted).
func (g *Grants) named() []string {
	var out []string
	add := func(list []string) {
		for _, n := range list {
			if n != All && !slices.Contains(out, n) {
				out = append(out, n)
			}
		}
	}
	for _, l := range g.UIDs {
		add(l)
	}
	for _, l := range g.Tokens {
		add(l)
	}
	return out
}

// ParseGrant parses "UID=ns1,ns2" (a --grant flag).
func ParseGrant(s string) (uint32, []string, error) {
	u, list, ok := strings.Cut(s, "=")
	if !ok {
		return 0, nil, fmt.Errorf("grant %q: want UID=NAMESPACE[,NAMESPACE...]", s)
	}
	uid, err := strconv.ParseUint(strings.TrimSpace(u), 10, 32)
	if err != nil {
		return 0, nil, fmt.Errorf("grant %q: bad uid: %v", s, err)
	}
	ns, err := parseNSList(list)
	if err != nil {
		return 0, nil, fmt.Errorf("grant %q: %v", s, err)
	}
	return uint32(uid), ns, nil
}

func parseNSList(list string) ([]string, error) {
	var out []string
	for _, n := range strings.Split(list, ",") {
		n = strings.TrimSpace(n)
		if n == "" {
			continue
		}
		if n != All {
			if err := ValidNamespace(n); err != nil {
				return nil, err
			}
		}
		out = append(out, n)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("no namespace")
	}
	return out, nil
}

// LoadTokens reads a token file: one "TOKEN NAMESPACE[,NAMESPACE...]" per
// line; blank lines and lines starting with # are ignored. The file must not
// be readable by others (mode & 0o077 == 0).
func LoadTokens(path string) (map[string][]string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if fi.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("token file %s has mode %v: it must not be accessible to group or others (chmod 600)", path, fi.Mode().Perm())
	}
	out := map[string][]string{}
	sc := bufio.NewScanner(f)
	line := 0
	for sc.Scan() {
		line++
		t := strings.TrimSpace(sc.Text())
		if t == "" || strings.HasPrefix(t, "#") {
			continue
		}
		fields := strings.Fields(t)
		if len(fields) != 2 {
			return nil, fmt.Errorf("%s:%d: want TOKEN NAMESPACE[,NAMESPACE...]", path, line)
		}
		if len(fields[0]) < 16 {
			return nil, fmt.Errorf("%s:%d: token shorter than 16 characters", path, line)
		}
		ns, err := parseNSList(fields[1])
		if err != nil {
			return nil, fmt.Errorf("%s:%d: %v", path, line, err)
		}
		out[fields[0]] = ns
	}
	return out, sc.Err()
}

// caller is who an RPC comes from and what it may touch.
type caller struct {
	unix       bool
	uid        uint32
	token      string // TCP: the bearer token (who the caller is there)
	conn       uint64
	namespaces []string // granted; may hold All
}

// callerKey is what per-caller limits count by: the user of a unix client,
// the bearer token of a TCP one.
type callerKey struct {
	unix  bool
	uid   uint32
	token string
}

func (c *caller) key() callerKey {
	if c.unix {
		return callerKey{unix: true, uid: c.uid}
	}
	return callerKey{token: c.token}
}

// String names the caller in logs and errors (a token by its hash).
func (k callerKey) String() string {
	if k.unix {
		return fmt.Sprintf("uid %d", k.uid)
	}
	return "bearer token " + tokenID(k.token)
}

func (c *caller) admin() bool { return slices.Contains(c.namespaces, All) }

func (c *caller) may(ns string) bool { return c.admin() || slices.Contains(c.namespaces, ns) }

func (c *caller) check(ns string) error {
	if !c.may(ns) {
		return status.Errorf(codes.PermissionDenied, "namespace %q is not granted to this client", ns)
	}
	return nil
}

func intersect(a, b []string) []string {
	if slices.Contains(a, All) {
		return b
	}
	if slices.Contains(b, All) {
		return a
	}
	var out []string
	for _, x := range a {
		if slices.Contains(b, x) {
			out = append(out, x)
		}
	}
	return out
}

func bearer(ctx context.Context) (string, bool) {
	md, _ := metadata.FromIncomingContext(ctx)
	for _, v := range md.Get("authorization") {
		if t, ok := strings.CutPrefix(v, "Bearer "); ok {
			return t, true
		}
	}
	return "", false
}

func (g *Grants) lookupToken(tok string) ([]string, bool) {
	var found []string
	ok := false
	for t, ns := range g.Tokens {
		if subtle.ConstantTimeCompare([]byte(t), []byte(tok)) == 1 {
			found, ok = ns, true
		}
	}
	return found, ok
}

// authenticate resolves the caller of an RPC.
func (s *Server) authenticate(ctx context.Context) (*caller, error) {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return nil, status.Error(codes.Unauthenticated, "no peer information")
	}
	a, _ := p.AuthInfo.(peerAuth)
	c := &caller{unix: a.unix, uid: a.uid, conn: connID(ctx)}
	tok, hasTok := bearer(ctx)
	var tokNS []string
	if hasTok {
		ns, ok := s.grants.lookupToken(tok)
		if !ok {
			return nil, status.Error(codes.Unauthenticated, "unknown bearer token")
		}
		tokNS = ns
	}
	if !a.unix {
		if !hasTok {
			return nil, status.Error(codes.Unauthenticated, "TCP clients must present a bearer token (authorization: Bearer TOKEN)")
		}
		if a.tcp != nil {
			if err := a.tcp.charge(tok, tokNS); err != nil {
				return nil, err
			}
		}
		c.namespaces, c.token = tokNS, tok
		return c, nil
	}
	uidNS := s.uidGrant(a.uid)
	if len(uidNS) == 0 {
		return nil, status.Errorf(codes.PermissionDenied, "uid %d is granted no namespace", a.uid)
	}
	c.namespaces = uidNS
	if hasTok {
		c.namespaces = intersect(uidNS, tokNS)
	}
	return c, nil
}

func (s *Server) uidGrant(uid uint32) []string {
	if len(s.grants.UIDs) == 0 {
		if uid == uint32(os.Getuid()) {
			return []string{All}
		}
		return nil
	}
	return s.grants.UIDs[uid]
}

// takeConn takes one of a user's connection slots (--max-conns), or refuses
// the connection; the returned func gives the slot back.
func (s *Server) takeConn(uid uint32) (func(), error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.connsByUID[uid] >= s.cfg.MaxConnsPerUID {
		s.metrics.connsRefused.WithLabelValues("unix").Inc()
		s.log.Warn("connection refused: too many connections", "uid", uid, "max", s.cfg.MaxConnsPerUID)
		return nil, fmt.Errorf("uid %d already has %d connections (--max-conns)", uid, s.cfg.MaxConnsPerUID)
	}
	s.connsByUID[uid]++
	return func() {
		s.mu.Lock()
		s.connsByUID[uid]--
		s.mu.Unlock()
	}, nil
}

// TCP connections per token (--max-conns-per-token). A TCP client is known
// only by the bearer token its requests carry, not at its handshake, so a
// connection is charged to a token by the first request that presents it:
// from then on, until the connection closes, it holds one of that token's
// slots. A request whose token already holds MaxConnsPerToken other
// connections is refused (RESOURCE_EXHAUSTED naming the flag), and the
// connection is not charged; a later request on it is admitted once the
// token has a free slot. A connection whose requests present several
// tokens holds a slot of each. TLS does not change the key: the daemon asks
// no client certificate, so under TLS too a client is its token.
//
// Until its first request with a known token a TCP connection is pending:
// at most MaxTCPPending are, over all clients (past it a new connection is
// closed at its handshake, which the client sees as UNAVAILABLE), and one
// still pending TCPAuthTimeout after its handshake began is closed. So a
// client that connects and never presents a token (or only a refused one)
// holds a descriptor only that long.

// tcpConn is a TCP connection's record of the tokens charged for it.
type tcpConn struct {
	s       *Server
	mu      sync.Mutex
	tokens  []string // each holds one slot of connsByToken
	closed  bool
	pending bool        // holds a slot of tcpPending
	expiry  *time.Timer // closes the connection while pending
}

// newTCPConn takes a pending slot for a new TCP connection, or refuses it.
func (s *Server) newTCPConn(raw net.Conn) (*tcpConn, error) {
	s.mu.Lock()
	if n := s.tcpPending; n >= s.cfg.MaxTCPPending {
		s.mu.Unlock()
		s.metrics.connsRefused.WithLabelValues("tcp_pending").Inc()
		s.log.Warn("TCP connection refused: too many connections without a known bearer token", "remote", raw.RemoteAddr().String(), "pending", n, "max", s.cfg.MaxTCPPending)
		return nil, fmt.Errorf("%d TCP connections have not presented a known bearer token yet (--max-tcp-pending %d)", n, s.cfg.MaxTCPPending)
	}
	s.tcpPending++
	s.mu.Unlock()
	t := &tcpConn{s: s, pending: true}
	t.mu.Lock()
	t.expiry = time.AfterFunc(s.cfg.TCPAuthTimeout, func() {
		t.mu.Lock()
		expired := t.pending && !t.closed
		t.mu.Unlock()
		if expired {
			s.log.Info("TCP connection closed: no request with a known bearer token in time (--tcp-auth-timeout)", "remote", raw.RemoteAddr().String(), "timeout", s.cfg.TCPAuthTimeout.String())
			raw.Close()
			// The transport then closes its countedConn, which releases it
			// again (a no-op); released here too, so the slot comes back
			// even where grpc closes only the raw connection (an error
			// before its transport was up).
			t.release()
		}
	})
	t.mu.Unlock()
	return t, nil
}

// settle gives back the pending slot (t.mu held).
func (t *tcpConn) settle() {
	if !t.pending {
		return
	}
	t.pending = false
	t.expiry.Stop()
	t.s.mu.Lock()
	t.s.tcpPending--
	t.s.mu.Unlock()
}

// charge charges the connection to tok, unless it is already or the token
// holds MaxConnsPerToken connections (then the request is refused).
func (t *tcpConn) charge(tok string, grant []string) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed || slices.Contains(t.tokens, tok) {
		// A closed connection's requests are ending: nothing to hold.
		return nil
	}
	if err := t.s.takeTokenConn(tok, grant); err != nil {
		return err
	}
	t.tokens = append(t.tokens, tok)
	t.settle()
	return nil
}

// release gives back the connection's slots (it closed).
func (t *tcpConn) release() {
	t.mu.Lock()
	toks := t.tokens
	t.tokens, t.closed = nil, true
	t.settle()
	t.mu.Unlock()
	t.s.mu.Lock()
	for _, tok := range toks {
		if t.s.connsByToken[tok]--; t.s.connsByToken[tok] <= 0 {
			delete(t.s.connsByToken, tok)
		}
	}
	t.s.mu.Unlock()
}

func (s *Server) takeTokenConn(tok string, grant []string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if n := s.connsByToken[tok]; n >= s.cfg.MaxConnsPerToken {
		s.metrics.connsRefused.WithLabelValues("tcp").Inc()
		s.log.Warn("request refused: its token holds too many TCP connections", "token", tokenID(tok), "namespaces", grant, "connections", n, "max", s.cfg.MaxConnsPerToken)
		return status.Errorf(codes.ResourceExhausted, "this bearer token (%s) already holds %d TCP connections (--max-conns-per-token %d): send on the connections it holds, or close some", tokenID(tok), n, s.cfg.MaxConnsPerToken)
	}
	s.connsByToken[tok]++
	return nil
}

// tokenID names a token in logs and errors without showing it: the first 8
// hex digits of its SHA-256 (tokens are at least 16 characters).
func tokenID(tok string) string {
	h := sha256.Sum256([]byte(tok))
	return "sha256:" + hex.EncodeToString(h[:4])
}
