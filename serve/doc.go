// Package serve is the serving layer between a model runtime and the chunk
// store: it saves the per-layer states a forward pass emits according to
// the context's plan (Saver), and it is the one restore pipeline (Restorer)
// for every caller: the library and the CLI restore into host caches, the
// GPU path into a device cache, and the daemon streams stored or projected
// rows to its clients (Restorer.Stream). A restore streams layers from a
// Source (the store) into a gpu.Backend, the asynchronous device interface
// with the CPU and CUDA backends behind it: the plan's recomputed prefix is
// queued first and runs while the stored layers are read, and each stored
// layer is projected or loaded as its read completes, so that the backend's
// work on layer l overlaps the reads of layer l+1. serve links no backend
// and not the storage engine's types: it takes the interfaces.
//
// # Executing a plan
//
// # Codecs
//
// A context saved under a codec (the identity's `Codec`: fp8 E4M3 per token or
// per 128-value block, `state/codec`) is encoded by the Saver (`NewCodecSaver`:
// a hidden row is one segment, a KV row K then V) and decoded by the Restorer
// into the model dtype on the host before the backend's `Hidden`/`KV` call
// (`RestoreStats.DecodeDur`); a projected `Stream` decodes both kinds, an
// unprojected one hands rows on as stored. `CheckPlanCodec` checks the row
// sizes against the codec's. `MeasureCodec` (`hcache model codec-error`)
// saves and restores through both and reports, against the never-evicted
// cache, K/V and last-position attention error per layer, the next logits'
// error and greedy agreement (with a 2^-8 control); `TestCodecMatchesTorch`
// checks the restored K/V and attention against the torch reference's own
// fp8 quantizer, and `TestCodecRestore` every kind of layer bit for bit
// against state/codec's round trip.
//
// # Executing a plan
//
// Executing a plan (`serve.Restorer`: the one restore pipeline; the
// library, the CLI, the GPU path and the daemon all restore through it).
// It reads from a `serve.Source` (`RestoreOwned`; `*chunk.Store`) and drives a
// `gpu.Backend`, an asynchronous device interface: `BeginRestore(dst,
// positions)` opens one restore into a `gpu.Cache` (a `gpu.HostCache`, or the
// backend's device cache), whose `Recompute(tokens, layers, done)`, `Hidden`
// and `KV(layer, rows, release)` queue work (the CPU backend runs each call to
// completion; CUDA queues on its streams) and hand each buffer back through
// `release` once read; `Wait` ends it, and is called on every path, errors
// included, so no buffer is left with the device. `Restore(Request{NS, ID,
// Ident, Tokens, Dst, Start})`: the plan's recomputed prefix must be a prefix
// and its rows the backend model's (`serve.CheckPlan`, `ErrPlan`); when it is
// non-empty the request must carry the context's token ids (their count is
// checked against the stored token count) and the backend must have loaded
// those layers (`LoadRecompute`, with the full weights). A goroutine runs
// `RestoreOwned`, which hands each layer's buffer over without a copy and
// keeps reading later layers until `ahead` buffers are held: max(2,
// `Settings.BufferBytes` / layer bytes) when the request carries the token ids
// (required for a recomputed prefix), the store's bound otherwise; so the reads
// run ahead while the prefix is recomputed or a hidden layer projected, within
// a bound per restore. The caller's goroutine queues the recompute first (on
// the CPU it runs `model.PrefillStop`, the forward pass's own arithmetic; on
// CUDA, the device forward pass), then each stored layer as its read
// completes. If the reads fail, the restore is aborted (`Restore.Abort`: the
// CPU recompute stops before its next layer) and the store's error returned.
// Admission is a FIFO semaphore (`MaxConcurrent`); admitted restores run on
// the backend side by side, each with its own `gpu.Restore`, up to the
// backend's `Concurrency()` (the CPU: any; CUDA: `cuda.Options.Restores`,
// default 4, each on its own lane of streams and staging slots; a restore
// past that waits in `BeginRestore` while its reads run ahead). Rows stored
// under a codec are decoded on the host, unless the backend's restore is a
// `gpu.DeviceDecoder` for that codec (CUDA, fp8): it then gets them as
// stored, so that its copy moves the encoded bytes. `RestoreStats` reports queue wait, recompute time, I/O
// time, backend time, compute idle (bubbles), backend wait (in
// `BeginRestore`), peak read-ahead bytes, the backend's `gpu.Timing`, and per
// layer: read done, compute start and end (on a device: when its work was
// queued). `Stream` is the daemon's form: each stored layer goes to a sink as
// rows, as stored or (with `Project`) hidden layers projected to K|V rows
// through a host cache. Restore by tokens (issue 19): a `Request` or
// `StreamRequest` with `ByTokens` restores the longest stored prefix of its
// token ids (whole chunk groups of the namespace, salt and identity, plus
// the named context's matching tail) from a `serve.PrefixSource`
// (`serve/chunksrc` adapts a `*chunk.Store`): the same reads, plans and
// backends, a recomputed prefix recomputed from the prefix's ids; nothing
// stored is 0 tokens, not an error (`TestRestoreByTokens`, every kind of
// plan on the CPU backend, generation continuing as an uninterrupted run
// of the new prompt). Tests
// restore every plan the scheduler can emit (every r < L, every hidden/KV
// split) for five model families (Llama, GQA with llama3 rope, Qwen2, OPT,
// linear rope with interleaved rotary) from prefill-plus-decode saves, bit for
// bit against the never-evicted cache, then continue generation identically;
// eight concurrent restores of random plans under a 2 KiB budget (peak held
// at most two layers); FIFO
// service order; failures stop the reads and leave the context restorable;
// restores admitted together all begin on the backend before any has
// finished a layer (`TestConcurrentRestoresRunSideBySide`). A fake device
// (`asyncDevice` in `serve/device_test.go`, a test seam only: it queues every
// call on a worker goroutine and releases buffers from there, and holds the
// recompute until a stored layer is queued behind it) checks the ordering for
// every scheduled plan: begin, recompute, stored layers in order, one Wait,
// stored layers queued while the recompute is pending, the result equal to the
// all-KV restore; and that device failures drain (`TestDevicePipeline*`).
package serve
