package chunk

import (
	"bytes"
	"fmt"
	"hash/crc32"
	"io"
	"sort"

	"github.com/cockroachdb/pebble/v2/vfs"

	"github.com/hcache/hcache/chunk/format"
	"github.com/hcache/hcache/lsm"
	"github.com/hcache/hcache/state"
)

// RepairOptions configure Repair.
type RepairOptions struct {
	FS  vfs.FS // default vfs.Default
	Dir string
	// Progress is called after each segment file with the bytes scanned so
	// far and the total.
	Progress func(done, total int64)
	Logf     func(string, ...any)
	// ChunkTokens is used only when neither a record nor the old index
	// says what the store's chunk size is (an empty store).
	ChunkTokens int
	// Now is the clock of the new index's records (Unix nanoseconds);
	// default the wall clock.
	Now func() int64
}

// oldChunkTokens reads the chunk size from a (possibly damaged) index's
// store record, read-only; 0 if it cannot.
func oldChunkTokens(fs vfs.FS, dir string) int {
	db, err := lsm.Open(fs, dir, lsm.Options{ReadOnly: true})
	if err != nil {
		return 0
	}
	defer db.Close()
	m, err := db.GetMeta()
	if err != nil {
		return 0
	}
	return int(m.ChunkTokens)
}

// RepairReport says what Repair adopted and what it set aside.
type RepairReport struct {
	Segments int      // segment files scanned
	Records  int      // records whose header checked
	Contexts int      // contexts adopted
	Groups   int      // chunk groups adopted
	Tokens   uint64   // tokens adopted
	Adopted  []string // "ns/id: N tokens in G groups (generation X)"
	SetAside []string // each record or context not adopted, and why
	// Superseded counts valid records replaced by a newer version of the
	// same group (a partial group rewritten as it filled, a GC copy).
	Superseded int
	// Deleted counts valid records of contexts a tombstone says were
	// deleted (not adopted).
	Deleted int
	// SharedGroups counts the shared group records adopted (those a
	// token-addressed context's chain reaches; prefix_repair.go).
	SharedGroups int
	OldIndex     string // where the previous index was moved ("" if none)
}

// repairCand is one record that verified.
type repairCand struct {
	h      *RecordHeader
	seg    uint32
	off    uint64
	ident  *Identity
	ctxKey string
	tomb   bool // a deletion record
	group  bool // a shared group record (no context)
}

// Repair rebuilds a store's index from its segment files alone. Every record
// (format version 2) names its context, identity, generation and group and
// carries its slices' checksums; Repair adopts a record only if its header
// checks, its binding matches its descriptor and every slice verifies. For
// each context it keeps the newest generation, the newest version (most
// tokens) of each group, and the longest contiguous prefix of groups. The
// previous index directory, if any, is moved aside (index.damaged-TIME), never
// deleted; segment files are only read. Everything not adopted is listed in
// the report with the reason. Every record of a generation a tombstone
// covers (or an older one) is set aside: deleted and evicted contexts stay
// gone (see tombstone.go). Pins and last-use times lived only in the index
// and are lost.
func Repair(o RepairOptions) (*RepairReport, error) {
	if o.FS == nil {
		o.FS = vfs.Default
	}
	if o.Logf == nil {
		o.Logf = func(string, ...any) {}
	}
	fs, dir := o.FS, o.Dir
	names, lock, err := repairLock(fs, dir)
	if err != nil {
		return nil, err
	}
	defer lock.Close()

	rep := &RepairReport{}
	sc, err := repairScanAll(o, names, rep)
	if err != nil {
		return nil, err
	}
	ct := sc.ct
	if ct == 0 {
		// No record: the old index's store record (if it still reads), else
		// the option, else the default.
		ct = oldChunkTokens(fs, fs.PathJoin(dir, "index"))
	}
	if ct == 0 {
		ct = o.ChunkTokens
	}
	if ct == 0 {
		ct = DefaultChunkTokens
	}
	cands, deadSegs := repairSetAsideDeleted(sc.cands, sc.tombs, rep)
	picks, keys := repairPick(cands, rep)

	// The new index, written beside the old one, then swapped in.
	newDir := fs.PathJoin(dir, "index.repair")
	now := wallNanos()
	if o.Now != nil {
		now = o.Now()
	}
	if err := repairWriteIndex(fs, newDir, ct, now, sc, picks, keys, deadSegs, rep); err != nil {
		return nil, err
	}
	if err := repairInstall(fs, dir, newDir, now, rep); err != nil {
		return nil, err
	}
	sort.Strings(rep.SetAside)
	return rep, nil
}

// repairLock checks that dir is a store directory, lists its segments
// directory and takes the store's lock.
func repairLock(fs vfs.FS, dir string) ([]string, io.Closer, error) {
	st, err := fs.Stat(dir)
	if err != nil {
		return nil, nil, fmt.Errorf("%w: %s: %v", ErrNotStore, dir, err)
	}
	if !st.IsDir() {
		return nil, nil, fmt.Errorf("%w: %s is a file, not a store directory", ErrNotStore, dir)
	}
	segDir := fs.PathJoin(dir, "segments")
	names, err := fs.List(segDir)
	if err != nil {
		return nil, nil, fmt.Errorf("%w: %s has no segments directory: %v", ErrNotStore, dir, err)
	}
	lock, err := fs.Lock(fs.PathJoin(dir, "hcache.lock"))
	if err != nil {
		return nil, nil, fmt.Errorf("chunk: %s is in use by another process: %w", dir, err)
	}
	return names, lock, nil
}

// repairScan is what the segment files hold: their ids (ascending), where
// each one's last checked record ends, the records that verified and the
// tombstones, and the chunk size of the first record (0: none).
type repairScan struct {
	ids        []uint32
	segWritten map[uint32]uint64
	cands      []*repairCand
	tombs      []*repairCand
	// groups: the shared group records, by namespace and key (the
	// latest written copy of each).
	groups map[gid]*repairCand
	ct     int
}

// repairScanAll scans every segment file in id order. A record of another
// chunk size than the first is set aside.
func repairScanAll(o RepairOptions, names []string, rep *RepairReport) (*repairScan, error) {
	fs := o.FS
	segDir := fs.PathJoin(o.Dir, "segments")
	sc := &repairScan{segWritten: map[uint32]uint64{}, groups: map[gid]*repairCand{}}
	var total int64
	for _, n := range names {
		if id, ok := parseSegName(n); ok {
			sc.ids = append(sc.ids, id)
			if st, err := fs.Stat(fs.PathJoin(segDir, n)); err == nil {
				total += st.Size()
			}
		}
	}
	sort.Slice(sc.ids, func(i, j int) bool { return sc.ids[i] < sc.ids[j] })
	var done int64
	for _, id := range sc.ids {
		path := fs.PathJoin(segDir, segName(id))
		cs, end, size, err := repairScanSegment(fs, path, id, rep)
		if err != nil {
			return nil, fmt.Errorf("chunk: repair: scan %s: %w", path, err)
		}
		rep.Segments++
		sc.segWritten[id] = end
		for _, c := range cs {
			if c.tomb {
				sc.tombs = append(sc.tombs, c)
				continue
			}
			if sc.ct == 0 {
				sc.ct = int(c.h.ChunkTokens)
			}
			if int(c.h.ChunkTokens) != sc.ct {
				rep.SetAside = append(rep.SetAside, fmt.Sprintf("segment %d offset %d: record of %d-token chunks in a store of %d-token chunks", id, c.off, c.h.ChunkTokens, sc.ct))
				continue
			}
			if c.group {
				k := gid{c.h.Namespace, c.h.Key}
				if old := sc.groups[k]; old != nil {
					rep.Superseded++ // a GC copy, or a group written again after it was dropped
				}
				sc.groups[k] = c // segments in id order: the latest copy wins
				continue
			}
			sc.cands = append(sc.cands, c)
		}
		done += size
		if o.Progress != nil {
			o.Progress(done, total)
		}
	}
	return sc, nil
}

// repairSetAsideDeleted sets aside a context's records up to the newest
// generation a tombstone names (they were deleted). It returns the records
// kept and, per deleted context, the segments holding its deleted records.
func repairSetAsideDeleted(cands, tombs []*repairCand, rep *RepairReport) ([]*repairCand, map[string]map[uint32]bool) {
	deleted := map[string]uint64{}
	for _, tb := range tombs {
		deleted[tb.ctxKey] = max(deleted[tb.ctxKey], tb.h.Gen)
	}
	deadSegs := map[string]map[uint32]bool{}
	var kept []*repairCand
	for _, c := range cands {
		if g, ok := deleted[c.ctxKey]; ok && c.h.Gen <= g {
			if deadSegs[c.ctxKey] == nil {
				deadSegs[c.ctxKey] = map[uint32]bool{}
			}
			deadSegs[c.ctxKey][c.seg] = true
			rep.Deleted++
			continue
		}
		kept = append(kept, c)
	}
	return kept, deadSegs
}

// ctxPick is a context's newest generation and, per group, its newest
// version.
type ctxPick struct {
	ns, id string
	gen    uint64
	ident  []byte
	groups map[uint32]*repairCand
	older  int
}

// repairPick picks each context's newest generation and each group's newest
// version (most tokens, then the latest written). It returns the picks and
// their keys, sorted.
func repairPick(cands []*repairCand, rep *RepairReport) (map[string]*ctxPick, []string) {
	picks := map[string]*ctxPick{}
	for _, c := range cands {
		p := picks[c.ctxKey]
		if p == nil || c.h.Gen > p.gen {
			if p != nil {
				p.older += len(p.groups)
			}
			older := 0
			if p != nil {
				older = p.older
			}
			p = &ctxPick{ns: c.h.Namespace, id: c.h.ContextID, gen: c.h.Gen, ident: c.h.Identity, groups: map[uint32]*repairCand{}, older: older}
			picks[c.ctxKey] = p
		}
		if c.h.Gen < p.gen {
			p.older++
			continue
		}
		if !bytes.Equal(c.h.Identity, p.ident) {
			rep.SetAside = append(rep.SetAside, fmt.Sprintf("%s/%s group %d (segment %d offset %d): identity differs from the context's other records", p.ns, p.id, c.h.Group, c.seg, c.off))
			continue
		}
		cur := p.groups[c.h.Group]
		if cur == nil {
			p.groups[c.h.Group] = c
			continue
		}
		rep.Superseded++
		if c.h.Tokens > cur.h.Tokens || (c.h.Tokens == cur.h.Tokens && (c.seg > cur.seg || (c.seg == cur.seg && c.off > cur.off))) {
			p.groups[c.h.Group] = c
		}
	}
	keys := make([]string, 0, len(picks))
	for k := range picks {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return picks, keys
}

// repairWriteIndex creates a new index in newDir holding the store record,
// each picked context's longest contiguous prefix of groups, the
// tombstones, and every segment, sealed.
func repairWriteIndex(fs vfs.FS, newDir string, ct int, now int64, sc *repairScan, picks map[string]*ctxPick, keys []string, deadSegs map[string]map[uint32]bool, rep *RepairReport) error {
	if err := fs.RemoveAll(newDir); err != nil {
		return err
	}
	db, err := lsm.Open(fs, newDir, lsm.Options{})
	if err != nil {
		return fmt.Errorf("chunk: repair: create index: %w", err)
	}
	b := db.NewBatch()
	m := lsm.Meta{StoreVersion: StoreVersion, ChunkTokens: uint32(ct), CreatedNanos: now}
	b.PutMeta(&m)
	live := map[uint32]uint64{}
	nss := map[string]bool{}
	adopted := map[gid]*repairCand{}
	for _, k := range keys {
		p := picks[k]
		if p.older > 0 {
			rep.SetAside = append(rep.SetAside, fmt.Sprintf("%s/%s: %d records of older generations (deleted or recreated contexts)", p.ns, p.id, p.older))
		}
		if p.tokenAddressed() {
			if repairTokenContext(b, ct, p, sc.groups, adopted, live, rep) && !nss[p.ns] {
				nss[p.ns] = true
				b.PutNamespace(p.ns, now)
			}
			continue
		}
		var tokens uint64
		n := 0
		for g := uint32(0); ; g++ {
			c := p.groups[g]
			if c == nil {
				break
			}
			ch := lsm.Chunk{Segment: c.seg, Offset: c.off, Length: uint32(c.h.RecordBytes), Tokens: c.h.Tokens, Slices: c.h.Slices}
			b.PutChunk(p.ns, p.id, g, &ch)
			live[c.seg] += c.h.RecordBytes
			tokens += uint64(c.h.Tokens)
			n++
			if int(c.h.Tokens) != ct {
				break // a partial group ends the prefix
			}
		}
		if skipped := len(p.groups) - n; skipped > 0 {
			rep.SetAside = append(rep.SetAside, fmt.Sprintf("%s/%s: %d groups after group %d (not contiguous with the prefix)", p.ns, p.id, skipped, n))
		}
		if n == 0 {
			continue
		}
		rec := lsm.Context{Identity: p.ident, Tokens: tokens, Gen: p.gen}
		b.PutContext(p.ns, p.id, &rec)
		if !nss[p.ns] {
			nss[p.ns] = true
			b.PutNamespace(p.ns, now)
		}
		rep.Contexts++
		rep.Groups += n
		rep.Tokens += tokens
		rep.Adopted = append(rep.Adopted, fmt.Sprintf("%s/%s: %d tokens in %d groups (generation %d)", p.ns, p.id, tokens, n, p.gen))
	}
	repairPutGroups(b, sc.groups, adopted, live, rep)
	// Tombstones are indexed again, so GC keeps carrying them while
	// segments holding the deleted records exist.
	for _, tb := range sc.tombs {
		var segs []uint32
		for sid := range deadSegs[tb.ctxKey] {
			segs = append(segs, sid)
		}
		sort.Slice(segs, func(i, j int) bool { return segs[i] < segs[j] })
		t := lsm.Tombstone{Namespace: tb.h.Namespace, ID: tb.h.ContextID, Gen: tb.h.Gen, Segments: segs}
		b.PutTombstone(tb.seg, tb.off, &t)
	}
	for _, id := range sc.ids {
		// Every segment is sealed: new writes go to a new one, so nothing
		// set aside is overwritten. GC reclaims what is not live.
		sr := lsm.Segment{Written: max(sc.segWritten[id], format.SegmentHeaderBytes), Live: live[id], Sealed: true}
		b.PutSegment(id, &sr)
	}
	if err := b.Commit(true); err != nil {
		db.Close()
		return fmt.Errorf("chunk: repair: commit index: %w", err)
	}
	if err := db.Close(); err != nil {
		return fmt.Errorf("chunk: repair: close index: %w", err)
	}
	return nil
}

// repairInstall moves the old index aside (never deleting it), renames the
// new one into place and writes the creation marker if it is missing.
func repairInstall(fs vfs.FS, dir, newDir string, now int64, rep *RepairReport) error {
	indexDir := fs.PathJoin(dir, "index")
	if _, err := fs.Stat(indexDir); err == nil {
		rep.OldIndex = fs.PathJoin(dir, fmt.Sprintf("index.damaged-%d", now))
		if err := fs.Rename(indexDir, rep.OldIndex); err != nil {
			return fmt.Errorf("chunk: repair: move the old index aside: %w", err)
		}
	}
	if err := fs.Rename(newDir, indexDir); err != nil {
		return fmt.Errorf("chunk: repair: install the new index: %w", err)
	}
	if ok, err := readMarker(fs, fs.PathJoin(dir, createdMarker)); !ok || err != nil {
		if err := writeMarker(fs, fs.PathJoin(dir, createdMarker)); err != nil {
			return fmt.Errorf("chunk: repair: write %s: %w", createdMarker, err)
		}
	}
	return syncDir(fs, dir)
}

// repairScanSegment reads every record of a segment file whose header checks
// and whose slices verify. It returns them, the end of the last record that
// checked, and the file size. Blocks that are not a record header are
// skipped one at a time (a torn or damaged header does not hide the records
// after it).
func repairScanSegment(fs vfs.FS, path string, id uint32, rep *RepairReport) ([]*repairCand, uint64, int64, error) {
	f, err := fs.Open(path)
	if err != nil {
		return nil, 0, 0, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, 0, 0, err
	}
	size := st.Size()
	defer scanAdvice(f)()
	block := make([]byte, BlockBytes)
	if _, err := f.ReadAt(block, 0); err != nil {
		rep.SetAside = append(rep.SetAside, fmt.Sprintf("segment %d: header unreadable: %v", id, err))
	} else if h, err := DecodeSegmentHeader(block); err != nil {
		rep.SetAside = append(rep.SetAside, fmt.Sprintf("segment %d: %v (its records are still checked one by one)", id, err))
	} else if h.ID != id {
		rep.SetAside = append(rep.SetAside, fmt.Sprintf("segment %d: header names segment %d (its records are still checked one by one)", id, h.ID))
	}
	var out []*repairCand
	end := uint64(format.SegmentHeaderBytes)
	skipped := 0
	var rec []byte
	var tmp []byte
	for off := nextData(f, format.SegmentHeaderBytes, size); off+BlockBytes <= size; { // never-written space holds no record (tombstone.go)
		if _, err := f.ReadAt(block, off); err != nil {
			return nil, 0, 0, err
		}
		hb := int(BlockBytes)
		if format.IsRecordMagic(block) {
			if want := int(leU32(block[12:])); want > BlockBytes && want <= format.MaxHeaderBytes && want%BlockBytes == 0 && off+int64(want) <= size {
				hb = want
			}
		}
		hdr := block
		if hb > BlockBytes {
			hdr = make([]byte, hb)
			if _, err := f.ReadAt(hdr, off); err != nil {
				return nil, 0, 0, err
			}
		}
		h, err := DecodeRecordHeader(hdr)
		if err != nil || off+int64(h.RecordBytes) > size {
			if !allZero(block) {
				skipped++
			}
			off = nextData(f, off+BlockBytes, size)
			continue
		}
		rep.Records++
		where := fmt.Sprintf("segment %d offset %d", id, off)
		next := off + int64(h.RecordBytes)
		end = uint64(next)
		if h.Flags&RecordTombstone != 0 {
			if h.Segment == id && lsm.ValidateName("namespace", h.Namespace) == nil && lsm.ValidateName("context id", h.ContextID) == nil {
				out = append(out, &repairCand{h: h, seg: id, off: uint64(off), ctxKey: ctxMapKey(h.Namespace, h.ContextID), tomb: true})
			}
			off = next
			continue
		}
		if h.Version == format.VersionV1 {
			rep.SetAside = append(rep.SetAside, where+": format version 1 record (no context descriptor; written before repair was possible)")
			off = next
			continue
		}
		if h.Segment != id {
			rep.SetAside = append(rep.SetAside, fmt.Sprintf("%s: record names segment %d", where, h.Segment))
			off = next
			continue
		}
		group := h.Flags&format.RecordGroup != 0
		ident, err := DecodeIdentity(h.Identity)
		if err == nil {
			if berr := lsm.ValidateName("namespace", h.Namespace); berr != nil {
				err = berr
			} else if berr := lsm.ValidateName("context id", h.ContextID); berr != nil && !group {
				err = berr
			}
		}
		if err != nil {
			rep.SetAside = append(rep.SetAside, fmt.Sprintf("%s: %v", where, err))
			off = next
			continue
		}
		binding := NewBinding(h.Namespace, h.ContextID, h.Gen, ident)
		if group {
			binding = state.NewGroupBinding(h.Namespace, ident, h.Key)
		}
		if binding != h.Binding {
			rep.SetAside = append(rep.SetAside, fmt.Sprintf("%s (%s/%s group %d): binding does not match the descriptor", where, h.Namespace, h.ContextID, h.Group))
			off = next
			continue
		}
		if cap(rec) < int(h.RecordBytes) {
			rec = make([]byte, h.RecordBytes)
		}
		rec = rec[:h.RecordBytes]
		if _, err := f.ReadAt(rec, off); err != nil {
			return nil, 0, 0, err
		}
		if h.Flags&format.RecordTip != 0 {
			// A tip record: no rows to verify.
		} else if err := verifyRecord(h, ident, &binding, rec, &tmp); err != nil {
			rep.SetAside = append(rep.SetAside, fmt.Sprintf("%s (%s/%s group %d): %v", where, h.Namespace, h.ContextID, h.Group, err))
			off = next
			continue
		}
		out = append(out, &repairCand{h: h, seg: id, off: uint64(off), ident: ident, ctxKey: ctxMapKey(h.Namespace, h.ContextID), group: group})
		off = next
	}
	if skipped > 0 {
		rep.SetAside = append(rep.SetAside, fmt.Sprintf("segment %d: %d non-zero blocks that are not a valid record header (torn or damaged) skipped", id, skipped))
	}
	return out, end, size, nil
}

// verifyRecord checks that a record's slices match its identity's plan and
// pass their checksums.
func verifyRecord(h *RecordHeader, ident *Identity, binding *Binding, rec []byte, tmp *[]byte) error {
	var stored []int
	for l, p := range ident.Plan {
		if p.Kind != LayerNone {
			stored = append(stored, l)
		}
	}
	if len(stored) != len(h.Slices) {
		return fmt.Errorf("%w: %d slices, the plan stores %d layers", ErrCorrupt, len(h.Slices), len(stored))
	}
	for i, sl := range h.Slices {
		l := stored[i]
		if int(sl.Layer) != l || int(sl.Raw) != int(h.Tokens)*int(ident.Plan[l].RowBytes) {
			return fmt.Errorf("%w: slice %d (layer %d, %d bytes) does not fit the plan", ErrCorrupt, i, sl.Layer, sl.Raw)
		}
		data := rec[sl.Off : sl.Off+sl.Stored]
		raw := data
		if sl.Flags&lsm.SliceLZ4 != 0 {
			if len(*tmp) < 2*int(sl.Raw) {
				*tmp = make([]byte, 2*int(sl.Raw))
			}
			raw = (*tmp)[:sl.Raw]
			if err := decompressSlice(raw, (*tmp)[sl.Raw:], data); err != nil {
				return err
			}
		} else if sl.Stored != sl.Raw {
			return fmt.Errorf("%w: slice of layer %d stores %d bytes of %d", ErrCorrupt, sl.Layer, sl.Stored, sl.Raw)
		}
		if got := crc32.Update(format.SliceSeed(*binding, h.Group, sl.Layer), format.Castagnoli, raw); got != sl.CRC {
			return fmt.Errorf("%w: layer %d checksum %08x, record says %08x", ErrCorrupt, sl.Layer, got, sl.CRC)
		}
	}
	return nil
}

func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

func leU32(b []byte) uint32 {
	return uint32(b[0]) | uint32(b[1])<<8 | uint32(b[2])<<16 | uint32(b[3])<<24
}
