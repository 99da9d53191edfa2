// Package benchdaemon measures restores through hcached against the embedded
// library, in the same run on the same data (`hcache bench daemon`).
//
// # Method
//
// `hcache bench daemon --dir /tmp --model llama2-7b --tokens 512 --contexts 8 --rounds 4 --json`: llama2-7b rows, 8 contexts x 512 tokens = 128 MiB each, DRAM tier off; the two sides alternate restore by restore (ABBA) over the same contexts, and the embedded side copies each layer into a caller buffer as the daemon copies into the region. `daemon_inline_gbps` is the same client with the rows inline in the messages (what a TCP client gets).
//
// Figures (with their commands and raw JSON): bench/results/cpu-2026-12-03/README.md.
package benchdaemon
