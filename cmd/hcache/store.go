package main

import (
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"text/tabwriter"

	"github.com/hcache/hcache/bench/benchstore"
	"github.com/hcache/hcache/chunk"
	"github.com/hcache/hcache/internal/progress"
)

func init() {
	register("bench store", "save/restore bandwidth of the chunk store against fio in the same run", benchStore)
	register("fsck", "check every index entry against segment bytes and checksums (read-only)", fsck)
	register("stat", "print namespaces, contexts and per-segment live/dead bytes (read-only)", stat)
}

func benchStore(args []string, stdout, stderr io.Writer) error {
	fs := newFlags("bench store", stderr)
	dir := fs.String("dir", os.TempDir(), "directory on the device to measure")
	mdl := fs.String("model", "llama2-7b", "model preset whose row shapes to store")
	tokens := fs.Int("tokens", 4096, "tokens per context")
	contexts := fs.Int("contexts", 16, "contexts")
	writers := fs.Int("writers", 2, "contexts saved concurrently")
	comp := fs.String("compression", "none", "none or lz4")
	asJSON := fs.Bool("json", false, "print one JSON object")
	noFio := fs.Bool("no-fio", false, "skip the fio baseline")
	codecs := fs.String("codecs", "", "compare codecs instead, in one run: \"default\" or a comma-separated list of CODEC-KIND[+lz4] (none-kv, none-hidden, fp8-hidden, fp8-block-hidden, fp8-kv, none-hidden+lz4, ...)")
	rounds := fs.Int("rounds", 3, "save rounds, each next to fio's best-write and durable-write jobs (interleaved; save figures are medians); with --codecs: rounds over the variants (interleaved; restore figures are medians)")
	seed := fs.Int64("seed", 1, "with --codecs: seed of the synthetic states")
	sweep := addSweepFlags(fs)
	so, err := sweep.parse(fs, args, dir)
	if err != nil {
		return err
	}
	if *noFio {
		so = nil
	}
	if *codecs != "" {
		return benchCodecs(benchstore.CodecOptions{Dir: *dir, Model: *mdl, Tokens: *tokens, Contexts: *contexts, Rounds: *rounds, Seed: *seed,
			Variants: codecVariants(*codecs), Progress: stderr}, *asJSON, stdout)
	}
	self, err := os.Executable()
	if err != nil {
		return err
	}
	res, err := benchstore.Run(benchstore.Options{Dir: *dir, Model: *mdl, Tokens: *tokens, Contexts: *contexts,
		Writers: *writers, Compression: *comp, SkipFio: *noFio, Progress: stderr, Sweep: so, Rounds: *rounds,
		CrashWriter: func(d string) *exec.Cmd {
			return exec.Command(self, "stress", "--dir", d, "--seed", "1", "--chunk-tokens", "0")
		}})
	if err != nil {
		return err
	}
	if *asJSON {
		return printJSON(stdout, res)
	}
	fmt.Fprintf(stdout, "save %.2f GB/s (fio %.2f, %.2f), restore %.2f GB/s (fio %.2f, %.2f), %.0f bytes/token on disk (%.4f x raw), append_token %.1f us (copy %.1f us, %.2f x), reopen %.1f ms\n",
		res.SaveGBps, res.FioWriteGBps, res.SaveRatio, res.RestoreGBps, res.FioReadGBps, res.RestoreRatio,
		res.BytesOnDiskPerToken, res.DiskOverRaw, res.AppendTokenUS, res.CopyUS, res.AppendTokenRatio, res.RecoveryMS)
	if res.FioSweep != nil {
		fmt.Fprintf(stdout, "%s; ours: save %.2f x, restore %.2f x the best\n", res.FioSweep, res.SaveVsBest, res.RestoreVsBest)
	}
	sp := func(s benchstore.Spread) string { return fmt.Sprintf("%.2f [%.2f, %.2f]", s.Median, s.Min, s.Max) }
	if res.FioBestWriteSpread.N == 0 {
		fmt.Fprintf(stdout, "%d save rounds, median [min, max]: save %s GB/s (no fio)\n", res.SaveSpread.N, sp(res.SaveSpread))
	} else {
		fmt.Fprintf(stdout, "%d save rounds, median [min, max]: save %s GB/s; next to each: fio %s %s GB/s, save/it %s; fio %s %s GB/s, save/it %s (the same job over its own written blocks: %s GB/s)\n",
			res.SaveSpread.N, sp(res.SaveSpread), res.FioBestWriteJob, sp(res.FioBestWriteSpread), sp(res.SaveVsBestInterleaved),
			res.FioDurableWriteJob, sp(res.FioDurableWriteSpread), sp(res.SaveVsDurable), sp(res.FioDurableOverSpread))
	}
	for i, r := range res.SaveRounds {
		fmt.Fprintf(stdout, "  round %d: save %.2f GB/s in %.0f ms: writes in flight %.0f ms (idle %.0f), %d writes of %d B (%.1f ms each), %d fdatasyncs %.0f ms, %d index commits %.0f ms, %d segment creates/grows %.0f ms; writers: copy %.0f ms, close %.0f ms (summed)\n",
			i, r.GBps, r.WallMS, r.BusyMS, r.IdleMS, r.Writes, r.WriteBytes, r.WriteMS, r.Syncs, r.SyncMS, r.Commits, r.IndexMS, r.Segments, r.SegmentMS, r.CopyMS, r.CloseMS)
	}
	return nil
}

func codecVariants(s string) []string {
	if s == "default" {
		return benchstore.DefaultCodecVariants
	}
	return strings.Split(s, ",")
}

func benchCodecs(o benchstore.CodecOptions, asJSON bool, stdout io.Writer) error {
	res, err := benchstore.RunCodecs(o)
	if err != nil {
		return err
	}
	if asJSON {
		return printJSON(stdout, res)
	}
	tw := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "variant\tB/token rows\tB/token disk\tvs dtype KV\tencode GB/s\tsave GB/s\tsave dtype GB/s\trestore ms\tvs none-hidden\trestore+decode ms\tvs none-hidden\t")
	for _, r := range res.Rows {
		fmt.Fprintf(tw, "%s\t%d\t%.0f\t%.3f\t%.2f\t%.2f\t%.2f\t%.1f\t%.3f\t%.1f\t%.3f\t\n", r.Variant, r.RowBytesPerToken, r.BytesOnDiskPerToken, r.DiskVsFP16KV,
			r.EncodeGBps, r.SaveGBps, r.SaveModelGBps, r.RestoreMS, r.RestoreVsHidden, r.RestoreDecodeMS, r.RestoreDecodeVs)
	}
	tw.Flush()
	fmt.Fprintf(stdout, "%s, %d tokens x %d contexts x %d rounds, %s engine; states: %s\n", res.Model, res.Tokens, res.Contexts, res.Rounds, res.Engine, res.States)
	return nil
}

// exitError carries an exit status.
type exitError struct {
	code int
	msg  string
}

func (e *exitError) Error() string { return e.msg }
func (e *exitError) ExitCode() int { return e.code }

func fsck(args []string, stdout, stderr io.Writer) error {
	t, err := newTargetFlags("fsck", stderr).parse(args)
	if err != nil {
		return err
	}
	if t.addr != "" {
		return fsckDaemon(t, stdout)
	}
	st, err := t.open(stderr, true)
	if err != nil {
		return err
	}
	asJSON := t.asJSON
	defer st.Close()
	var bar *progress.Bar
	rep := st.Check(func(done, total int) {
		if bar == nil {
			bar = progress.New(stderr, "fsck", int64(total), "chunk groups")
		}
		bar.Add(1)
	})
	bar.Finish()
	return printCheck(stdout, rep, asJSON)
}

// printCheck prints an fsck report and turns its findings into the exit status.
func printCheck(stdout io.Writer, rep *chunk.CheckReport, asJSON bool) error {
	if asJSON {
		if err := printJSON(stdout, rep); err != nil {
			return err
		}
	} else {
		fmt.Fprintf(stdout, "%d contexts, %d chunk groups, %d slices, %d segments checked\n", rep.Contexts, rep.Chunks, rep.Slices, rep.Segments)
		for _, o := range rep.Orphans {
			fmt.Fprintf(stdout, "orphan: %s\n", o)
		}
		for _, d := range rep.DamagedContexts {
			fmt.Fprintf(stdout, "damaged context: %s\n", d)
		}
		for _, e := range rep.Errors {
			fmt.Fprintf(stdout, "error: %s\n", e)
		}
	}
	if !rep.OK() {
		return &exitError{1, fmt.Sprintf("%d inconsistencies", len(rep.Errors))}
	}
	if len(rep.DamagedContexts) > 0 {
		return &exitError{1, fmt.Sprintf("%d damaged contexts", len(rep.DamagedContexts))}
	}
	fmt.Fprintln(stdout, "clean")
	return nil
}

func stat(args []string, stdout, stderr io.Writer) error {
	t, err := newTargetFlags("stat", stderr).parse(args)
	if err != nil {
		return err
	}
	if t.addr != "" {
		return statDaemon(t, stdout)
	}
	st, err := t.open(stderr, true)
	if err != nil {
		return err
	}
	asJSON := t.asJSON
	defer st.Close()
	out := struct {
		Namespaces []string
		Contexts   []chunk.ContextInfo
		Segments   []chunk.SegmentInfo
		Stats      chunk.Stats
	}{st.Namespaces(), st.Contexts(), st.Segments(), st.Stats()}
	if asJSON {
		return printJSON(stdout, out)
	}
	fmt.Fprintf(stdout, "namespaces: %v\n", out.Namespaces)
	fmt.Fprintf(stdout, "%-16s %-24s %10s %12s %s\n", "NAMESPACE", "CONTEXT", "TOKENS", "LIVE_BYTES", "FLAGS")
	for _, c := range out.Contexts {
		flags := ""
		if c.Pinned {
			flags += "pinned "
		}
		if c.Damaged {
			flags += "damaged"
		}
		fmt.Fprintf(stdout, "%-16s %-24s %10d %12d %s\n", c.Namespace, c.ID, c.Tokens, c.LiveBytes, flags)
	}
	fmt.Fprintf(stdout, "%-10s %14s %14s %14s %s\n", "SEGMENT", "WRITTEN", "LIVE", "DEAD", "STATE")
	for _, s := range out.Segments {
		state := "sealed"
		if s.Active {
			state = "active"
		} else if !s.Sealed {
			state = "open"
		}
		fmt.Fprintf(stdout, "%-10d %14d %14d %14d %s\n", s.ID, s.Written, s.Live, s.Written-s.Live, state)
	}
	return nil
}
