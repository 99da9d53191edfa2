package gpubench

import (
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"

	"github.com/hcache/hcache/gpu"
	"github.com/hcache/hcache/gpu/cuda"
	"github.com/hcache/hcache/model"
)

// The IPC check: this process allocates a cache and exports it; a child
// process (the same binary, `hcache gpu ipc-child`) opens it by its CUDA IPC
// handle and restores hidden rows into it, as an hcache process would into a
// serving engine's cache; this process then checks the cache against the
// CPU backend.

const ipcBlockTokens = 16

func ipcShape(preset string, layers int) (*model.Config, error) {
	base, err := model.Preset(preset)
	if err != nil {
		return nil, err
	}
	c := *base
	c.Layers = min(c.Layers, layers)
	return &c, nil
}

// CheckIPC runs the IPC check for preset's shape (two layers) and returns
// it as a CheckResult named "<preset> via IPC".
func CheckIPC(opts cuda.Options, preset string, tokens int, seed int64) (CheckResult, error) {
	res := CheckResult{Preset: preset + " via IPC", Tokens: tokens}
	c, err := ipcShape(preset, 2)
	if err != nil {
		return res, err
	}
	res.DType, res.Layers = c.DType, c.Layers
	w := SynthKV(c, seed)
	b, err := cuda.Open(c, w, opts)
	if err != nil {
		return res, err
	}
	defer b.Close()
	blocks := (tokens + ipcBlockTokens - 1) / ipcBlockTokens
	cache, err := b.NewCache(c.Layers, blocks, ipcBlockTokens)
	if err != nil {
		return res, err
	}
	defer cache.Free()
	if err := cache.Poison(0xff); err != nil {
		return res, err
	}
	h, kOff, vOff, err := cache.ExportIPC()
	if err != nil {
		return res, err
	}
	exe, err := os.Executable()
	if err != nil {
		return res, err
	}
	cmd := exec.Command(exe, "gpu", "ipc-child", "--preset", preset, "--tokens", strconv.Itoa(tokens),
		"--seed", strconv.FormatInt(seed, 10), "--handle", h.String(), "--koff", joinInts(kOff), "--voff", joinInts(vOff),
		"--blocks", strconv.Itoa(blocks), "--cublas", opts.CublasPath, "--device", strconv.Itoa(opts.Device))
	if out, err := cmd.CombinedOutput(); err != nil {
		return res, fmt.Errorf("ipc child: %v: %s", err, out)
	}
	cpu, err := gpu.NewCPU(c, w)
	if err != nil {
		return res, err
	}
	rows := make([]byte, tokens*c.HiddenRowBytes())
	hostRows(c, rows, c.HiddenRowBytes(), seed)
	positions := make([]int, tokens)
	for i := range positions {
		positions[i] = i
	}
	lb := cache.LayerBytes()
	kb, vb := make([]byte, lb), make([]byte, lb)
	all := &errStats{}
	for l := 0; l < c.Layers; l++ {
		es, left, err := checkLayer(c, cpu, cache, l, rows, positions, positions, kb, vb)
		if err != nil {
			return res, err
		}
		res.Unwritten += left
		all.got, all.want = append(all.got, es.got...), append(all.want, es.want...)
	}
	res.MaxRelErr, res.MaxAbsErr = all.result()
	res.KVExact = true // no KV layer in this check
	res.OK = res.MaxRelErr < CheckTolerance && res.Unwritten == 0
	return res, nil
}

// IPCChild is the child's side: open the exported cache and restore every
// layer's hidden rows into it.
func IPCChild(opts cuda.Options, preset string, tokens int, seed int64, handle string, kOff, vOff []int64, blocks int) error {
	c, err := ipcShape(preset, len(kOff))
	if err != nil {
		return err
	}
	h, err := cuda.ParseIPCHandle(handle)
	if err != nil {
		return err
	}
	w := SynthKV(c, seed)
	b, err := cuda.Open(c, w, opts)
	if err != nil {
		return err
	}
	defer b.Close()
	table := make([]int, blocks)
	for i := range table {
		table[i] = i
	}
	cache, err := b.OpenIPCCache(h, kOff, vOff, blocks, ipcBlockTokens, table)
	if err != nil {
		return err
	}
	defer cache.Free()
	rows := make([]byte, tokens*c.HiddenRowBytes())
	hostRows(c, rows, c.HiddenRowBytes(), seed)
	positions := make([]int, tokens)
	for i := range positions {
		positions[i] = i
	}
	r, err := b.Begin(cache, positions)
	if err != nil {
		return err
	}
	for l := 0; l < c.Layers && err == nil; l++ {
		err = r.Hidden(l, rows, nil)
	}
	if _, werr := r.Wait(); err == nil {
		err = werr
	}
	return err
}

func joinInts(v []int64) string {
	s := make([]string, len(v))
	for i, x := range v {
		s[i] = strconv.FormatInt(x, 10)
	}
	return strings.Join(s, ",")
}

// ParseInts reads a comma-separated list of integers.
func ParseInts(s string) ([]int64, error) {
	var out []int64
	for _, f := range strings.Split(s, ",") {
		n, err := strconv.ParseInt(strings.TrimSpace(f), 10, 64)
		if err != nil {
			return nil, fmt.Errorf("%q is not a list of integers", s)
		}
		out = append(out, n)
	}
	return out, nil
}
