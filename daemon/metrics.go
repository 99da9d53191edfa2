package daemon

import (
	"net/http"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"google.golang.org/grpc/status"

	"github.com/hcache/hcache/chunk"
)

// metrics are the daemon's Prometheus metrics: the store's counters (read at
// scrape time from chunk.Stats) and the daemon's own.
type metrics struct {
	reg              *prometheus.Registry
	restores         *prometheus.CounterVec
	restoreStage     *prometheus.HistogramVec
	restoreTokens    prometheus.Counter
	flushSeconds     prometheus.Histogram
	appendBytes      prometheus.Counter
	rpcs             *prometheus.CounterVec
	checksumFailures prometheus.Counter
	identityMismatch prometheus.Counter
	ioErrors         prometheus.Counter
	quotaRefused     prometheus.Counter
	abandoned        prometheus.Counter
	conns            prometheus.Gauge
	connsRefused     *prometheus.CounterVec
	acceptErrors     *prometheus.CounterVec
	sideRefused      prometheus.Counter
	lookups          *prometheus.CounterVec
	lookupTokens     prometheus.Counter
	s                *Server
}

func newMetrics(s *Server) *metrics {
	m := &metrics{reg: prometheus.NewRegistry(), s: s}
	f := func(c prometheus.Collector) { m.reg.MustRegister(c) }
	m.restores = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "hcache_restore_requests_total",
		Help: "Restore requests by result: hit (served), miss (no such context), identity_mismatch, timeout (--restore-timeout), refused (--max-restores-per-caller), error."}, []string{"result"})
	m.restoreStage = prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "hcache_restore_seconds",
		Help:    "Restore latency by stage: first_layer (request to first layer verified), layer_wait (waiting for the next layer's reads), layer_send (handing a layer to the client, projection included), project (daemon-side projection of a hidden layer), total.",
		Buckets: prometheus.ExponentialBuckets(50e-6, 2, 18)}, []string{"stage"})
	m.restoreTokens = prometheus.NewCounter(prometheus.CounterOpts{Name: "hcache_restored_tokens_total", Help: "Tokens restored."})
	m.flushSeconds = prometheus.NewHistogram(prometheus.HistogramOpts{Name: "hcache_flush_seconds", Help: "Flush latency (until durable).",
		Buckets: prometheus.ExponentialBuckets(100e-6, 2, 16)})
	m.appendBytes = prometheus.NewCounter(prometheus.CounterOpts{Name: "hcache_appended_bytes_total", Help: "Row bytes accepted by appends."})
	m.rpcs = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "hcache_rpcs_total", Help: "RPCs by method and gRPC code."}, []string{"method", "code"})
	m.checksumFailures = prometheus.NewCounter(prometheus.CounterOpts{Name: "hcache_checksum_failures_total", Help: "Requests failed by a checksum failure or a damaged context."})
	m.identityMismatch = prometheus.NewCounter(prometheus.CounterOpts{Name: "hcache_identity_mismatch_total", Help: "Opens and restores refused for an identity mismatch."})
	m.ioErrors = prometheus.NewCounter(prometheus.CounterOpts{Name: "hcache_io_errors_total", Help: "Requests failed by an I/O or index error."})
	m.quotaRefused = prometheus.NewCounter(prometheus.CounterOpts{Name: "hcache_quota_refused_total", Help: "Appends refused by a namespace quota."})
	m.abandoned = prometheus.NewCounter(prometheus.CounterOpts{Name: "hcache_writers_abandoned_total", Help: "Writers dropped because their client's connection ended."})
	m.conns = prometheus.NewGauge(prometheus.GaugeOpts{Name: "hcache_connections", Help: "Open client connections."})
	m.connsRefused = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "hcache_connections_refused_total",
		Help: "Connections refused for a connection limit, by listener: unix (past --max-conns, at the handshake), tcp (a request whose bearer token holds --max-conns-per-token other connections), tcp_pending (a new TCP connection past --max-tcp-pending, at the handshake)."}, []string{"listener"})
	m.acceptErrors = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "hcache_accept_errors_total",
		Help: "Failed accepts by listener (api, tcp, shm) and errno (EMFILE, ENFILE, ECONNABORTED, ...): each is retried after a backoff."}, []string{"listener", "errno"})
	m.sideRefused = prometheus.NewCounter(prometheus.CounterOpts{Name: "hcache_side_refused_total",
		Help: "Side connections refused at accept: past --max-side-pending-per-uid or --max-side-pending."})
	m.lookups = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "hcache_lookups_total",
		Help: "Lookup requests by result: hit (some leading tokens stored), miss (none)."}, []string{"result"})
	m.lookupTokens = prometheus.NewCounter(prometheus.CounterOpts{Name: "hcache_lookup_hit_tokens_total", Help: "Leading tokens with stored state that lookups reported."})
	for _, c := range []prometheus.Collector{m.lookups, m.lookupTokens, m.acceptErrors, m.sideRefused, m.restores, m.restoreStage, m.restoreTokens, m.flushSeconds, m.appendBytes, m.rpcs,
		m.checksumFailures, m.identityMismatch, m.ioErrors, m.quotaRefused, m.abandoned, m.conns, m.connsRefused} {
		f(c)
	}
	st := func() chunk.Stats { return s.store.Stats() }
	counter := func(name, help string, v func(chunk.Stats) float64) {
		f(prometheus.NewCounterFunc(prometheus.CounterOpts{Name: name, Help: help}, func() float64 { return v(st()) }))
	}
	gauge := func(name, help string, v func() float64) {
		f(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: name, Help: help}, v))
	}
	counter("hcache_bytes_written_total", "Record bytes written to segments.", func(x chunk.Stats) float64 { return float64(x.BytesWritten) })
	counter("hcache_bytes_read_total", "Bytes read from segments (the disk tier).", func(x chunk.Stats) float64 { return float64(x.BytesRead) })
	counter("hcache_commits_total", "Index group commits.", func(x chunk.Stats) float64 { return float64(x.Commits) })
	counter("hcache_dram_slice_hits_total", "Slices served from the DRAM tier instead of the disk.", func(x chunk.Stats) float64 { return float64(x.CacheHits) })
	counter("hcache_evictions_total", "Contexts evicted for space.", func(x chunk.Stats) float64 { return float64(x.Evictions) })
	counter("hcache_invariant_violations_total", "The store's own invariants found violated (bugs); while any is, the store refuses writes and serves reads (chunk.ErrInvariant).", func(x chunk.Stats) float64 { return float64(x.InvariantViolations) })
	counter("hcache_damaged_contexts_total", "Contexts marked damaged by a checksum failure or missing data.", func(x chunk.Stats) float64 { return float64(x.Damaged) })
	counter("hcache_gc_segments_total", "Segments compacted by GC.", func(x chunk.Stats) float64 { return float64(x.GCRuns) })
	counter("hcache_gc_moved_bytes_total", "Bytes rewritten by GC.", func(x chunk.Stats) float64 { return float64(x.GCMovedBytes) })
	counter("hcache_groups_written_total", "Shared chunk groups written (token-addressed state).", func(x chunk.Stats) float64 { return float64(x.GroupsWritten) })
	counter("hcache_group_bytes_written_total", "Bytes of shared chunk groups written.", func(x chunk.Stats) float64 { return float64(x.GroupBytesWritten) })
	counter("hcache_groups_deduped_total", "Full chunk groups saved whose state was already stored: referenced, not written.", func(x chunk.Stats) float64 { return float64(x.GroupsDeduped) })
	counter("hcache_chain_collisions_total", "Chunk groups whose chain key was stored for other tokens (nothing served or written over).", func(x chunk.Stats) float64 { return float64(x.Collisions) })
	gauge("hcache_shared_groups", "Shared chunk groups stored.", func() float64 { return float64(st().Groups) })
	gauge("hcache_shared_bytes", "Bytes of shared chunk groups stored (counted once, however many contexts reference them).", func() float64 { return float64(st().GroupBytes) })
	gauge("hcache_dram_bytes", "Bytes in the DRAM tier.", func() float64 { return float64(st().CacheBytes) })
	gauge("hcache_live_bytes", "Bytes of live records on disk.", func() float64 { return float64(st().LiveBytes) })
	gauge("hcache_dead_bytes", "Bytes written to segments and no longer referenced (what GC reclaims).", func() float64 {
		var dead uint64
		for _, sg := range s.store.Segments() {
			dead += sg.Written - min(sg.Written, sg.Live)
		}
		return float64(dead)
	})
	gauge("hcache_contexts", "Contexts stored.", func() float64 { return float64(s.store.NumContexts()) })
	gauge("hcache_shared_region_bytes", "Bytes of shared regions mapped.", func() float64 { return float64(s.regions.size()) })
	gauge("hcache_open_writers", "Writers open.", func() float64 {
		s.mu.Lock()
		defer s.mu.Unlock()
		return float64(len(s.writers))
	})
	callerConns := func(listener string, v func() int) {
		f(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "hcache_caller_connections", ConstLabels: prometheus.Labels{"listener": listener},
			Help: "Connections charged to callers' limits: unix (per user, --max-conns), tcp (per bearer token, --max-conns-per-token; a connection counts once for each token its requests presented)."},
			func() float64 {
				s.mu.Lock()
				defer s.mu.Unlock()
				return float64(v())
			}))
	}
	sum := func(m map[uint32]int) (n int) {
		for _, v := range m {
			n += v
		}
		return n
	}
	callerConns("unix", func() int { return sum(s.connsByUID) })
	callerConns("tcp", func() int {
		n := 0
		for _, v := range s.connsByToken {
			n += v
		}
		return n
	})
	gauge("hcache_tcp_pending_connections", "TCP connections that have not presented a known bearer token yet (--max-tcp-pending; closed after --tcp-auth-timeout).", func() float64 {
		s.mu.Lock()
		defer s.mu.Unlock()
		return float64(s.tcpPending)
	})
	if s.cfg.MetricsNamespaces {
		f(usageCollector{s})
	}
	return m
}

// usageCollector exports each namespace's row bytes (what quotas count) and
// its quota; only with Config.MetricsNamespaces (--metrics-namespaces),
// since /metrics answers anyone who can reach it.
type usageCollector struct{ s *Server }

var (
	usageDesc = prometheus.NewDesc("hcache_namespace_bytes", "Row bytes a namespace holds (stored plus appended to open writers): what --quota bounds.", []string{"namespace"}, nil)
	quotaDesc = prometheus.NewDesc("hcache_namespace_quota_bytes", "A namespace's quota (absent: none).", []string{"namespace"}, nil)
)

func (u usageCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- usageDesc
	ch <- quotaDesc
}

func (u usageCollector) Collect(ch chan<- prometheus.Metric) {
	u.s.mu.Lock()
	defer u.s.mu.Unlock()
	for ns, n := range u.s.usage {
		ch <- prometheus.MustNewConstMetric(usageDesc, prometheus.GaugeValue, float64(n), ns)
		if q := u.s.quota(ns); q > 0 {
			ch <- prometheus.MustNewConstMetric(quotaDesc, prometheus.GaugeValue, float64(q), ns)
		}
	}
}

func (m *metrics) rpcDone(method string, err error) {
	m.rpcs.WithLabelValues(method, status.Code(err).String()).Inc()
}

func (m *metrics) handler() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{}))
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) {
		m.s.mu.Lock()
		stopping := m.s.stopping
		m.s.mu.Unlock()
		if stopping {
			http.Error(w, "stopping", http.StatusServiceUnavailable)
			return
		}
		w.Write([]byte("ok\n"))
	})
	return mux
}
