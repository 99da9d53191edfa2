package crash

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"math/rand"
	"os"
	"path/filepath"
	"sort"
	"sync"

	"github.com/cockroachdb/pebble/v2/vfs"

	"github.com/hcache/hcache/chunk"
	"github.com/hcache/hcache/fuzz/faultfs"
	"github.com/hcache/hcache/internal/progress"
)

// SimOptions configure Simulate.
type SimOptions struct {
	Seed      int64
	Cycles    int     // workloads, each on a fresh file system
	Ops       int     // operations per workload
	Contexts  int     // context slots
	WriteProb float64 // chance of a crash point at a write between syncs
	// SyncProb is the chance that a sync is a crash point (0: every sync
	// is one).
	SyncProb float64
	Progress io.Writer
	// Config is the store configuration the workload runs on (zero: the
	// default one); see Metamorphic.
	Config Config
	// Trace, when set, receives the run's trace (one line per crash point
	// and what it found), whose digest is Report.Trace.
	Trace io.Writer
	// NoFaults leaves out the injected torn writes (whose place in the
	// operation sequence depends on the configuration): Metamorphic sets it.
	NoFaults bool
	// Prefix adds token-addressed contexts (prefix.go): saves by tokens
	// with shared prefixes, forks, deletes of one sharer, restores by
	// tokens. Off, a seed replays the operations it always did.
	Prefix bool
	// Adversarial adds operations a client may do that the workload
	// otherwise never does (adversarial.go): writers abandoned (as by a
	// client that disconnects) and reopened by name or by tokens, deletes
	// (and GC) during a restore of the same context, forks of forks, of
	// zero tokens, of a context being written, past its end, of a deleted
	// context, of a named one. Each has an exact prediction. Off, a seed
	// replays the operations it always did.
	Adversarial bool

	// opLog, when set, receives every draw of the workload's generator
	// and the model after each operation (a test seam: a seed must replay
	// the same operations; ops_test.go).
	opLog io.Writer
}

// Config is one store configuration of the simulation. Every
// configuration must end each workload with the same contexts holding the
// same bytes.
type Config struct {
	Name        string
	ChunkTokens int     // default 8
	LZ4         bool    // Compression "lz4"
	NoCache     bool    // CacheBytes 0 (no DRAM tier)
	GCLiveRatio float64 // default 0.6; high: eager GC, low: lazy
	// RealDir runs the workload on real files under this directory (no
	// crash points: those need the in-memory file system), with the I/O
	// engine Engine ("io_uring", "fallback", "auto") and O_DIRECT unless
	// NoDirect.
	RealDir  string
	Engine   string
	NoDirect bool
}

func (c Config) label() string {
	if c.Name != "" {
		return c.Name
	}
	return fmt.Sprintf("%+v", c)
}

// ctxModel is what the workload did to one context id.
type ctxModel struct {
	id            string
	appended      int  // tokens handed to the store (before the call returns)
	acked         int  // tokens acknowledged by a returned Flush
	ackedExists   bool // a Flush returned and no delete started since
	deleteStarted bool
	deleteAcked   bool
	evictPending  bool // an EvictOne is under way and may pick it
	evicted       bool // the store evicted it (OnEvict)
	writer        *chunk.Writer
	// A token-addressed context (prefix.go): its token ids (those with
	// rows handed over are tokens[:appended]) and its base document.
	tok    bool
	tokens []uint32
	seed   int
	forkOf string // the context it was forked from
}

// ns is the context's namespace.
func (m *ctxModel) ns() string {
	if m.tok {
		return TokNamespace
	}
	return "crash"
}

// expect is what the context may look like after a crash (afterRepair:
// and after the index was lost and rebuilt from the segments).
func (m ctxModel) expect(afterRepair bool) Expect {
	e := Expect{
		MustExist: m.ackedExists && !m.deleteStarted,
		MayExist:  !m.deleteAcked,
		MinTokens: m.acked,
		MaxTokens: m.appended,
	}
	if afterRepair {
		// A context acknowledged with no token has no record to
		// rebuild it from.
		e.MustExist = e.MustExist && e.MinTokens > 0
	}
	return evictedExpect(m, e, afterRepair)
}

// evictedExpect is how eviction changes what a context may look like: one
// that an eviction under way may pick need not exist; one evicted must not
// come back after a crash, whether the index survived it or was lost and
// repaired from the segments (an eviction's tombstone is durable before it
// takes effect).
func evictedExpect(m ctxModel, e Expect, afterRepair bool) Expect {
	if m.evictPending || m.evicted {
		e.MustExist = false
	}
	if m.evicted {
		e.MayExist = false
	}
	return e
}

// sim is one workload cycle.
type sim struct {
	rep      *Report
	cycle    int
	seed     int64
	cfg      Config
	mem      *vfs.MemFS // nil on real files
	ident    *chunk.Identity
	opts     chunk.Options
	mu       sync.Mutex // guards ctxs, op, now, hookRNG, points
	ctxs     map[string]*ctxModel
	slots    [][]string // context ids per slot, in creation order
	prefix   bool       // SimOptions.Prefix
	adv      bool       // SimOptions.Adversarial
	tokSlots [][]string
	op       int
	now      int64 // the store's clock: one microsecond per operation
	hookRNG  *rand.Rand
	points   int
	verify   sync.Mutex // one crash verification at a time
	trace    io.Writer
}

// simEpoch is the simulated clock's start (2026-01-01T00:00:00Z).
const simEpoch = int64(1767225600) * 1e9

// Simulate runs the simulated crash harness. The same options give the
// same operations, crash points and report (byte for byte as JSON): GC and
// eviction are operations of the seeded workload, the store's clock is the
// workload's, and the store runs Synchronous, so no timer or goroutine
// schedule decides anything.
func Simulate(o SimOptions) *Report {
	if o.Cycles <= 0 {
		o.Cycles = 1
	}
	if o.Ops <= 0 {
		o.Ops = 200
	}
	if o.Contexts <= 0 {
		o.Contexts = 6
	}
	rep := &Report{Seed: o.Seed}
	name := "crashtest simulated"
	if o.Prefix {
		name += " (with token-addressed contexts)"
	}
	if o.Adversarial {
		name += " (adversarial)"
	}
	if o.Config.Name != "" {
		name += " " + o.Config.Name
	}
	bar := progress.New(o.Progress, name, int64(o.Cycles)*int64(o.Ops), "operations")
	digest := sha256.New()
	var trace io.Writer = digest
	if o.Trace != nil {
		trace = io.MultiWriter(digest, o.Trace)
	}
	for c := 0; c < o.Cycles; c++ {
		runCycle(rep, o, c, trace, bar)
		rep.Cycles++
	}
	bar.Finish()
	rep.Trace = hex.EncodeToString(digest.Sum(nil))[:16]
	return rep
}

func runCycle(rep *Report, o SimOptions, cycle int, trace io.Writer, bar *progress.Bar) {
	// The progress bar counts every operation of the cycle, also those a
	// stopped cycle did not run.
	done := 0
	defer func() { bar.Add(int64(o.Ops - done)) }()
	seed := o.Seed*1000003 + int64(cycle)
	s := &sim{rep: rep, cycle: cycle, seed: seed, cfg: o.Config, ident: Identity(),
		ctxs: map[string]*ctxModel{}, slots: make([][]string, o.Contexts), hookRNG: rand.New(rand.NewSource(seed ^ 0x5eed)), now: simEpoch}
	s.trace = trace
	s.prefix, s.tokSlots, s.adv = o.Prefix, make([][]string, tokSlots), o.Adversarial
	src := rand.NewSource(seed).(rand.Source64)
	if o.opLog != nil {
		fmt.Fprintf(o.opLog, "cycle %d seed %d\n", cycle, seed)
		src = logSource{src, o.opLog}
	}
	rng := rand.New(src)
	ct := o.Config.ChunkTokens
	if ct == 0 {
		ct = 8
	}
	ratio := o.Config.GCLiveRatio
	if ratio == 0 {
		ratio = 0.6
	}
	cache := int64(1 << 16)
	if o.Config.NoCache {
		cache = 0
	}
	compression := "none"
	if o.Config.LZ4 {
		compression = "lz4"
	}
	// Synchronous, the store commits written groups only for a Flush,
	// Close, delete, GC or eviction, or past CommitBytes: a third of the
	// cycles commit after every write (as an idle flusher does), a third
	// every 16 KiB, a third only when asked.
	commitBytes := []int64{1, 16 << 10, 0}[cycle%3]
	s.opts = chunk.Options{Dir: "/db", ChunkTokens: ct, SegmentBytes: chunk.MinSegmentBytes, CapacityBytes: -1,
		CacheBytes: cache, Compression: compression, GCLiveRatio: ratio, GCInterval: -1, Synchronous: true,
		CommitBytes: commitBytes, Now: s.clock, Logf: func(string, ...any) {}, OnEvict: s.onEvict}
	if o.Config.RealDir != "" {
		s.opts.Dir = filepath.Join(o.Config.RealDir, fmt.Sprintf("cycle-%d", cycle))
		if err := os.RemoveAll(s.opts.Dir); err != nil {
			rep.FsckErrors++
			rep.fail("seed %d cycle %d: %v", seed, cycle, err)
			return
		}
		s.opts.FS, s.opts.EngineKind, s.opts.DisableDirect = vfs.Default, o.Config.Engine, o.Config.NoDirect
	} else {
		s.mem = vfs.NewCrashableMem()
		var rules []faultfs.Rule
		if cycle%4 == 3 && !o.NoFaults {
			// A torn write of a segment at a random point of this cycle.
			rules = append(rules, faultfs.Rule{Fault: faultfs.TornWrite, Match: "segments/", Nth: 5 + rng.Intn(80)})
		}
		ffs := faultfs.New(s.mem, seed, rules...)
		ffs.OnSync = func(name string) {
			if o.SyncProb > 0 {
				s.mu.Lock()
				hit := s.hookRNG.Float64() < o.SyncProb
				s.mu.Unlock()
				if !hit {
					return
				}
			}
			s.crashPoint("sync "+name, trace)
		}
		ffs.OnTorn = func(name string) { s.crashPoint("torn write "+name, trace) }
		ffs.OnWrite = func(name string) {
			s.mu.Lock()
			hit := s.hookRNG.Float64() < o.WriteProb
			s.mu.Unlock()
			if hit {
				s.crashPoint("write "+name, trace)
			}
		}
		s.opts.FS = ffs
	}
	st, err := chunk.Open(s.opts)
	if err != nil {
		rep.FsckErrors++
		rep.fail("seed %d cycle %d: open: %v", seed, cycle, err)
		return
	}
	for op := 0; op < o.Ops; op++ {
		s.mu.Lock()
		s.op = op
		s.now = simEpoch + int64(op+1)*1000
		s.mu.Unlock()
		err := s.step(st, rng, o.Contexts)
		done++
		bar.Add(1)
		if o.opLog != nil {
			s.logModels(o.opLog, op, err)
		}
		if err != nil {
			// A fault stopped the store's writes: that is the crash.
			fmt.Fprintf(trace, "cycle %d stopped at op %d: %v\n", cycle, op, err)
			break
		}
	}
	for _, id := range s.ids() {
		if m := s.ctxs[id]; m.writer != nil {
			s.ack(m, true) // a failed Close acknowledges nothing
		}
	}
	if s.mem != nil {
		s.crashPoint("end of cycle", trace)
	}
	st.Close()
	s.mu.Lock()
	for _, m := range s.ctxs {
		if m.ackedExists && !m.evicted {
			rep.AckedContexts++
		}
	}
	s.mu.Unlock()
	rep.finals = append(rep.finals, s.finalState())
}

// clock is the store's Options.Now.
func (s *sim) clock() int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.now
}

// onEvict is the store's Options.OnEvict.
func (s *sim) onEvict(ns, id string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if m := s.ctxs[id]; m != nil {
		m.evicted = true
	}
	fmt.Fprintf(s.trace, "cycle %d op %d: evicted %s\n", s.cycle, s.op, id)
}

// ids returns the context ids in order.
func (s *sim) ids() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.idsLocked()
}

// idsLocked is ids with s.mu held.
func (s *sim) idsLocked() []string {
	ids := make([]string, 0, len(s.ctxs))
	for id := range s.ctxs {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	return ids
}

// step runs one random operation.
func (s *sim) step(st *chunk.Store, rng *rand.Rand, slots int) error {
	if s.adv && rng.Intn(100) < adversarialPct {
		return s.stepAdversarial(st, rng, slots)
	}
	if s.prefix && rng.Intn(100) < 45 {
		return s.stepTok(st, rng)
	}
	slot := rng.Intn(slots)
	m := s.live(s.slots, slot)
	r := rng.Intn(100)
	switch {
	case m == nil:
		s.mu.Lock()
		m = &ctxModel{id: fmt.Sprintf("s%di%d", slot, len(s.ctxs))}
		s.ctxs[m.id] = m
		s.slots[slot] = append(s.slots[slot], m.id)
		s.mu.Unlock()
		w, err := st.Create("crash", m.id, s.ident, chunk.CreateOptions{})
		if err != nil {
			return err
		}
		m.writer = w
	case m.writer == nil && r < 60:
		w, err := st.Append("crash", m.id, s.ident)
		if err != nil {
			return err
		}
		m.writer = w
	case r < 35 && m.writer != nil: // decode-style
		n := 1 + rng.Intn(12)
		s.mu.Lock()
		from := m.appended
		m.appended += n
		s.mu.Unlock()
		for t := from; t < from+n; t++ {
			if err := m.writer.AppendToken(TokenRows(s.ident, m.id, t)); err != nil {
				return err
			}
		}
	case r < 55 && m.writer != nil: // prefill-style
		n := 1 + rng.Intn(30)
		s.mu.Lock()
		from := m.appended
		m.appended += n
		s.mu.Unlock()
		for l, p := range s.ident.Plan {
			if p.Kind == chunk.LayerNone {
				continue
			}
			if err := m.writer.AppendLayer(l, LayerRows(s.ident, m.id, l, from, from+n)); err != nil {
				return err
			}
		}
	case r < 80 && m.writer != nil:
		if _, err := s.ack(m, r >= 70); err != nil {
			return err
		}
	case r < 90:
		return s.delete(st, m)
	case r < 94:
		if res := st.GC(); res.Err != nil {
			return res.Err
		}
	case r < 97:
		return s.evict(st)
	default:
		// A restore on the running store: it must hold what was
		// acknowledged (and it moves the context's last use).
		s.checkRunning(st, m)
	}
	return nil
}

// live returns the live (not deleted or evicted) context of a slot, if
// any: the last one created in it.
func (s *sim) live(slots [][]string, slot int) *ctxModel {
	s.mu.Lock()
	defer s.mu.Unlock()
	if ids := slots[slot]; len(ids) > 0 {
		if c := s.ctxs[ids[len(ids)-1]]; !c.deleteStarted && !c.evicted {
			return c
		}
	}
	return nil
}

// ack is the one "flush or close, then acknowledge" step of every context,
// named or token-addressed: it flushes m's writer (or, with close, closes
// and drops it) and, once that returned nil, acknowledges the tokens
// appended before the call. It returns that count.
func (s *sim) ack(m *ctxModel, close bool) (int, error) {
	s.mu.Lock()
	want := m.appended
	s.mu.Unlock()
	var err error
	if close {
		err = m.writer.Close()
		s.mu.Lock()
		m.writer = nil
		s.mu.Unlock()
	} else {
		err = m.writer.Flush()
	}
	if err != nil {
		return want, err
	}
	s.mu.Lock()
	m.acked, m.ackedExists = want, !m.deleteStarted
	s.mu.Unlock()
	return want, nil
}

// delete closes m's writer, if any (acknowledging it), and deletes the
// context: from the call on it need not exist, once the call returned it
// must not.
func (s *sim) delete(st *chunk.Store, m *ctxModel) error {
	if m.writer != nil {
		if _, err := s.ack(m, true); err != nil {
			return err
		}
	}
	s.mu.Lock()
	m.deleteStarted = true
	s.mu.Unlock()
	if m.tok {
		fmt.Fprintf(s.trace, "cycle %d op %d: delete %s\n", s.cycle, s.op, m.id)
	}
	if err := st.Delete(m.ns(), m.id); err != nil {
		return err
	}
	s.mu.Lock()
	m.deleteAcked = true
	s.mu.Unlock()
	return nil
}

// checkRunning restores m's context on the running store and tallies the
// verdict: it must hold what was acknowledged.
func (s *sim) checkRunning(st *chunk.Store, m *ctxModel) {
	s.mu.Lock()
	c := *m
	s.mu.Unlock()
	v, msg := s.checkModel(st, c, c.expect(false))
	s.rep.tally(v, msg, fmt.Sprintf("seed %d cycle %d op %d (running store)", s.seed, s.cycle, s.op))
}

// evict runs one EvictOne: every context it may pick (no open writer) need
// not exist at a crash point until it returns; OnEvict marks the ones it
// took.
func (s *sim) evict(st *chunk.Store) error {
	s.mu.Lock()
	for _, m := range s.ctxs {
		m.evictPending = m.writer == nil && !m.deleteStarted && !m.evicted
	}
	s.mu.Unlock()
	_, err := st.EvictOne()
	s.mu.Lock()
	for _, m := range s.ctxs {
		m.evictPending = false
	}
	s.mu.Unlock()
	return err
}

// crashPoint simulates a power cut now: clone the file system keeping a
// random share of unsynced data, reopen the clone and check it against the
// acknowledged model.
func (s *sim) crashPoint(where string, trace io.Writer) {
	s.verify.Lock()
	defer s.verify.Unlock()
	s.mu.Lock()
	models := map[string]ctxModel{}
	for id, m := range s.ctxs {
		models[id] = *m
	}
	op := s.op
	s.points++
	point := s.points
	pct := s.hookRNG.Intn(101)
	cloneSeed := s.hookRNG.Int63()
	// The clone is taken in the same critical section as the models: steps
	// update a model under s.mu before they call the store, so the image
	// never holds more than the models say was appended.
	clone, err := crashClone(s.mem, pct, cloneSeed)
	s.mu.Unlock()
	s.rep.CrashPoints++
	tag := fmt.Sprintf("seed %d cycle %d crash point %d (%s, op %d, %d%% unsynced kept)", s.seed, s.cycle, point, where, op, pct)
	fails := len(s.rep.Failures) + s.rep.LostAcked + s.rep.TornServed + s.rep.FsckErrors
	var state uint32
	if err == nil {
		state, err = stateDigest(clone, "/")
	}
	defer func() {
		fmt.Fprintf(trace, "%s: state %08x: %d\n", tag, state, len(s.rep.Failures)+s.rep.LostAcked+s.rep.TornServed+s.rep.FsckErrors-fails)
	}()
	if err != nil {
		s.rep.FsckErrors++
		s.rep.fail("%s: clone: %v", tag, err)
		return
	}
	o := s.opts
	o.FS = clone
	o.OnEvict = nil
	o.Synchronous = false
	var logged []string
	o.Logf = func(format string, args ...any) { logged = append(logged, fmt.Sprintf(format, args...)) }
	st, err := chunk.Open(o)
	if err != nil {
		s.rep.FsckErrors++
		s.rep.fail("%s: open after crash: %v", tag, err)
		return
	}
	if point%3 == 0 {
		// Every third crash point: then lose the index and repair it from
		// the segments alone; the same acknowledgements must hold.
		defer s.checkRepair(clone, o, tag, models)
	}
	defer st.Close()
	if n := st.Recovery().LiveRecounted; n > 0 {
		s.rep.LiveRecounted += n
		s.rep.fail("%s: note: %v", tag, logged)
	}
	for _, id := range sortedIDs(models) {
		v, msg := s.checkModel(st, models[id], models[id].expect(false))
		s.rep.tally(v, msg, tag)
	}
	r := st.Check(nil)
	for _, e := range r.Errors {
		s.rep.FsckErrors++
		s.rep.fail("%s: fsck: %s", tag, e)
	}
	for _, d := range r.DamagedContexts {
		s.rep.FsckErrors++
		s.rep.fail("%s: fsck: damaged context %s", tag, d)
	}
}

func sortedIDs(models map[string]ctxModel) []string {
	ids := make([]string, 0, len(models))
	for id := range models {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	return ids
}

// checkRepair deletes the crashed store's index, rebuilds it with
// chunk.Repair and checks the contexts against the same acknowledgements.
func (s *sim) checkRepair(fs vfs.FS, o chunk.Options, tag string, models map[string]ctxModel) {
	tag += " after index loss and repair"
	if err := fs.RemoveAll(fs.PathJoin(o.Dir, "index")); err != nil {
		s.rep.FsckErrors++
		s.rep.fail("%s: remove index: %v", tag, err)
		return
	}
	if _, err := chunk.Repair(chunk.RepairOptions{FS: fs, Dir: o.Dir, ChunkTokens: o.ChunkTokens, Now: o.Now}); err != nil {
		s.rep.FsckErrors++
		s.rep.fail("%s: %v", tag, err)
		return
	}
	st, err := chunk.Open(o)
	if err != nil {
		s.rep.FsckErrors++
		s.rep.fail("%s: open: %v", tag, err)
		return
	}
	defer st.Close()
	s.rep.RepairChecks++
	for _, id := range sortedIDs(models) {
		v, msg := s.checkModel(st, models[id], models[id].expect(true))
		s.rep.tally(v, msg, tag)
	}
	r := st.Check(nil)
	for _, e := range r.Errors {
		s.rep.FsckErrors++
		s.rep.fail("%s: fsck: %s", tag, e)
	}
}

// finalState reopens the closed store and describes what it restores:
// one line per context, its tokens and a digest of its bytes. Every
// configuration of one seed must give the same lines.
func (s *sim) finalState() []string {
	o := s.opts
	if s.mem != nil {
		o.FS = s.mem // no hooks, no crash points
	}
	o.OnEvict = nil
	o.Synchronous = false
	o.Logf = func(string, ...any) {}
	st, err := chunk.Open(o)
	if err != nil {
		s.rep.FsckErrors++
		s.rep.fail("seed %d cycle %d: final open: %v", s.seed, s.cycle, err)
		return []string{"open: " + err.Error()}
	}
	defer st.Close()
	var out []string
	for _, c := range st.Contexts() {
		h := sha256.New()
		n, err := st.Restore(c.Namespace, c.ID, s.ident, func(layer int, rows []byte) error {
			fmt.Fprintf(h, "%d:%d:", layer, len(rows))
			h.Write(rows)
			return nil
		})
		line := fmt.Sprintf("%s/%s %d tokens %x", c.Namespace, c.ID, n, h.Sum(nil)[:8])
		if err != nil {
			line = fmt.Sprintf("%s/%s: %v", c.Namespace, c.ID, err)
		}
		out = append(out, line)
	}
	sort.Strings(out)
	return out
}
