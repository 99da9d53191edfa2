package daemon

import (
	"context"
	"errors"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/hcache/hcache/chunk"
	"github.com/hcache/hcache/chunk/format"
	"github.com/hcache/hcache/chunk/remote"
)

// The shared tier on object storage (package chunk/remote), when
// Config.Remote is set: a context closed here is published by name (its
// manifest is written last, so another node sees all of it or nothing);
// a token-addressed one by tokens instead, in the same background publish
// (after its Close made its groups durable): its full groups the bucket
// lacks as group objects, then its tip object (with its partial tail's
// rows), which is also its by-name form: a Close uploads only new groups,
// the tail and the tip, never the whole context again. A Lookup whose local match
// ends on a group boundary asks the bucket for the next groups (batched
// existence checks, LookupParallel at once); a restore by tokens first
// promotes what the bucket holds past the local match into the local
// store (remote.PromoteTokens: fetched, every group verified against the
// request, written as a token-addressed context remote-prefix-TIP), then
// serves from the local store. A collision or a corrupt object promotes
// nothing (the restore serves what is local);
// a restore or an append of a context this node lacks, or holds with
// fewer tokens than the bucket's manifest, first imports it from the
// bucket (promotion into the local store). The object store's faults
// never stop local service: a lookup or import that fails falls back to
// what the local store holds (a miss if nothing).

// RemoteConfig is the daemon's side of the remote tier.
type RemoteConfig struct {
	Client *remote.Client
	// Tier is the write-back of sealed segments (for its metrics), if any.
	Tier *remote.Tier
	// PublishSync makes CloseContext wait for the publish (at most
	// PublishTimeout) before it answers, so that a turn acknowledged by
	// this node is restorable on every node; otherwise publishes run in
	// the background.
	PublishSync    bool
	PublishTimeout time.Duration
	// NoPublish: import from the bucket, never publish to it.
	NoPublish bool
	// LookupParallel bounds the existence checks (HEADs) in flight of one
	// lookup or restore by tokens past the local match, and the group
	// uploads' checks of a publish by tokens (--remote-lookup-parallel;
	// remote.DefaultLookupParallel when 0).
	LookupParallel int
}

// remoteBackoff is how long after a failed request to the object store
// the daemon stops asking it on restores and appends (serving what the
// local store holds at once, rather than waiting on a store that is down).
const remoteBackoff = 5 * time.Second

type remoteMetrics struct {
	failedAt atomic.Int64 // unix nanos of the last failed lookup
	imports  *prometheus.CounterVec
	byTokens *prometheus.CounterVec
	publish  *prometheus.CounterVec
	seconds  *prometheus.HistogramVec
	inflight prometheus.Gauge
}

func (m *metrics) addRemote(rc *RemoteConfig) *remoteMetrics {
	r := &remoteMetrics{
		imports: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "hcache_remote_lookups_total",
			Help: "Restores and appends that asked the bucket: remote_hit (imported), local_current (the local copy is as new), miss (no manifest), error (the object store failed; local served), skipped (within 5 s of an error: local served without asking)."}, []string{"result"}),
		byTokens: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "hcache_remote_token_lookups_total",
			Help: "Lookups and restores by tokens that asked the bucket past the local match: lookup_hit, promoted (a restore fetched and promoted groups), miss, refused (a collision or a corrupt object: nothing promoted), error (the object store failed; local served), skipped (within 5 s of an error)."}, []string{"result"}),
		publish: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "hcache_remote_publishes_total",
			Help: "Publishes of closed contexts to the bucket by result (ok, error)."}, []string{"result"}),
		seconds: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "hcache_remote_seconds",
			Help: "Remote tier latency by operation: lookup, import, publish.", Buckets: prometheus.ExponentialBuckets(250e-6, 2, 18)}, []string{"op"}),
		inflight: prometheus.NewGauge(prometheus.GaugeOpts{Name: "hcache_remote_publishes_in_flight", Help: "Background publishes not finished."}),
	}
	m.reg.MustRegister(r.imports, r.byTokens, r.publish, r.seconds, r.inflight)
	cs := func() remote.ClientStats { return rc.Client.Stats() }
	cf := func(name, help string, v func() float64) {
		m.reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{Name: name, Help: help}, v))
	}
	cf("hcache_remote_get_bytes_total", "Bytes read from the object store.", func() float64 { return float64(cs().GetBytes) })
	cf("hcache_remote_put_bytes_total", "Bytes written to the object store.", func() float64 { return float64(cs().PutBytes) })
	cf("hcache_remote_request_errors_total", "Failed GETs and PUTs.", func() float64 { return float64(cs().GetErrors + cs().PutErrors) })
	if t := rc.Tier; t != nil {
		gf := func(name, help string, v func(remote.TierStats) float64) {
			m.reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: name, Help: help}, func() float64 { return v(t.Stats()) }))
		}
		gf("hcache_remote_upload_queue", "Sealed segments waiting for their upload.", func(s remote.TierStats) float64 { return float64(s.Queued) })
		gf("hcache_remote_segments", "Segments the remote tier holds (local files deleted).", func(s remote.TierStats) float64 { return float64(s.RemoteSegments) })
		gf("hcache_remote_uploads", "Verified segment uploads since start.", func(s remote.TierStats) float64 { return float64(s.Uploads) })
		gf("hcache_remote_upload_errors", "Failed segment uploads since start (each retried).", func(s remote.TierStats) float64 { return float64(s.UploadErrors) })
		gf("hcache_remote_upload_backpressure", "Times the upload scan waited for room in the queue.", func(s remote.TierStats) float64 { return float64(s.QueueFullWaits) })
	}
	return r
}

// remoteRefresh imports ns/id from the bucket when this node lacks it or
// holds fewer tokens than the bucket's manifest.
func (s *Server) remoteRefresh(ctx context.Context, ns, id string) {
	rc := s.cfg.Remote
	if rc == nil {
		return
	}
	s.mu.Lock()
	open := s.writers[key(ns, id)] != nil
	s.mu.Unlock()
	if open { // this node is writing it: its copy is the newest
		return
	}
	if at := s.remote.failedAt.Load(); at != 0 && time.Since(time.Unix(0, at)) < remoteBackoff {
		s.remote.imports.WithLabelValues("skipped").Inc()
		return
	}
	t0 := time.Now()
	_, err := rc.Client.Import(ctx, s.store, ns, id)
	s.remote.seconds.WithLabelValues("import").Observe(time.Since(t0).Seconds())
	switch {
	case err == nil:
		s.remote.imports.WithLabelValues("remote_hit").Inc()
		s.recount(ns)
	case errors.Is(err, remote.ErrHaveNewer):
		s.remote.imports.WithLabelValues("local_current").Inc()
	case errors.Is(err, remote.ErrNotFound):
		s.remote.imports.WithLabelValues("miss").Inc()
	default:
		if errors.Is(err, remote.ErrUnavailable) {
			s.remote.failedAt.Store(time.Now().UnixNano())
		}
		s.remote.imports.WithLabelValues("error").Inc()
		s.log.Warn("remote tier: import failed; serving what the local store holds", "ns", ns, "id", id, "err", err)
	}
}

// remoteTokens answers how many tokens of p past local (a whole number
// of groups) the bucket holds, or promotes them into the local store
// (promote: a restore by tokens). The object store failing (or within
// remoteBackoff of a failure) answers 0 at once: local service goes on.
func (s *Server) remoteTokens(ctx context.Context, p chunk.Prefix, local int, promote bool) int {
	rc := s.cfg.Remote
	ct := s.store.ChunkTokens()
	if rc == nil || local%ct != 0 || len(p.Tokens)-local < ct {
		return 0
	}
	if at := s.remote.failedAt.Load(); at != 0 && time.Since(time.Unix(0, at)) < remoteBackoff {
		s.remote.byTokens.WithLabelValues("skipped").Inc()
		return 0
	}
	t0 := time.Now()
	var n int
	var err error
	op := "lookup_tokens"
	if promote {
		op = "promote"
		n, err = rc.Client.PromoteTokens(ctx, s.store, p, rc.LookupParallel)
	} else {
		n, err = rc.Client.LookupTokens(ctx, s.store, p, local/ct, rc.LookupParallel)
	}
	s.remote.seconds.WithLabelValues(op).Observe(time.Since(t0).Seconds())
	switch {
	case err == nil && n == 0:
		s.remote.byTokens.WithLabelValues("miss").Inc()
	case err == nil && promote:
		s.remote.byTokens.WithLabelValues("promoted").Inc()
		s.recount(p.Namespace)
	case err == nil:
		s.remote.byTokens.WithLabelValues("lookup_hit").Inc()
	case errors.Is(err, remote.ErrUnavailable):
		s.remote.failedAt.Store(time.Now().UnixNano())
		s.remote.byTokens.WithLabelValues("error").Inc()
		s.log.Warn("remote tier: lookup by tokens failed; serving what the local store holds", "ns", p.Namespace, "err", err)
		return 0
	case errors.Is(err, remote.ErrCollision) || errors.Is(err, format.ErrCorrupt) || errors.Is(err, chunk.ErrCollision):
		s.remote.byTokens.WithLabelValues("refused").Inc()
		s.log.Warn("remote tier: group objects refused; serving what the local store holds", "ns", p.Namespace, "err", err)
		return 0
	default:
		s.remote.byTokens.WithLabelValues("error").Inc()
		s.log.Warn("remote tier: by tokens failed; serving what the local store holds", "ns", p.Namespace, "err", err)
		return 0
	}
	return n
}

// tokPublish is what a publish by tokens of a closed token-addressed
// context needs: its salt and the ids of its tokens.
type tokPublish struct {
	ident *chunk.Identity
	salt  []byte
	ids   []uint32
}

// remotePublish publishes a closed context (waiting for it with
// PublishSync): by name, and, for a token-addressed one (tp), its groups
// by tokens then its tip object. A failure is logged and counted: the
// context stays served locally and is published again at its next close.
func (s *Server) remotePublish(ns, id string, tp *tokPublish) {
	rc := s.cfg.Remote
	if rc == nil || rc.NoPublish {
		return
	}
	run := func() {
		ctx, cancel := context.WithTimeout(context.Background(), rc.PublishTimeout)
		defer cancel()
		t0 := time.Now()
		var err error
		if tp != nil {
			// Groups first (only those the bucket lacks), then the tip
			// naming them and holding the tail: the context's by-name
			// form too (no context object: its groups hold the rows).
			p := chunk.Prefix{Namespace: ns, Salt: tp.salt, Identity: tp.ident, Tokens: tp.ids}
			if _, err = rc.Client.PublishTokens(ctx, s.store, p, rc.LookupParallel); err == nil {
				err = rc.Client.PublishTip(ctx, s.store, id, p)
			}
		} else {
			_, err = rc.Client.Publish(ctx, s.store, ns, id)
		}
		s.remote.seconds.WithLabelValues("publish").Observe(time.Since(t0).Seconds())
		if err != nil {
			s.remote.publish.WithLabelValues("error").Inc()
			s.log.Warn("remote tier: publish failed; the context is served locally", "ns", ns, "id", id, "err", err)
			return
		}
		s.remote.publish.WithLabelValues("ok").Inc()
	}
	if rc.PublishSync {
		run()
		return
	}
	s.remote.inflight.Inc()
	s.restoring.Add(1) // Stop waits for it
	go func() {
		defer s.restoring.Done()
		defer s.remote.inflight.Dec()
		run()
	}()
}
