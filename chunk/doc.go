// Package chunk is hcache's storage engine: a log-structured store of
// per-layer rows (hidden states or K/V) of LLM contexts.
//
// A context (namespace + id) has an Identity (model fingerprint and per-layer
// plan). Its rows are grouped by ChunkTokens tokens into chunk groups; each
// group is written once, as one record laid out layer-major, into the active
// segment file, and located through the Pebble index (package lsm).
//
// Writes are two-phase. Phase 1 (Writer.AppendLayer for prefill,
// Writer.AppendToken for decode) copies rows into DRAM staging slabs and
// returns. Phase 2 runs in the store's flusher goroutine: full groups (and the
// partial tail on Flush) are written with large aligned writes through the
// io_uring engine, made durable with one fdatasync per touched segment, and
// then indexed with one Pebble batch. Flush waits for that commit; concurrent
// flushes share it (group commit).
//
// Restore streams a context layer by layer: the reads of layer l+1 are in
// flight while the consumer handles layer l, and every slice is verified
// against its checksum before it is handed over.
//
// Every file goes through a vfs.FS: vfs.Default in production (segments then
// use O_DIRECT descriptors and io_uring), a crashable in-memory FS in tests.
//
// The files follow the data path, producer -> staging -> segment -> index ->
// reader:
//
//	options.go   Options and their defaults
//	open.go      Open and Close: lock, meta record, index, segment files
//	recover.go   recovery at Open: replaying what the index misses
//	marker.go    the creation marker and the emergency ballast file
//	store.go     the Store and its in-memory contexts, listings, Pin
//	writer.go    Writer: Create, Append, AppendLayer, AppendToken, Flush
//	staging.go   DRAM staging slabs of unwritten rows
//	flush.go     the flusher goroutine: ops, writes in flight
//	commit.go    group commit: fdatasync, then one index batch
//	alloc.go     segment allocation, the append point, disk-full handling
//	segment.go   segment files and their reads and writes
//	object.go    the object seam: sealed segments other providers hold
//	tier.go      the hooks of a tier under the store: OpenSealedSegment, MoveSegment
//	format.go    aliases of package chunk/format, the on-disk encodings
//	tombstone.go Delete: tombstone records, roll-forward
//	evict.go     eviction under CapacityBytes
//	gc.go        compaction of segments
//	fetch.go     snapshots of a context and verified slice reads
//	restore.go   Restore and RestoreOwned: layer-pipelined restores
//	priority.go  restore admission (arrival order, bounded) and writes yielding to restores
//	stages.go    where restores and saves spend their time (RestoreStages, SaveStages)
//	cache.go     the DRAM tier of recent slices
//	fsck.go      Check: read-only consistency check
//	repair.go    Repair: rebuilding the index from segments
//	stats.go     counters
//	prefix.go          token-addressed state: the group table, Lookup,
//	                   CreateTokens, Fork, writers' token ids, refcounts
//	prefix_write.go    the flusher's side: dedup at hand-off, the commit
//	                   of group records and references, GC of group records
//	prefix_restore.go  restores by name of a token-addressed context and
//	                   RestoreTokens(Owned)
//
// # Prefix-addressed state (issue 19)
//
// A context may be token-addressed: its writer knows the token id of every
// row. Its full groups (ChunkTokens tokens each, from position 0) are group
// records in the namespace's shared space, addressed by state.Chain keys
// (the chain's root binds namespace, salt and identity; see state/chain.go
// for the key spec); only its partial tail is a record of its own. Legacy
// contexts (Create) are unchanged, and Create, Append, Restore, Delete, Pin
// work on both kinds.
//
//	type Prefix struct { Namespace string; Salt []byte; Identity *Identity; Tokens []uint32; Context string }
//
//	func (s *Store) CreateTokens(ns, id string, ident *Identity, tokens []uint32, opts CreateOptions) (w *Writer, stored int, err error)
//	func (w *Writer) ExtendTokens(ids []uint32) error
//	func (w *Writer) AppendTokenID(id uint32, rows [][]byte) error
//	func (s *Store) Lookup(p Prefix) (int, error)
//	func (s *Store) RestoreTokens(p Prefix, fn func(layer int, rows []byte) error) (int, error)
//	func (s *Store) RestoreTokensOwned(p Prefix, ahead int, fn func(layer int, rows []byte, release func()) error) (int, error)
//	func (s *Store) Fork(ns, src, dst string, n int) error
//
// CreateTokens creates (ns, id) for a prompt's tokens under opts.Salt and
// returns stored, the leading whole groups the namespace already holds for
// that salt and identity: the context references them, and the writer
// expects rows from token stored on (AppendLayer / AppendToken, as Create's
// writer). The writer knows the ids of tokens [0, len(tokens)); rows past
// them fail with ErrTokens until ExtendTokens (or AppendTokenID, decode's
// call) gives their ids. Append of a token-addressed context continues it
// the same way (its tail's ids are stored; ExtendTokens for new ones).
// Dedup happens when a full group is handed to the flusher: a key that is
// stored or being written is referenced, not written (Stats.GroupsDeduped;
// a second save of the same prompt writes no group bytes,
// Stats.GroupBytesWritten). A key stored for other tokens (ErrCollision)
// is never written over: the writer's Flush/Close fails with it.
//
// Lookup returns how many leading tokens of p.Tokens have stored state:
// whole groups (binary search over the chain keys in memory: stored groups
// are prefix-closed, since a group lives only while a context's chain
// reaches it), each group's stored token digest checked against the
// request's tokens; plus, when p.Context names a token-addressed context of
// the namespace (same salt and identity) whose chain ends exactly there,
// the leading tokens of its own partial tail that match the request. It
// does no I/O. Namespaces never see each other's groups (the chain root
// and the table both key by namespace); a salt shares only with lookups of
// the same salt.
//
// RestoreTokensOwned restores what Lookup(p) reports, through the same
// layer-pipelined read path and DRAM tier as RestoreOwned (same callback
// contract; the rows handed over cover exactly the returned token count;
// 0 with fn never called when nothing is stored). Before any read, each
// group's index entry is checked against the request: position, token
// digest (state.TokensDigest of the request's tokens) and group binding
// (namespace, identity, key): a collision or a bug serves nothing
// (ErrCollision). Every slice is then verified against its checksum, seeded
// from the group binding (state.NewGroupBinding: no context id, no
// generation), so a slice of another group, namespace or identity fails.
// Restore of a token-addressed context by name works as for any context.
//
// Fork makes dst (token-addressed) hold the first n tokens of src
// (token-addressed, no open writer): dst references src's full groups among
// them and copies only the rows of a partial last group; it returns once
// dst is durable. Either side may then be appended to or deleted.
//
// Lifecycle. A group lives while a live token-addressed context's chain
// reaches it. Reference counts are not stored: Open derives them from the
// context records (each names its chain's tip key; the chain is walked back
// through the group entries' parent keys), and every commit keeps them in
// memory; they are exact after a crash and reopen because a group entry is
// indexed in the same batch as the first context record referencing it,
// and dropped in the same batch as the delete (or eviction) of its last
// referencing context (after that delete's tombstone is durable, as for
// any delete). GC moves group records like any record and re-points their
// entries. Eviction evicts whole contexts, least recently used first,
// counting what a victim frees (its tail, and the groups it holds the last
// reference to); a token-addressed context ranks as if used up to
// Options.EvictSharedBonus later, scaled by the share of its bytes other
// contexts also reference (TestEvictionPrefersUnshared measures it). A
// restore by tokens is a use of the named context whose tail it serves
// (persisted, as Restore's) and of the shared groups it serves, whoever
// holds them (in memory only, a hint: a restart forgets it): a context
// whose delete would drop such a group ranks no earlier than that use, so
// a prefix engines restore by tokens stays stored while its sharers go by
// their own use (TestRestoreByTokensKeepsWhatItServed,
// TestRestoreByTokensRaisesHitRate). A
// reference taken to a group still being written fails the referencing
// writer's Flush if that write fails. Repair rebuilds group entries and
// token-addressed contexts from their version 3 records (a group is
// adopted iff a live context's chain reaches it); fsck checks group
// records, reference counts and chains read-only. Repair finds a context
// only through its own records: its tail, or a tip record (a Flush or
// Close with no tail writes one naming the chain's tip, unless one at the
// full group count is indexed). So a durable record names every
// acknowledged state: a tail or tip record that a newly whole group
// supersedes stays indexed and live (GC moves it) until a tail or tip
// record written after it is durable; the index batch of that commit
// drops it (prefix_write.go keptRecords), as does a delete. Quotas: a shared group is paid for once, by the store as a
// whole (Stats.GroupBytes; LiveBytes counts it once); a context's
// ContextInfo.LiveBytes counts only its own records (its tail or tip record, and a kept one), so the
// daemon's per-namespace limits, which count contexts, are unaffected by
// sharing.
package chunk
