package gpubench

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os/exec"
	"strconv"
	"strings"
	"time"

	"github.com/hcache/hcache/model"
)

// TorchOptions run the PyTorch prefill baseline (scripts/torch_prefill.py).
type TorchOptions struct {
	Python string // default /usr/bin/python3
	Script string // path of torch_prefill.py
	Device string // "cuda" (default) or "cpu"
	// DType: "fp16", "bf16" or "fp32"; default the model's dtype on cuda,
	// fp32 on the CPU (PyTorch's CPU GEMMs lack half precision).
	DType   string
	Reps    int           // timed runs per token count (default 5)
	Timeout time.Duration // default 5 minutes
}

// TorchResult is the script's JSON.
type TorchResult struct {
	Script    string         `json:"script"`
	Torch     string         `json:"torch"`
	Device    string         `json:"device"`
	DType     string         `json:"dtype"`
	Attention string         `json:"attention"`
	Timer     string         `json:"timer"`
	Shape     map[string]any `json:"shape"`
	Rows      []TorchRow     `json:"rows"`
}

// TorchRow is one token count of the baseline.
type TorchRow struct {
	Tokens  int       `json:"tokens"`
	Layers  int       `json:"layers"`
	MS      Spread    `json:"ms"`
	Samples []float64 `json:"samples_ms"`
	Finite  bool      `json:"finite"` // the output held no NaN or Inf (timing does not depend on it)
}

// At returns the baseline's time at n tokens.
func (r *TorchResult) At(n int) (Spread, bool) {
	if r == nil {
		return Spread{}, false
	}
	for _, row := range r.Rows {
		if row.Tokens == n {
			return row.MS, true
		}
	}
	return Spread{}, false
}

// torchDType names c's dtype as the script does.
func torchDType(c *model.Config) string {
	switch c.DType {
	case "bfloat16":
		return "bf16"
	case "float32":
		return "fp32"
	}
	return "fp16"
}

// TorchArgs is the script's command line for layers layers of c's shape
// (a Llama-style layer: what the baseline models; c's qkv bias is kept).
func TorchArgs(o TorchOptions, c *model.Config, layers int, tokens []int) []string {
	ts := make([]string, len(tokens))
	for i, t := range tokens {
		ts[i] = strconv.Itoa(t)
	}
	dev, dt := o.Device, o.DType
	if dev == "" {
		dev = "cuda"
	}
	if dt == "" {
		dt = torchDType(c)
		if dev == "cpu" {
			dt = "fp32"
		}
	}
	reps := o.Reps
	if reps <= 0 {
		reps = 5
	}
	args := []string{o.Script,
		"--hidden", strconv.Itoa(c.HiddenSize), "--heads", strconv.Itoa(c.Heads), "--kv-heads", strconv.Itoa(c.KVHeads),
		"--head-dim", strconv.Itoa(c.HeadDim), "--intermediate", strconv.Itoa(c.Intermediate), "--layers", strconv.Itoa(layers),
		"--vocab", strconv.Itoa(c.Vocab), "--rope-theta", strconv.FormatFloat(float64(c.RopeTheta), 'g', -1, 64),
		"--tokens", strings.Join(ts, ","), "--reps", strconv.Itoa(reps), "--device", dev, "--dtype", dt}
	if c.QKVBias {
		args = append(args, "--qkv-bias")
	}
	return args
}

// RunTorch runs the PyTorch baseline for layers layers of c at each token
// count and parses its JSON; an error names the script's last output.
func RunTorch(o TorchOptions, c *model.Config, layers int, tokens []int) (*TorchResult, error) {
	if o.Script == "" {
		return nil, fmt.Errorf("torch baseline: no script")
	}
	py := o.Python
	if py == "" {
		py = "/usr/bin/python3"
	}
	to := o.Timeout
	if to <= 0 {
		to = 5 * time.Minute
	}
	ctx, cancel := context.WithTimeout(context.Background(), to)
	defer cancel()
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, py, TorchArgs(o, c, layers, tokens)...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return nil, fmt.Errorf("torch baseline %s %s: %w: %s", py, o.Script, err, tail(stderr.String(), 600))
	}
	return ParseTorch(stdout.Bytes(), layers, tokens)
}

// ParseTorch reads the script's JSON and checks that it has a row of the
// layers for every token count, with positive times.
func ParseTorch(data []byte, layers int, tokens []int) (*TorchResult, error) {
	var r TorchResult
	if err := json.Unmarshal(data, &r); err != nil {
		return nil, fmt.Errorf("torch baseline: output is not its JSON: %w: %q", err, tail(string(data), 200))
	}
	for _, n := range tokens {
		found := false
		for _, row := range r.Rows {
			if row.Tokens != n {
				continue
			}
			found = true
			if row.Layers != layers || row.MS.N <= 0 || !(row.MS.Median > 0) || row.MS.Min > row.MS.Median || row.MS.Median > row.MS.Max {
				return nil, fmt.Errorf("torch baseline: row of %d tokens is malformed: %d layers (want %d), ms %+v", n, row.Layers, layers, row.MS)
			}
		}
		if !found {
			return nil, fmt.Errorf("torch baseline: no row for %d tokens", n)
		}
	}
	return &r, nil
}

func tail(s string, n int) string {
	s = strings.TrimSpace(s)
	if len(s) > n {
		return "..." + s[len(s)-n:]
	}
	return s
}
