// Package sched is the bubble-free scheduler of HCache: given a platform
// profile, a model and the expected context length, it chooses per layer what
// a context stores (nothing: recomputed from the tokens; the hidden state; or
// plain KV) so that on restore the I/O stream and the compute stream finish
// together. It also holds the plan helpers (DefaultPlan, PlanOf) that build
// state.LayerPlan values for a model; they live here, on the serving side, so
// that model and gpu do not link the storage engine.
//
// # Plans
//
// A context's plan (per layer: `LayerNone` = recompute, `LayerHidden`,
// `LayerKV`) is chosen once, when the context is first saved, and travels in its
// identity. `serve/sched` chooses it from a profile of the platform, the
// model and the expected context length.
//
// Profiles are described in package profiles (the JSON fields, the loader's checks, the shipped profiles, `hcache profile`).
//
// # Costs per layer
//
// Costs per layer (`Platform.Costs`, n tokens): T_rc (recompute: a curve
// scaled to the model by its FLOP ratio, matrices plus causal attention, or
// FLOPs / (GEMM x efficiency)); T_hc (projection: curve, or 4·n·d·kv_dim FLOPs
// at the GEMM rate plus RoPE/scatter bytes at memory bandwidth); T_kv (KV
// scatter); T_hio and T_kvio (row bytes / min(tier read, H2D): the read and the
// copy are pipelined by chunk, so the slower bounds).
//
// # The pipeline model
//
// The pipeline model (`sched.Simulate`) is what restore does: the compute
// stream first recomputes the r unstored layers (they need no reads), then
// takes the stored layers in order, each when its read is done; the I/O stream
// reads the stored layers back to back from time zero (restore buffers what
// arrives early). Predicted restore time = when the compute stream finishes.
// Stored layers are ordered hidden first, KV last: Johnson's rule for a
// two-stage flow shop (hidden layers are the compute-heavy jobs, KV layers the
// I/O-heavy ones), which a test confirms by also trying KV first on every
// profile: never faster. (Costs that no platform gives, a KV layer dearer to
// load than to read and a hidden one cheaper to project than to read, can
// make KV first faster; plans keep the fixed order regardless.)
//
// # The cost model against the CUDA backend
//
// Checked against the H100 runs of the CUDA backend: the figures, their commands and raw output are in bench/results/plan-2026-12-03/README.md.
//
// # The optimiser
//
// The optimiser (`sched.Optimise`): plans are splits `none^r hidden^h
// kv^k`. For each r it solves the steady-state balance of the two streams
// (r T_rc + (s-k) T_hc + k T_kv = (s-k) T_hio + k T_kvio, s = L - r) for k in
// closed form, once per context length, and evaluates the integers around
// each solution and the ends with the exact pipeline model. Hidden layers are
// allowed only when a hidden row is smaller than a K/V row (MHA): for GQA/MLA
// models a hidden layer reads more and computes more than a KV layer, so they
// get KV and recomputation only (a test checks that allowing hidden would not
// have helped). `ChooseFor` minimises the mean over a distribution of lengths (a weighted
// sum need not be minimal near any one length's balance point, so problems up
// to ~5e7 evaluations scan every k exactly; a seeded random case found this)
// (what `simulate` uses: one plan fixed for a workload). Tests: against a
// brute-force search over every split (hidden before KV, the order a plan
// has) on every profile x tier (plus a compute-poor variant) x 6 lengths x
// every preset and two extra shapes (624 cases), and 300 seeded random cost
// sets with mixed lengths: all within 2% (in practice equal).
//
// # Codecs
//
// `Platform.CostsCodec` prices a layer whose rows are stored under a codec:
// the reads and copies move the encoded bytes, and the projection and the KV
// load first decode them at the codec's own rate (`Platform.DecodeGBps`: the
// profile's `decode_gbps` for fp8, `codec_decode_gbps` for fp8-block and
// int8; without one an estimate: memory-bound at `mem_gbps` for the fp8
// codecs, int8's host decode through float32 at the slower of `mem_gbps`
// and `h2d_gbps`, and either no faster than the slowest rate the profile
// measured, so a profile with only the old `decode_gbps` chooses as before;
// `Costs.DecodeSource` names the figure). `ChooseCodec`
// runs the optimiser for every codec the caller allows and keeps the fastest
// (ties: fewer bytes); `PlanOfCodec` and `Split.PlanCodec` give the encoded row
// sizes. GQA presets choose KV in every codec (a test); MLA (`deepseek-v3`)
// stores its latent and rotary key (`kvRowBytes`; two segments under fp8,
// one row of 576 values with its scale area under int8: 640 bytes, what
// `codec.EncodeRows` takes),
// and its costs count the low-rank projections (the forward pass is not built).
//
// # Simulation
//
// Simulation (`hcache simulate --profile P --model M --workload chat|long
// --json`; the output of every figure of bench/results/simulate-2026-12-03/README.md,
// the `h200-nvme` ones included, is in `bench/results/simulate-2026-12-03/simulate.log`). Seeded workloads (`sched.Workloads`, seed 1 there):
//
//   - `chat`, ShareGPT-like: 400 conversations, turns geometric with mean 4 (at
//     most 20; assumption), prompt and answer lengths log-normal with means 161
//     and 338 tokens (ShareGPT as reported in the vLLM paper, Kwon et al.
//     SOSP 2023, Fig. 11) and sigma of the log 1.0 (assumption), a conversation
//     ends at 16K tokens; every turn after the first restores the history
//     (1,216 restores, mean context 2,101 tokens).
//   - `long`, L-Eval-like: 120 documents, length log-uniform in 4K-16K tokens
//     (the range issue 12 takes from L-Eval, An et al. 2023), 3-6 questions of
//     20-60 tokens with answers of 50-200 (assumptions); every question after the
//     first restores document and earlier turns (415 restores, mean 9,306 tokens).
//
// TTFT = predicted restore of the context + prefill of the new prompt on top
// (R(ctx+prompt) - R(ctx), R the full recomputation); `recompute` is
// R(ctx+prompt). Requests are served one at a time (no queueing). `scheduled`
// is one split chosen for the workload's length distribution (64 quantiles),
// allowed to store nothing. Storage is bytes per token over all layers.
//
// The figures of `hcache simulate` (every model and workload on `a100-pm9a3x4`, and `h200-nvme`), against the paper's, are in bench/results/simulate-2026-12-03/README.md.
//
// # Shared prefixes
//
// `hcache simulate prefix --workload chat|docqa|agent` (SimulatePrefix, in
// prefix.go) prices the requests of a shared-prefix workload
// (bench/prefixwl) with two hits each: what a restore by conversation id
// covers and what a lookup by tokens covers (group-aligned, or the named
// context's own tail). TTFT = restore of the hit + prefill of the rest; the
// figures are in bench/results/prefix-2026-12-03/README.md.
//
// # Limits
//
// Limits: the cost model ignores contention between concurrent restores and
// the store's per-group read granularity; the A100 profile is derived from data
// sheets, not measured; the CPU backend has no GPU forward, so a recomputed
// prefix on CPU is the float32 reference (`hcache demo` shows its cost).
package sched
