// Package gpubench measures the CUDA backend on a GPU and checks it against
// the CPU reference: `hcache gpu check` (every preset shape), `hcache gpu
// lanes` (fp8 decoded on the device, restores at once) and
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
// # Lanes and fp8 on the device
//
// `hcache gpu lanes` (CheckLanes) checks what only a GPU shows of the
// restore lanes and of fp8 decoded on the device, through serve.Restorer
// from a store, for a preset's first layers stored hidden then KV: (a) a
// context under each fp8 codec restored with the rows decoded on the device
// (the restore is a gpu.DeviceDecoder: the copy moves the stored bytes,
// `copied_bytes`) must equal, bit for bit, the same restore through a
// backend wrapper that hides Encoded (serve decodes on the host, the device
// gets the model dtype), and the CPU backend's restore (hidden layers within
// CheckTolerance, KV exact); (b) N = the lanes, then twice the lanes,
// restores of different contexts (codecs none, fp8, fp8-block in turn) at
// once must each equal its restore alone, and N at once is timed against N
// in turn (rounds alternating the order; median and range of the ratio).
// The codec check's contexts are short (`--codec-tokens`, default at most
// 256): the CPU backend restores them too. With `--backend cpu` the same
// check runs on the host (`TestCheckLanesCPU`); `TestCheckLanesFindsFaults`
// gives it a CPU backend whose restores decode fp8 themselves, and a decode
// off by one bit, or a restore off by one bit only while another runs, fails
// it. It has not run on a GPU yet.
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
