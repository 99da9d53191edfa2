// Package crash is hcache's crash-consistency harness. It drives the chunk
// store with a seeded workload (creates, prefill- and decode-style appends,
// flushes, deletes, GC), simulates a power cut at every sync point (and at
// random writes in between) by cloning Pebble's crashable MemFS with a random
// share of unsynced data kept, reopens each clone and checks it against a
// model of what was acknowledged: every flushed context restores
// byte-identical (at least as many tokens as acknowledged, never more than
// appended), nothing restores torn, and fsck is clean. A second mode runs the
// store in a child process on real files, kills it with SIGKILL at random
// times and checks the same property against the acknowledgements it printed.
//
// # Power cuts
//
// `fuzz/crash`: simulated power cuts at every sync point and at random writes
// (Pebble's `CrashClone` keeping a random share of unsynced data), torn
// writes, checks against a model of acknowledgements; plus SIGKILL of a real
// writer process. It found four bugs while being written (an unfinished store
// creation that could not reopen; a `Flush` that returned after an unsynced
// commit; `Close` after a failed `Close` returning nil; a harness error).
//
// # Repair checks
//
// The crash harness also checks repair: at every third simulated crash
// point the clone loses its index, `chunk.Repair` rebuilds it, and the same
// acknowledgements must hold (`repair_checks` in its report). Writing that
// check found that repair of a store with no record forgot its chunk size.
//
// # Determinism
//
// The simulation is deterministic: `crashtest --seed S` (and `HCACHE_SEED=S`
// for the seeded tests in `fuzz/crash`) replays the same operations, crash
// points and report, byte for byte (`--kill 0`; the SIGKILL cycles depend on
// timing). GC, eviction (`Store.EvictOne`: least recently used until one
// context holding bytes has gone) and restores on the running store are
// seeded operations, not timers; the store's clock is the workload's
// (`Options.Now`); the store runs `Options.Synchronous` (a test seam: each
// call that hands work to the flusher returns once the flusher is still, and
// the flusher never commits merely because it is idle; a third of the cycles
// set `CommitBytes` 1 to commit after every write, a third 16 KiB); segments
// are synced in id order; and the crash clone draws which unsynced entries
// and 4 KiB blocks survive per path (a generator seeded by the crash point
// and the path) from a 0% and a 100% clone (Pebble's `CrashClone` draws in
// map order, so one seed gave another state each run; and draws shared
// across paths shifted when Pebble's own goroutine had or had not yet
// deleted an obsolete file). Pebble writes no table during a cycle at this size (the index
// stays in its first memtable; `TestSimulatedReplays` fails if it does), so
// the index's crash points are the WAL, MANIFEST and directory syncs of
// hcache's commits. The report's `trace` is a digest of every crash point,
// a CRC of the crashed state (every file's bytes; Pebble's WAL by length,
// as the store fills a batch from maps; Pebble's obsolete MANIFEST, OPTIONS
// and WAL files left out, as Pebble deletes them on its own goroutine after
// it opens) and what it found; `--trace FILE`
// writes the lines. With Pebble's clone, or without `Synchronous`,
// `TestSimulatedReplays` fails; segments synced in map order gave
// `--seed 698302 --cycles 10` two traces.
//
// # Metamorphic configurations
//
// Metamorphic (`crashtest --metamorphic`, `TestSimulatedMetamorphic`): the
// same seeded operations run on in-memory configurations (chunk groups of 3,
// 8, 16 and 64 tokens, lz4 on and off, DRAM cache on and off, GC live ratio
// 0.1/0.6/0.95) with crash points, and on real files (no crash points: the
// crash clone needs the in-memory file system) with io_uring or the
// fallback engine, O_DIRECT or buffered; every configuration must keep its
// acknowledgements and end each cycle with the same contexts restoring the
// same bytes. Injected torn writes are left out there (their place depends
// on the configuration). It found a bug the other tests had missed: with
// O_DIRECT and the DRAM cache both on, a direct read rounded up to whole
// blocks overwrote DRAM-tier hits already copied into the layer's buffer,
// and restores served rows that were not the context's (seed 457033,
// `TestSimulatedDirectCache`; `chunk`'s
// `TestCacheHitsNotOverwrittenByDirectReads`). Hits are now copied once
// the fetch's reads have landed.
//
// # Token-addressed contexts
//
// SimOptions.Prefix (TestSimulatedPrefixCrashes) adds contexts of namespace
// "tok" saved by tokens (chunk.Store.CreateTokens): prompts of three base
// documents, so their prefixes are shared, extended by prefill or by decode
// with token ids and sometimes branched; forks (Store.Fork) of
// acknowledged prefixes; deletes of one sharer. Rows are a function of each
// position's token prefix (TokLayerRows), so a byte served for other tokens
// is caught. At every crash point, and after repair, each context restores
// by name within its acknowledged and appended counts, and by its tokens
// (naming it) at least its acknowledged count, every row the request's
// own; fsck checks the shared groups' reference counts against the
// contexts' chains. Off (the default), a seed replays the operations it
// always did. Writing it found that a delete rolled forward at open did not
// release the context's shared groups (fsck: counts off, groups no chain
// reaches).
//
// `hcache crashtest --prefix` runs it, with progress (operations done) and a
// summary of the token-addressed contexts saved, forked and found shared.
// Run longer (`--seed 11 --cycles 6 --sync-prob 0.05 --write-crash-prob 0`)
// it found that repair drops an acknowledged context whose tail (or tip)
// record a GC reclaimed once a newer group was whole, before a newer record
// named it (TestRepairKeepsSupersededName; TestSimulatedPrefixCrashes
// failed by it with HCACHE_SEED=22181).
//
// # Adversarial operations
//
// SimOptions.Adversarial (`crashtest --adversarial`,
// TestSimulatedAdversarial) adds operations a client may do that the
// workload otherwise never does, on 8% of the operations, each checked
// against an exact prediction on the running store: a writer abandoned
// (Writer.Abandon, a client gone) and reopened by name, whose Append must
// report max(acknowledged, whole groups appended) tokens, or by its tokens
// under a new id, whose CreateTokens must find exactly the whole groups
// stored; a restore (by name, or by tokens naming the context) during
// which the context is deleted and a GC runs, which must still serve its
// rows, the delete succeed and a later restore find nothing; forks of
// forks, of zero tokens up to all acknowledged ones; and forks the store
// must refuse (of a context being written: ErrBusy; past a context's end:
// ErrTokens; of a deleted context: ErrNotFound; of a named one:
// ErrTokens). With token-addressed contexts it found that repair drops a
// context saved by tokens whose groups were all stored already, its writer
// abandoned, reopened and closed: no record names it
// (TestKnownBugAbandonedDedupedCreate).
//
// # Replaying operations
//
// SimOptions.Prefix and SimOptions.Adversarial each add random draws only
// when on: off, a seed replays the operations it always did.
// TestSeedsReplayOperations holds digests of the generator's draws and of
// the model after every operation for a few seeds, recorded before the
// flush-or-close-then-acknowledge step of named and token-addressed
// contexts became one (sim.ack).
//
// # SIGKILL
//
// The SIGKILL loop kills each writer right after a seeded number of its
// acknowledgements (read from its stdout), not after a wall-clock delay, so
// a slow child (a loaded machine, `-race`) is killed as far into its work as
// a fast one.
package crash
