package main

import (
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
	"time"

	"github.com/hcache/hcache/bench/gpubench"
	"github.com/hcache/hcache/gpu/cuda"
	"github.com/hcache/hcache/state"
)

func init() {
	register("gpu check", "CUDA backend against the CPU reference on every preset shape (needs a GPU)", gpuCheck)
	register("gpu ipc-child", "(used by gpu check) restore into another process's cache opened by its CUDA IPC handle", gpuIPCChild)
	register("gpu mixed", "mixed plans on the GPU: device recompute vs the CPU, scheduled-plan restore vs all-KV (needs a GPU)", gpuMixed)
	register("bench gpu", "restore into GPU memory: pipelined hidden vs copy-only vs KV offload (needs a GPU)", benchGPU)
}

func cudaFlags(fs interface {
	String(string, string, string) *string
	Int(string, int, string) *int
}) func() cuda.Options {
	cublas := fs.String("cublas", "", "libcublas path (default: $"+cuda.EnvCublas+", the loader's search, then the CUDA and PyTorch install directories)")
	device := fs.Int("device", 0, "CUDA device ordinal")
	slots := fs.Int("slots", cuda.DefaultSlots, "device staging buffers (layers in flight between copy and compute)")
	return func() cuda.Options { return cuda.Options{CublasPath: *cublas, Device: *device, Slots: *slots} }
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
			"Example:\n  hcache bench gpu --model llama2-7b --tokens 1024,4096,16384 --json\n\nflags:")
		fs.PrintDefaults()
	}
	opts := cudaFlags(fs)
	modelName := fs.String("model", "llama2-7b", "preset")
	tokens := fs.String("tokens", "1024,4096,16384", "comma-separated token counts")
	reps := fs.Int("reps", 7, "timed rounds after one warm-up round, each timing copy-only, hidden and KV once (order rotated); median and range reported")
	fromStore := fs.String("from-store", "", "also restore from a store created under this directory (on the disk to measure)")
	seed := fs.Int64("seed", 1, "random seed")
	asJSON := fs.Bool("json", false, "print JSON (one object per token count)")
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
	t0 := time.Now()
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
