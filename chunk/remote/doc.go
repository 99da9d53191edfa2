// Package remote is hcache's shared tier on S3-compatible object storage
// (AWS S3, MinIO, Ceph RGW, SeaweedFS, ...), through minio-go. It imports
// chunk; chunk does not import it. Three parts:
//
// Segment tiering (DRAM -> local -> remote). A store opened with the
// client's Provider in chunk.Options.Providers serves segments the index
// records at location "s3://BUCKET/PREFIX" by ranged GETs (large reads
// split into Config.RangeBytes pieces, Config.Parallel in flight), through
// the store's own verified read path: every slice is checked against its
// checksum as for a local read. Tier uploads sealed local segments in the
// background (bounded queue: the scan waits when it is full; never a
// writer), checks each object (its size, its header block equal to the
// local one) and then, past TierOptions.LocalBytes of uploaded local
// bytes, switches the segment to the remote tier (chunk.Store.MoveSegment,
// which checks the object's header again, commits the location to the
// index, and deletes the local file once no restore reads it). What the
// remote tier holds stays restorable: nothing is deleted locally before
// the index says where the bytes are. An upload cut short leaves no
// object (a PUT, or a multipart upload, is visible only once whole) and is
// retried: a restarted node uploads again what it had not finished.
//
// By name. Publish uploads a named context's current generation as one
// context object (layer-major: one ranged GET, or a few, per layer) with a
// header and a trailer describing it (names, identity, generation, tokens,
// binding, layer offsets, per-layer checksums seeded by the binding), checks
// the upload (size, trailer), and only then writes the manifest
// name/NS/ID.hcm: the commit point. Another node (Lookup, Fetch, Import,
// RestoreByName) reads the manifest, checks its checksum and that its
// binding is the one the names, generation and identity compute, fetches
// the layers (several at once) and hands over each only once its checksum
// passed; Import writes them into the local store (a promotion), replacing
// an older local copy; a failure leaves no local context of that name. A
// conversation grows turn by turn, so a copy with more tokens is newer.
// The formats are in manifest.go.
//
// By tokens. PublishTokens uploads the full groups of a token-addressed
// prompt as group objects keyed by namespace and chain key (content
// addressed: a group the bucket holds already, same token digest, is not
// uploaded again), once they are durable locally; PublishTip writes a
// named context's tip object (chain tip, salt, token ids, the partial
// tail's rows), which with the group objects is also the context's by-name
// form: a token-addressed context is never uploaded whole as a context
// object, so a Close uploads only its new groups, its tail and its tip
// (Import and RestoreByName assemble it from them, verified as a
// promotion, and take the tip or a manifest, whichever has more tokens).
// LookupTokens
// answers how many leading tokens past the local match the bucket holds
// (HEADs, a bounded number at once, digest in the object's metadata);
// PromoteTokens fetches them, verifies every group (size, description,
// token ids against the request, checksums) and writes them into the
// local store as a token-addressed context (PromotedID), whose groups are
// then local shared groups that a restore by tokens serves. A collision,
// a corrupt or truncated object promotes nothing. The formats are in
// groups.go.
//
// Keys, under Config.Prefix: seg/STORE/seg-NNNNNNNN.hcs (segment ids
// restart at 1 in every store, hence the store id), ctx/STORE/BINDING.hcx,
// name/NS/ID.hcm, grp/NS/CHAINKEY.hcg, tip/NS/ID.hct.
// The tip object's format is in tip.go.
//
// Faults are normal: a request that fails (store down, slow past
// Config.Timeout, an error reply, a body cut short) is ErrUnavailable,
// never read as damage (a restore of a remote segment fails and is retried
// later; the context is not marked damaged); local segments serve on;
// an object gone is ErrNotFound, a miss. GC removes objects nothing refers
// to once older than a grace period (GCOptions.Grace; a group object is
// referred to while some tip object's chain reaches it, walked back from
// the tip through the groups' parent keys), which is how a fleet avoids
// deleting what another node just wrote; Check verifies the bucket
// read-only (deep: every group object on its own and its parent link,
// every tip's chain back to its first group and its tail's checksums);
// DownloadSegments
// brings a store's segment objects back before hcache repair rebuilds its
// index from segments.
package remote
