package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/stats"
	"google.golang.org/grpc/status"

	"github.com/hcache/hcache/chunk"
	hcachev1 "github.com/hcache/hcache/proto/hcache/v1"
	"github.com/hcache/hcache/serve"
)

// Version is reported by Info.
const Version = "hcached 1"

// Defaults of the limits (each is a flag of cmd/hcached).
const (
	DefaultMaxContexts         = 1 << 20
	DefaultMaxTokensPerContext = 1 << 20
	DefaultMaxInflight         = 64
	DefaultMaxConnsPerUID      = 256
	DefaultMaxMessageBytes     = 64 << 20
	DefaultMaxRegionBytes      = 4 << 30
	DefaultMaxRegionsPerUID    = 64
	DefaultRestorePieceBytes   = 4 << 20
	DefaultGCInterval          = 30 * time.Second
	DefaultStopTimeout         = 30 * time.Second
	DefaultRestoreTimeout      = 10 * time.Minute
	// Side connections that have not registered a region yet: per user and
	// in all, and how long one may take to register.
	DefaultMaxSidePendingPerUID = 8
	DefaultMaxSidePending       = 64
	DefaultSideRegisterTimeout  = 2 * time.Second
)

// Defaults of the per-caller limits (auth.go): TCP connections per bearer
// token, as many as a unix user's; restores running at once per caller, one
// connection's --max-inflight.
const (
	DefaultMaxConnsPerToken     = DefaultMaxConnsPerUID
	DefaultMaxRestoresPerCaller = DefaultMaxInflight
	// TCP connections that have not presented a known bearer token yet, in
	// all (as many as side connections not registered yet), and how long
	// one may take to.
	DefaultMaxTCPPending  = DefaultMaxSidePending
	DefaultTCPAuthTimeout = 10 * time.Second
)

// Config configures a Server. Zero limits take the defaults above.
type Config struct {
	// Store is the open store the daemon serves (it does not close it).
	Store *chunk.Store
	// Listen is the unix socket path of the API.
	Listen string
	// TCP, if set, is an additional TCP address of the API (bearer tokens
	// required there), with TLS when TLSCertFile and TLSKeyFile are set.
	TCP                     string
	TLSCertFile, TLSKeyFile string
	// Shm is the path of the shared-memory side socket; "" disables shared
	// regions.
	Shm string
	// Metrics, if set, is the HTTP address of /metrics and /healthz.
	Metrics string
	Grants  Grants
	// Quotas bound the stored row bytes of each namespace; DefaultQuota
	// applies to namespaces not listed (0: none).
	Quotas       map[string]int64
	DefaultQuota int64

	MaxContexts int
	// MaxContextsPerNamespace bounds the contexts (empty ones included) of
	// one namespace. 0: a fair share, MaxContexts divided by the number of
	// namespaces named in Grants (UIDs and Tokens; "*" not counted), at
	// least 1.
	MaxContextsPerNamespace int
	// MaxSidePendingPerUID and MaxSidePending bound the side connections
	// that have not registered a region yet, per peer user and in all; past
	// them a new side connection is answered ERR and closed at once.
	// SideRegisterTimeout is how long one may take to register.
	MaxSidePendingPerUID int
	MaxSidePending       int
	SideRegisterTimeout  time.Duration
	// MetricsNamespaces exports per-namespace series (names, row bytes,
	// quotas) on /metrics. Off by default: /metrics has no authentication,
	// and any local user can read it.
	MetricsNamespaces   bool
	MaxTokensPerContext uint64
	MaxInflight         int   // concurrent RPCs per client connection
	MaxConnsPerUID      int   // unix connections per user
	MaxMessageBytes     int   // gRPC message size, both ways
	MaxRegionBytes      int64 // one shared region
	MaxRegionsPerUID    int
	RestorePieceBytes   int // inline restore pieces
	GCInterval          time.Duration
	StopTimeout         time.Duration
	RestoreTimeout      time.Duration // longest restore (a client that stops reading is cut off)
	Logger              *slog.Logger
	// Models are what Restore with project set can project with.
	Models []*Model
	// Remote, if set, is the shared tier on object storage (remote.go).
	Remote *RemoteConfig

	// MaxRequestTokens bounds the token ids of one request (Lookup,
	// OpenContext's tokens, Restore by tokens, AppendTokens' token_ids).
	// Default DefaultMaxRequestTokens.
	MaxRequestTokens uint64

	// MaxConnsPerToken bounds the TCP connections charged to one bearer
	// token (auth.go): past it a request presenting the token on another
	// connection is refused with RESOURCE_EXHAUSTED.
	MaxConnsPerToken int
	// MaxRestoresPerCaller bounds the restores one caller (a unix user, a
	// TCP bearer token) runs at once, over all its connections; past it a
	// restore is refused with RESOURCE_EXHAUSTED.
	MaxRestoresPerCaller int
	// MaxTCPPending bounds the TCP connections that have not presented a
	// known bearer token yet, in all; past it a new one is closed at its
	// handshake. TCPAuthTimeout closes one still pending that long after
	// it was accepted.
	MaxTCPPending  int
	TCPAuthTimeout time.Duration
}

func (c *Config) fill() error {
	if c.Store == nil {
		return errors.New("daemon: Config.Store is required")
	}
	if c.Listen == "" && c.TCP == "" {
		return errors.New("daemon: nothing to listen on")
	}
	def := func(p *int, v int) {
		if *p == 0 {
			*p = v
		}
	}
	def(&c.MaxContexts, DefaultMaxContexts)
	def(&c.MaxInflight, DefaultMaxInflight)
	def(&c.MaxConnsPerUID, DefaultMaxConnsPerUID)
	def(&c.MaxConnsPerToken, DefaultMaxConnsPerToken)
	def(&c.MaxRestoresPerCaller, DefaultMaxRestoresPerCaller)
	def(&c.MaxTCPPending, DefaultMaxTCPPending)
	if c.TCPAuthTimeout == 0 {
		c.TCPAuthTimeout = DefaultTCPAuthTimeout
	}
	def(&c.MaxMessageBytes, DefaultMaxMessageBytes)
	def(&c.MaxRegionsPerUID, DefaultMaxRegionsPerUID)
	def(&c.RestorePieceBytes, DefaultRestorePieceBytes)
	def(&c.MaxSidePendingPerUID, DefaultMaxSidePendingPerUID)
	def(&c.MaxSidePending, DefaultMaxSidePending)
	if c.SideRegisterTimeout == 0 {
		c.SideRegisterTimeout = DefaultSideRegisterTimeout
	}
	if c.MaxContextsPerNamespace == 0 {
		c.MaxContextsPerNamespace = max(1, c.MaxContexts/max(1, len(c.Grants.named())))
	}
	if c.MaxTokensPerContext == 0 {
		c.MaxTokensPerContext = DefaultMaxTokensPerContext
	}
	if c.MaxRequestTokens == 0 {
		c.MaxRequestTokens = DefaultMaxRequestTokens
	}
	if c.MaxRegionBytes == 0 {
		c.MaxRegionBytes = DefaultMaxRegionBytes
	}
	if c.GCInterval == 0 {
		c.GCInterval = DefaultGCInterval
	}
	if c.StopTimeout == 0 {
		c.StopTimeout = DefaultStopTimeout
	}
	if c.RestoreTimeout == 0 {
		c.RestoreTimeout = DefaultRestoreTimeout
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.NewJSONHandler(os.Stderr, nil))
	}
	if c.TCP != "" && len(c.Grants.Tokens) == 0 {
		return errors.New("daemon: TCP needs a token file (clients there authenticate with bearer tokens)")
	}
	return nil
}

// Server is a running daemon.
type Server struct {
	hcachev1.UnimplementedHCacheServer
	cfg     Config
	store   *chunk.Store
	grants  Grants
	log     *slog.Logger
	grpc    *grpc.Server
	lns     []net.Listener
	shmLn   net.Listener
	httpSrv *http.Server
	metrics *metrics
	remote  *remoteMetrics
	regions regions

	shmMu    sync.Mutex
	shmOpen  map[*net.UnixConn]bool
	shmConns sync.WaitGroup

	// admin is held shared by every mutating RPC and the GC loop, and
	// exclusively by fsck (which must see a still store).
	admin sync.RWMutex

	mu         sync.Mutex
	writers    map[string]*openWriter // ns\0id
	conns      map[uint64]*connState
	connsByUID map[uint32]int
	// TCP connections charged to each bearer token (--max-conns-per-token).
	connsByToken map[string]int
	// Restores running per caller (--max-restores-per-caller).
	restoresBy map[callerKey]int
	// TCP connections not charged to a token yet (--max-tcp-pending).
	tcpPending int
	usage      map[string]int64 // stored + appended row bytes per namespace
	stopping   bool
	// Contexts per namespace and in all (empty ones included), kept by
	// creates, deletes and evictions; creating counts creates under way.
	nsCtx         map[string]int
	ctxGen        map[string]uint64 // bumped by each count change of a namespace
	ctxTotal      int
	creating      map[string]int
	creatingTotal int
	// Side connections not registered yet, per peer user and in all.
	sidePending      map[uint32]int
	sidePendingTotal int

	restoring  sync.WaitGroup             // restore goroutines, which may outlive their RPC (--restore-timeout)
	plain      *serve.Restorer            // plain restores (serve's pipeline)
	projectors map[*Model]*serve.Restorer // restores projected by each model
	nextConn   atomic.Uint64
	stopOnce   sync.Once
	gcStop     chan struct{}
	gcDone     chan struct{}
	serveErr   chan error
}

type connState struct {
	inflight atomic.Int64
	ended    bool
}

// New starts a daemon: it listens, serves in the background and returns.
func New(cfg Config) (*Server, error) {
	if err := cfg.fill(); err != nil {
		return nil, err
	}
	s := &Server{cfg: cfg, store: cfg.Store, grants: cfg.Grants, log: cfg.Logger,
		writers: map[string]*openWriter{}, conns: map[uint64]*connState{}, connsByUID: map[uint32]int{}, connsByToken: map[string]int{}, restoresBy: map[callerKey]int{}, usage: map[string]int64{},
		nsCtx: map[string]int{}, ctxGen: map[string]uint64{}, creating: map[string]int{}, sidePending: map[uint32]int{},
		shmOpen: map[*net.UnixConn]bool{}, gcStop: make(chan struct{}), gcDone: make(chan struct{}),
		serveErr: make(chan error, 4)}
	s.regions.init()
	s.newRestorers()
	for _, c := range s.store.Contexts() {
		s.usage[c.Namespace] += int64(c.Tokens) * rowSum(c.Identity)
		s.nsCtx[c.Namespace]++
		s.ctxTotal++
	}
	s.metrics = newMetrics(s)
	if c := s.cfg.Remote; c != nil {
		if c.PublishTimeout <= 0 {
			c.PublishTimeout = time.Minute
		}
		s.remote = s.metrics.addRemote(c)
	}
	creds := peerCreds{s: s}
	if cfg.TLSCertFile != "" || cfg.TLSKeyFile != "" {
		tc, err := credentials.NewServerTLSFromFile(cfg.TLSCertFile, cfg.TLSKeyFile)
		if err != nil {
			return nil, fmt.Errorf("daemon: TLS: %w", err)
		}
		creds.tls = tc
	}
	if cfg.TCP != "" && creds.tls == nil {
		s.log.Warn("TCP without TLS: bearer tokens and rows travel in clear; use it only on a trusted network (--tls-cert, --tls-key)")
	}
	s.grpc = grpc.NewServer(
		grpc.Creds(creds),
		grpc.MaxRecvMsgSize(cfg.MaxMessageBytes),
		grpc.MaxSendMsgSize(cfg.MaxMessageBytes),
		grpc.StatsHandler(connTracker{s}),
		// Pings find TCP peers that vanished without closing (a unix peer's
		// death closes its socket at once), so their writers are abandoned.
		grpc.KeepaliveParams(keepalive.ServerParameters{Time: 30 * time.Second, Timeout: 10 * time.Second}),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 10 * time.Second, PermitWithoutStream: true}),
		grpc.ChainUnaryInterceptor(s.unaryLimit),
		grpc.ChainStreamInterceptor(s.streamLimit),
	)
	hcachev1.RegisterHCacheServer(s.grpc, s)
	ok := false
	defer func() {
		if !ok {
			for _, ln := range s.lns {
				ln.Close()
			}
			if s.shmLn != nil {
				s.shmLn.Close()
			}
		}
	}()
	if cfg.Listen != "" {
		ln, err := listenUnix(cfg.Listen)
		if err != nil {
			return nil, err
		}
		s.lns = append(s.lns, s.steady(ln, "api"))
	}
	if cfg.TCP != "" {
		ln, err := net.Listen("tcp", cfg.TCP)
		if err != nil {
			return nil, err
		}
		s.lns = append(s.lns, s.steady(ln, "tcp"))
	}
	if cfg.Shm != "" {
		ln, err := listenUnix(cfg.Shm)
		if err != nil {
			return nil, err
		}
		s.shmLn = s.steady(ln, "shm")
		go s.serveShm(s.shmLn)
	}
	if cfg.Metrics != "" {
		ln, err := net.Listen("tcp", cfg.Metrics)
		if err != nil {
			return nil, fmt.Errorf("daemon: metrics address: %w", err)
		}
		s.httpSrv = &http.Server{Handler: s.metrics.handler(), ReadHeaderTimeout: 10 * time.Second}
		go s.httpSrv.Serve(ln)
		s.log.Info("metrics listening", "addr", ln.Addr().String())
	}
	for _, ln := range s.lns {
		go func(ln net.Listener) {
			if err := s.grpc.Serve(ln); err != nil {
				s.serveErr <- err
			}
		}(ln)
		s.log.Info("listening", "addr", ln.Addr().String(), "network", ln.Addr().Network())
	}
	go s.gcLoop()
	ok = true
	return s, nil
}

// Errors reports a listener failure.
func (s *Server) Errors() <-chan error { return s.serveErr }

// listenUnix listens on a unix socket path, replacing a stale socket file
// (one nobody answers on) and refusing to replace anything else.
func listenUnix(path string) (*net.UnixListener, error) {
	path = strings.TrimPrefix(strings.TrimPrefix(path, "unix://"), "unix:")
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("daemon: socket directory: %w", err)
	}
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("daemon: %s exists and is not a socket", path)
		}
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("daemon: %s: another daemon answers on it", path)
		}
		os.Remove(path)
	}
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("daemon: listen %s: %w", path, err)
	}
	// Anyone may connect; what a peer may do is decided by its credentials.
	if err := os.Chmod(path, 0o666); err != nil {
		ln.Close()
		return nil, err
	}
	return ln, nil
}

// Stop stops gracefully: no new connections or RPCs, running RPCs finish
// (up to StopTimeout, then they are cancelled), open writers are flushed and
// closed, shared regions released. The store is left open for the caller to
// close. Calling it again does nothing.
func (s *Server) Stop() { s.stopOnce.Do(s.stop) }

func (s *Server) stop() {
	s.mu.Lock()
	s.stopping = true
	s.mu.Unlock()
	close(s.gcStop)
	<-s.gcDone
	if s.shmLn != nil {
		s.shmLn.Close()
	}
	done := make(chan struct{})
	go func() {
		s.grpc.GracefulStop()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(s.cfg.StopTimeout):
		s.log.Warn("requests still running after the stop timeout; cancelling them")
		s.grpc.Stop()
		<-done
	}
	// Restores cut off by their timeout wind down once their stream is gone.
	s.restoring.Wait()
	s.mu.Lock()
	ws := make([]*openWriter, 0, len(s.writers))
	for k, w := range s.writers {
		ws = append(ws, w)
		delete(s.writers, k)
	}
	s.mu.Unlock()
	for _, w := range ws {
		w.mu.Lock()
		w.closed = true
		if err := w.w.Close(); err != nil {
			s.log.Error("flush on stop failed", "ns", w.ns, "id", w.id, "err", err)
		} else {
			s.log.Info("flushed on stop", "ns", w.ns, "id", w.id, "tokens", w.w.Tokens())
		}
		w.mu.Unlock()
	}
	s.shmMu.Lock()
	for c := range s.shmOpen {
		c.Close()
	}
	s.shmMu.Unlock()
	s.shmConns.Wait()
	if s.httpSrv != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		s.httpSrv.Shutdown(ctx)
		cancel()
	}
}

func (s *Server) gcLoop() {
	defer close(s.gcDone)
	if s.cfg.GCInterval < 0 {
		return
	}
	t := time.NewTicker(s.cfg.GCInterval)
	defer t.Stop()
	for {
		select {
		case <-s.gcStop:
			return
		case <-t.C:
		}
		s.admin.RLock()
		res := s.store.GC()
		s.admin.RUnlock()
		if res.Err != nil {
			s.log.Error("gc", "err", res.Err)
		} else if res.Segments > 0 {
			s.log.Info("gc", "segments", res.Segments, "moved_bytes", res.MovedBytes)
		}
	}
}

// Connection tracking: each connection gets an id (in its RPCs' contexts);
// when it ends, the writers it opened are abandoned (whole groups already with
// the flusher become durable, the partial last group is dropped) so the
// context can be reopened.

type connKey struct{}

type connTracker struct{ s *Server }

func (t connTracker) TagConn(ctx context.Context, _ *stats.ConnTagInfo) context.Context {
	id := t.s.nextConn.Add(1)
	t.s.mu.Lock()
	t.s.conns[id] = &connState{}
	t.s.mu.Unlock()
	t.s.metrics.conns.Inc()
	return context.WithValue(ctx, connKey{}, id)
}

func (t connTracker) HandleConn(ctx context.Context, st stats.ConnStats) {
	if _, ok := st.(*stats.ConnEnd); ok {
		t.s.connEnded(connID(ctx))
		t.s.metrics.conns.Dec()
	}
}

func (connTracker) TagRPC(ctx context.Context, _ *stats.RPCTagInfo) context.Context { return ctx }
func (connTracker) HandleRPC(context.Context, stats.RPCStats)                       {}

func connID(ctx context.Context) uint64 {
	id, _ := ctx.Value(connKey{}).(uint64)
	return id
}

func (s *Server) connEnded(id uint64) {
	s.mu.Lock()
	if cs := s.conns[id]; cs != nil {
		cs.ended = true
	}
	delete(s.conns, id)
	if s.stopping {
		// Stop flushes the writers instead.
		s.mu.Unlock()
		return
	}
	var orphans []*openWriter
	for k, w := range s.writers {
		if w.conn == id {
			orphans = append(orphans, w)
			delete(s.writers, k)
		}
	}
	s.mu.Unlock()
	for _, w := range orphans {
		w.mu.Lock()
		w.closed = true
		w.w.Abandon()
		w.mu.Unlock()
		s.log.Warn("client gone: writer abandoned, its partial last group dropped", "ns", w.ns, "id", w.id)
		s.metrics.abandoned.Inc()
		s.recount(w.ns)
	}
}

func (s *Server) conn(id uint64) *connState {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.conns[id]
}

func (s *Server) unaryLimit(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
	release, err := s.admit(ctx)
	if err != nil {
		s.metrics.rpcDone(info.FullMethod, err)
		return nil, err
	}
	defer release()
	resp, err := h(ctx, req)
	s.rpcDone(ctx, info.FullMethod, err)
	return resp, err
}

// rpcDone counts an RPC and logs a failure: at error level when the daemon
// or its data is at fault, at debug level when the request was.
func (s *Server) rpcDone(ctx context.Context, method string, err error) {
	s.metrics.rpcDone(method, err)
	if err == nil {
		return
	}
	lvl := slog.LevelDebug
	switch status.Code(err) {
	case codes.Internal, codes.DataLoss, codes.Unknown:
		lvl = slog.LevelError
	}
	s.log.Log(ctx, lvl, "request failed", "method", method, "code", status.Code(err).String(), "err", status.Convert(err).Message(), "conn", connID(ctx))
}

func (s *Server) streamLimit(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
	release, err := s.admit(ss.Context())
	if err != nil {
		s.metrics.rpcDone(info.FullMethod, err)
		return err
	}
	defer release()
	err = h(srv, ss)
	s.rpcDone(ss.Context(), info.FullMethod, err)
	return err
}

func (s *Server) admit(ctx context.Context) (func(), error) {
	cs := s.conn(connID(ctx))
	if cs == nil {
		return func() {}, nil
	}
	if n := cs.inflight.Add(1); n > int64(s.cfg.MaxInflight) {
		cs.inflight.Add(-1)
		return nil, status.Errorf(codes.ResourceExhausted, "more than %d requests in flight on this connection (--max-inflight)", s.cfg.MaxInflight)
	}
	return func() { cs.inflight.Add(-1) }, nil
}

// takeRestore takes one of a caller's restore slots
// (--max-restores-per-caller), or refuses the restore; the returned func
// gives it back (once, however often called).
func (s *Server) takeRestore(c *caller) (func(), error) {
	k := c.key()
	s.mu.Lock()
	defer s.mu.Unlock()
	if n := s.restoresBy[k]; n >= s.cfg.MaxRestoresPerCaller {
		s.metrics.restores.WithLabelValues("refused").Inc()
		s.log.Warn("restore refused: its caller runs too many restores", "caller", k.String(), "restores", n, "max", s.cfg.MaxRestoresPerCaller)
		return nil, status.Errorf(codes.ResourceExhausted, "%s already runs %d restores (--max-restores-per-caller %d): wait for one to end", k, n, s.cfg.MaxRestoresPerCaller)
	}
	s.restoresBy[k]++
	var once sync.Once
	return func() {
		once.Do(func() {
			s.mu.Lock()
			if s.restoresBy[k]--; s.restoresBy[k] <= 0 {
				delete(s.restoresBy, k)
			}
			s.mu.Unlock()
		})
	}, nil
}

func rowSum(id *chunk.Identity) int64 {
	if id == nil {
		return 0
	}
	var n int64
	for _, p := range id.Plan {
		n += int64(p.RowBytes)
	}
	return n
}

// recount recomputes a namespace's usage: stored tokens' rows for contexts
// without a writer, appended rows for those with one.
//
// It also resets the namespace's context count from the store, unless a
// create, delete or eviction in the namespace was counted during the scan
// (the count it read may then be stale); so the count does not drift from
// the store's, whatever the store did on its own.
func (s *Server) recount(ns string) {
	var total int64
	n := 0
	open := map[string]*openWriter{}
	s.mu.Lock()
	for _, w := range s.writers {
		if w.ns == ns {
			open[w.id] = w
		}
	}
	gen := s.ctxGen[ns]
	busy := s.creating[ns] > 0
	s.mu.Unlock()
	for _, c := range s.store.Contexts() {
		if c.Namespace != ns {
			continue
		}
		n++
		if w := open[c.ID]; w != nil {
			total += w.appended.Load()
		} else {
			total += int64(c.Tokens) * rowSum(c.Identity)
		}
	}
	s.mu.Lock()
	s.usage[ns] = total
	if !busy && s.creating[ns] == 0 && s.ctxGen[ns] == gen && s.nsCtx[ns] != n {
		s.ctxTotal += n - s.nsCtx[ns]
		if s.nsCtx[ns] = n; n == 0 {
			delete(s.nsCtx, ns)
		}
	}
	s.mu.Unlock()
}

func (s *Server) quota(ns string) int64 {
	if q, ok := s.cfg.Quotas[ns]; ok {
		return q
	}
	return s.cfg.DefaultQuota
}

// reserve accounts n more row bytes to a namespace, or refuses them.
func (s *Server) reserve(ns string, n int64) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	q := s.quota(ns)
	if q > 0 && s.usage[ns]+n > q {
		s.metrics.quotaRefused.Inc()
		return status.Errorf(codes.ResourceExhausted, "namespace %q quota of %d bytes: %d in use, %d more refused", ns, q, s.usage[ns], n)
	}
	s.usage[ns] += n
	return nil
}

func (s *Server) unreserve(ns string, n int64) {
	s.mu.Lock()
	s.usage[ns] -= n
	s.mu.Unlock()
}
