// Package benchprefix is `hcache bench prefix`: a shared-prefix workload
// (bench/prefixwl) replayed through token-addressed stores, hcache and the
// file-per-chunk-hash peer (LMCache's local-disk backend), in one run.
//
// Each request, in the workload's order, is served as an engine with an
// external prefix cache serves it: look up the prompt (timed), restore the
// hit (timed, when there is one), then save the prompt and the answer (the
// store writes only the groups it does not hold). Rows depend on the whole
// prefix (peer.PrefixRows), so shared prefixes have equal rows and every
// restore of a seeded sample of requests is compared byte for byte (outside
// the timing). Each lookup must equal the workload's own hit for the
// system's group size (prefixwl.Count): a store that misses a stored prefix,
// or finds one that is not, fails the run.
//
// Reported per system: the logical bytes the requests hand over (every
// full group of every saved list), the bytes on disk after the replay, the
// workload's unique groups' bytes at the system's group size and the ratio
// of the two (the target is at most 1.05), the dedup ratio (logical over on
// disk), lookup p50/p99 during the replay and against an index of about a
// million groups (LookupScale says how it was filled), restore median and
// p99 over the requests with a hit, and the hit rate.
package benchprefix

import (
	"fmt"
	"io"
	"math"
	"math/rand"
	"os"
	"path/filepath"
	"sort"
	"time"

	"github.com/hcache/hcache/bench/peer"
	"github.com/hcache/hcache/bench/prefixwl"
	"github.com/hcache/hcache/internal/progress"
	"github.com/hcache/hcache/state"
)

// Options of one run.
type Options struct {
	Dir      string // a directory on the device to measure; a fresh subdirectory is used and removed
	Workload string // chat, docqa or agent
	Seed     int64
	Scale    float64 // multiplies the workload's sessions
	// Layers and RowBytes shape each token's state (what a stored layer
	// keeps per token): small here so a run fits a shared machine; bytes
	// scale with them, ratios do not (a group's record is large against
	// its header either way).
	Layers   int
	RowBytes int
	// Systems to run, in order: "hcache", "file-per-chunk-hash".
	Systems []string
	// LookupGroups is the index size of the lookup-at-scale measure (0:
	// skip it), LookupPromptTokens the prompt it times (128K in issue 19).
	LookupGroups       int
	LookupPromptTokens int
	LookupRounds       int
	// VerifyEvery compares the restored rows of every k-th request with a
	// hit (0: 8).
	VerifyEvery int
	Progress    io.Writer
}

// Defaults for the zero fields of Options.
const (
	DefaultLayers       = 4
	DefaultRowBytes     = 1024
	DefaultLookupGroups = 1 << 20
	DefaultLookupPrompt = 128 << 10
	DefaultLookupRounds = 200
)

// LookupScale is the lookup measure against a large index.
type LookupScale struct {
	IndexGroups  int     `json:"index_groups"`
	PromptTokens int     `json:"prompt_tokens"`
	HitTokens    int     `json:"hit_tokens"` // what each timed lookup found
	Rounds       int     `json:"rounds"`
	P50US        float64 `json:"p50_us"`
	P99US        float64 `json:"p99_us"`
	How          string  `json:"how"`
	FillSeconds  float64 `json:"fill_seconds"`
	// KeysP50US is the median time to compute the chain keys of a prompt
	// of that length at the system's group size (state.ChainHasher, no
	// allocation): the floor under any lookup by chain keys, measured in
	// the same run.
	KeysP50US float64 `json:"keys_only_p50_us"`
}

// SystemResult is one system's row.
type SystemResult struct {
	System      string `json:"system"`
	GroupTokens int    `json:"group_tokens"`
	// Bytes.
	LogicalBytes   int64   `json:"logical_bytes"`
	BytesOnDisk    int64   `json:"bytes_on_disk"`
	IndexBytes     int64   `json:"index_bytes_on_disk"` // of BytesOnDisk (the peer's index is in memory only)
	UniqueBytes    int64   `json:"unique_group_bytes"`
	TailBytes      int64   `json:"tail_bytes"` // named contexts' partial tails it keeps beside the groups (0 for the peer)
	DiskOverUnique float64 `json:"disk_over_unique"`
	DiskOverKept   float64 `json:"disk_over_unique_plus_tails"`
	DedupRatio     float64 `json:"dedup_ratio"` // logical over on disk
	GroupsWritten  int64   `json:"groups_written"`
	GroupsStored   int64   `json:"groups_stored"` // after the replay, before any lookup-at-scale fill
	UniqueGroups   int64   `json:"unique_groups"`
	// Hits.
	HitRate         float64 `json:"hit_rate"`
	ExpectedHitRate float64 `json:"expected_hit_rate"`
	// Times.
	LookupP50US     float64      `json:"lookup_p50_us"`
	LookupP99US     float64      `json:"lookup_p99_us"`
	LookupAtScale   *LookupScale `json:"lookup_at_scale,omitempty"`
	Restores        int          `json:"restores"`
	RestoreMeanTok  float64      `json:"restore_mean_tokens"`
	RestoreMedianMS float64      `json:"restore_median_ms"`
	RestoreP99MS    float64      `json:"restore_p99_ms"`
	RestoreGBps     float64      `json:"restore_gbps"` // restored bytes over restore time, all restores
	SaveSeconds     float64      `json:"save_seconds"`
	Verified        int          `json:"restores_verified"`
	Notes           string       `json:"notes,omitempty"`
}

// Result is what `hcache bench prefix --json` prints.
type Result struct {
	Workload      prefixwl.Params `json:"workload"`
	Seed          int64           `json:"seed"`
	Scale         float64         `json:"scale"`
	Requests      int             `json:"requests"`
	Sessions      int             `json:"sessions"`
	PromptTokens  int64           `json:"prompt_tokens"`
	Layers        int             `json:"layers"`
	RowBytes      int             `json:"row_bytes"`
	BytesPerToken int             `json:"bytes_per_token"`
	Systems       []SystemResult  `json:"systems"`
}

// system is a PrefixSystem with what the harness needs to know of it.
type system struct {
	peer.PrefixSystem
	namedTails bool // lookups add the named context's partial tail
	// fill is the lookup-at-scale fill: it makes the index hold about
	// groups groups, one of them chains of a promptTokens-token prompt
	// stored whole, and returns a lookup of that prompt (to time) and how
	// it filled.
	fill func(groups, promptTokens int, rng *rand.Rand) (lookup func() (int, error), how string, err error)
	// indexBytes is what its index takes on the disk (nil: none there).
	indexBytes func() (int64, error)
	// storedGroups is the groups the store holds now (nil: unknown).
	storedGroups func() int64
	close        func() error
}

// opener builds a system in dir.
type opener func(dir string, o Options, chain state.Chain) (*system, error)

// openers are the systems by name; hcache's registers itself.
var openers = map[string]opener{
	"file-per-chunk-hash": openChainFiles,
}

// Identity is the identity every system's chain keys are computed under.
func Identity(o Options) *state.Identity {
	plan := make([]state.LayerPlan, o.Layers)
	for l := range plan {
		plan[l] = state.LayerPlan{Kind: state.LayerKV, RowBytes: uint32(o.RowBytes)}
	}
	return &state.Identity{Model: []byte("hcache bench prefix"), Plan: plan}
}

// Namespace is the namespace the runs use.
const Namespace = "bench"

func openChainFiles(dir string, o Options, chain state.Chain) (*system, error) {
	cf, err := peer.NewChainFiles(peer.Spec{Dir: dir, Layers: o.Layers, RowBytes: o.RowBytes, ChunkTokens: peer.DefaultChunkTokens}, chain)
	if err != nil {
		return nil, err
	}
	return &system{PrefixSystem: cf,
		fill: func(groups, promptTokens int, rng *rand.Rand) (func() (int, error), string, error) {
			var prompt []uint32
			n := 0
			for cf.Chunks() < groups {
				prompt = randomTokens(rng, promptTokens)
				if _, err := cf.FillIndex(prompt); err != nil {
					return nil, "", err
				}
				n++
			}
			return func() (int, error) { return cf.Lookup("", prompt) }, fmt.Sprintf("index-only: the chunk keys of %d random %d-token prompts put in the in-memory index (LMCache's dict) "+
				"without files; a lookup computes the prompt's chain keys and probes the map, as batched_async_contains does", n, promptTokens), nil
		},
		storedGroups: func() int64 { return int64(cf.Chunks()) },
		close:        cf.Close,
	}, nil
}

func randomTokens(rng *rand.Rand, n int) []uint32 {
	t := make([]uint32, n)
	for i := range t {
		t[i] = uint32(rng.Intn(32000))
	}
	return t
}

// Systems lists the systems this build can run.
func Systems() []string {
	var n []string
	for k := range openers {
		n = append(n, k)
	}
	sort.Strings(n)
	return n
}

func (o *Options) defaults() error {
	if o.Layers == 0 {
		o.Layers = DefaultLayers
	}
	if o.RowBytes == 0 {
		o.RowBytes = DefaultRowBytes
	}
	if o.Scale == 0 {
		o.Scale = 1
	}
	if o.LookupPromptTokens == 0 {
		o.LookupPromptTokens = DefaultLookupPrompt
	}
	if o.LookupRounds == 0 {
		o.LookupRounds = DefaultLookupRounds
	}
	if o.VerifyEvery == 0 {
		o.VerifyEvery = 8
	}
	if len(o.Systems) == 0 {
		o.Systems = Systems()
	}
	switch {
	case o.Layers < 0 || o.RowBytes <= 0 || o.RowBytes%2 != 0:
		return fmt.Errorf("bench prefix: %d layers of %d-byte rows (want > 0, even row bytes)", o.Layers, o.RowBytes)
	case o.Scale < 0:
		return fmt.Errorf("bench prefix: scale %g (want > 0)", o.Scale)
	case o.LookupGroups < 0 || o.LookupPromptTokens < 0 || o.LookupRounds < 0 || o.VerifyEvery < 0:
		return fmt.Errorf("bench prefix: negative lookup or verify options")
	case o.Dir == "":
		return fmt.Errorf("bench prefix: no directory")
	}
	for _, s := range o.Systems {
		if openers[s] == nil {
			return fmt.Errorf("bench prefix: unknown system %q (this build has %v)", s, Systems())
		}
	}
	return nil
}

// Run runs the benchmark.
func Run(o Options) (*Result, error) {
	if err := o.defaults(); err != nil {
		return nil, err
	}
	params, ok := prefixwl.Defaults[o.Workload]
	if !ok {
		return nil, fmt.Errorf("bench prefix: unknown workload %q (want one of %v)", o.Workload, prefixwl.Names())
	}
	w, err := params.Scaled(o.Scale).Generate(o.Seed)
	if err != nil {
		return nil, err
	}
	chain, err := state.NewChain(Namespace, nil, Identity(o))
	if err != nil {
		return nil, err
	}
	root, err := os.MkdirTemp(o.Dir, "hcache-bench-prefix-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(root)
	res := &Result{Workload: w.Params, Seed: o.Seed, Scale: o.Scale, Requests: len(w.Requests), Sessions: w.Sessions,
		Layers: o.Layers, RowBytes: o.RowBytes, BytesPerToken: o.Layers * o.RowBytes}
	for _, r := range w.Requests {
		res.PromptTokens += int64(r.Prompt)
	}
	src := peer.NewSource(o.Seed)
	for i, name := range o.Systems {
		s, err := openers[name](filepath.Join(root, fmt.Sprint(i, "-", name)), o, chain)
		if err != nil {
			return nil, fmt.Errorf("bench prefix: open %s: %w", name, err)
		}
		sr, err := replay(s, w, o, src)
		if err == nil && o.LookupGroups > 0 && s.fill != nil {
			sr.LookupAtScale, err = lookupAtScale(s, o, chain)
		}
		if cerr := s.close(); err == nil && cerr != nil {
			err = cerr
		}
		if err != nil {
			return nil, fmt.Errorf("bench prefix: %s: %w", name, err)
		}
		res.Systems = append(res.Systems, *sr)
	}
	return res, nil
}

func ctxName(session int) string { return fmt.Sprint("s", session) }

// replay serves the workload's requests in order through s.
func replay(s *system, w *prefixwl.Workload, o Options, src *peer.Source) (*SystemResult, error) {
	G := s.GroupTokens()
	counts, hits, err := w.Count(G)
	if err != nil {
		return nil, err
	}
	bpt := int64(o.Layers * o.RowBytes)
	sr := &SystemResult{System: s.Name(), GroupTokens: G, LogicalBytes: counts.LogicalGroups * int64(G) * bpt,
		UniqueBytes: counts.UniqueGroups * int64(G) * bpt, UniqueGroups: counts.UniqueGroups}
	if s.namedTails {
		sr.TailBytes = counts.Tails * bpt
	}
	var lookups, restores []float64
	var hitTok, expTok, restoredBytes int64
	var restoreTime, saveTime time.Duration
	verified := 0
	bar := progress.New(o.Progress, "bench prefix "+s.Name(), int64(len(w.Requests)), "requests")
	for i, r := range w.Requests {
		ctx := ctxName(r.Session)
		prompt := r.Tokens[:r.Prompt]
		want := hits[i].Shared
		if s.namedTails {
			want = hits[i].Best()
		}
		t0 := time.Now()
		n, err := s.Lookup(ctx, prompt)
		lookups = append(lookups, float64(time.Since(t0).Nanoseconds())/1e3)
		if err != nil {
			return nil, fmt.Errorf("request %d: lookup: %w", i, err)
		}
		if n != want {
			return nil, fmt.Errorf("request %d (session %d): lookup found %d of %d prompt tokens, the workload says %d", i, r.Session, n, r.Prompt, want)
		}
		hitTok += int64(n)
		expTok += int64(want)
		if n > 0 {
			got := 0
			t0 = time.Now()
			err := s.RestoreTokens(ctx, prompt, n, func(_, _ int, rows []byte) error {
				got += len(rows)
				return nil
			})
			d := time.Since(t0)
			if err != nil {
				return nil, fmt.Errorf("request %d: restore of %d tokens: %w", i, n, err)
			}
			if int64(got) != int64(n)*bpt {
				return nil, fmt.Errorf("request %d: restore handed over %d bytes, want %d", i, got, int64(n)*bpt)
			}
			restores = append(restores, float64(d.Nanoseconds())/1e6)
			restoreTime += d
			restoredBytes += int64(got)
			sr.RestoreMeanTok += float64(n)
			if len(restores)%o.VerifyEvery == 1 || o.VerifyEvery == 1 {
				if err := verify(s, ctx, prompt, n, o, src); err != nil {
					return nil, fmt.Errorf("request %d: %w", i, err)
				}
				verified++
			}
		}
		rows := src.PrefixRows(r.Tokens, o.RowBytes)
		t0 = time.Now()
		written, err := s.SaveTokens(ctx, r.Tokens, rows.Rows)
		if err != nil {
			return nil, fmt.Errorf("request %d: save: %w", i, err)
		}
		sr.GroupsWritten += int64(written)
		saveTime += time.Since(t0)
		bar.Add(1)
	}
	bar.Finish()
	disk, err := s.BytesOnDisk()
	if err != nil {
		return nil, err
	}
	sr.BytesOnDisk = disk
	if s.storedGroups != nil {
		sr.GroupsStored = s.storedGroups()
	}
	if s.indexBytes != nil {
		if sr.IndexBytes, err = s.indexBytes(); err != nil {
			return nil, err
		}
	}
	sr.DiskOverUnique = float64(disk) / float64(sr.UniqueBytes)
	sr.DiskOverKept = float64(disk) / float64(sr.UniqueBytes+sr.TailBytes)
	sr.DedupRatio = float64(sr.LogicalBytes) / float64(disk)
	sr.HitRate = float64(hitTok) / float64(sumPrompt(w))
	sr.ExpectedHitRate = float64(expTok) / float64(sumPrompt(w))
	sr.LookupP50US, sr.LookupP99US = quantile(lookups, 0.5), quantile(lookups, 0.99)
	sr.Restores = len(restores)
	if len(restores) > 0 {
		sr.RestoreMeanTok /= float64(len(restores))
		sr.RestoreMedianMS, sr.RestoreP99MS = quantile(restores, 0.5), quantile(restores, 0.99)
		sr.RestoreGBps = float64(restoredBytes) / restoreTime.Seconds() / 1e9
	}
	sr.SaveSeconds = saveTime.Seconds()
	sr.Verified = verified
	return sr, nil
}

func sumPrompt(w *prefixwl.Workload) int64 {
	var n int64
	for _, r := range w.Requests {
		n += int64(r.Prompt)
	}
	return n
}

// verify restores again and compares every row with the prefix's rows.
func verify(s *system, ctx string, prompt []uint32, n int, o Options, src *peer.Source) error {
	want := src.PrefixRows(prompt, o.RowBytes)
	seen := make([]int, o.Layers)
	exp := make([]byte, 0)
	err := s.RestoreTokens(ctx, prompt, n, func(l, first int, rows []byte) error {
		k := len(rows) / o.RowBytes
		if l < 0 || l >= o.Layers || first < 0 || first+k > n || len(rows)%o.RowBytes != 0 {
			return fmt.Errorf("restore handed layer %d tokens [%d, +%d bytes) of %d tokens", l, first, len(rows), n)
		}
		exp = append(exp[:0], want.Rows(l, first, first+k)...)
		for i := range rows {
			if rows[i] != exp[i] {
				return fmt.Errorf("restored layer %d token %d differs from the saved row", l, first+i/o.RowBytes)
			}
		}
		seen[l] += k
		return nil
	})
	if err != nil {
		return err
	}
	for l, k := range seen {
		if k != n {
			return fmt.Errorf("restore handed %d tokens of layer %d, want %d", k, l, n)
		}
	}
	return nil
}

// lookupAtScale fills s's index to o.LookupGroups groups and times lookups
// of a stored o.LookupPromptTokens-token prompt.
func lookupAtScale(s *system, o Options, chain state.Chain) (*LookupScale, error) {
	rng := rand.New(rand.NewSource(o.Seed ^ 0x5eed))
	t0 := time.Now()
	lookup, how, err := s.fill(o.LookupGroups, o.LookupPromptTokens, rng)
	if err != nil {
		return nil, err
	}
	ls := &LookupScale{IndexGroups: o.LookupGroups, PromptTokens: o.LookupPromptTokens, Rounds: o.LookupRounds, How: how,
		FillSeconds: time.Since(t0).Seconds()}
	var ts []float64
	want := o.LookupPromptTokens / s.GroupTokens() * s.GroupTokens()
	for i := 0; i < o.LookupRounds; i++ {
		t0 := time.Now()
		n, err := lookup()
		ts = append(ts, float64(time.Since(t0).Nanoseconds())/1e3)
		if err != nil {
			return nil, err
		}
		if n != want {
			return nil, fmt.Errorf("lookup at scale found %d of %d tokens, want %d", n, o.LookupPromptTokens, want)
		}
		ls.HitTokens = n
	}
	ls.P50US, ls.P99US = quantile(ts, 0.5), quantile(ts, 0.99)
	prompt := randomTokens(rng, o.LookupPromptTokens)
	ts = ts[:0]
	var h state.ChainHasher
	g := s.GroupTokens()
	for i := 0; i < o.LookupRounds; i++ {
		t0 := time.Now()
		var k state.ChainKey
		for j := 0; (j+1)*g <= len(prompt); j++ {
			k = h.Next(chain, k, prompt[j*g:(j+1)*g])
		}
		ts = append(ts, float64(time.Since(t0).Nanoseconds())/1e3)
	}
	ls.KeysP50US = quantile(ts, 0.5)
	return ls, nil
}

// quantile is the nearest-rank quantile.
func quantile(v []float64, q float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	i := int(math.Ceil(q*float64(len(s)))) - 1
	return s[max(0, min(len(s)-1, i))]
}
