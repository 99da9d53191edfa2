// Package benchio measures sequential O_DIRECT bandwidth through an iouring
// engine and, in the same run, through fio with the same size, block size
// and queue depth.
//
// # Method
//
// `bench/benchio` and `bench/benchstore` compare the engine and the store with fio
// run in the same process with the same block size and queue depth, and
// with the disk's limit: the best point of a short fio sweep run in the
// same command (`bench/fio`: block sizes 256 KiB–2 MiB x queue depths 8–64,
// reads and writes, 2 s per point on a 1 GiB file by default, all settable
// with `--sweep-*`). fio's buffers come from a hugetlbfs mount
// (`--mem=mmaphuge`, found in `/proc/mounts` or given with `--sweep-huge`)
// when it has free huge pages for the point, otherwise anonymous memory
// aligned to 2 MiB (`--mem=mmap --iomem_align=2m`); each point records which.
// A ratio above 1 against the best-of means the sweep missed the disk's best,
// not that we beat the disk.
//
// Figures (with their commands and raw JSON): bench/results/cpu-2026-12-03/README.md.
package benchio
