package crash

import (
	"fmt"
	"io"
	"math/rand"
	randv2 "math/rand/v2"
	"sort"
	"sync"
	"time"

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
	Progress  io.Writer
}

// ctxModel is what the workload did to one context id.
type ctxModel struct {
	id            string
	appended      int  // tokens handed to the store (before the call returns)
	acked         int  // tokens acknowledged by a returned Flush
	ackedExists   bool // a Flush returned and no delete started since
	deleteStarted bool
	deleteAcked   bool
	writer        *chunk.Writer
}

func (m *ctxModel) expect() Expect {
	return Expect{
		MustExist: m.ackedExists && !m.deleteStarted,
		MayExist:  !m.deleteAcked,
		MinTokens: m.acked,
		MaxTokens: m.appended,
	}
}

// sim is one workload cycle.
type sim struct {
	rep     *Report
	cycle   int
	seed    int64
	mem     *vfs.MemFS
	ident   *chunk.Identity
	opts    chunk.Options
	mu      sync.Mutex // guards ctxs, op, hookRNG, points
	ctxs    map[string]*ctxModel
	op      int
	hookRNG *rand.Rand
	points  int
	verify  sync.Mutex // one crash verification at a time
}

// Simulate runs the simulated crash harness.
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
	bar := progress.New(o.Progress, "crashtest simulated", int64(o.Cycles), "cycles")
	for c := 0; c < o.Cycles; c++ {
		runCycle(rep, o, c)
		rep.Cycles++
		bar.Add(1)
	}
	bar.Finish()
	return rep
}

func runCycle(rep *Report, o SimOptions, cycle int) {
	seed := o.Seed*1000003 + int64(cycle)
	s := &sim{rep: rep, cycle: cycle, seed: seed, mem: vfs.NewCrashableMem(), ident: Identity(),
		ctxs: map[string]*ctxModel{}, hookRNG: rand.New(rand.NewSource(seed ^ 0x5eed))}
	rng := rand.New(rand.NewSource(seed))
	var rules []faultfs.Rule
	if cycle%4 == 3 {
		// A torn write of a segment at a random point of this cycle.
		rules = append(rules, faultfs.Rule{Fault: faultfs.TornWrite, Match: "segments/", Nth: 5 + rng.Intn(80)})
	}
	ffs := faultfs.New(s.mem, seed, rules...)
	ffs.OnSync = func(name string) { s.crashPoint("sync " + name) }
	ffs.OnTorn = func(name string) { s.crashPoint("torn write " + name) }
	ffs.OnWrite = func(name string) {
		s.mu.Lock()
		hit := s.hookRNG.Float64() < o.WriteProb
		s.mu.Unlock()
		if hit {
			s.crashPoint("write " + name)
		}
	}
	s.opts = chunk.Options{FS: ffs, Dir: "/db", ChunkTokens: 8, SegmentBytes: chunk.MinSegmentBytes, CapacityBytes: -1,
		CacheBytes: 1 << 16, GCLiveRatio: 0.6, GCInterval: 3 * time.Millisecond, Logf: func(string, ...any) {}}
	st, err := chunk.Open(s.opts)
	if err != nil {
		rep.FsckErrors++
		rep.fail("seed %d cycle %d: open: %v", seed, cycle, err)
		return
	}
	for op := 0; op < o.Ops; op++ {
		s.mu.Lock()
		s.op = op
		s.mu.Unlock()
		if err := s.step(st, rng, o.Contexts); err != nil {
			// A fault stopped the store's writes: that is the crash.
			break
		}
	}
	for _, m := range s.ctxs {
		if m.writer != nil {
			if m.writer.Close() == nil {
				s.mu.Lock()
				m.acked, m.ackedExists = m.appended, !m.deleteStarted
				s.mu.Unlock()
			}
		}
	}
	s.crashPoint("end of cycle")
	st.Close()
	s.mu.Lock()
	for _, m := range s.ctxs {
		if m.ackedExists {
			rep.AckedContexts++
		}
	}
	s.mu.Unlock()
}

// step runs one random operation.
func (s *sim) step(st *chunk.Store, rng *rand.Rand, slots int) error {
	slot := rng.Intn(slots)
	// The live (not deleted) context of the slot, if any.
	var m *ctxModel
	s.mu.Lock()
	for _, c := range s.ctxs {
		if c.id[:len(fmt.Sprint("s", slot, "i"))] == fmt.Sprint("s", slot, "i") && !c.deleteStarted {
			m = c
		}
	}
	s.mu.Unlock()
	r := rng.Intn(100)
	switch {
	case m == nil:
		s.mu.Lock()
		m = &ctxModel{id: fmt.Sprintf("s%di%d", slot, len(s.ctxs))}
		s.ctxs[m.id] = m
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
		s.mu.Lock()
		want := m.appended
		s.mu.Unlock()
		var err error
		if r < 70 {
			err = m.writer.Flush()
		} else {
			err = m.writer.Close()
			m.writer = nil
		}
		if err != nil {
			return err
		}
		s.mu.Lock()
		m.acked, m.ackedExists = want, true
		s.mu.Unlock()
	case r < 90:
		if m.writer != nil {
			err := m.writer.Close()
			m.writer = nil
			if err != nil {
				return err
			}
			s.mu.Lock()
			m.acked, m.ackedExists = m.appended, true
			s.mu.Unlock()
		}
		s.mu.Lock()
		m.deleteStarted = true
		s.mu.Unlock()
		if err := st.Delete("crash", m.id); err != nil {
			return err
		}
		s.mu.Lock()
		m.deleteAcked = true
		s.mu.Unlock()
	default:
		if res := st.GC(); res.Err != nil {
			return res.Err
		}
	}
	return nil
}

// crashPoint simulates a power cut now: clone the file system keeping a
// random share of unsynced data, reopen the clone and check it against the
// acknowledged model.
func (s *sim) crashPoint(where string) {
	s.verify.Lock()
	defer s.verify.Unlock()
	s.mu.Lock()
	expects := map[string]Expect{}
	for id, m := range s.ctxs {
		expects[id] = m.expect()
	}
	op := s.op
	s.points++
	point := s.points
	pct := s.hookRNG.Intn(101)
	cloneSeed := s.hookRNG.Uint64()
	s.mu.Unlock()
	clone := s.mem.CrashClone(vfs.CrashCloneCfg{UnsyncedDataPercent: pct, RNG: randv2.New(randv2.NewPCG(cloneSeed, 7))})
	s.rep.CrashPoints++
	tag := fmt.Sprintf("seed %d cycle %d crash point %d (%s, op %d, %d%% unsynced kept)", s.seed, s.cycle, point, where, op, pct)
	o := s.opts
	o.FS = clone
	o.OnEvict = nil
	o.GCInterval = -1 // Check needs a still store
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
		defer s.checkRepair(clone, o, tag, expects)
	}
	defer st.Close()
	if n := st.Recovery().LiveRecounted; n > 0 {
		s.rep.LiveRecounted += n
		s.rep.fail("%s: note: %v", tag, logged)
	}
	ids := make([]string, 0, len(expects))
	for id := range expects {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	for _, id := range ids {
		v, msg := CheckContext(st, "crash", id, s.ident, expects[id])
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

// checkRepair deletes the crashed store's index, rebuilds it with
// chunk.Repair and checks the contexts against the same acknowledgements
// (a context acknowledged with no token has no record to rebuild it from).
func (s *sim) checkRepair(fs vfs.FS, o chunk.Options, tag string, expects map[string]Expect) {
	tag += " after index loss and repair"
	if err := fs.RemoveAll(fs.PathJoin(o.Dir, "index")); err != nil {
		s.rep.FsckErrors++
		s.rep.fail("%s: remove index: %v", tag, err)
		return
	}
	if _, err := chunk.Repair(chunk.RepairOptions{FS: fs, Dir: o.Dir, ChunkTokens: o.ChunkTokens}); err != nil {
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
	ids := make([]string, 0, len(expects))
	for id := range expects {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	for _, id := range ids {
		e := expects[id]
		e.MustExist = e.MustExist && e.MinTokens > 0
		v, msg := CheckContext(st, "crash", id, s.ident, e)
		s.rep.tally(v, msg, tag)
	}
	r := st.Check(nil)
	for _, e := range r.Errors {
		s.rep.FsckErrors++
		s.rep.fail("%s: fsck: %s", tag, e)
	}
}
