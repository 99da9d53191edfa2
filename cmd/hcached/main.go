// Command hcached is the hcache state-store daemon: one chunk store shared by
// the serving engines of a machine over a gRPC API on a unix socket (TCP
// optional), with per-namespace tenancy, limits, shared-memory transfers and
// Prometheus metrics. See the daemon package doc (go doc ./daemon).
//
//	hcached --dir DIR --listen unix:///run/hcache/hcache.sock
//
// It creates the store in --dir when none is there (the one command besides
// hcache demo and stress that does), after checking that nothing else
// answers on its sockets and metrics address.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hcache/hcache/chunk"
	"github.com/hcache/hcache/chunk/remote"
	"github.com/hcache/hcache/daemon"
	"github.com/hcache/hcache/gpu"
	"github.com/hcache/hcache/gpu/cuda" // registers --backend cuda with gpu.Select
	"github.com/hcache/hcache/internal/buildinfo"
	"github.com/hcache/hcache/internal/units"
)

type listFlag []string

func (l *listFlag) String() string     { return strings.Join(*l, " ") }
func (l *listFlag) Set(v string) error { *l = append(*l, v); return nil }

func main() { os.Exit(run(os.Args[1:])) }

const usageHead = `usage: hcached --dir DIR [--listen /run/hcache/hcache.sock] [flags]

The hcache state-store daemon: one store shared by the serving engines of a
machine over gRPC on a unix socket (TCP optional, with --tokens and TLS),
shared-memory transfers on a side socket, and Prometheus metrics. It creates
the store in --dir when none is there. Sizes take K, M, G and T (binary).
Who may connect: the sockets are created with --socket-mode (0666: any local
user may connect); what a peer may do is decided by its credentials
(SO_PEERCRED uid, --grant; this daemon's own user gets every namespace).

Example:
  hcached --dir /var/lib/hcache --listen /run/hcache/hcache.sock --capacity 200G --cache 8G
  hcached --dir /tmp/store2 --listen /tmp/hcache2.sock --metrics 127.0.0.1:9465   # a second daemon on the machine

flags:
`

func run(args []string) int {
	for _, a := range args {
		if a == "--version" || a == "-version" {
			fmt.Println(buildinfo.String("hcached"))
			return 0
		}
	}
	fs := flag.NewFlagSet("hcached", flag.ContinueOnError)
	for _, a := range args {
		if a == "-h" || a == "--help" || a == "-help" {
			fs.SetOutput(os.Stdout) // asked-for help goes to stdout
		}
	}
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), usageHead)
		fs.PrintDefaults()
	}
	socketMode := fs.String("socket-mode", "0666", "permission bits of the API and shared-memory sockets (octal), e.g. 0660 to let only this user and group connect")
	fs.Bool("version", false, "print the build (module version and commit) and exit")
	dir := fs.String("dir", "", "store directory (required)")
	listen := fs.String("listen", "unix:///run/hcache/hcache.sock", "unix socket of the API: /path/hcache.sock or unix:///path/hcache.sock")
	tcp := fs.String("tcp", "", "also serve the API on this TCP address (off by default; needs --tokens)")
	shm := fs.String("shm", "", "shared-memory side socket (default: the --listen path + \".shm\"; \"off\" disables)")
	metricsAddr := fs.String("metrics", "127.0.0.1:9464", "HTTP address of /metrics and /healthz (\"\" disables; a second daemon on the machine needs its own, or \"\")")
	tokens := fs.String("tokens", "", "bearer token file: lines \"TOKEN NS[,NS...]\" (mode 600)")
	tlsCert := fs.String("tls-cert", "", "TLS certificate (PEM) of the --tcp listener")
	tlsKey := fs.String("tls-key", "", "TLS private key (PEM) of the --tcp listener")
	var grants, quotas, models listFlag
	fs.Var(&models, "model", "NAME=DIR: load a model's K/V weights to project hidden states on restore (repeatable)")
	backend := fs.String("backend", "auto", "projection backend of --model: auto (CUDA when a device can be used, else CPU), cpu or cuda")
	restores := fs.Int("restores", 0, fmt.Sprintf("CUDA backend (--backend cuda, or auto on a GPU): projected restores run on the device at once, each on its own lane of streams and staging buffers, 1 to %d (default %d); more wait for a lane", cuda.MaxRestores, cuda.DefaultRestores))
	restoreMem := fs.String("restore-memory", "0", "CUDA backend: device memory its restore lanes may hold together, e.g. 8G (0: a quarter of the device's memory); a restore that would need more fails")
	fs.Var(&grants, "grant", "UID=NS[,NS...]: namespaces a unix user may use, \"*\" = all (repeatable; default: this daemon's user gets *)")
	fs.Var(&quotas, "quota", "NS=BYTES: stored row bytes allowed in a namespace (repeatable)")
	defQuota := fs.String("default-quota", "0", "row bytes allowed in a namespace without --quota (0: unlimited)")
	maxContexts := fs.Int("max-contexts", daemon.DefaultMaxContexts, "contexts the store may hold (empty ones included)")
	maxContextsNS := fs.Int("max-contexts-per-namespace", 0, "contexts one namespace may hold, empty ones included (0: a fair share, --max-contexts divided by the number of namespaces --grant and --tokens name)")
	maxSidePendingUID := fs.Int("max-side-pending-per-uid", daemon.DefaultMaxSidePendingPerUID, "side (shared-memory) connections of one user that have not registered a region yet")
	maxSidePending := fs.Int("max-side-pending", daemon.DefaultMaxSidePending, "side connections of all users that have not registered a region yet")
	sideRegisterTimeout := fs.Duration("side-register-timeout", daemon.DefaultSideRegisterTimeout, "how long a side connection may take to register its region")
	metricsNS := fs.Bool("metrics-namespaces", false, "export per-namespace series (namespace names, row bytes, quotas) on /metrics, which any local user can read")
	maxTokens := fs.Uint64("max-tokens", daemon.DefaultMaxTokensPerContext, "tokens per context")
	maxReqTokens := fs.Uint64("max-request-tokens", daemon.DefaultMaxRequestTokens, "token ids in one request (lookup, open, restore by tokens, append)")
	maxInflight := fs.Int("max-inflight", daemon.DefaultMaxInflight, "concurrent requests per client connection")
	maxConns := fs.Int("max-conns", daemon.DefaultMaxConnsPerUID, "unix socket connections per user")
	maxConnsTok := fs.Int("max-conns-per-token", daemon.DefaultMaxConnsPerToken, "TCP connections per bearer token: a connection counts for each token its requests present, until it closes; past it such a request is refused (RESOURCE_EXHAUSTED)")
	maxRestoresCaller := fs.Int("max-restores-per-caller", daemon.DefaultMaxRestoresPerCaller, "restores one caller (a unix user, a TCP bearer token) runs at once over all its connections; past it a restore is refused (RESOURCE_EXHAUSTED)")
	maxTCPPending := fs.Int("max-tcp-pending", daemon.DefaultMaxTCPPending, "TCP connections of all clients that have not presented a known bearer token yet; past it a new one is closed at once")
	tcpAuthTimeout := fs.Duration("tcp-auth-timeout", daemon.DefaultTCPAuthTimeout, "how long a TCP connection may take to present a known bearer token (in a request the daemon admits) before it is closed")
	maxMsg := fs.String("max-message", units.FormatSize(int64(daemon.DefaultMaxMessageBytes)), "largest gRPC message, both ways")
	maxRegion := fs.String("max-region", units.FormatSize(int64(daemon.DefaultMaxRegionBytes)), "largest shared region")
	maxRegions := fs.Int("max-regions", daemon.DefaultMaxRegionsPerUID, "shared regions per user")
	gcInterval := fs.Duration("gc-interval", daemon.DefaultGCInterval, "how often GC looks for segments to compact (negative: only on request)")
	stopTimeout := fs.Duration("stop-timeout", daemon.DefaultStopTimeout, "on SIGTERM/SIGINT, how long running requests may take before they are cancelled")
	restoreTimeout := fs.Duration("restore-timeout", daemon.DefaultRestoreTimeout, "longest a restore may take (a client that stops reading is cut off)")
	capacity := fs.String("capacity", units.FormatSize(chunk.DefaultCapacityBytes), "live bytes on disk before least recently used contexts are evicted (-1: none)")
	cacheBytes := fs.String("cache", units.FormatSize(chunk.DefaultCacheBytes), "DRAM tier of recently used slices (0: off)")
	staging := fs.String("staging", units.FormatSize(chunk.DefaultStagingBytes), "DRAM staging bound of unwritten rows")
	chunkTokens := fs.Int("chunk-tokens", 0, "tokens per chunk group of a new store (default 64)")
	restoreAhead := fs.String("restore-ahead", units.FormatSize(chunk.DefaultRestoreAheadBytes), "layer bytes one restore keeps read or in flight (at least two layers; 0: two layers)")
	idleReadBufs := fs.String("idle-read-buffers", units.FormatSize(chunk.DefaultIdleReadBufferBytes), "restore buffers kept mapped for reuse while idle (0: none)")
	restoreQueue := fs.String("restore-queue", units.FormatSize(chunk.DefaultRestoreQueueBytes), "buffers the restores being read at once may reserve; later restores wait in arrival order, one that does not fit alone is read alone (0: no bound, every restore reads at once)")
	writeBytes := fs.String("write-bytes", units.FormatSize(chunk.DefaultWriteBytes), "bytes of the flusher's group writes in flight, so an fdatasync does not queue behind them (one write always goes; at least 1)")
	writeUnder := fs.String("write-bytes-under-restores", units.FormatSize(chunk.DefaultWriteBytesUnderRestores), "bytes of group writes in flight while a restore is being read, so restore reads do not queue behind saves (at least 1; --write-bytes or more: saves never yield)")
	logLevel := fs.String("log-level", "info", "debug, info, warn or error")
	remoteFlags := remote.RegisterFlags(fs)
	remoteLocal := fs.String("remote-local-bytes", "0", "sealed segment bytes kept local once the remote tier holds them; past it the oldest move there (their files deleted; restores read them remotely). 0: keep every local copy; -1: move each right after its upload")
	remoteQueue := fs.Int("remote-upload-queue", 16, "sealed segments waiting for upload before the scan waits (backpressure)")
	remoteLookupPar := fs.Int("remote-lookup-parallel", 16, "existence checks (HEADs) in flight of one lookup or restore by tokens past the local match")
	remotePublish := fs.String("remote-publish", "sync", "publish a context by name when it is closed: sync (the close answers once the manifest is written, or --remote-timeout passed), async, or off (import only)")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(*logLevel)); err != nil {
		fmt.Fprintf(os.Stderr, "hcached: --log-level: %v\n", err)
		return 2
	}
	log := slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: lvl}))
	fail := func(format string, a ...any) int {
		log.Error(fmt.Sprintf(format, a...))
		return 1
	}
	if *dir == "" || fs.NArg() > 0 {
		if *dir == "" {
			fmt.Fprintln(os.Stderr, "hcached: missing --dir DIR (the store directory)")
		} else {
			fmt.Fprintf(os.Stderr, "hcached: unexpected argument %q\n", fs.Arg(0))
		}
		fmt.Fprintln(os.Stderr, "usage: hcached --dir DIR [--listen /run/hcache/hcache.sock] [flags]; hcached -h for the flags and an example")
		return 2
	}
	for _, l := range []struct {
		name string
		v    int
	}{{"max-conns", *maxConns}, {"max-conns-per-token", *maxConnsTok}, {"max-restores-per-caller", *maxRestoresCaller}, {"max-tcp-pending", *maxTCPPending}} {
		if l.v < 1 {
			fmt.Fprintf(os.Stderr, "hcached: --%s %d: want at least 1\n", l.name, l.v)
			return 2
		}
	}
	if *tcpAuthTimeout <= 0 {
		fmt.Fprintf(os.Stderr, "hcached: --tcp-auth-timeout %v: want a positive duration\n", *tcpAuthTimeout)
		return 2
	}
	sockMode, err := strconv.ParseUint(*socketMode, 8, 32)
	if err != nil || sockMode > 0o777 {
		fmt.Fprintf(os.Stderr, "hcached: --socket-mode %q: want octal permission bits such as 0660\n", *socketMode)
		return 2
	}
	size := func(name, v string) int64 {
		n, err := parseSize(v)
		if err != nil {
			fmt.Fprintf(os.Stderr, "hcached: --%s: %v\n", name, err)
			os.Exit(2)
		}
		return n
	}
	// positive is a size flag the store has no "none" for: 0 would mean
	// its default there, so it is refused rather than silently changed.
	positive := func(name, v string) int64 {
		n := size(name, v)
		if n == 0 {
			fmt.Fprintf(os.Stderr, "hcached: --%s %s: want at least 1 byte\n", name, v)
			os.Exit(2)
		}
		return n
	}
	cfg := daemon.Config{
		Listen: strings.TrimPrefix(strings.TrimPrefix(*listen, "unix://"), "unix:"), TCP: *tcp, TLSCertFile: *tlsCert, TLSKeyFile: *tlsKey, Metrics: *metricsAddr,
		Quotas: map[string]int64{}, DefaultQuota: size("default-quota", *defQuota),
		MaxContexts: *maxContexts, MaxContextsPerNamespace: *maxContextsNS,
		MaxSidePendingPerUID: *maxSidePendingUID, MaxSidePending: *maxSidePending, SideRegisterTimeout: *sideRegisterTimeout, MetricsNamespaces: *metricsNS,
		MaxTokensPerContext: *maxTokens, MaxRequestTokens: *maxReqTokens, MaxInflight: *maxInflight, MaxConnsPerUID: *maxConns, MaxConnsPerToken: *maxConnsTok, MaxRestoresPerCaller: *maxRestoresCaller,
		MaxTCPPending: *maxTCPPending, TCPAuthTimeout: *tcpAuthTimeout,
		MaxMessageBytes: int(size("max-message", *maxMsg)), MaxRegionBytes: size("max-region", *maxRegion), MaxRegionsPerUID: *maxRegions,
		GCInterval: *gcInterval, StopTimeout: *stopTimeout, RestoreTimeout: *restoreTimeout, Logger: log,
	}
	switch {
	case *shm == "off":
	case *shm != "":
		cfg.Shm = *shm
	case cfg.Listen != "":
		cfg.Shm = cfg.Listen + ".shm"
	}
	for _, g := range grants {
		uid, ns, err := daemon.ParseGrant(g)
		if err != nil {
			return fail("--grant: %v", err)
		}
		if cfg.Grants.UIDs == nil {
			cfg.Grants.UIDs = map[uint32][]string{}
		}
		cfg.Grants.UIDs[uid] = append(cfg.Grants.UIDs[uid], ns...)
	}
	for _, q := range quotas {
		ns, v, ok := strings.Cut(q, "=")
		if !ok {
			return fail("--quota %q: want NS=BYTES", q)
		}
		if err := daemon.ValidNamespace(ns); err != nil {
			return fail("--quota %q: %v (--default-quota bounds every namespace without a --quota)", q, err)
		}
		cfg.Quotas[ns] = size("quota", v)
	}
	if *tokens != "" {
		t, err := daemon.LoadTokens(*tokens)
		if err != nil {
			return fail("--tokens: %v", err)
		}
		cfg.Grants.Tokens = t
	}
	// The CUDA backend's options: checked here, so a bad value is refused
	// before anything opens (and not only on a machine with a GPU).
	var cudaOpts any
	{
		var set []string
		fs.Visit(func(f *flag.Flag) {
			if f.Name == "restores" || f.Name == "restore-memory" {
				set = append(set, "--"+f.Name)
			}
		})
		if len(set) > 0 && *backend == gpu.SelectCPU {
			fmt.Fprintf(os.Stderr, "hcached: %s: an option of the CUDA backend, not of --backend cpu\n", strings.Join(set, ", "))
			return 2
		}
		if slices.Contains(set, "--restores") && (*restores < 1 || *restores > cuda.MaxRestores) {
			fmt.Fprintf(os.Stderr, "hcached: --restores %d: want how many restores run on the device at once, 1 to %d\n", *restores, cuda.MaxRestores)
			return 2
		}
		o := cuda.Options{Restores: *restores, RestoreMemory: size("restore-memory", *restoreMem)}
		if *backend != gpu.SelectCPU {
			cudaOpts = o
		}
	}
	for _, m := range models {
		name, dir, ok := strings.Cut(m, "=")
		if !ok {
			return fail("--model %q: want NAME=DIR", m)
		}
		lm, err := daemon.LoadModelWith(name, dir, *backend, cudaOpts)
		if err != nil {
			return fail("--model %s: %v", name, err)
		}
		log.Info("model loaded", "name", name, "dir", dir, "layers", lm.Config.Layers, "backend", lm.Note)
		cfg.Models = append(cfg.Models, lm)
	}
	// Refuse what would fail after the store is opened (and, in a fresh
	// directory, created): a socket another daemon answers on, a metrics
	// address another process holds.
	for _, p := range []string{cfg.Listen, cfg.Shm} {
		if err := checkSocketFree(p); err != nil {
			return fail("%v", err)
		}
	}
	if err := checkAddrFree(cfg.Metrics); err != nil {
		return fail("--metrics %s: %v (another hcached? give each daemon its own --metrics ADDR, or --metrics \"\" to turn metrics off)", cfg.Metrics, err)
	}
	var srv atomic.Pointer[daemon.Server]
	capBytes := int64(-1) // "-1": no bound
	if strings.TrimSpace(*capacity) != "-1" {
		capBytes = size("capacity", *capacity)
	}
	rcfg, err := remoteFlags.Config()
	if err != nil {
		fmt.Fprintf(os.Stderr, "hcached: %v\n", err)
		return 2
	}
	if *remotePublish != "sync" && *remotePublish != "async" && *remotePublish != "off" {
		fmt.Fprintf(os.Stderr, "hcached: --remote-publish %q: want sync, async or off\n", *remotePublish)
		return 2
	}
	var rclient *remote.Client
	var providers []chunk.ObjectProvider
	if rcfg != nil {
		if rclient, err = remote.New(*rcfg); err != nil {
			return fail("%v", err)
		}
		providers = []chunk.ObjectProvider{rclient.Provider()}
		ctx, cancel := context.WithTimeout(context.Background(), rcfg.Timeout)
		if err := rclient.EnsureBucket(ctx); err != nil {
			// Not fatal: local service goes on; uploads and imports
			// retry as the object store comes back.
			log.Warn("remote tier: bucket not reachable now", "err", err)
		}
		cancel()
	}
	ioOpts := chunk.Options{RestoreQueueBytes: orNone(size("restore-queue", *restoreQueue)), WriteBytes: positive("write-bytes", *writeBytes),
		WriteBytesUnderRestores: positive("write-bytes-under-restores", *writeUnder)}
	st, err := chunk.Open(chunk.Options{Dir: *dir, ChunkTokens: *chunkTokens, CapacityBytes: capBytes, Providers: providers,
		CacheBytes: size("cache", *cacheBytes), StagingBytes: size("staging", *staging),
		RestoreAheadBytes: orNone(size("restore-ahead", *restoreAhead)), IdleReadBufferBytes: orNone(size("idle-read-buffers", *idleReadBufs)),
		RestoreQueueBytes: ioOpts.RestoreQueueBytes, WriteBytes: ioOpts.WriteBytes, WriteBytesUnderRestores: ioOpts.WriteBytesUnderRestores,
		GCInterval: -1, // the daemon runs GC itself, so that fsck can exclude it
		Logf:       func(f string, a ...any) { log.Info(fmt.Sprintf(f, a...), "component", "chunk") },
		OnEvict: func(ns, id string) {
			log.Info("evicted", "ns", ns, "id", id)
			if s := srv.Load(); s != nil {
				s.OnEvict(ns, id)
			}
		}})
	if err != nil {
		return fail("open store: %v", err)
	}
	rec := st.Recovery()
	log.Info("store open", "dir", *dir, "contexts", rec.Contexts, "segments", rec.Segments,
		"unindexed_records", rec.UnindexedRecords, "orphan_segments", rec.OrphanSegments, "took", rec.Duration.String(), "engine", st.EngineName(),
		"restore_queue_bytes", ioOpts.RestoreQueueBytes, "write_bytes", ioOpts.WriteBytes, "write_bytes_under_restores", ioOpts.WriteBytesUnderRestores)
	cfg.Store = st
	var tier *remote.Tier
	if rclient != nil {
		tier = remote.StartTier(st, rclient, remote.TierOptions{QueueLen: *remoteQueue, LocalBytes: orNone(size("remote-local-bytes", *remoteLocal)),
			Logf: func(f string, a ...any) { log.Warn(fmt.Sprintf(f, a...), "component", "remote") }})
		cfg.Remote = &daemon.RemoteConfig{Client: rclient, Tier: tier, PublishSync: *remotePublish == "sync",
			NoPublish: *remotePublish == "off", PublishTimeout: rcfg.Timeout, LookupParallel: *remoteLookupPar}
		log.Info("remote tier", "endpoint", rcfg.Endpoint, "bucket", rcfg.Bucket, "prefix", rcfg.Prefix, "store_id", rcfg.StoreID, "publish", *remotePublish)
	}
	s, err := daemon.New(cfg)
	if err != nil {
		if tier != nil {
			tier.Close()
		}
		st.Close()
		return fail("%v", err)
	}
	srv.Store(s)
	for _, p := range []string{cfg.Listen, cfg.Shm} {
		if p != "" {
			if err := os.Chmod(p, os.FileMode(sockMode)); err != nil {
				s.Stop()
				st.Close()
				return fail("--socket-mode: %v", err)
			}
		}
	}
	log.Info("ready", "listen", cfg.Listen, "shm", cfg.Shm, "tcp", cfg.TCP)
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	code := 0
	select {
	case v := <-sig:
		log.Info("stopping", "signal", v.String())
	case err := <-s.Errors():
		log.Error("serve", "err", err)
		code = 1
	}
	s.Stop()
	if tier != nil {
		tier.Close()
	}
	if err := st.Close(); err != nil {
		log.Error("close store", "err", err)
		code = 1
	}
	for _, p := range []string{cfg.Listen, cfg.Shm} {
		if p != "" {
			os.Remove(p)
		}
	}
	log.Info("stopped")
	return code
}

func parseSize(v string) (int64, error) { return units.ParseSize(v) }

// checkSocketFree fails when a process answers on the unix socket path (a
// stale socket file nobody answers on is replaced by the daemon).
func checkSocketFree(path string) error {
	if path == "" {
		return nil
	}
	fi, err := os.Lstat(path)
	switch {
	case err != nil:
		return nil // missing: the daemon creates it
	case fi.Mode()&os.ModeSocket == 0:
		return fmt.Errorf("%s exists and is not a socket (give another --listen or --shm); nothing was created", path)
	}
	c, err := net.DialTimeout("unix", path, time.Second)
	if err != nil {
		return nil // a stale socket nobody answers on: the daemon replaces it
	}
	c.Close()
	return fmt.Errorf("%s: another daemon answers on it (stop it, or give this one another --listen and --shm); nothing was created", path)
}

// checkAddrFree fails when the TCP address cannot be listened on now.
func checkAddrFree(addr string) error {
	if addr == "" {
		return nil
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	return ln.Close()
}

// orNone maps a flag's 0 ("none") to the store's -1 (0 there is the default).
func orNone(n int64) int64 {
	if n == 0 {
		return -1
	}
	return n
}
