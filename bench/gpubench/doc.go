// Package gpubench measures the CUDA backend on a GPU and checks it against
// the CPU reference: `hcache gpu check` (every preset shape) and
// `hcache bench gpu` (pipelined hidden restore against a copy-only baseline
// and KV offload, from pinned host memory or from a store on disk).
//
// # Plans from a store (issue 18)
//
// `hcache bench gpu --plan scheduled,hidden,kv,recompute --from-store DIR`
// (RunPlans) stores a context of each token count on DIR's disk under each
// plan (scheduled: what sched.Platform.Choose picks on --profile, the
// measured GPU profile h200-measured once committed, else h200-nvme) and
// restores it through serve.Restorer into a device cache (or, with
// --backend cpu, a host cache): one row per (tokens, plan) with the layer
// counts, the profile's prediction, restore_ms median and range over rounds
// in which every plan runs once in a rotated order, and disk_gbps from a
// no-op restore of the all-hidden context in the same rounds. The scheduled
// row has its ratio to the best other plan of each round (target <= 0.9 at
// 4K and 16K); all-recompute stores nothing (the store refuses a plan
// without a stored layer), so it times what serve runs for a recomputed
// prefix (BeginRestore, Recompute, Wait), and with --torch carries
// PyTorch's prefill of the same layers (scripts/torch_prefill.py: eager,
// scaled_dot_product_attention, CUDA events; RunTorch) and hcache's ratio to
// it (target <= 1.3). Weights are model.SynthesizeParallel (every tensor, in parallel);
// in the warm-up round each plan restores into a poisoned cache, and
// its first, last recomputed, first stored and last layers must hold no
// poison. Correctness against the CPU forward pass is `gpu mixed`'s.
//
// # How bench gpu times
//
// Copy-only, hidden and KV are timed once each per
// round, in an order rotated every round (copy, hidden, KV; hidden, KV, copy;
// ...), `--reps` rounds (default 7; `gpu-check.sh` 9) after one warm-up round;
// the JSON has each kind's median and range (`*_ms_spread`) and the hidden /
// copy and hidden / KV ratios taken within each round, their median and range
// (`hidden_over_copy_spread`). A drift of the machine during the run (clocks,
// another tenant) then falls on all three alike instead of on whichever batch
// ran last (`TestInterleaveCancelsDrift`: a steady drift that separate batches
// report as 1.6x comes out within 5% of 1.0). The H100 runs (bench/results/gpu-2026-11-27-h100.md) predate this.
package gpubench
