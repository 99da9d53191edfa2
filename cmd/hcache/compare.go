package main

import (
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"strings"

	"github.com/hcache/hcache/bench/compare"
)

func init() {
	register("bench compare", "hcache against file-per-chunk, redis, pebble, recomputation and the disk's limit, same run; JSON, plots, report", benchCompare)
}

func benchCompare(args []string, stdout, stderr io.Writer) error {
	fs := newFlags("bench compare", stderr)
	mdl := fs.String("model", "llama2-7b", "model preset (llama2-7b: MHA, llama3-8b: GQA, ...)")
	wl := fs.String("workload", "chat", "chat (ShareGPT-shaped) or long (L-Eval-shaped)")
	asJSON := fs.Bool("json", false, "print one JSON object")
	dir := fs.String("dir", os.TempDir(), "scratch directory on the device to measure")
	out := fs.String("out", "", "directory for the report, plots and raw JSON, each named <date>-<model>-<workload>-<run id> (default: a new temporary directory, named when done; \"none\": no files)")
	layers := fs.Int("layers", 0, "layers kept of the model, rows at full width (0: 16 for chat, 2 for long, so a run fits 24 GiB and a few minutes)")
	conc := fs.String("concurrency", "1,4,16,64", "concurrency levels")
	systems := fs.String("systems", strings.Join(compare.AllSystems, ","), "systems to run (also, only when named: "+strings.Join(compare.ExtraSystems, ",")+")")
	seed := fs.Int64("seed", 1, "workload seed")
	convs := fs.Int("conversations", 16, "chat: conversations")
	maxCtx := fs.Int("max-context", 0, "chat: context limit in tokens (0: the model's, at most 8192)")
	docs := fs.Int("docs", 8, "long: documents")
	questions := fs.Int("questions", 4, "long: questions per document (L-Eval: about 4)")
	minDoc := fs.Int("min-doc", 4096, "long: shortest document (tokens)")
	maxDoc := fs.Int("max-doc", 16384, "long: longest document (tokens)")
	recModel := fs.String("recompute-model", "tiny-llama", "recompute: the model preset its CPU forward pass runs")
	recMax := fs.Int("recompute-max", 6, "recompute: restores it runs (at concurrency 1)")
	recTok := fs.Int("recompute-max-tokens", 2048, "recompute: longest context it restores (the CPU prefill is quadratic)")
	warm := sizeFlag(4 << 30)
	fs.Var(&warm, "warm", "memory touched before each system (VM first-touch costs would otherwise fall mostly on the first)")
	sweep := addSweepFlags(fs)
	so, err := sweep.parse(fs, args, dir)
	if err != nil {
		return err
	}
	o := compare.Options{Model: *mdl, Workload: *wl, Layers: *layers, Dir: *dir, Seed: *seed,
		Conversations: *convs, MaxContext: *maxCtx, Docs: *docs, Questions: *questions, MinDoc: *minDoc, MaxDoc: *maxDoc,
		RecomputeModel: *recModel, RecomputeMax: *recMax, RecomputeMaxTokens: *recTok, Sweep: so, Progress: stderr, WarmBytes: int64(warm)}
	if *out != "" && *out != "none" {
		// Refuse an unwritable --out before minutes of measuring.
		if err := os.MkdirAll(*out, 0o755); err != nil {
			return fmt.Errorf("--out: %w", err)
		}
	}
	if o.Layers == 0 {
		o.Layers = 16
		if *wl == "long" {
			o.Layers = 2
		}
	}
	for _, v := range strings.Split(*conc, ",") {
		c, err := strconv.Atoi(strings.TrimSpace(v))
		if err != nil {
			return fmt.Errorf("--concurrency: bad level %q", v)
		}
		o.Concurrency = append(o.Concurrency, c)
	}
	for _, s := range strings.Split(*systems, ",") {
		if s = strings.TrimSpace(s); s != "" {
			o.Systems = append(o.Systems, s)
		}
	}
	res, err := compare.Run(o)
	if err != nil {
		return err
	}
	res.Commit = gitCommit()
	if *out != "none" {
		dir := *out
		if dir == "" {
			if dir, err = os.MkdirTemp("", "hcache-compare-"); err != nil {
				return err
			}
		}
		if err := compare.Write(res, dir, "hcache bench compare "+strings.Join(args, " ")); err != nil {
			return err
		}
		fmt.Fprintf(stderr, "report %s, plots and raw JSON beside it\n", res.Report)
	}
	if *asJSON {
		return printJSON(stdout, res)
	}
	fmt.Fprint(stdout, compare.Summary(res))
	return nil
}

// gitCommit names the commit of the working directory ("-dirty" with
// uncommitted changes), or "unknown" outside a git checkout.
func gitCommit() string {
	b, err := exec.Command("git", "rev-parse", "--short=12", "HEAD").Output()
	if err != nil {
		return "unknown"
	}
	c := strings.TrimSpace(string(b))
	if st, err := exec.Command("git", "status", "--porcelain", "--untracked-files=no").Output(); err == nil && len(strings.TrimSpace(string(st))) > 0 {
		c += "-dirty"
	}
	return c
}
