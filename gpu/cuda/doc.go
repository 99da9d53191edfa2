// Package cuda is hcache's GPU projection backend. It loads the CUDA driver
// (libcuda.so.1) and cuBLAS (libcublas.so.13, else .12) at run time through
// purego, so the binary builds with CGO_ENABLED=0 and runs on machines
// without a GPU (Open then returns an error wrapping ErrNoDevice). Nothing
// touches CUDA before Open.
//
// A restore streams layers through two streams of its own lane (up to
// Options.Restores restores, default 4, run on a backend at once): a copy
// stream moves a
// layer's rows from (pinned) host memory into one of a few device staging
// slots; the compute stream, ordered after the copy by an event, runs one
// cublasGemmEx of the rows by the layer's K||V weights (fp16/bf16 in, fp32
// accumulate) and one fused kernel that adds the biases, applies the model's
// RoPE to K, rounds to the model dtype and scatters K and V into a paged KV
// cache through a block table ([blocks, block_tokens, kv_heads, head_dim],
// as vLLM lays it out). Layers saved as KV are copied and scattered. So
// layer l+1 copies while layer l computes, and the host buffer of a layer is
// handed back (its release called) as soon as its copy has completed.
//
// # Loading
//
// `cuda.Open` dlopens `libcuda.so.1` (driver API, `_v2` entry
// points) and cuBLAS through `github.com/ebitengine/purego`, so `go build`
// needs no CUDA toolkit and works with `CGO_ENABLED=0`, and nothing touches
// CUDA before the first `Open` (no `init()`). cuBLAS is looked for, in order:
// `--cublas` / `Options.CublasPath`, `$HCACHE_CUBLAS`, the loader's own search
// for `libcublas.so.13` then `.so.12`, then `cuda.CublasSearchDirs()`: the CUDA
// toolkit's `lib64` and `targets/x86_64-linux/lib` directories and the NVIDIA
// wheels PyTorch installs (`site-packages/nvidia/{cublas,cu13,cu12}/lib` under
// the usual Python prefixes, `/opt/*/.venv` included). Any failure (no driver
// library, no device, no cuBLAS, a symbol missing) is an error wrapping
// `cuda.ErrNoDevice` whose text starts `no CUDA device: ` and names the reason;
// `gpu.Select("auto", ...)` then returns the CPU backend with that reason.
// (`Select` lives in `gpu`, which imports no backend: `gpu/cuda` registers
// itself from its `init` (`gpu.Register`), and the binaries link it; `serve`
// and the daemon do not, `internal/importrules` checks.)
// Driver calls take their context per OS thread: every call runs on a locked
// thread with the device's primary context made current (the one cuBLAS uses).
// Everything whose address is passed to C is forced onto the heap (a goroutine
// stack may move between taking an address and the call).
//
// # Kernels
//
// `gpu/cuda/kernels/hcache.cu` is CUDA C written for clang without
// CUDA headers: `go generate` (or `make ptx`) runs `clang-19 -x cuda
// --cuda-device-only --cuda-gpu-arch=sm_80 -nocudainc -nocudalib -O3
// -ffp-contract=off -S`; the PTX is committed, embedded with `go:embed`, and
// JIT-compiled by the driver (`cuModuleLoadData`) for the card. `make lint`
// regenerates it and fails if the committed file is stale (CI installs
// clang-19). Two restore kernels, one block per token (the forward-pass
// kernels are below): `hc_project_scatter` adds the
// K/V biases to the GEMM output, rotates K (neox halves or interleaved pairs)
// with a cos/sin table, rounds to the model dtype (fp16, bf16 or fp32, with the
// same round-to-nearest-even bit algorithm as `internal/half`) and writes K and
// V to the token's slot through the block table; `hc_kv_scatter` copies a KV
// layer's rows into their slots. Without `-nocudalib` there is no libdevice, so
// there is no `cosf`: the table is computed in Go exactly as `tensor.Rope`
// computes its factors (float32 angle, float64 cos/sin rounded to float32) and
// uploaded once per backend, grown to the largest position seen.
//
// `kernels/codec.cu` (its own module, `codec.ptx`) is the fp8 decode:
// `hc_fp8_dequant`, one block per segment, E4M3 code times its float32 scale,
// rounded to the dtype, and a flag for bytes that are not an encoding. Its
// host build equals `state/codec.TranscodeRows` to the bit
// (`TestCodecKernelMatchesTranscode`, a mutated exponent bias fails it).
// `Backend.CodecCopy` times copy plus decode against the model-dtype copy on a
// device and checks the output (`hcache bench gpu --codec fp8`; it has not run
// on a GPU yet). The restore pipeline runs it: `Restore.Encoded` (the
// `gpu.DeviceDecoder` serve uses for fp8 states) copies a layer's rows as
// stored into a staging slot (the fp8 bytes: 0.254x the fp16 K||V row of
// Llama2-7B's hidden state) and, on the compute stream after the copy's
// event, launches `hc_fp8_dequant` into the lane's decode buffer (one block
// per segment: a hidden row one segment of hidden_size values, a KV row K
// then V segments of kv_dim) before the GEMM and `hc_project_scatter`, or
// `hc_kv_scatter`. The kernel's "not an encoding" flag is read back at
// `Wait`, which then fails. No GPU has run this path yet.
//
// # Tested without a GPU
//
// The same file is built for the host (`-x c++
// -DHCACHE_HOST`, a shared library loaded with purego in the tests, also
// `-ffp-contract=off`): its fp16/bf16 conversions equal `internal/half` on edge
// cases and 200 000 random bit patterns, and GEMM-in-Go plus the host kernels
// reproduce the CPU backend's `Project` and `LoadKV` to the bit for every
// family (fp16 neox, bf16 GQA with llama3 scaling, q/k/v biases, OPT without
// RoPE, fp32 interleaved with linear scaling), through a shuffled block table,
// at non-zero start positions and with 1 to 256 threads per block. Mutating an
// index or a sign in the kernel makes the test fail.
//
// # Restore pipeline
//
// A `Backend` holds, per model, each layer's K||V weight
// matrix `[2 kv_dim, hidden]` in the model dtype (uploaded once; exact, since
// the weights are dtype values) and its biases, and up to `Options.Restores`
// lanes (`lane.go`), made when first needed and kept until `Close`: two
// non-blocking streams, a cuBLAS handle bound to the lane's compute stream,
// `Slots` (3) device staging buffers, one float32 GEMM output, the positions,
// a decode buffer and the recompute buffers. Every lane buffer counts against
// `Options.RestoreMemory` (default a quarter of the device's memory; past it
// `Begin` fails with `ErrRestoreMemory` before queueing anything). The RoPE
// table is shared and reference-counted: a restore needing more positions
// makes a larger one, and the old table is freed when the last restore
// holding it ends. `Begin(cache, positions)` takes an idle lane (waiting while
// all are in use) and starts a restore into a
// `Cache` — K and V per layer, `[blocks, block_tokens, kv_heads, head_dim]`,
// plus a block table: allocated by the backend (`NewCache`) or the caller's
// own device memory (`WrapCache`, pointers from a serving engine) — and for
// each layer:
//
//  1. copy stream: wait until the slot's previous layer has been consumed,
//     `cuMemcpyHtoDAsync` the rows into the slot, record copied;
//  2. compute stream: wait copied; `cublasGemmEx` (fp16/bf16 in, fp32
//     accumulate and out, `CUBLAS_COMPUTE_32F`) of the rows `[n, hidden]` by the
//     weights; the fused kernel; record done;
//  3. a releaser goroutine waits on copied and calls the layer's `release`.
//
// So layer l+1 copies while layer l computes, and the host buffer goes back as
// soon as its copy has read it. `Wait` joins both streams, waits for every
// release, returns the device time and hands the lane back. `Concurrency()` is
// `Options.Restores`, so serve's Restorer runs that many restores side by side
// (`LoadRecompute`, `CodecCopy` and `Close` wait for every lane to be idle).
//
// The driver calls of this path (memory, streams, events, asynchronous
// copies, launches, GEMMs) go through `devOps` (`devops.go`): `cudaOps` on a
// GPU; in the tests `simDev`, a model of streams and events in which each
// queued operation runs only when a seeded scheduler picks it (streams at
// uneven speeds, copies that run only when someone synchronises, or nothing
// at all until the test thaws it), kernels through their host builds with the
// very parameter arrays built for `cuLaunchKernel`, GEMMs in Go. It records
// a copy that overwrites bytes an operation queued before it has still to
// read. `TestRestoreLanesMatchCPU` runs several restores at once (more than
// the lanes), hidden and KV layers in random order, codec none, fp8 per token
// and per block, five model families, and requires the CPU backend's caches
// to the bit; `TestRestoreSubmitSequence` checks what each stream queues
// (waits, copies of the encoded size, the dequantize grid and geometry, the
// GEMM shape, the scatter grid, events); `TestReleaseWaitsForCopy` that no
// buffer goes back before its copy ran; `TestRecomputeOnLanes` a mixed plan
// (device recompute, then stored layers) on two lanes at once against
// `model.Prefill` (within `RecomputeTolerance`) and the CPU backend (to the
// bit); `TestRestoreRefusals` bad options, rows of the wrong size, bytes that
// are not an encoding and the memory bound. Dropping the slot wait, the
// copy-to-compute wait or the releaser's wait, or decoding fp8-block rows with
// the per-token geometry, fails them.
//
// # Hand-off from the store
//
// How chunk.Store.RestoreOwned hands each restore buffer over, and how its ReadBuffers hooks (the backend's HostRegister / HostUnregister) pin each buffer once so the copy reads it in place, is described with the store (docs/engine.md, "Hand-off from the store"). serve.Restorer with a *cuda.Cache as the request's Dst joins the two (BeginRestore of a device cache is Begin). A gpu.HostCache on cuda.Backend takes the checked host path (each layer copied in, computed, copied back; no recompute), so the CPU-shaped serve.Restore, the daemon's projection and the checks can use it.
//
// # Measured
//
// The H100 runs (`scripts/gpu-check.sh`), their figures, commands and raw JSON are in bench/results/gpu-2026-11-27-h100.md; how `bench gpu` times is in package bench/gpubench.
//
// # Another process's cache
//
// `Cache.ExportIPC` gives a CUDA IPC handle of a
// cache's allocation and each layer's K/V offsets in it; `OpenIPCCache` opens
// such a handle (one a serving engine made with `cudaIpcGetMemHandle` too) as a
// cache to restore into. The 64-byte handle is passed by value, which the SysV
// ABI puts on the stack after the register arguments; `gpu check` proves it on
// the GPU by having a child process restore into the parent's cache. The IPC
// entry points are optional: a driver without them runs everything else.
//
// # Recomputing the prefix on the device
//
// Recomputing the prefix on the device (issue 18: built and host-tested;
// no GPU has run it yet). `serve.Restorer` runs every plan the scheduler
// emits into a device cache: `Restore.Recompute` is queued on the compute
// stream first, and the stored layers' copies overlap it on the copy stream;
// no path refuses recomputed layers. `hcache gpu mixed` (step 5 of
// `scripts/gpu-check.sh`) checks it on a GPU: `CheckRecompute` of every layer,
// then a scheduled plan restored from a store against the all-KV restore. The loop of
// `Model.layers` (`model/forward.go`) runs on the compute stream as
// `fwdPass.run` (`gpu/cuda/forward.go`): GEMMs by `cublasGemmEx` (model-dtype
// inputs, float32 out), everything between them by seven more kernels in
// `hcache.cu`: `hc_embed` (token rows, plus OPT's learned positions at offset
// 2), `hc_norm` (RMSNorm or LayerNorm, one block per row, float32 sums through a
// shared-memory tree, the inverse root as the CPU takes it, float64), `hc_qrope`
// (Q's bias and RoPE, project_token's arithmetic), `hc_attention`,
// `hc_residual` (x += y + bias), `hc_swiglu` (silu(gate) x up) and
// `hc_bias_act` (bias then ReLU, or GELU's tanh form). Each layer: norm, the
// K||V GEMM by the weights the hidden restore already holds, and
// `hc_project_scatter` writing K and V where a restore of that layer would;
// the last recomputed layer stops there (as `Model.Prefill`); the others go on
// through the Q GEMM, `hc_qrope`, attention over the cache just written, the
// output GEMM, residual, norm, the MLP GEMMs and residual. The residual stream
// and GEMM outputs are float32; what feeds a GEMM (normed rows, attention
// output, MLP activation) is stored in the model dtype, which is the one
// numerical difference from the CPU (which keeps the latter two in float32).
// `hc_attention` is FlashAttention-2-shaped: a block takes 64 consecutive
// queries of one head (GQA: KV head h / (heads / kv_heads)), each thread one
// query with q and a float32 accumulator in registers; K/V tiles (32 positions,
// 16 at head_dim 128) come from the paged cache through the block table into
// shared memory, and each thread folds the positions up to its own into a
// running max and sum: no n x n buffer. Head dims 16, 32, 64, 128. It uses no
// tensor cores, and head_dim 128 spills one 128-float array to local memory:
// its speed against PyTorch's SDPA is for the first GPU run to measure. There
// is no libdevice, so exp is Go's `math.Exp` algorithm in float64 in the
// kernel source (`hc_exp`); SiLU from it equals `tensor.SiLU` to the bit.
//
// `Backend.LoadRecompute(w, layers)` uploads, once, the embeddings and the
// first `layers` layers' attention, MLP and norm weights, refusing before
// allocating anything when they exceed `Options.RecomputeMemory` (default half
// the device's memory; `ErrRecomputeMemory`). `Restore.Recompute(tokens,
// layers)` queues the pass inside a restore whose positions are 0..n-1, so
// stored layers submitted after it copy while it computes (their GEMMs queue
// behind it on the one compute stream). `CheckRecompute` is the GPU machine's
// check: a synthetic model recomputed into a poisoned cache with a shuffled
// block table, every layer's K and V against `model.Prefill`.
//
// Kernel arguments: each new kernel takes one struct; its fields are listed
// once in the .cu (`HC_*_FIELDS`), and the host build exports every field's
// name, offset and size, which `TestFwdArgLayout` compares with the Go
// structs (`embedArgs` ...); `hc_project_scatter`'s per-parameter list is read
// back by a host entry in the kernel's order; and `TestPTXParams` (no clang
// needed) reads the committed PTX's parameter declarations and checks them
// against the Go structs' sizes, and the restore kernels' against the fields
// their launches point at. On the host, `hc_host_grid` runs
// a launch's blocks in turn and a block's threads as pthreads meeting at a
// real barrier, with shared memory filled with NaNs, and `fwdPass.run` itself
// runs there (host launches, Go GEMM): `TestRecomputeMatchesPrefill` checks
// every layer's normed hidden states and K/V against `model.Prefill`, and that
// nothing else in the cache was written, for Llama fp16 neox, bf16 GQA 4:1
// with llama3 scaling, Qwen2 (q/k/v biases, GQA 3:1), OPT (LayerNorm, ReLU,
// biases, learned positions; fp16 and fp32), fp32 interleaved with linear
// scaling, head dims 16, 32, 64 and 128. Tolerance (`RecomputeTolerance`, of the
// layer's largest value): fp16 6e-3, bf16 3e-2, fp32 5e-6; measured at most
// 1e-3, 5e-3, 4e-7; layer 0 of the fp16/bf16 models is usually bit-exact. The
// elementwise kernels (embedding, Q bias/RoPE, residual, SwiGLU, bias+ReLU) are
// checked bit-exact against the CPU arithmetic; exp, SiLU and fp16/bf16
// widening (all 65 536 patterns) bit-exact; norms within 4e-6 of the row's
// largest value (float32) or one dtype step; attention within 2e-6 of the
// largest output or one dtype step. Removing a barrier, a wrong GQA mapping,
// an off-by-one causal mask, a dropped bias, a dropped epsilon or two swapped
// struct fields each fail a test. `go test -cover ./gpu/cuda` without a GPU:
// 8.0% of statements before the forward pass's host tests, 27.1% after;
// 23.9% before the restore path ran on the simulated device, 57.1% after.
// What stays GPU-only: loading the driver and cuBLAS (driver.go), cudaOps
// (each driver call itself), Open's module loading, CodecCopy, CUDA IPC,
// WrapCache's address checks and CheckRecompute.
//
// Not built: a separate recompute stream; fp8 fed to the GEMM directly
// (the decode writes the model dtype first).
package cuda
