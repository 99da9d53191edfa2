// Package daemon is hcached's service: the chunk store behind a gRPC API
// (proto/hcache/v1) on a unix socket (and optionally TCP), with per-namespace
// tenancy, quotas and limits, shared-memory bulk transfer for local clients,
// and Prometheus metrics. cmd/hcached is its command.
//
// # Files
//
//	cmd/hcached           the daemon: flags, signals, logs (log/slog, JSON on stderr)
//	daemon/               the service: gRPC API, tenancy, limits, shared regions, metrics
//	proto/hcache/v1/      hcache.proto and its generated Go code (`make proto`)
//	clients/hcacheclient  Go client;  clients/python: Python client + a PyTorch engine
//	bench/benchdaemon  `hcache bench daemon`
//
// # Serving
//
// Serving engines are separate processes, mostly Python; `hcached --dir DIR
// --listen unix:///path/hcache.sock` lets all of a machine's engines share one
// store. It opens the store (with the store's background GC off: the daemon runs
// GC itself, every `--gc-interval`, so that fsck can exclude it) and serves the
// gRPC service `hcache.v1.HCache` on a unix socket; `--tcp ADDR` adds TCP (off
// by default, bearer tokens required there), with TLS when `--tls-cert` and
// `--tls-key` are given (`TestTCPWithTLS`); without them the daemon warns that
// tokens and rows travel in clear. Before it opens (and perhaps creates) the
// store, it refuses a `--listen` or shared-memory socket another process
// answers on and a `--metrics` address it cannot bind, saying which (a second
// daemon on the machine needs its own, or `--metrics ""`;
// `TestSecondDaemonCreatesNothing`). The sockets get `--socket-mode` (default
// 0666, set right after listening): connecting is open to local users by
// default because what a peer may do is decided by its credentials (below);
// 0660 or 0600 narrows who may connect at all.
//
// # API
//
// The service (`proto/hcache/v1/hcache.proto`): `OpenContext` (mode `CREATE`, or
// `APPEND` to continue a context on the next turn; identity = model fingerprint
// bytes + plan, as the store's `Identity`), `AppendLayer` (prefill: rows of one
// layer), `AppendTokens` (decode: whole tokens, each the rows of every stored
// layer in layer order), `Flush` (answers once durable, the store's contract),
// `CloseContext` (flush or abandon), `Restore` (server stream: one message per
// layer, or per piece of at most 4 MiB inline; layers come from
// `Store.RestoreOwned` with the store's read-ahead (`--restore-ahead` bytes
// of the context's layers, at least two buffers), so the store keeps reading
// the next layers while the pipeline hands one to the sender), `Stat`, `List`,
// `Delete`, `Pin`, `Fsck`, `Gc`, `Info`. Restore returns stored rows, or, with
// `project`, K|V rows for every layer: hidden-state layers projected on the
// daemon's backend (`--model NAME=DIR` loads a model's norms and K/V weights
// into the backend `--backend` names, through `gpu.Select`: `auto` is CUDA when
// a device can be used, else the CPU backend; every restore goes through
// `serve.Restorer.Stream` (one restorer per model, and one without a backend
// for plain restores), which projects hidden layers through a host cache on
// that backend, side by side as the backend allows, and the rows are sent; `Info` lists each model with the
// identity model bytes of its states, `serve.Identity`'s fingerprint). Only an identity whose model bytes
// equal a loaded model's, and whose plan has that model's row sizes, is
// projected (`FAILED_PRECONDITION` otherwise): the checksums prove the rows, the
// fingerprint proves the weights. The CPU projection is bit-exact with the
// forward pass (`TestProjectedRestore`); the CUDA path has a test that runs only
// on a GPU (`TestProjectedRestoreCUDA`, within the dtype's rounding) and has not
// run yet; handing a device cache to a client (CUDA IPC)
// instead of host rows is next. A writer belongs to the connection
// that opened it: appends from another connection are refused, and when the
// connection ends (the client died) its writers are abandoned — whole chunk
// groups already handed to the store's flusher still become durable, the
// partial last group is dropped (see Abandon, then reopen), and the context
// can be reopened with `APPEND`, which reports the count a restore then sees. On SIGTERM/SIGINT the daemon stops accepting, lets running
// requests finish (`--stop-timeout`, then cancels them), flushes and closes every
// open writer, and closes the store; a restart serves everything acknowledged.
// `Pin` is durable at the next index commit (any flush, GC, or the stop).
//
// # Codecs
//
// An identity carries its rows' codec (`Identity.codec`: `CODEC_NONE`,
// `CODEC_FP8`, `CODEC_FP8_BLOCK`, `CODEC_INT8`, state/codec), bound into the stored
// identity, the slice checksums and the chain keys. The client encodes: it
// appends rows already encoded under its identity's codec (the plan's row
// sizes are the encoded ones, `codec.HiddenRowBytes`), and the daemon stores
// them as given, so a save costs the daemon no CPU and needs no model
// loaded; the engine has the values in float and encodes them where they
// are (on the GPU, next to the forward pass). A restore hands rows back as
// stored (encoded; each chunk's `codec` says so, and the client decodes
// with `codec.TranscodeRows`, or on its GPU); with `decode` the daemon
// decodes them into the model dtype first (the identity's model must be
// loaded, as for `project`; `codec` `CODEC_NONE` on the chunks), and with
// `project` the pipeline decodes before it projects. A state is served only
// to the codec it was stored in: a restore or `APPEND` whose identity
// differs in its codec is `FAILED_PRECONDITION` with both codecs named, and
// a lookup or restore by tokens under another codec matches nothing (its
// chain keys differ), also when it names the context (`TestCodecThroughDaemon`,
// with identities that differ in nothing but the codec). The daemon does
// not check an encoding on append (it would need the model's layout): bytes
// that are not a valid encoding are refused when decoded (`DATA_LOSS` with
// `decode`, the codec's error in a client that decodes). Under `CODEC_INT8`
// the rows of a whole 64-token group decode only together: a `Fork` at a
// count inside one is `INVALID_ARGUMENT` (fork at a multiple of 64).
//
// # State addressed by its tokens
//
// A context opened with `tokens` (`OpenContext` `CREATE`: the prompt's ids;
// optional `salt`, vLLM's `cache_salt`) is token-addressed (package chunk,
// "Prefix-addressed state"): its whole chunk groups (`chunk_tokens` each,
// from position 0) are stored once per namespace, salt and identity and
// shared by every context whose tokens start the same way. The reply's
// `tokens` is where the writer continues: the groups already stored are
// referenced, and the client sends rows from there on (a second save of a
// prompt sends only its tail; `TestPrefixThroughDaemon` checks with the
// store's counters that no group byte is written again). `APPEND` with
// `tokens` gives the stored ids followed by this turn's: the daemon checks
// the stored ones (`Lookup` restricted to the context), so a client whose
// idea of the context differs is refused (`FAILED_PRECONDITION`) before it
// appends rows computed for other tokens. `AppendTokens` carries
// `token_ids` for decode (one per token; rows of tokens whose ids the
// writer does not know are `INVALID_ARGUMENT`).
//
// `Lookup` answers how many leading tokens of a prompt have stored state
// (whole groups, plus the partial tail of a named context whose ids match);
// it reads the store's in-memory index only. `Restore` with `tokens`
// restores that prefix through the same `serve.Restorer.Stream` as a
// restore by name (inline, shared region, `project`); with `ctx.id` empty
// it is the namespace's shared groups, with `ctx.id` set that context's
// tail may extend them (`NOT_FOUND` when it does not exist); nothing stored
// is an empty stream, not an error. Each group's token digest and binding
// are checked before its rows are read (a collision serves nothing:
// `ABORTED`, counted in `hcache_chain_collisions_total`). `Fork` makes
// `dst_id` hold the first `tokens` of `src` (created with tokens, no writer
// open): groups are referenced, only a partial tail is copied; it takes a
// context slot like `CREATE`. Deleting one sharer leaves the others whole.
//
// Tenancy: the chain keys and the store's group table are per namespace, so
// namespaces never share or see each other's groups; a lookup, restore or
// fork in a namespace not granted is `PERMISSION_DENIED`, checked before the
// store is asked anything, so it is never a count (a prefix lookup is a
// timing oracle of other tenants' prompts). A salt separates callers inside
// a namespace. Quotas count logical rows, as for any context: a context's
// tokens x its row bytes, shared groups included, so each sharer pays for
// the prefix it can restore and a namespace's usage does not depend on
// which of its contexts wrote a group first or is deleted first; the disk
// holds a shared group once (`hcache_shared_bytes`; the store's
// `--capacity` and eviction count it once). Charging a namespace once per
// group would need the store to report group bytes per namespace (it
// reports them for the store as a whole). Token lists are bounded by
// `--max-request-tokens`.
//
// # Bulk bytes
//
// Rows travel inline in the messages (TCP, or any client), or,
// for unix clients, in a shared region: the client creates a memfd, seals it
// against shrinking (`F_SEAL_SHRINK`: a shrink under the daemon's mapping would
// turn its accesses into SIGBUS), and sends it with `SCM_RIGHTS` on the side
// socket (`--shm`, default `<listen>.shm`) after the 8 bytes `HCSHM001`; the
// daemon checks the seal, the size (`--max-region`) and the peer's uid, maps it
// `MAP_SHARED` and answers `OK <region id> <size>` (a registration must arrive
// within `--side-register-timeout`, 2 s, of connecting; Stop closes side
// connections, registered or not). A side connection from a uid granted
// nothing, or past `--max-side-pending-per-uid` (8) or `--max-side-pending`
// (64) connections not registered yet, is answered `ERR <reason>` and closed at
// once, so silent connections cannot hold the daemon's file descriptors
// (`TestSidePendingLimits`; `cmd/hcached` `TestFDExhaustingClient` runs the
// daemon under `RLIMIT_NOFILE` 256 against 600 silent connections). The Go
// client's registration has a deadline (the context's, at most
// `RegisterTimeout` 10 s; `TestRegisterDeadline`), the Python client's a
// `timeout` (10 s, `DEADLINE_EXCEEDED`). Requests then carry a
// `RegionSlice{region, offset, length}`: appends read the rows in place (the
// store's staging copy is the only copy) before they reply, so the client may
// write over the slice as soon as the reply comes (hcache_client.Saver's ring
// does; `TestRegionSliceReusableAfterAppend`), restores are placed layer after layer
// into the region (one copy from the store's read buffer). The region lives as
// long as the side connection; after that, requests naming it fail with
// `FAILED_PRECONDITION`, and the daemon unmaps it once the requests using it end.
// Only the uid that registered a region may name it, and its id is 128 random
// bits.
//
// # Tenancy
//
// Unix clients are identified by their peer credentials
// (`SO_PEERCRED`, read by a gRPC `TransportCredentials` when the connection is
// accepted); `--grant UID=ns1,ns2` grants namespaces (`*` = all; with no
// `--grant`, the daemon's own user gets `*` and nobody else anything). A token
// file (`--tokens`, mode 600, lines `TOKEN ns1,ns2`) grants bearer tokens
// (`authorization: Bearer TOKEN`): TCP clients must present one; a unix client
// may, and is then limited to the intersection of its uid's and its token's
// grants (how engines under one user are kept apart). A namespace not granted is
// `PERMISSION_DENIED` for every call naming it, and `List` shows only granted
// namespaces; `Fsck` and `Gc` need `*`. The grant is checked before the store
// is looked at, so a caller without a namespace's grant gets the same
// `PERMISSION_DENIED` and message whether or not a context exists there, from
// every call (`TestNoTenantLeak`). Ids (namespace, context) follow the
// store's rules (1–255 bytes, no NUL) and must also be UTF-8 without control
// characters; the namespace `*` is reserved (grants, quotas and token files read
// it as "every namespace"): every call naming it, `--quota '*=…'` and a token
// file's or `--grant`'s list can only mean all (`TestStarNamespaceRefused`). Quotas (`--quota ns=BYTES`, `--default-quota`) bound a
// namespace's row bytes: stored tokens x row bytes of its contexts, plus rows
// appended to open writers; an append that would pass it is refused whole
// (`RESOURCE_EXHAUSTED`), nothing is stored, and the usage is recounted from the
// store after closes, abandons, deletes and evictions.
//
// # Limits
//
// Every limit is a flag of `hcached`; exceeding one fails that
// request only, with `RESOURCE_EXHAUSTED` naming the flag unless the table says
// otherwise. Nothing a tenant does within its limits can take a resource every
// tenant needs (contexts, connections, file descriptors, accept loops) from the
// others.
//
//	| flag | default | bounds | why |
//	| `--max-contexts` | 1 Mi | contexts in the store, empty ones included | index size and memory; empty contexts hold an index entry each |
//	| `--max-contexts-per-namespace` | a fair share: `--max-contexts` / the number of namespaces `--grant` and `--tokens` name (all of it with none named) | contexts of one namespace, empty ones included | one tenant cannot use up `--max-contexts` for everyone (`TestContextsPerNamespace`) |
//	| `--max-tokens` | 1 Mi | tokens per context | one context's size |
//	| `--max-request-tokens` | 1 Mi | token ids in one request (`Lookup`, `OpenContext`, `Restore` by tokens): `INVALID_ARGUMENT` | memory and hashing per request |
//	| `--quota NS=BYTES`, `--default-quota` | none | row bytes of a namespace | disk share |
//	| `--max-inflight` | 64 | concurrent requests per connection | goroutines and memory per client |
//	| `--max-conns` | 256 | unix connections per user; past it the connection is closed at its handshake (`UNAVAILABLE`, `TestConnectionLimit`) | file descriptors per user |
//	| `--max-conns-per-token` | 256 | TCP connections per bearer token. A TCP client is known only by the token its requests carry, so a connection is charged to a token by its first request presenting it and holds that slot until it closes (one slot of each token its requests present); a request that would charge a connection past the limit is refused (`RESOURCE_EXHAUSTED` naming the flag; the connection stays pending, and a later request on it goes through once a slot is free, until `--tcp-auth-timeout` closes it). Logged with the token's SHA-256 prefix and grant, never the token; counted in `hcache_connections_refused_total{listener="tcp"}`. Under TLS the key is the token too (no client certificate is asked) (`TestCallerConnectionLimits`, `TestTokenConnectionsRandom`) | file descriptors and memory per tenant on TCP |
//	| `--max-tcp-pending` | 64 | TCP connections of all clients not charged to a token yet (before their first request with a known token, or refused by `--max-conns-per-token`); past it a new TCP connection is closed at its handshake (`UNAVAILABLE`), counted in `hcache_connections_refused_total{listener="tcp_pending"}`; gauge `hcache_tcp_pending_connections` (`TestTCPPending`) | file descriptors: a client that connects and never presents a token is in no token's count |
//	| `--tcp-auth-timeout` | 10 s | how long after it is accepted a TCP connection may stay pending; then it is closed (logged) | a pending slot is held only that long |
//	| `--max-restores-per-caller` | 64 (one connection's `--max-inflight`) | restores one caller (a unix user; a TCP bearer token) runs at once over all its connections; a restore holds its slot until its goroutine ends (after its stream, when cut off by `--restore-timeout`); counted in `hcache_restore_requests_total{result="refused"}` (`TestRestoresPerCaller`) | a caller's restores grew with its connections (`--max-inflight` each); restore buffers are bounded in all (`--restore-queue`) but read in arrival order, so one caller's many restores queued ahead of everyone's |
//	| `--max-side-pending-per-uid` | 8 | side connections of one user not registered yet; past it `ERR` and closed | file descriptors: silent connections |
//	| `--max-side-pending` | 64 | side connections of all users not registered yet | same, across users |
//	| `--side-register-timeout` | 2 s | how long a side connection may take to register (then `ERR`, closed) | a slot is held only that long |
//	| `--max-region` | 4 GiB | one shared region | mapped memory |
//	| `--max-regions` | 64 | registered regions (each one side connection) per user | mapped memory and descriptors |
//	| `--max-message` | 64 MiB | one gRPC message, both ways | memory per request |
//	| `--restore-timeout` | 10 min | one restore; then the stream ends with `DEADLINE_EXCEEDED` (`TestRestoreTimeout`) | a client that stops reading holds read buffers and segment references only that long |
//	| `--stop-timeout` | 30 s | running requests on SIGTERM, then cancelled | a bounded stop |
//	| `--capacity` | 64 GiB (`-1`: none) | live bytes before LRU eviction | disk |
//	| `--cache`, `--staging` | 256 MiB, 2 GiB | DRAM tier, unwritten rows in DRAM | memory |
//	| `--restore-ahead`, `--idle-read-buffers` | 32 MiB, 256 MiB | restore buffers | memory; they fail nothing |
//
// # Accept loops
//
// Accept loops (the gRPC listeners and the side socket) survive transient
// errors: `EMFILE`, `ENFILE` (out of descriptors), `ECONNABORTED` (a peer gave
// up), `ENOBUFS`/`ENOMEM` are counted in
// `hcache_accept_errors_total{listener,errno}`, logged, and retried after a
// backoff (5 ms doubling to 1 s, reset by the next connection); only a closed
// listener ends a loop (`TestShmAcceptSurvivesTransientErrors`). Before, the
// side socket's loop returned on the first error, and shared memory was gone
// until a restart.
//
// # Metrics
//
// Metrics on `--metrics` (default 127.0.0.1:9464, a separate HTTP server):
// `/healthz` (503 while stopping) and `/metrics` — the store's counters read at
// scrape time (`hcache_bytes_written_total`, `hcache_bytes_read_total` (disk
// tier), `hcache_dram_slice_hits_total` (DRAM tier), `hcache_live_bytes`,
// `hcache_dead_bytes`, `hcache_gc_segments_total`, `hcache_gc_moved_bytes_total`,
// `hcache_evictions_total`, `hcache_damaged_contexts_total`, `hcache_commits_total`)
// and the daemon's: `hcache_restore_requests_total{result=hit|miss|identity_mismatch|timeout|refused|error}`,
// `hcache_restore_seconds{stage=first_layer|layer_wait|layer_send|project|total}`,
// `hcache_flush_seconds`, `hcache_rpcs_total{method,code}`,
// `hcache_checksum_failures_total`, `hcache_io_errors_total`,
// `hcache_identity_mismatch_total`, `hcache_quota_refused_total`,
// `hcache_writers_abandoned_total`, `hcache_accept_errors_total{listener,errno}`,
// `hcache_side_refused_total`, connections, open writers, region bytes,
// `hcache_caller_connections{listener=unix|tcp}` (connections charged to
// `--max-conns` and `--max-conns-per-token`),
// `hcache_connections_refused_total{listener=unix|tcp|tcp_pending}`,
// `hcache_tcp_pending_connections`;
// token-addressed state: `hcache_lookups_total{result=hit|miss}`,
// `hcache_lookup_hit_tokens_total`, `hcache_shared_groups`,
// `hcache_shared_bytes` (counted once), `hcache_groups_written_total`,
// `hcache_group_bytes_written_total`, `hcache_groups_deduped_total`,
// `hcache_chain_collisions_total`.
// `/metrics` has no authentication and answers any local user, so by default
// it carries no tenant: no namespace names, per-namespace bytes or quotas, only
// the store's aggregates (contexts, bytes) and per-method counts
// (`TestMetricsHideNamespaces`). `--metrics-namespaces` adds
// `hcache_namespace_bytes{namespace}` and `hcache_namespace_quota_bytes{namespace}`
// (what quotas count: eviction frees it, `TestEvictionFreesQuota`) for a
// deployment whose metrics port only its operator reaches. (Chosen over a
// bearer token on `/metrics`, which scrapers would need configured, and over a
// unix socket, which most scrapers cannot read.)
//
// # Bad input to the daemon
//
// Each case gets its code and the daemon keeps serving; stored data is unchanged
// (`daemon.TestBadInput` checks the rows without a test named in them, then
// restores the other contexts byte for byte).
//
//	| input | gRPC code |
//	| malformed protobuf (undecodable bytes) | `INTERNAL` ("failed to unmarshal": grpc-go's code for it, before our handler runs) |
//	| missing context reference, rows, or identity; mode unset; count 0 | `INVALID_ARGUMENT` |
//	| invalid ids: empty, > 255 bytes, NUL, control characters | `INVALID_ARGUMENT` |
//	| invalid identity: no plan, odd or zero row size, unknown kind or codec | `INVALID_ARGUMENT` |
//	| wrong row size (layer rows not whole rows; tokens not count x token bytes) | `INVALID_ARGUMENT` |
//	| layer out of range, or a layer the plan stores nothing for | `INVALID_ARGUMENT` |
//	| unknown context (stat, restore, append, delete) | `NOT_FOUND` |
//	| context exists (create) | `ALREADY_EXISTS` |
//	| identity mismatch (restore or append with another model or plan); `project` for an identity no loaded model has | `FAILED_PRECONDITION` (`TestProjectedRestore`) |
//	| restore or append under another codec than the stored one; `decode` for an identity under a codec no loaded model has | `FAILED_PRECONDITION` (`TestCodecThroughDaemon`) |
//	| append or flush without an open writer, on another connection's writer, or on one closed meanwhile; delete with a writer open; fsck with writers open | `FAILED_PRECONDITION` |
//	| writer already open (on another connection, or on this one) | `ABORTED` |
//	| oversize message (> `--max-message`) | `RESOURCE_EXHAUSTED` |
//	| tokens per context, contexts (in the store or the namespace, empty ones included), in-flight requests, quota exceeded | `RESOURCE_EXHAUSTED` (`TestInflightLimit`, `TestTenancy`, `TestContextsPerNamespace`) |
//	| the disk is full (`chunk.ErrDiskFull`, `ENOSPC`) | `RESOURCE_EXHAUSTED` (`TestFullDiskThroughDaemon` on a real 48 MB tmpfs, skipped without root unless `HCACHE_REQUIRE_TMPFS=1`; `TestDiskFullIsResourceExhausted`): acknowledged contexts still restore; deleting contexts and GC free space |
//	| namespace `*` | `INVALID_ARGUMENT` ("reserved", `TestStarNamespaceRefused`) |
//	| side connections not registered past `--max-side-pending-per-uid`/`--max-side-pending`, or silent past `--side-register-timeout` | side socket answers `ERR <reason>` and closes (`TestSidePendingLimits`) |
//	| a client that stops reading a restore | `DEADLINE_EXCEEDED` after `--restore-timeout` (`TestRestoreTimeout`) |
//	| connections per user past `--max-conns` | connection closed at the handshake: `UNAVAILABLE` (`TestConnectionLimit`) |
//	| a request charging a TCP connection to a token that holds `--max-conns-per-token` others | `RESOURCE_EXHAUSTED` naming the flag (`TestCallerConnectionLimits`) |
//	| a new TCP connection past `--max-tcp-pending`; one without a request with a known token after `--tcp-auth-timeout` | closed at the handshake: `UNAVAILABLE`; closed (`TestTCPPending`) |
//	| a restore past its caller's `--max-restores-per-caller` | `RESOURCE_EXHAUSTED` naming the flag (`TestRestoresPerCaller`) |
//	| shared region unknown, released (unmapped early), or another user's; region on TCP | `FAILED_PRECONDITION` |
//	| region slice past the region's end; restore into a region too small | `OUT_OF_RANGE` |
//	| memfd without `F_SEAL_SHRINK`, not a memfd, too large | side socket answers `ERR <reason>` (`TestUnsealedRegionRefused`) |
//	| namespace not granted; fsck/gc without `*` | `PERMISSION_DENIED` (`TestTenancy`) |
//	| TCP without a token; unknown token | `UNAUTHENTICATED` (`TestTCPNeedsToken`, `TestTenancy`) |
//	| checksum failure on restore, then the damaged context | `DATA_LOSS`, other contexts served (`TestChecksumFailureIsDataLoss`) |
//	| I/O or index error (other than a full disk) | `INTERNAL`, counted in `hcache_io_errors_total` (mapping only: not injected at the daemon level) |
//	| by tokens: empty `tokens` (lookup), more than `--max-request-tokens`, a salt over 256 bytes or without tokens, `token_ids` not one per token, rows of a token whose id is unknown; fork onto itself or of more tokens than stored | `INVALID_ARGUMENT` (`TestPrefixBadInput`) |
//	| by tokens: `APPEND` with stored ids (or salt) that differ, or to a context not created with tokens; fork of such a context or of one with a writer open | `FAILED_PRECONDITION` (`TestPrefixBadInput`) |
//	| client dies mid-append | its writers are abandoned: whole groups handed to the flusher become durable, the partial last group is dropped; `APPEND` reopens it at the count a restore sees (`TestClientDiesMidAppend`, `TestAbandonThenReopen`; store: `TestAbandonThenReopenExact`) |
//
// # Tests
//
// `cmd/hcached` `TestDaemonEndToEnd` builds and starts the real binary on a temp
// directory and socket: two namespaces (two tokens), 8 concurrent writers
// (prefill, decode, periodic flushes) and 3 concurrent readers verifying bytes;
// SIGKILL with a writer mid-turn, restart, every acknowledged context restored
// byte for byte and the in-flight one at its acknowledged length; A cannot
// restore, list or delete B's contexts; B's quota refuses an append with its data
// intact; SIGTERM with unflushed rows, restart, the rows are served.
// `TestPythonTorchEngine` runs `clients/python/torch_engine.py` (PyTorch, the
// repository's torch reference model run incrementally with a KV cache) against
// the same binary: 2 conversations x 3 turns, each turn restoring through the
// daemon (hidden-state layers re-projected, a KV layer copied), on tiny-gqa (bf16,
// GQA) and tiny-llama (fp16), over shared memory and inline, and once with the
// daemon projecting (its Go CPU projection within 5e-4 of torch's, relative to
// the K/V scale, under bf16's 2^-8); the generated tokens must equal an
// uninterrupted run's and restored rows the saved bytes.
// `clients/python/README.md` maps the calls onto vLLM's KVConnector.
//
// # Cost and what is not built
//
// The daemon's cost is one more copy of every layer (store read buffer into the
// region) and a message per layer; reading straight into the region (the
// store's reads landing in caller memory) would remove the copy and is next.
//
// Not built: reads landing straight in a client's region (one copy saved);
// limits per user on in-flight requests (bounded per connection, and
// connections per user); layers planned as `LayerNone` are skipped by the daemon (the
// client recomputes them); the CUDA projection path of the daemon has not run on
// a GPU.
//
// Figures of `hcache bench daemon` (with their commands and raw JSON): bench/results/cpu-2026-12-03/README.md; the method: package bench/benchdaemon.
package daemon
