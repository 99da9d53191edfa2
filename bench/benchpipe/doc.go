// Package benchpipe measures how well a restore pipelines: one context of a
// small model saved under a mixed plan is restored (a) with reads only, (b)
// with compute only (recomputation of the prefix, projection and KV loads
// from rows already in memory), and (c) through serve.Restorer, which
// overlaps them; the ratio (c) / max((a), (b)) is 1.0 for a perfect
// pipeline. The three run back to back in each round (in an order rotated
// every round); the reported ratio is the median over rounds of each
// round's ratio. Every pipelined restore is checked against the forward
// pass's cache bit for bit.
//
// # Method
//
// Measured (`hcache bench pipeline --json`: demo-llama, 512 tokens, 15
// rounds of I/O alone, compute alone and pipelined back to back in rotated
// order; `ratio` is the median of the rounds' pipelined / max(I/O, compute);
// `pipelined_backend_ms` is the pipelined restore's time in the backend, to
// set against `compute_alone_ms`). The plan is the scheduler's best mixed plan
// on a profile measured in the same run: hidden 1, kv 5 in every run of bench/results/cpu-2026-12-03/README.md (a
// layer's projection costs 49-153 ms on this loaded CPU against 0.18-1.4 ms to
// read its hidden rows, `plan_source` in each JSON, so every plan with hidden
// or recomputed layers is compute-bound).
//
// # Why the first builds did not overlap
//
// The first builds were slower pipelined than I/O and compute one after the
// other; a layer timeline showed why: the projection ran much slower beside
// the reads than alone, and the reads of the KV layers finished late. Three
// causes, fixed in turn: (1) the ring goroutine blocked in `io_uring_enter`
// kept its P for up to sysmon's 10 ms after each completion while the GEMM
// workers held the other, so a GEMM worker waited for a P and the reads were
// reaped late (the ring now sleeps in the netpoller, see package iouring); (2)
// the store read one layer ahead and verified on its reading goroutine, which
// then waited for a CPU behind the GEMM to start the next reads (reads now go
// deep, are submitted before the layer in front is handed over, and are
// verified on the consumer's side); (3) a fixed split of the GEMM rows made
// any stolen millisecond the whole product's (workers now claim row blocks).
// (Those development timings, and sixteen `ratio`s quoted here before, had no
// committed output and are gone.)
//
// Figures (with their commands and raw JSON): bench/results/cpu-2026-12-03/README.md.
package benchpipe
