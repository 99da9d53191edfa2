// Package compare runs `hcache bench compare`: hcache against the systems a
// user would pick instead (package bench/peer), on seeded chat and
// long-document workloads, in the same run, against the disk's and memory's
// limits measured in that run; it prints JSON, draws plots and writes a
// Markdown report.
//
// # Systems
//
// `hcache bench compare` (`bench/compare`) runs hcache and what a user would
// pick instead on one seeded workload, one system after another, each on a
// fresh directory, at concurrency 1 and 16. Every system implements
// `bench/peer.System` (save tokens [from, to) of a context, restore its first
// n tokens layer by layer into host memory, bytes on disk); the round-trip
// test checks each byte of every peer.
//
//	| system | what it is |
//	| `hcache` | the store with `sched.DefaultPlan` (hidden states for MHA, KV for GQA), O_DIRECT, DRAM tier off |
//	| `hcache-kv` | the same store keeping K‖V rows: isolates the representation |
//	| `hcache-dram` | `hcache` with a DRAM tier that holds every context |
//	| `file-per-chunk` | LMCache's local-disk backend: a file per 256-token chunk of all layers, buffered writes without fsync, no index |
//	| `pebble-blob` | a value per (256-token chunk, layer) in Pebble, each save one batch committed with Sync |
//	| `redis` | Debian's `redis-server`, started by the benchmark on a unix socket, persistence off, a key per 256-token chunk (LMCache's remote backend), `go-redis` |
//	| `recompute` | the CPU reference forward pass over the whole context, on a small preset (`--recompute-model`, first `--recompute-max` restores): its times are that shape's |
//	| `limit-disk`, `limit-dram` | each restore's hcache bytes at the fio best-of read bandwidth, and at one core's memory-copy bandwidth |
//
// # Rules that keep it fair
//
// a restore ends when the last layer is in host
// memory, verified where the system verifies (ready for the copy to a GPU);
// hcache's K/V projection is not in it, since on a GPU it overlaps the next
// layer's read (the H100 runs, bench/results/gpu-2026-11-27-h100.md: the hidden restore within a few percent
// of its copy alone, `bench/results/gpu-2026-11-27-h100*/llama2-7b.json`), and the CPU projection would
// measure a scalar Go GEMM rather than the store. Peers that read through the
// page cache have it dropped for the context (`fdatasync` + `posix_fadvise
// DONTNEED`; Pebble's memtable flushed first) before each timed restore,
// untimed; hcache reads with O_DIRECT. Rows for saves come from a seeded pool
// and the time spent producing them is subtracted. `burst` restores every
// context once, c at a time, after the trace. Bytes on disk: hcache counts
// live record bytes plus the index (segments are preallocated), the others
// their files, in allocated bytes (`st_blocks`; a file a compaction deletes
// during the walk is skipped); redis reports memory instead.
//
// # Workloads and output
//
// Workloads (`bench/compare/workload.go`; real data sets cannot be had here):
// chat is ShareGPT-shaped: turns 1 + geometric with mean 3.51 (ShareGPT:
// Yan et al., ShareChat, arXiv 2512.17843, Table 1), prompt and answer
// lengths lognormal with means 161.31 and 337.99 tokens (Kwon et al., vLLM,
// SOSP 2023, §6.1), sigma 1.0 (ours), every turn restoring the whole context
// so far and saving the new tokens; long is L-Eval-shaped: documents of
// uniform 4K–16K tokens saved once, about 4 questions each (L-Eval: 508
// documents, >2,000 questions), each restoring the whole document; the
// questions are then asked again while new documents are saved among them
// (one save per 4 questions), and once more alone, so that every row has
// restores alone and with saves in the mix at the same concurrency (each
// row's `phases`, with hcache's per-stage restore times; the system
// `hcache-noprio`, run only when named, is hcache with the restore
// admission and write bounds of issue 20 turned off). To fit
// this 2-core, 24 GiB machine in a few minutes the models keep 16 (chat) or 2
// (long) of their layers at full row width (`--layers`); every report says
// so. Output: `--out DIR` (default a new temporary directory, named when the
// run ends; `make bench-compare` uses `bench/results/`): a Markdown report, the
// raw JSON (the result and every timed request) and the plots, every file named
// `<date>-<model>-<workload>-<run id>` so that no run overwrites another. The
// report opens with a verdict computed from the rows (`compare.Verdict`: the
// fastest system at each concurrency and by how much, hcache from disk against
// the fastest disk peer, bytes against KV, when hcache is the wrong choice),
// then the figures, the setup, the table, the design targets, and every ratio
// last; the command prints the verdict unless `--json`. Plots: one colour
// (Okabe-Ito) and marker per system, the same in every plot; a faint point per
// request and a line through binned medians; the legend in a column beside the
// axes; the CPU recompute peer (another, tiny model) only in the table.
//
// Figures of the 2026-11-27 runs, their reports and raw JSON: bench/results/compare-2026-11-27.md.
package compare
