// Command hcached is the hcache state-store daemon: one chunk store shared by
// the serving engines of a machine over a gRPC API on a unix socket (TCP
// optional), with per-namespace tenancy, limits, shared-memory transfers and
// Prometheus metrics. See DESIGN.md, "The daemon".
//
//	hcached --dir DIR --listen unix:///run/hcache/hcache.sock
package main

import (
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"

	"github.com/hcache/hcache/chunk"
	"github.com/hcache/hcache/daemon"
	_ "github.com/hcache/hcache/gpu/cuda" // registers --backend cuda with gpu.Select
	"github.com/hcache/hcache/internal/units"
)

type listFlag []string

func (l *listFlag) String() string     { return strings.Join(*l, " ") }
func (l *listFlag) Set(v string) error { *l = append(*l, v); return nil }

func main() { os.Exit(run(os.Args[1:])) }

func run(args []string) int {
	fs := flag.NewFlagSet("hcached", flag.ContinueOnError)
	dir := fs.String("dir", "", "store directory (required)")
	listen := fs.String("listen", "unix:///run/hcache/hcache.sock", "unix socket of the API (unix:///path)")
	tcp := fs.String("tcp", "", "also serve the API on this TCP address (off by default; needs --tokens)")
	shm := fs.String("shm", "", "shared-memory side socket (default: the --listen path + \".shm\"; \"off\" disables)")
	metricsAddr := fs.String("metrics", "127.0.0.1:9464", "HTTP address of /metrics and /healthz (\"\" disables)")
	tokens := fs.String("tokens", "", "bearer token file: lines \"TOKEN NS[,NS...]\" (mode 600)")
	tlsCert := fs.String("tls-cert", "", "TLS certificate (PEM) of the --tcp listener")
	tlsKey := fs.String("tls-key", "", "TLS private key (PEM) of the --tcp listener")
	var grants, quotas, models listFlag
	fs.Var(&models, "model", "NAME=DIR: load a model's K/V weights to project hidden states on restore (repeatable)")
	backend := fs.String("backend", "auto", "projection backend of --model: auto (CUDA when a device can be used, else CPU), cpu or cuda")
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
	maxInflight := fs.Int("max-inflight", daemon.DefaultMaxInflight, "concurrent requests per client connection")
	maxConns := fs.Int("max-conns", daemon.DefaultMaxConnsPerUID, "unix socket connections per user")
	maxMsg := fs.String("max-message", strconv.Itoa(daemon.DefaultMaxMessageBytes), "largest gRPC message, both ways")
	maxRegion := fs.String("max-region", strconv.Itoa(daemon.DefaultMaxRegionBytes), "largest shared region")
	maxRegions := fs.Int("max-regions", daemon.DefaultMaxRegionsPerUID, "shared regions per user")
	gcInterval := fs.Duration("gc-interval", daemon.DefaultGCInterval, "how often GC looks for segments to compact (negative: only on request)")
	stopTimeout := fs.Duration("stop-timeout", daemon.DefaultStopTimeout, "on SIGTERM/SIGINT, how long running requests may take before they are cancelled")
	restoreTimeout := fs.Duration("restore-timeout", daemon.DefaultRestoreTimeout, "longest a restore may take (a client that stops reading is cut off)")
	capacity := fs.String("capacity", strconv.FormatInt(chunk.DefaultCapacityBytes, 10), "live bytes on disk before least recently used contexts are evicted (-1: none)")
	cacheBytes := fs.String("cache", strconv.FormatInt(chunk.DefaultCacheBytes, 10), "DRAM tier of recently used slices (0: off)")
	staging := fs.String("staging", strconv.FormatInt(chunk.DefaultStagingBytes, 10), "DRAM staging bound of unwritten rows")
	chunkTokens := fs.Int("chunk-tokens", 0, "tokens per chunk group of a new store (default 64)")
	restoreAhead := fs.String("restore-ahead", strconv.FormatInt(chunk.DefaultRestoreAheadBytes, 10), "layer bytes one restore keeps read or in flight (at least two layers; 0: two layers)")
	idleReadBufs := fs.String("idle-read-buffers", strconv.FormatInt(chunk.DefaultIdleReadBufferBytes, 10), "restore buffers kept mapped for reuse while idle (0: none)")
	logLevel := fs.String("log-level", "info", "debug, info, warn or error")
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
		fmt.Fprintln(os.Stderr, "usage: hcached --dir DIR [--listen unix:///path/hcache.sock] [flags]")
		fs.PrintDefaults()
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
	cfg := daemon.Config{
		Listen: strings.TrimPrefix(strings.TrimPrefix(*listen, "unix://"), "unix:"), TCP: *tcp, TLSCertFile: *tlsCert, TLSKeyFile: *tlsKey, Metrics: *metricsAddr,
		Quotas: map[string]int64{}, DefaultQuota: size("default-quota", *defQuota),
		MaxContexts: *maxContexts, MaxContextsPerNamespace: *maxContextsNS,
		MaxSidePendingPerUID: *maxSidePendingUID, MaxSidePending: *maxSidePending, SideRegisterTimeout: *sideRegisterTimeout, MetricsNamespaces: *metricsNS,
		MaxTokensPerContext: *maxTokens, MaxInflight: *maxInflight, MaxConnsPerUID: *maxConns,
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
	for _, m := range models {
		name, dir, ok := strings.Cut(m, "=")
		if !ok {
			return fail("--model %q: want NAME=DIR", m)
		}
		lm, err := daemon.LoadModel(name, dir, *backend)
		if err != nil {
			return fail("--model %s: %v", name, err)
		}
		log.Info("model loaded", "name", name, "dir", dir, "layers", lm.Config.Layers, "backend", lm.Note)
		cfg.Models = append(cfg.Models, lm)
	}
	var srv atomic.Pointer[daemon.Server]
	capBytes := int64(-1) // "-1": no bound
	if strings.TrimSpace(*capacity) != "-1" {
		capBytes = size("capacity", *capacity)
	}
	st, err := chunk.Open(chunk.Options{Dir: *dir, ChunkTokens: *chunkTokens, CapacityBytes: capBytes,
		CacheBytes: size("cache", *cacheBytes), StagingBytes: size("staging", *staging),
		RestoreAheadBytes: orNone(size("restore-ahead", *restoreAhead)), IdleReadBufferBytes: orNone(size("idle-read-buffers", *idleReadBufs)),
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
		"unindexed_records", rec.UnindexedRecords, "orphan_segments", rec.OrphanSegments, "took", rec.Duration.String(), "engine", st.EngineName())
	cfg.Store = st
	s, err := daemon.New(cfg)
	if err != nil {
		st.Close()
		return fail("%v", err)
	}
	srv.Store(s)
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

// orNone maps a flag's 0 ("none") to the store's -1 (0 there is the default).
func orNone(n int64) int64 {
	if n == 0 {
		return -1
	}
	return n
}
