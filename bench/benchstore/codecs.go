package benchstore

import (
	"fmt"
	"io"
	"math"
	"math/rand"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/hcache/hcache/chunk"
	"github.com/hcache/hcache/internal/progress"
	"github.com/hcache/hcache/internal/stat"
	"github.com/hcache/hcache/model"
	"github.com/hcache/hcache/serve/sched"
	"github.com/hcache/hcache/state"
	"github.com/hcache/hcache/state/codec"
)

// CodecOptions of a codec comparison: every variant saved and restored in
// the same run, rounds interleaved so that each variant sees the same disk.
type CodecOptions struct {
	Dir      string
	Model    string // preset name
	Tokens   int
	Contexts int // per variant and round
	Rounds   int
	// Variants are "CODEC-KIND" or "CODEC-KIND+lz4" (the store's lz4
	// compression of slices): none-kv, none-hidden, fp8-hidden, ...
	Variants []string
	Seed     int64
	Progress io.Writer
}

// DefaultCodecVariants are what `hcache bench store --codecs default` runs.
var DefaultCodecVariants = []string{"none-kv", "none-hidden", "none-hidden+lz4", "fp8-hidden", "fp8-block-hidden", "int8-hidden", "fp8-kv", "int8-kv", "fp8-hidden+lz4"}

// CodecRow is one variant's figures. Restore times are medians per context
// over every round; Restore is the store's restore (read, checksum, rows
// handed over as stored: what a GPU restore copies to the device, which
// then decodes), RestoreDecode the same plus decoding the rows into the
// model dtype on the host (one core: what the CPU backend does).
type CodecRow struct {
	Variant     string `json:"variant"`
	Kind        string `json:"kind"`
	Codec       string `json:"codec"`
	Compression string `json:"compression"`
	// RowBytesPerToken is the stored rows of one token over every layer;
	// BytesOnDiskPerToken what the store wrote for it (after lz4, with
	// headers and alignment).
	RowBytesPerToken    int     `json:"row_bytes_per_token"`
	BytesOnDiskPerToken float64 `json:"bytes_on_disk_per_token"`
	DiskVsFP16KV        float64 `json:"disk_vs_model_dtype_kv"` // on disk / the model-dtype KV rows of a token
	EncodeGBps          float64 `json:"encode_gbps"`            // model-dtype bytes encoded per second (host, one core)
	SaveGBps            float64 `json:"save_gbps"`              // stored row bytes per second through the store
	SaveModelGBps       float64 `json:"save_model_gbps"`        // model-dtype bytes per second, encode included
	RestoreMS           float64 `json:"restore_ms"`
	RestoreDecodeMS     float64 `json:"restore_decode_ms"`
	RestoreVsHidden     float64 `json:"restore_vs_none_hidden,omitempty"` // RestoreMS / none-hidden's, same run
	RestoreDecodeVs     float64 `json:"restore_decode_vs_none_hidden,omitempty"`
	CompressionRatio    float64 `json:"compression_ratio,omitempty"`
}

// CodecResult is what `hcache bench store --codecs ... --json` prints.
type CodecResult struct {
	Model    string `json:"model"`
	Engine   string `json:"engine"`
	Tokens   int    `json:"tokens"`
	Contexts int    `json:"contexts"`
	Rounds   int    `json:"rounds"`
	Seed     int64  `json:"seed"`
	States   string `json:"states"`
	// LoadAvg is /proc/loadavg's 1-minute figure at the start and the end:
	// the machine may be shared.
	LoadAvg [2]float64 `json:"loadavg_start_end"`
	Rows    []CodecRow `json:"rows"`
}

type codecVariant struct {
	name  string
	kind  state.LayerKind
	codec state.Codec
	lz4   bool
	plan  []state.LayerPlan
	ident *state.Identity
	rows  []byte // one layer's stored rows (every layer stores the same)
	row   CodecRow
	save  []float64 // seconds per round
	rest  []float64 // ms per context
	restD []float64
}

func parseVariant(c *model.Config, s string) (*codecVariant, error) {
	v := &codecVariant{name: s}
	base, lz, _ := strings.Cut(s, "+")
	if lz != "" && lz != "lz4" {
		return nil, fmt.Errorf("bench store: variant %q: only +lz4 may follow", s)
	}
	v.lz4 = lz == "lz4"
	i := strings.LastIndexByte(base, '-')
	if i < 0 {
		return nil, fmt.Errorf("bench store: variant %q is not CODEC-KIND (e.g. fp8-hidden, none-kv)", s)
	}
	cd, err := state.ParseCodec(base[:i])
	if err != nil {
		return nil, fmt.Errorf("bench store: variant %q: %w", s, err)
	}
	switch base[i+1:] {
	case "hidden":
		v.kind = state.LayerHidden
	case "kv":
		v.kind = state.LayerKV
	default:
		return nil, fmt.Errorf("bench store: variant %q: kind %q (hidden or kv)", s, base[i+1:])
	}
	v.codec = cd
	v.plan = sched.PlanOfCodec(c, v.kind, cd)
	v.ident = &state.Identity{Model: model.ShapeFingerprint(c), Plan: v.plan, Codec: cd}
	comp := "none"
	if v.lz4 {
		comp = "lz4"
	}
	v.row = CodecRow{Variant: s, Kind: v.kind.String(), Codec: cd.String(), Compression: comp, RowBytesPerToken: v.ident.TokenBytes()}
	return v, nil
}

// syntheticLayer is one layer's values of tokens rows of n values: gaussian,
// each channel with its own scale (log-normal, so that a few channels are
// 10x the others, as activations have), in the model dtype's range.
func syntheticLayer(rng *rand.Rand, tokens, n int) []float32 {
	ch := make([]float64, n)
	for i := range ch {
		ch[i] = math.Exp(rng.NormFloat64())
	}
	x := make([]float32, tokens*n)
	for i := range x {
		x[i] = float32(rng.NormFloat64() * ch[i%n])
	}
	return x
}

// RunCodecs compares codecs on one store: per variant, bytes per token,
// encode and save bandwidth, restore medians with and without the host
// decode.
func RunCodecs(o CodecOptions) (*CodecResult, error) {
	c, err := model.Preset(o.Model)
	if err != nil {
		return nil, err
	}
	if o.Tokens <= 0 || o.Contexts <= 0 || o.Rounds <= 0 {
		return nil, fmt.Errorf("bench store: --tokens, --contexts and --rounds must be positive")
	}
	if len(o.Variants) == 0 {
		o.Variants = DefaultCodecVariants
	}
	load0 := loadAvg()
	rng := rand.New(rand.NewSource(o.Seed))
	hidden := syntheticLayer(rng, o.Tokens, c.HiddenSize)
	kv := syntheticLayer(rng, 2*o.Tokens, c.KVDim()) // K and V of each token, alternating
	var vs []*codecVariant
	maxPerToken := 0
	for _, s := range o.Variants {
		v, err := parseVariant(c, s)
		if err != nil {
			return nil, err
		}
		// Encode one layer, timed (what the Saver does per layer).
		vals, n, segs := hidden, c.HiddenSize, 1
		if v.kind == state.LayerKV {
			vals, n, segs = kv, c.KVDim(), 2
		}
		rb := codec.RowBytes(v.codec, c.DType, segs, n)
		v.rows = make([]byte, o.Tokens*rb)
		// Three passes, the first touching the memory; the median of the
		// other two is kept.
		var secs []float64
		for pass := 0; pass < 3; pass++ {
			t0 := time.Now()
			// A prefill from position 0 (int8: whole 64-token groups).
			if err := codec.EncodeRows(v.codec, c.DType, v.rows, segs, n, 0, vals); err != nil {
				return nil, err
			}
			if pass > 0 {
				secs = append(secs, time.Since(t0).Seconds())
			}
		}
		v.row.EncodeGBps = float64(len(vals)*c.ElemBytes()) / stat.Median(secs) / 1e9
		maxPerToken = max(maxPerToken, v.ident.TokenBytes())
		vs = append(vs, v)
	}
	dir := filepath.Join(o.Dir, "hcache-bench-codecs")
	os.RemoveAll(dir)
	defer os.RemoveAll(dir)
	stores := map[bool]*chunk.Store{}
	for _, lz := range []bool{false, true} {
		comp := "none"
		if lz {
			comp = "lz4"
		}
		st, err := chunk.Open(chunk.Options{Dir: filepath.Join(dir, comp), CapacityBytes: -1, Compression: comp, GCInterval: -1,
			StagingBytes: int64(o.Contexts+2) * int64(o.Tokens+64) * int64(maxPerToken), Logf: func(string, ...any) {}})
		if err != nil {
			return nil, err
		}
		defer st.Close()
		stores[lz] = st
	}
	res := &CodecResult{Model: o.Model, Engine: stores[false].EngineName(), Tokens: o.Tokens, Contexts: o.Contexts, Rounds: o.Rounds, Seed: o.Seed,
		States: "synthetic: gaussian values with log-normal per-channel scales (seeded), not a trained model's states"}
	kvModel := float64(c.Layers * c.KVRowBytes())
	bar := progress.New(o.Progress, "bench store codecs", int64(o.Rounds*len(vs)), "variant rounds")
	dec := make([]byte, o.Tokens*max(c.HiddenRowBytes(), c.KVRowBytes()))
	for r := 0; r < o.Rounds; r++ {
		for _, v := range vs {
			st := stores[v.lz4]
			before := st.Stats()
			var onDisk0 uint64
			for _, s := range st.Segments() {
				onDisk0 += s.Live
			}
			t0 := time.Now()
			for i := 0; i < o.Contexts; i++ {
				wr, err := st.Create("bench", fmt.Sprint(v.name, "-", i), v.ident, chunk.CreateOptions{})
				if err != nil {
					return nil, err
				}
				for l := range v.plan {
					if err := wr.AppendLayer(l, v.rows); err != nil {
						return nil, err
					}
				}
				if err := wr.Close(); err != nil {
					return nil, err
				}
			}
			v.save = append(v.save, time.Since(t0).Seconds())
			var onDisk uint64
			for _, s := range st.Segments() {
				onDisk += s.Live
			}
			v.row.BytesOnDiskPerToken = float64(onDisk-onDisk0) / float64(o.Tokens*o.Contexts)
			if after := st.Stats(); after.CompressStored > before.CompressStored {
				v.row.CompressionRatio = float64(after.CompressRawBytes-before.CompressRawBytes) / float64(after.CompressStored-before.CompressStored)
			}
			segs, n, out := 1, c.HiddenSize, c.HiddenRowBytes()
			if v.kind == state.LayerKV {
				segs, n, out = 2, c.KVDim(), c.KVRowBytes()
			}
			for i := 0; i < o.Contexts; i++ {
				id := fmt.Sprint(v.name, "-", i)
				t0 := time.Now()
				if _, err := st.Restore("bench", id, v.ident, func(int, []byte) error { return nil }); err != nil {
					return nil, err
				}
				v.rest = append(v.rest, float64(time.Since(t0).Microseconds())/1000)
				t0 = time.Now()
				_, err := st.Restore("bench", id, v.ident, func(_ int, rows []byte) error {
					if v.codec == state.CodecNone {
						return nil // already the model dtype
					}
					return codec.TranscodeRows(v.codec, c.DType, dec[:len(rows)/codec.RowBytes(v.codec, c.DType, segs, n)*out], rows, segs, n)
				})
				if err != nil {
					return nil, err
				}
				v.restD = append(v.restD, float64(time.Since(t0).Microseconds())/1000)
			}
			for i := 0; i < o.Contexts; i++ {
				if err := st.Delete("bench", fmt.Sprint(v.name, "-", i)); err != nil {
					return nil, err
				}
			}
			bar.Add(1)
		}
	}
	bar.Finish()
	var hiddenMS, hiddenDMS float64
	for _, v := range vs {
		row := &v.row
		row.DiskVsFP16KV = row.BytesOnDiskPerToken / kvModel
		sec := stat.Median(v.save)
		row.SaveGBps = float64(o.Contexts*o.Tokens*v.ident.TokenBytes()) / sec / 1e9
		modelBytes := float64(o.Contexts * o.Tokens * c.Layers * c.HiddenRowBytes())
		if v.kind == state.LayerKV {
			modelBytes = float64(o.Contexts * o.Tokens * c.Layers * c.KVRowBytes())
		}
		encSec := 0.0
		if v.codec != state.CodecNone {
			encSec = modelBytes / (row.EncodeGBps * 1e9)
		}
		row.SaveModelGBps = modelBytes / (sec + encSec) / 1e9
		row.RestoreMS, row.RestoreDecodeMS = stat.Median(v.rest), stat.Median(v.restD)
		if v.name == "none-hidden" {
			hiddenMS, hiddenDMS = row.RestoreMS, row.RestoreDecodeMS
		}
	}
	for _, v := range vs {
		if hiddenMS > 0 {
			v.row.RestoreVsHidden = v.row.RestoreMS / hiddenMS
			v.row.RestoreDecodeVs = v.row.RestoreDecodeMS / hiddenDMS
		}
		res.Rows = append(res.Rows, v.row)
	}
	res.LoadAvg = [2]float64{load0, loadAvg()}
	return res, nil
}

// loadAvg is /proc/loadavg's 1-minute figure (0 where there is none).
func loadAvg() float64 {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return 0
	}
	var f float64
	fmt.Sscan(string(b), &f)
	return f
}
