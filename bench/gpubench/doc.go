// Package gpubench measures the CUDA backend on a GPU and checks it against
// the CPU reference: `hcache gpu check` (every preset shape) and
// `hcache bench gpu` (pipelined hidden restore against a copy-only baseline
// and KV offload, from pinned host memory or from a store on disk).
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
