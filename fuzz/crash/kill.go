package crash

import (
	"bufio"
	"fmt"
	"io"
	"math/rand"
	"os/exec"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/hcache/hcache/chunk"
	"github.com/hcache/hcache/internal/progress"
)

// StressNamespace holds the contexts of the stress workload.
const StressNamespace = "stress"

// StressChunkTokens is the chunk size of stores the stress workload creates
// (small, so a short run crosses many groups and segments).
const StressChunkTokens = 16

// stressOptions are the store settings of the stress workload; chunkTokens 0
// accepts an existing store's.
func stressOptions(dir string, chunkTokens int) chunk.Options {
	return chunk.Options{Dir: dir, ChunkTokens: chunkTokens, SegmentBytes: 4 << 20, CapacityBytes: -1, GCLiveRatio: 0.6, GCInterval: 20 * time.Millisecond,
		Logf: func(string, ...any) {}}
}

// Stress is the writer process of the SIGKILL loop: it opens the store on
// real files, then creates, appends to (continuing contexts that earlier runs
// left), flushes, deletes and compacts, printing one line per acknowledgement
// to out, unbuffered, after the call returned:
//
//	READY               the store is open
//	ACK <id> <tokens>   Flush returned: tokens are durable
//	DELSTART <id>       Delete is about to be called
//	DEL <id>            Delete returned
//
// It runs ops operations (0: until killed) on a store of chunkTokens tokens
// per group (0: the existing store's, or the default for a new one).
func Stress(dir string, seed int64, ops, chunkTokens int, out io.Writer) error {
	st, err := chunk.Open(stressOptions(dir, chunkTokens))
	if err != nil {
		return err
	}
	defer st.Close()
	fmt.Fprintln(out, "READY")
	ident := Identity()
	rng := rand.New(rand.NewSource(seed))
	type live struct {
		id string
		w  *chunk.Writer
	}
	var ctxs []*live
	for _, c := range st.Contexts() {
		if c.Namespace == StressNamespace && !c.Damaged {
			ctxs = append(ctxs, &live{id: c.ID})
		}
	}
	created := 0
	for op := 0; ops == 0 || op < ops; op++ {
		r := rng.Intn(100)
		if len(ctxs) < 3 || r < 10 {
			id := fmt.Sprintf("k%d-%d", seed, created)
			created++
			w, err := st.Create(StressNamespace, id, ident, chunk.CreateOptions{})
			if err != nil {
				return err
			}
			ctxs = append(ctxs, &live{id: id, w: w})
			continue
		}
		i := rng.Intn(len(ctxs))
		c := ctxs[i]
		if c.w == nil && r < 85 {
			if c.w, err = st.Append(StressNamespace, c.id, ident); err != nil {
				return err
			}
		}
		switch {
		case r < 45: // decode steps
			from := c.w.Tokens()
			for t := from; t < from+1+rng.Intn(24); t++ {
				if err := c.w.AppendToken(TokenRows(ident, c.id, t)); err != nil {
					return err
				}
			}
		case r < 65: // a prefill
			from := c.w.Tokens()
			n := 1 + rng.Intn(100)
			for l, p := range ident.Plan {
				if p.Kind != chunk.LayerNone {
					if err := c.w.AppendLayer(l, LayerRows(ident, c.id, l, from, from+n)); err != nil {
						return err
					}
				}
			}
		case r < 85:
			n := c.w.Tokens()
			if r < 78 {
				err = c.w.Flush()
			} else {
				err = c.w.Close()
				c.w = nil
			}
			if err != nil {
				return err
			}
			fmt.Fprintf(out, "ACK %s %d\n", c.id, n)
		case r < 97:
			if c.w != nil {
				n := c.w.Tokens()
				err := c.w.Close()
				c.w = nil
				if err != nil {
					return err
				}
				fmt.Fprintf(out, "ACK %s %d\n", c.id, n)
			}
			fmt.Fprintf(out, "DELSTART %s\n", c.id)
			if err := st.Delete(StressNamespace, c.id); err != nil {
				return err
			}
			fmt.Fprintf(out, "DEL %s\n", c.id)
			ctxs = append(ctxs[:i], ctxs[i+1:]...)
		default:
			if res := st.GC(); res.Err != nil {
				return res.Err
			}
		}
	}
	for _, c := range ctxs {
		if c.w != nil {
			n := c.w.Tokens()
			if err := c.w.Close(); err != nil {
				return err
			}
			fmt.Fprintf(out, "ACK %s %d\n", c.id, n)
		}
	}
	return nil
}

// ackModel is what the parent learned from a child's lines.
type ackModel struct {
	everAcked     bool
	acked         int
	ackedExists   bool
	deleteStarted bool
	deleteAcked   bool
}

// KillOptions configure KillLoop.
type KillOptions struct {
	Dir     string
	Cycles  int
	Seed    int64
	Command func(seed int64) *exec.Cmd // starts a Stress writer on Dir
	// The child is killed right after it has printed a seeded number of
	// acknowledgements (ACK lines) in [MinAcks, MaxAcks): no wall-clock
	// window, so a slow (loaded, -race) child is killed as far into its
	// work as a fast one. Defaults 1 and 64.
	MinAcks, MaxAcks int
	// Timeout bounds how long a child may take to open the store and
	// print its acknowledgements (default 2 minutes): a stuck child is an
	// error, never a shorter run.
	Timeout  time.Duration
	Progress io.Writer
}

// KillLoop runs writer processes under load and kills them with SIGKILL
// after a seeded number of acknowledgements; after each kill it opens the
// store and checks every acknowledged context against the child's
// acknowledgements, and runs fsck.
func KillLoop(o KillOptions, rep *Report) error {
	if o.MinAcks <= 0 {
		o.MinAcks = 1
	}
	if o.MaxAcks <= o.MinAcks {
		o.MaxAcks = o.MinAcks + 63
	}
	if o.Timeout <= 0 {
		o.Timeout = 2 * time.Minute
	}
	rng := rand.New(rand.NewSource(o.Seed))
	model := map[string]*ackModel{}
	ident := Identity()
	bar := progress.New(o.Progress, "crashtest SIGKILL", int64(o.Cycles), "cycles")
	for c := 0; c < o.Cycles; c++ {
		childSeed := o.Seed*7919 + int64(c)
		acks := o.MinAcks + rng.Intn(o.MaxAcks-o.MinAcks)
		cmd := o.Command(childSeed)
		stdout, err := cmd.StdoutPipe()
		if err != nil {
			return err
		}
		var stderr strings.Builder
		cmd.Stderr = &stderr
		if err := cmd.Start(); err != nil {
			return fmt.Errorf("crash: start writer: %w", err)
		}
		var lines []string
		var mu sync.Mutex
		done := make(chan struct{})
		reached := make(chan struct{})
		go func() {
			defer close(done)
			sc := bufio.NewScanner(stdout)
			n := 0
			for sc.Scan() {
				if sc.Text() == "READY" {
					continue
				}
				mu.Lock()
				lines = append(lines, sc.Text())
				mu.Unlock()
				if strings.HasPrefix(sc.Text(), "ACK ") {
					if n++; n == acks {
						close(reached)
					}
				}
			}
		}()
		exited := make(chan error, 1)
		go func() { <-done; exited <- cmd.Wait() }()
		timeout := time.NewTimer(o.Timeout)
		select {
		case <-reached:
			cmd.Process.Signal(syscall.SIGKILL)
			<-exited
		case err := <-exited:
			// The writer stopped by itself (it runs until killed).
			timeout.Stop()
			return fmt.Errorf("crash: writer (seed %d) exited before %d acknowledgements: %v: %s", childSeed, acks, err, stderr.String())
		case <-timeout.C:
			cmd.Process.Signal(syscall.SIGKILL)
			<-exited
			return fmt.Errorf("crash: writer (seed %d) printed fewer than %d acknowledgements in %v: %s", childSeed, acks, o.Timeout, stderr.String())
		}
		timeout.Stop()
		// The reader has finished (exited follows done): lines is still.
		for _, line := range lines {
			f := strings.Fields(line)
			if len(f) < 2 {
				continue
			}
			m := model[f[1]]
			if m == nil {
				m = &ackModel{}
				model[f[1]] = m
			}
			switch f[0] {
			case "ACK":
				n, _ := strconv.Atoi(f[2])
				m.acked, m.ackedExists, m.deleteStarted, m.deleteAcked = max(m.acked, n), true, false, false
				m.everAcked = true
			case "DELSTART":
				m.deleteStarted = true
			case "DEL":
				m.deleteAcked = true
			}
		}
		where := fmt.Sprintf("kill cycle %d (seed %d, killed after %d acknowledgements, %d lines)", c, childSeed, acks, len(lines))
		if err := checkStore(o.Dir, ident, model, rep, where); err != nil {
			return err
		}
		rep.KillCycles++
		bar.Add(1)
	}
	bar.Finish()
	// Every context acknowledged at some point was checked after each
	// kill that followed.
	for _, m := range model {
		if m.everAcked {
			rep.AckedContexts++
		}
	}
	return nil
}

// checkStore opens the store after a kill and checks it against the model.
func checkStore(dir string, ident *chunk.Identity, model map[string]*ackModel, rep *Report, where string) error {
	opts := stressOptions(dir, 0)
	opts.GCInterval = -1 // Check needs a still store
	st, err := chunk.Open(opts)
	if err != nil {
		rep.FsckErrors++
		rep.fail("%s: open: %v", where, err)
		return nil
	}
	defer st.Close()
	rep.LiveRecounted += st.Recovery().LiveRecounted
	ids := map[string]bool{}
	for id := range model {
		ids[id] = true
	}
	for _, c := range st.Contexts() {
		ids[c.ID] = true // present but never acknowledged: still never torn
	}
	sorted := make([]string, 0, len(ids))
	for id := range ids {
		sorted = append(sorted, id)
	}
	sort.Strings(sorted)
	for _, id := range sorted {
		e := Expect{MayExist: true, MaxTokens: 1 << 30}
		if m := model[id]; m != nil {
			e.MustExist = m.ackedExists && !m.deleteStarted
			e.MayExist = !m.deleteAcked
			e.MinTokens = m.acked
		}
		v, msg := CheckContext(st, StressNamespace, id, ident, e)
		rep.tally(v, msg, where)
	}
	r := st.Check(nil)
	for _, e := range r.Errors {
		rep.FsckErrors++
		rep.fail("%s: fsck: %s", where, e)
	}
	for _, d := range r.DamagedContexts {
		rep.FsckErrors++
		rep.fail("%s: fsck: damaged %s", where, d)
	}
	return nil
}
