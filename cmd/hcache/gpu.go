package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"strconv"
	"strings"
	"time"

	"github.com/hcache/hcache/bench/gpubench"
	"github.com/hcache/hcache/gpu"
	"github.com/hcache/hcache/gpu/cuda"
	"github.com/hcache/hcache/internal/units"
	"github.com/hcache/hcache/profiles"
	"github.com/hcache/hcache/state"
)

func init() {
	register("gpu check", "CUDA backend against the CPU reference on every preset shape (needs a GPU)", gpuCheck)
	register("gpu ipc-child", "(used by gpu check) restore into another process's cache opened by its CUDA IPC handle", gpuIPCChild)
	register("gpu lanes", "fp8 states decoded on the device against decoded on the host, and N restores at once against each alone, from a store through serve (needs a GPU, or --backend cpu)", gpuLanes)
	register("gpu mixed", "mixed plans on the GPU: device recompute vs the CPU, scheduled-plan restore vs all-KV (needs a GPU)", gpuMixed)
	register("bench gpu", "restore into GPU memory: pipelined hidden vs copy-only vs KV offload; with --plan, scheduled/hidden/kv/recompute plans from a store (needs a GPU, or --backend cpu)", benchGPU)
}

// measuredGPUProfile is the shipped profile a GPU run of `hcache profile
// --backend cuda` is committed as (scripts/gpu-check.sh writes it to $OUT);
// fallbackGPUProfile is used until it exists.
const (
	measuredGPUProfile = "h200-measured"
	fallbackGPUProfile = "h200-nvme"
)

// defaultGPUProfile is the profile `bench gpu --plan` plans with when
// --profile is not given: the measured GPU profile when shipped, else
// h200-nvme.
func defaultGPUProfile() string {
	if _, err := profiles.Load(measuredGPUProfile); err == nil {
		return measuredGPUProfile
	}
	return fallbackGPUProfile
}

func cudaFlags(fs interface {
	String(string, string, string) *string
	Int(string, int, string) *int
	Var(flag.Value, string, string)
}) func() cuda.Options {
	cublas := fs.String("cublas", "", "libcublas path (default: $"+cuda.EnvCublas+", the loader's search, then the CUDA and PyTorch install directories)")
	device := fs.Int("device", 0, "CUDA device ordinal")
	slots := fs.Int("slots", cuda.DefaultSlots, "device staging buffers (layers in flight between copy and compute)")
	var restores restoresFlag
	var restoreMem restoreMemoryFlag
	fs.Var(&restores, "restores", fmt.Sprintf("run `N` restores at once on the CUDA backend, each on its own lane of streams and staging buffers, 1 to %d (default %d)", cuda.MaxRestores, cuda.DefaultRestores))
	fs.Var(&restoreMem, "restore-memory", "`SIZE` of device memory the CUDA backend's restore lanes may hold together, e.g. 8G (default: a quarter of the device's memory); a restore that would need more fails")
	return func() cuda.Options {
		return cuda.Options{CublasPath: *cublas, Device: *device, Slots: *slots, Restores: int(restores), RestoreMemory: int64(restoreMem)}
	}
}

// cudaOnlyFlags refuses the CUDA backend's lane flags (--restores,
// --restore-memory) with a backend that is not CUDA: they would be
// silently ignored.
func cudaOnlyFlags(fs *flag.FlagSet, backend string) error {
	if backend == gpu.SelectCUDA || backend == gpu.SelectAuto {
		return nil
	}
	var err error
	fs.Visit(func(f *flag.Flag) {
		if err == nil && (f.Name == "restores" || f.Name == "restore-memory") {
			err = fmt.Errorf("--%s is an option of the CUDA backend, not of --backend %s", f.Name, backend)
		}
	})
	return err
}

// restoresFlag is --restores: cuda.Options.Restores, checked when parsed.
type restoresFlag int

func (f *restoresFlag) String() string {
	if f == nil || *f == 0 {
		return ""
	}
	return strconv.Itoa(int(*f))
}

func (f *restoresFlag) Set(s string) error {
	n, err := strconv.Atoi(strings.TrimSpace(s))
	if err != nil || n < 1 || n > cuda.MaxRestores {
		return fmt.Errorf("%q: want how many restores run on the device at once, 1 to %d", s, cuda.MaxRestores)
	}
	*f = restoresFlag(n)
	return nil
}

// restoreMemoryFlag is --restore-memory: cuda.Options.RestoreMemory, a
// size (units.ParseSize), checked when parsed.
type restoreMemoryFlag int64

func (f *restoreMemoryFlag) String() string {
	if f == nil || *f == 0 {
		return ""
	}
	return units.FormatSize(int64(*f))
}

func (f *restoreMemoryFlag) Set(s string) error {
	n, err := units.ParseSize(strings.TrimSpace(s))
	if err != nil {
		return err
	}
	if n == 0 {
		return fmt.Errorf("%q: want a size of device memory such as 8G (leave the flag out for the default, a quarter of the device)", s)
	}
	*f = restoreMemoryFlag(n)
	return nil
}

func gpuCheck(args []string, stdout, stderr io.Writer) error {
	fs := newFlags("gpu check", stderr)
	fs.Usage = func() {
		fmt.Fprintln(stderr, "hcache gpu check: project random hidden rows of every preset's shape (two layers each) on the GPU\n"+
			"and on the CPU reference, through the pipelined device path and the host-cache path; KV layers must\n"+
			"scatter bit-exact and every element of the cache must be written. Exits 1 on any disagreement.\n\n"+
			"Example:\n  hcache gpu check --tokens 200 --json\n\nflags:")
		fs.PrintDefaults()
	}
	opts := cudaFlags(fs)
	tokens := fs.Int("tokens", 100, "tokens per check")
	seed := fs.Int64("seed", 1, "random seed")
	asJSON := fs.Bool("json", false, "print JSON")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	res, err := gpubench.Check(opts(), *tokens, *seed, stderr)
	if err != nil {
		return err
	}
	bad, err := reportChecks(stdout, *asJSON, res, func(r gpubench.CheckResult) bool { return r.OK }, fmt.Sprintf(" (tolerance %.0e)", gpubench.CheckTolerance))
	if err != nil {
		return err
	}
	if bad > 0 {
		return fmt.Errorf("%d preset shapes disagree with the CPU reference", bad)
	}
	return nil
}

func gpuMixed(args []string, stdout, stderr io.Writer) error {
	fs := newFlags("gpu mixed", stderr)
	fs.Usage = func() {
		fmt.Fprintln(stderr, "hcache gpu mixed: for every model family's tiny preset, the device's recompute of every layer against\n"+
			"the CPU forward pass, then a context saved to a store under a scheduled plan (recomputed prefix, hidden\n"+
			"and KV layers) restored into GPU memory through serve's pipeline against its all-KV restore. Exits 1\n"+
			"on any disagreement beyond the dtype's rounding.\n\n"+
			"Example:\n  hcache gpu mixed --tokens 200 --dir /tmp --json\n\nflags:")
		fs.PrintDefaults()
	}
	opts := cudaFlags(fs)
	tokens := fs.Int("tokens", 100, "tokens per context")
	dir := fs.String("dir", "", "directory of the temporary store (default: the system's temporary directory)")
	seed := fs.Int64("seed", 1, "random seed")
	asJSON := fs.Bool("json", false, "print JSON")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	res, err := gpubench.CheckMixed(opts(), *dir, *tokens, *seed, stderr)
	if err != nil {
		return err
	}
	bad, err := reportChecks(stdout, *asJSON, res, func(r gpubench.MixedResult) bool { return r.OK }, "")
	if err != nil {
		return err
	}
	if bad > 0 {
		return fmt.Errorf("%d presets' mixed-plan restores disagree", bad)
	}
	return nil
}

func gpuLanes(args []string, stdout, stderr io.Writer) error {
	fs := newFlags("gpu lanes", stderr)
	fs.Usage = func() {
		fmt.Fprintln(stderr, "hcache gpu lanes: what only a GPU shows of the restore lanes and fp8 decoded on the device, through\n"+
			"serve's pipeline from a store: (a) a context stored under fp8 and fp8-block (hidden layers, then KV layers)\n"+
			"restored with the rows decoded on the device (the copy moves the fp8 bytes, hc_fp8_dequant decodes) must\n"+
			"equal the same restore with the rows decoded on the host bit for bit, and the CPU backend's (hidden within\n"+
			"the projection's tolerance, KV exact); (b) N restores of different contexts at once (N = the lanes, then\n"+
			"twice the lanes; codecs none, fp8, fp8-block in turn) must each equal its restore alone; N at once is\n"+
			"timed against N in turn. Exits 1 on any disagreement.\n\n"+
			"Example:\n  hcache gpu lanes --model llama2-7b --layers 4 --tokens 1024 --codec-tokens 128 --dir /tmp --json\n"+
			"  hcache gpu lanes --backend cpu --tokens 64 --dir /tmp\n\nflags:")
		fs.PrintDefaults()
	}
	opts := cudaFlags(fs)
	modelName := fs.String("model", "tiny-llama", "preset")
	layers := fs.Int("layers", 0, "the preset's first N layers (0: all)")
	tokens := fs.Int("tokens", 256, "tokens per context of the concurrency check")
	codecTokens := fs.Int("codec-tokens", 0, "tokens per context of the codec check, which the CPU backend restores too (default: --tokens, at most 256)")
	dir := fs.String("dir", "", "directory of the temporary store (default: the system's temporary directory)")
	backend := fs.String("backend", "cuda", "cuda, or cpu (host caches; the CPU backend decodes on the host)")
	reps := fs.Int("reps", 3, "timed rounds of N in turn and N at once, after one checked round")
	seed := fs.Int64("seed", 1, "random seed")
	asJSON := fs.Bool("json", false, "print JSON")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if err := cudaOnlyFlags(fs, *backend); err != nil {
		return err
	}
	if *tokens <= 0 || *codecTokens < 0 || *layers < 0 || *reps <= 0 {
		return fmt.Errorf("--tokens %d, --codec-tokens %d, --layers %d, --reps %d: want positive tokens and rounds, layers >= 0", *tokens, *codecTokens, *layers, *reps)
	}
	res, err := gpubench.CheckLanes(gpubench.LanesOptions{Model: *modelName, Layers: *layers, Tokens: *tokens, CodecTokens: *codecTokens, Dir: *dir, Backend: *backend,
		Reps: *reps, Seed: *seed, CUDA: opts(), Progress: stderr})
	if err != nil {
		if errors.Is(err, cuda.ErrNoDevice) {
			return fmt.Errorf("%w (this command needs a GPU, or --backend cpu)", err)
		}
		return err
	}
	if *asJSON {
		if err := printJSON(stdout, res); err != nil {
			return err
		}
	} else {
		fmt.Fprintf(stdout, "%s, %d layers (hidden/kv %s), %d tokens (codec check %d) on %s, %d lanes\n", res.Model, res.Layers, res.Plan, res.Tokens, res.CodecTokens, res.Device, res.Lanes)
		for _, r := range res.Codecs {
			fmt.Fprintf(stdout, "  %-9s decoded on the device %-5v copied %d bytes (host-decoded %d): exact vs host decode %v (max err %.1e), vs cpu hidden %.1e (tolerance %.0e) kv exact %v: ok %v %s\n",
				r.Codec, r.DecodedOnDevice, r.CopiedBytes, r.HostDecodedBytes, r.Exact, r.MaxErrVsHost, r.HiddenErrVsCPU, r.HiddenTolerance, r.KVExactVsCPU, r.OK, r.Error)
		}
		for _, r := range res.Concurrency {
			fmt.Fprintf(stdout, "  %2d at once: each equal to its restore alone %v %v; %.2f ms at once, %.2f ms in turn, %.3fx [%.3f-%.3f]: ok %v %s\n",
				r.N, r.Equal, r.Mismatched, r.ConcurrentMS, r.SequentialMS, r.Ratio.Median, r.Ratio.Min, r.Ratio.Max, r.OK, r.Error)
		}
	}
	if res.Failed > 0 {
		return fmt.Errorf("%d lane checks failed", res.Failed)
	}
	return nil
}

// reportChecks counts the checks that did not pass and prints them as JSON
// ({"checks", "failed"}) or as a line of counts followed by note.
func reportChecks[T any](stdout io.Writer, asJSON bool, res []T, ok func(T) bool, note string) (int, error) {
	bad := 0
	for _, r := range res {
		if !ok(r) {
			bad++
		}
	}
	if asJSON {
		return bad, printJSON(stdout, map[string]any{"checks": res, "failed": bad})
	}
	_, err := fmt.Fprintf(stdout, "%d presets checked, %d failed%s\n", len(res), bad, note)
	return bad, err
}

func benchGPU(args []string, stdout, stderr io.Writer) error {
	fs := newFlags("bench gpu", stderr)
	fs.Usage = func() {
		fmt.Fprintln(stderr, "hcache bench gpu: restore a context into a paged KV cache in GPU memory, three ways, same run:\n"+
			"copy-only (the hidden bytes copied, nothing computed), pipelined hidden restore (copy, GEMM, fused\n"+
			"RoPE+scatter), and KV offload (K and V copied and scattered); checks the result against the CPU backend.\n\n"+
			"With --plan: a context of each token count stored under each plan (scheduled: the plan `hcache plan`\n"+
			"makes on --profile; hidden, kv, recompute: every layer so) on the disk of --from-store, restored through\n"+
			"serve's pipeline and the backend, plans interleaved with the order rotated each round; one row per\n"+
			"(tokens, plan): layer counts, restore_ms median and range, the disk's read speed in the same rounds,\n"+
			"the scheduled plan over the best other (target <= 0.9), and with --torch PyTorch's prefill of the\n"+
			"same layers beside the recompute row (target <= 1.3).\n\n"+
			"Example:\n  hcache bench gpu --model llama2-7b --tokens 1024,4096,16384 --json\n"+
			"  hcache bench gpu --model llama2-7b --plan scheduled,hidden,kv,recompute --from-store /data --tokens 1024,4096,16384 --torch scripts/torch_prefill.py --json\n"+
			"  hcache bench gpu --model demo-llama --backend cpu --plan scheduled,kv --from-store /tmp --tokens 64,128\n\nflags:")
		fs.PrintDefaults()
	}
	opts := cudaFlags(fs)
	modelName := fs.String("model", "llama2-7b", "preset")
	tokens := fs.String("tokens", "1024,4096,16384", "comma-separated token counts")
	reps := fs.Int("reps", 7, "timed rounds after one warm-up round, each timing copy-only, hidden and KV once (order rotated); median and range reported")
	fromStore := fs.String("from-store", "", "also restore from a store created under this directory (on the disk to measure)")
	seed := fs.Int64("seed", 1, "random seed")
	asJSON := fs.Bool("json", false, "print JSON (one object per token count)")
	plans := fs.String("plan", "", "comma-separated plans to restore from the store of --from-store: scheduled, hidden, kv, recompute (all: \"all\")")
	backend := fs.String("backend", "cuda", "with --plan: cuda, or cpu (a host cache; small models)")
	profile := fs.String("profile", "", "with --plan: the profile of the scheduled plan, shipped name or path (default: "+measuredGPUProfile+" when shipped, else "+fallbackGPUProfile+")")
	tier := fs.String("tier", "", "with --plan: storage tier of the profile (default: its first)")
	torchScript := fs.String("torch", "", "with --plan recompute: the PyTorch baseline script (scripts/torch_prefill.py) run for the same layers and tokens")
	torchPython := fs.String("torch-python", "/usr/bin/python3", "python with torch for --torch")
	torchDevice := fs.String("torch-device", "", "device of --torch: cuda or cpu (default: cuda with --backend cuda, else cpu)")
	torchReps := fs.Int("torch-reps", 5, "timed runs of --torch per token count (after one warm-up)")
	torchTimeout := fs.Duration("torch-timeout", 150*time.Second, "time limit of --torch (a failed baseline is reported in the rows, the benchmark goes on)")
	codecName := fs.String("codec", "none", "with fp8 or fp8-block: time one hidden layer's rows copied in the model dtype against the same rows copied under the codec and decoded on the device (checked against state/codec), instead of the restores")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	cd, err := state.ParseCodec(*codecName)
	if err != nil {
		return fmt.Errorf("--codec: %w", err)
	}
	var ts []int
	for _, f := range strings.Split(*tokens, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n <= 0 {
			return fmt.Errorf("--tokens: %q is not a positive count", f)
		}
		ts = append(ts, n)
	}
	if *plans == "" {
		// The flags of --plan alone would be silently ignored.
		var err error
		fs.Visit(func(f *flag.Flag) {
			switch f.Name {
			case "backend", "profile", "tier", "torch", "torch-python", "torch-device", "torch-reps", "torch-timeout":
				if err == nil && !(f.Name == "backend" && f.Value.String() == gpu.SelectCUDA) {
					err = fmt.Errorf("--%s applies with --plan only (without it, bench gpu compares copy-only, hidden and KV restores on the CUDA backend)", f.Name)
				}
			}
		})
		if err != nil {
			return err
		}
	}
	t0 := time.Now()
	if *plans != "" {
		if err := cudaOnlyFlags(fs, *backend); err != nil {
			return err
		}
		if cd != state.CodecNone {
			return errors.New("--plan and --codec are separate benchmarks: give one")
		}
		var kinds []string
		if *plans != "all" {
			for _, p := range strings.Split(*plans, ",") {
				kinds = append(kinds, strings.TrimSpace(p))
			}
		}
		pname := *profile
		if pname == "" {
			pname = defaultGPUProfile()
		}
		prof, err := profiles.Load(pname)
		if err != nil {
			return fmt.Errorf("--profile: %w", err)
		}
		o := gpubench.PlanOptions{Model: *modelName, Tokens: ts, Plans: kinds, Reps: *reps, Dir: *fromStore, Backend: *backend,
			Profile: prof, ProfileName: pname, Tier: *tier, Seed: *seed, CUDA: opts(), Progress: stderr}
		if *torchScript != "" {
			dev := *torchDevice
			if dev == "" {
				dev = "cpu"
				if *backend == "cuda" {
					dev = "cuda"
				}
			}
			o.Torch = &gpubench.TorchOptions{Python: *torchPython, Script: *torchScript, Device: dev, Reps: *torchReps, Timeout: *torchTimeout}
		}
		rows, err := gpubench.RunPlans(o)
		if err != nil {
			if errors.Is(err, cuda.ErrNoDevice) {
				return fmt.Errorf("%w (this command needs a GPU, or --backend cpu)", err)
			}
			return err
		}
		fmt.Fprintf(stderr, "bench gpu --plan: %v\n", time.Since(t0).Round(time.Millisecond))
		if *asJSON {
			return printJSON(stdout, rows)
		}
		printPlanRows(stdout, rows)
		return nil
	}
	if cd != state.CodecNone {
		res, err := gpubench.RunCodec(gpubench.Options{Model: *modelName, Tokens: ts, Reps: *reps, Seed: *seed, CUDA: opts(), Progress: stderr}, cd)
		if err != nil {
			if errors.Is(err, cuda.ErrNoDevice) {
				return fmt.Errorf("%w (this command needs a GPU)", err)
			}
			return err
		}
		if *asJSON {
			return printJSON(stdout, res)
		}
		for _, r := range res {
			fmt.Fprintf(stdout, "%s %d tokens on %s, one hidden layer, medians of %d rounds: copy %.3f ms, %s copy+decode %.3f ms (copy alone %.3f), %.3fx (target <= %.2f); %d layers: %.1f vs %.1f ms; output checked %v\n",
				r.Model, r.Tokens, r.Device, *reps, r.CopyMS, r.Codec, r.CodecMS, r.CodecCopyMS, r.Ratio, r.Target, r.Layers, r.AllLayersCopyMS, r.AllLayersCodecMS, r.Checked)
		}
		return nil
	}
	res, err := gpubench.Run(gpubench.Options{Model: *modelName, Tokens: ts, Reps: *reps, FromStore: *fromStore, Seed: *seed, CUDA: opts(), Progress: stderr})
	if err != nil {
		if errors.Is(err, cuda.ErrNoDevice) {
			return fmt.Errorf("%w (this command needs a GPU)", err)
		}
		return err
	}
	fmt.Fprintf(stderr, "bench gpu: %v\n", time.Since(t0).Round(time.Millisecond))
	if *asJSON {
		return printJSON(stdout, res)
	}
	for _, r := range res {
		fmt.Fprintf(stdout, "%s %d tokens on %s, medians of %d interleaved rounds: copy-only %.2f ms, hidden %.2f ms (%.3fx copy, range %.3f-%.3f), kv %.2f ms, max_rel_err %.1e\n",
			r.Model, r.Tokens, r.Device, r.Rounds, r.CopyOnlyMs, r.HiddenMs, r.HiddenVsCopy, r.HiddenVsCopyS.Min, r.HiddenVsCopyS.Max, r.KVMs, r.MaxRelErr)
	}
	return nil
}

func gpuIPCChild(args []string, stdout, stderr io.Writer) error {
	fs := newFlags("gpu ipc-child", stderr)
	opts := cudaFlags(fs)
	preset := fs.String("preset", "llama2-7b", "model preset (two layers of it)")
	tokens := fs.Int("tokens", 100, "tokens")
	seed := fs.Int64("seed", 1, "seed of the weights and rows (the parent's)")
	handle := fs.String("handle", "", "CUDA IPC handle of the parent's cache, hex")
	koff := fs.String("koff", "", "byte offsets of each layer's K in the allocation, comma-separated")
	voff := fs.String("voff", "", "byte offsets of each layer's V")
	blocks := fs.Int("blocks", 0, "blocks in the cache")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	k, err := gpubench.ParseInts(*koff)
	if err != nil {
		return fmt.Errorf("--koff: %w", err)
	}
	v, err := gpubench.ParseInts(*voff)
	if err != nil {
		return fmt.Errorf("--voff: %w", err)
	}
	return gpubench.IPCChild(opts(), *preset, *tokens, *seed, *handle, k, v, *blocks)
}

// printPlanRows prints the plan benchmark as a table: one line per (tokens,
// plan), the scheduled plan against the best other and the recompute
// against PyTorch with their targets.
func printPlanRows(w io.Writer, rows []gpubench.PlanRow) {
	fmt.Fprintf(w, "%-10s %7s %-9s %-8s %12s %16s %12s %9s %s\n", "model", "tokens", "plan", "r/h/kv", "restore_ms", "[min-max]", "predicted", "disk_GB/s", "vs")
	for _, r := range rows {
		vs := ""
		if r.OverBest != nil {
			vs = fmt.Sprintf("%.3fx best other [%.3f-%.3f] (target <= %.2f)", r.OverBest.Median, r.OverBest.Min, r.OverBest.Max, r.OverBestTarget)
		}
		if r.TorchMS > 0 {
			vs = fmt.Sprintf("torch %.2f ms, %.3fx (target <= %.2f)", r.TorchMS, r.OverTorch, r.TorchTarget)
		} else if r.TorchError != "" {
			vs = "torch failed: " + r.TorchError
		}
		if r.Unwritten != 0 {
			vs += fmt.Sprintf(" UNWRITTEN %d", r.Unwritten)
		}
		fmt.Fprintf(w, "%-10s %7d %-9s %-8s %12.2f %16s %12.2f %9.2f %s\n", r.Model, r.Tokens, r.Plan, fmt.Sprintf("%d/%d/%d", r.Recomputed, r.Hidden, r.KV),
			r.RestoreMS, fmt.Sprintf("[%.2f-%.2f]", r.RestoreSpread.Min, r.RestoreSpread.Max), r.PredictedMS, r.DiskGBps, vs)
	}
}
