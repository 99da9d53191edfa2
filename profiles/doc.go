// Package profiles holds platform profiles for the scheduler: the storage
// read bandwidth of each tier, host-to-device bandwidth, GEMM throughput,
// device memory bandwidth, and measured cost curves (recomputation,
// projection, KV load) as functions of the token count. Every figure carries
// its source. The shipped profiles are embedded so the CLI can name them
// (`--profile h200-nvme`); a path to a JSON file works as well.
//
// The package is a leaf: it knows nothing of models or the store; the
// scheduler (serve/sched) turns a profile and a model into per-layer costs.
//
// # Profiles
//
// (`profiles/*.json`, embedded with `go:embed`, so `--profile
// h200-nvme` names one; a path to a JSON file works too). Every figure is
// `{"value", "source"}`: storage tiers' read bandwidth, host-to-device
// bandwidth, GEMM rate, device memory bandwidth, a per-layer launch overhead,
// optionally `compute_efficiency`, optional decode rates by codec (`decode_gbps`
// is fp8's, as it always was; `codec_decode_gbps` holds `fp8-block` and `int8`;
// a codec without one is priced by the scheduler's conservative estimate,
// which another codec's measured rate can only cap, never stand in for), and optional measured curves (`recompute`,
// `project`, `kv_load`: ms for all layers of a named model at several token
// counts, interpolated as a power law between points and extended beyond them
// with the nearest segment's exponent, so a superlinear cost stays
// superlinear). The loader refuses unknown fields, empty sources, non-positive
// or non-finite values, unordered points, and a profile with neither a
// recompute curve nor an efficiency, naming the field
// (`profile h200-nvme: recompute.points[1].tokens: 512 does not increase...`).
// Shipped: `a100-pm9a3x4` (the paper's platform, from data sheets: A100 PCIe
// 312 TFLOP/s fp16 and 1,555 GB/s HBM, PCIe 4.0 x16, PM9A3 6.9 GB/s sequential
// read; tiers one-drive-per-GPU, 4-drive striped, DRAM; derived figures say how
// they were derived) and `h200-nvme` (the lent machine's figures as the JSON's
// sources cite them from the project's H200 measurements, copied with their
// source into `docs/gpu-measurements.md` (no raw output here): H2D 55 GB/s, NVMe 1.9
// GB/s, cuBLAS 850 TFLOP/s, Llama2-7B eager prefill 48.7 / 127.1 / 615.7 ms
// at 1K / 4K / 16K; inputs of the cost model, not results). `hcache profile --dir D --model M`
// measures one for this machine with the backend `--backend` selects (auto:
// CUDA when a device can be used, else the CPU one): store restore bandwidth
// on D with O_DIRECT (tier `dir`) and from the store's DRAM tier (tier `dram`),
// a host memory copy standing for H2D, each codec's host decode of M's hidden
// rows (`profiler.DecodeRates`), and the three curves for M at
// `--tokens`. A CUDA backend is timed through `gpu.Backend` (rows copied in,
// the cache copied back), an upper bound of its pipelined cost, and its H2D
// is not measured; only the CPU path has run (no GPU reached this branch).
package profiles
