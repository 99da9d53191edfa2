package chunk

import (
	"encoding/binary"
	"errors"
	"fmt"
	"strings"
	"syscall"
	"time"

	"github.com/cockroachdb/pebble/v2/vfs"
	"github.com/hcache/hcache/chunk/format"
	"github.com/hcache/hcache/iouring"
	"github.com/hcache/hcache/lsm"
)

// storeEntries are the names a store directory may hold.
var storeEntries = map[string]bool{"hcache.lock": true, createdMarker: true, createdMarker + ".tmp": true, "index": true, "segments": true, ballastFile: true}

// Open opens or creates a store (with Options.ReadOnly: opens an existing
// one and writes nothing).
func Open(opts Options) (*Store, error) {
	start := time.Now()
	if err := opts.fill(); err != nil {
		return nil, err
	}
	s := newStore(opts)
	hasMarker, err := s.checkCreated()
	if err != nil {
		return nil, err
	}
	if err := s.lockDir(); err != nil {
		return nil, err
	}
	ok := false
	defer func() {
		if !ok {
			s.releaseOnFailedOpen()
		}
	}()
	s.releaseBallastIfFull()
	if err := s.openIndex(hasMarker); err != nil {
		return nil, err
	}
	if err := s.openEngine(); err != nil {
		return nil, err
	}
	if err := s.syncStoreDirs(); err != nil {
		return nil, err
	}
	if err := s.loadMeta(hasMarker); err != nil {
		return nil, err
	}
	if !hasMarker {
		if err := s.markCreated(); err != nil {
			return nil, err
		}
	}
	if err := s.recover(); err != nil {
		if errors.Is(err, lsm.ErrCorrupt) || errors.Is(err, lsm.ErrFatal) {
			return nil, indexDamaged(s.dir, "%v", err)
		}
		return nil, err
	}
	if err := s.rollForwardTombstones(); err != nil {
		return nil, err
	}
	if err := s.takeBallastAtOpen(); err != nil {
		return nil, err
	}
	s.readBufs.hooks, s.readBufs.logf, s.readBufs.bounded, s.readBufs.limit = opts.ReadBuffers, opts.Logf, true, opts.IdleReadBufferBytes
	s.gate.limit = opts.RestoreQueueBytes
	s.staging.init(opts.StagingBytes)
	s.staging.invariant = s.invariant
	s.cache = newSliceCache(opts.CacheBytes)
	s.recovery.Duration = time.Since(start)
	if !s.readOnly {
		s.prepareRestoreBuffers()
	}
	s.startBackground()
	ok = true
	return s, nil
}

// newStore returns a store of filled options with nothing opened yet.
func newStore(opts Options) *Store {
	s := &Store{
		opts: opts, fs: opts.FS, dir: opts.Dir, readOnly: opts.ReadOnly,
		ctxs: map[string]*ctxState{}, segs: map[uint32]*segFile{}, segRecs: map[uint32]*lsm.Segment{},
		namespaces: map[string]bool{}, nextSeg: 1, nextGen: 1,
		ops: make(chan op, 1024), dirtyCtxs: map[*ctxState]struct{}{},
		groups: map[gid]*groupEnt{}, groupSegTouched: map[uint32]bool{},
		keyFunc: opts.ChainKeyFunc,
	}
	s.segDir = s.fs.PathJoin(s.dir, "segments")
	return s
}

// checkCreated reports whether the directory holds a finished store (its
// creation marker). It refuses a path that is not a store, a damaged marker
// of a store that holds data, and (read-only) a store never finished.
func (s *Store) checkCreated() (bool, error) {
	st, statErr := s.fs.Stat(s.dir)
	switch {
	case statErr == nil && !st.IsDir():
		return false, fmt.Errorf("%w: %s is a file, not a store directory", ErrNotStore, s.dir)
	case statErr != nil && (s.readOnly || s.opts.MustExist):
		return false, fmt.Errorf("%w: %s: %v", ErrNotStore, s.dir, statErr)
	}
	markerPath := s.fs.PathJoin(s.dir, createdMarker)
	hasMarker, markerErr := readMarker(s.fs, markerPath)
	if markerErr != nil {
		// A marker that does not check: damage, unless nothing was ever
		// stored (a marker from before the atomic write, torn by a crash
		// while the store was being created).
		if statErr != nil || s.segmentsHoldRecords() {
			return false, indexDamaged(s.dir, "creation marker %s: %v", markerPath, markerErr)
		}
		hasMarker = false
	}
	if !hasMarker {
		if statErr == nil {
			if err := s.checkUnfinished(); err != nil {
				return false, err
			}
		}
		if s.readOnly || s.opts.MustExist {
			return false, fmt.Errorf("%w: %s has no %s", ErrNotStore, s.dir, createdMarker)
		}
	}
	return hasMarker, nil
}

// lockDir creates the segment directory and takes the store's lock (not
// read-only).
func (s *Store) lockDir() error {
	if s.readOnly {
		return nil
	}
	if err := s.fs.MkdirAll(s.segDir, 0o755); err != nil {
		return fmt.Errorf("chunk: create %s: %w", s.segDir, err)
	}
	lock, err := s.fs.Lock(s.fs.PathJoin(s.dir, "hcache.lock"))
	if err != nil {
		return fmt.Errorf("chunk: %s is in use by another process: %w", s.dir, err)
	}
	s.lock = lock
	return nil
}

// releaseBallastIfFull releases the ballast on a (nearly) full disk before
// Pebble's recovery needs room for a new WAL and manifest; the store then
// opens refusing writes until GC frees space.
func (s *Store) releaseBallastIfFull() {
	if s.readOnly || s.opts.BallastBytes <= 0 {
		return
	}
	if du, err := s.fs.GetDiskUsage(s.dir); err == nil && int64(du.AvailBytes) < s.opts.BallastBytes/2 {
		s.diskFull = true
		released := s.releaseBallast()
		s.opts.Logf("chunk: %s: only %d bytes free: ballast released (%v); writes refused until GC frees space", s.dir, du.AvailBytes, released)
	}
}

// openIndex opens the Pebble index: a finished store's index must exist and
// read whole (checked read-only before Pebble's recovery rewrites
// anything); an unfinished creation's index is created again.
func (s *Store) openIndex(hasMarker bool) error {
	indexDir := s.fs.PathJoin(s.dir, "index")
	var err error
	if hasMarker && !s.readOnly {
		// Read the whole index read-only first: a damaged index is
		// refused before Pebble's own recovery rewrites anything.
		if err := validateIndex(s.fs, indexDir); err != nil {
			return indexDamaged(s.dir, "%v", err)
		}
	}
	if hasMarker {
		if s.readOnly {
			if err := lsm.CheckWAL(s.fs, indexDir); err != nil {
				return indexDamaged(s.dir, "%v", err)
			}
		}
		if s.db, err = lsm.Open(s.fs, indexDir, lsm.Options{ReadOnly: s.readOnly, MustExist: true}); err != nil {
			if errors.Is(err, lsm.ErrLocked) {
				return fmt.Errorf("chunk: %s is in use by another process: %w", s.dir, err)
			}
			return indexDamaged(s.dir, "%v", err)
		}
		return nil
	}
	if s.db, err = lsm.Open(s.fs, indexDir, lsm.Options{}); err != nil {
		// The store's creation was cut short (no marker, no segment
		// data): it never acknowledged anything, so start it again.
		s.opts.Logf("chunk: %s: unfinished store creation (%v); creating it again", s.dir, err)
		if err := s.fs.RemoveAll(indexDir); err != nil {
			return err
		}
		if s.db, err = lsm.Open(s.fs, indexDir, lsm.Options{}); err != nil {
			return err
		}
	}
	return nil
}

// openEngine takes Options.Engine or creates an engine of EngineKind.
func (s *Store) openEngine() error {
	if s.opts.Engine != nil {
		s.eng = s.opts.Engine
		return nil
	}
	var err error
	if s.eng, err = iouring.New(iouring.Config{Kind: s.opts.EngineKind, Entries: nextPow2(max(s.opts.QueueDepth*4, iouring.DefaultEntries)), Logf: s.opts.Logf}); err != nil {
		return err
	}
	s.ownEng = true
	return nil
}

// syncStoreDirs makes the directory entries of the store itself durable
// (segments/, index/ and the store directory in its parent).
func (s *Store) syncStoreDirs() error {
	if s.readOnly {
		return nil
	}
	for _, d := range []string{s.fs.PathDir(s.dir), s.dir} {
		if err := syncDir(s.fs, d); err != nil {
			return fmt.Errorf("chunk: sync directory %s: %w", d, err)
		}
	}
	return nil
}

// markCreated writes the creation marker once the new index holds its meta
// record, and makes its directory entry durable.
func (s *Store) markCreated() error {
	markerPath := s.fs.PathJoin(s.dir, createdMarker)
	if err := writeMarker(s.fs, markerPath); err != nil {
		return fmt.Errorf("chunk: write %s: %w", markerPath, err)
	}
	return syncDir(s.fs, s.dir)
}

// takeBallastAtOpen takes the ballast (unless the disk is full); a disk too
// full for it opens in the disk-full state.
func (s *Store) takeBallastAtOpen() error {
	if s.readOnly || s.diskFull || s.opts.BallastBytes <= 0 {
		return nil
	}
	if err := s.takeBallast(); err != nil {
		if !errors.Is(err, syscall.ENOSPC) {
			return fmt.Errorf("chunk: ballast: %w", err)
		}
		s.mu.Lock()
		s.enterDiskFullLocked(err)
		s.mu.Unlock()
	}
	return nil
}

// startBackground starts the flusher and the GC loop (not read-only).
func (s *Store) startBackground() {
	s.gcStop = make(chan struct{})
	if s.readOnly {
		return
	}
	s.flusherWG.Add(1)
	go s.flushLoop()
	if s.opts.GCInterval > 0 {
		s.gcWG.Add(1)
		go s.gcLoop(s.opts.GCInterval)
	}
}

// validateIndex opens the index read-only and reads every key: Pebble
// reports a WAL that lost a synced record, a missing manifest or a corrupt
// sstable block as an error here, without writing anything.
func validateIndex(fs vfs.FS, dir string) error {
	if err := lsm.CheckWAL(fs, dir); err != nil {
		return err
	}
	db, err := lsm.Open(fs, dir, lsm.Options{ReadOnly: true})
	if err != nil {
		return err
	}
	defer db.Close()
	if _, err := db.GetMeta(); err != nil {
		if errors.Is(err, lsm.ErrNotFound) {
			return fmt.Errorf("the index holds no store record though %s says the store was created", createdMarker)
		}
		return err
	}
	if err := db.ReadAll(); err != nil {
		return err
	}
	return db.Err()
}

// checkUnfinished runs when the directory exists without a creation
// marker: that is an unfinished creation only if nothing else is there and
// no segment holds a record; otherwise the marker was lost and Open refuses.
func (s *Store) checkUnfinished() error {
	names, err := s.fs.List(s.dir)
	if err != nil {
		return fmt.Errorf("chunk: list %s: %w", s.dir, err)
	}
	for _, n := range names {
		if !storeEntries[n] && !strings.HasPrefix(n, "index.") && n != "lost+found" {
			return fmt.Errorf("%w: %s is not empty (it holds %q) and has no %s; refusing to create a store in it", ErrNotStore, s.dir, n, createdMarker)
		}
	}
	if s.segmentsHoldRecords() {
		return indexDamaged(s.dir, "%s is missing but segments hold records", createdMarker)
	}
	return nil
}

// segmentsHoldRecords reports whether any segment file holds a record.
func (s *Store) segmentsHoldRecords() bool {
	segs, err := s.fs.List(s.segDir)
	if err != nil {
		return false // no segments directory: nothing written yet
	}
	for _, n := range segs {
		if _, ok := parseSegName(n); !ok {
			continue
		}
		if recs, _ := scanSegmentFile(s.fs, s.fs.PathJoin(s.segDir, n), 1); recs > 0 {
			return true
		}
	}
	return false
}

// scanSegmentFile counts (up to limit) the records whose headers check in a
// segment file, reading it through the vfs.
func scanSegmentFile(fs vfs.FS, path string, limit int) (int, error) {
	f, err := fs.Open(path)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return 0, err
	}
	n := 0
	hdr := make([]byte, BlockBytes)
	for off := int64(format.SegmentHeaderBytes); off+BlockBytes <= st.Size() && n < limit; {
		if _, err := f.ReadAt(hdr, off); err != nil {
			return n, err
		}
		h, err := DecodeRecordHeader(hdr)
		if err != nil {
			// A header longer than a block, or none.
			if want := int(binary.LittleEndian.Uint32(hdr[12:])); err != nil && len(hdr) < want && want <= format.MaxHeaderBytes && want%BlockBytes == 0 {
				big := make([]byte, want)
				if _, err := f.ReadAt(big, off); err == nil {
					h, err = DecodeRecordHeader(big)
					if err == nil {
						n++
						off += int64(h.RecordBytes)
						continue
					}
				}
			}
			break
		}
		n++
		off += int64(h.RecordBytes)
	}
	return n, nil
}

func nextPow2(n int) int {
	p := 1
	for p < n {
		p <<= 1
	}
	return min(p, iouring.MaxEntries)
}

func (s *Store) releaseOnFailedOpen() {
	for _, sg := range s.segs {
		sg.close()
	}
	if s.db != nil {
		s.db.Close()
	}
	if s.ownEng && s.eng != nil {
		s.eng.Close()
	}
	if s.lock != nil {
		s.lock.Close()
	}
}

func (s *Store) loadMeta(hasMarker bool) error {
	m, err := s.db.GetMeta()
	if errors.Is(err, lsm.ErrNotFound) && hasMarker {
		return indexDamaged(s.dir, "the index holds no store record though %s says the store was created", createdMarker)
	}
	if errors.Is(err, lsm.ErrNotFound) {
		ct := s.opts.ChunkTokens
		if ct == 0 {
			ct = DefaultChunkTokens
		}
		if ct < 1 || ct > MaxChunkTokens {
			return fmt.Errorf("chunk: ChunkTokens %d not in [1, %d]", ct, MaxChunkTokens)
		}
		m := lsm.Meta{StoreVersion: StoreVersion, ChunkTokens: uint32(ct), CreatedNanos: s.opts.Now()}
		b := s.db.NewBatch()
		b.PutMeta(&m)
		if err := b.Commit(true); err != nil {
			return err
		}
		s.ct = ct
		return nil
	}
	if err != nil {
		return indexDamaged(s.dir, "reading the store record: %v", err)
	}
	if m.StoreVersion != StoreVersion {
		return fmt.Errorf("chunk: store version %d, this build reads %d", m.StoreVersion, StoreVersion)
	}
	if s.opts.ChunkTokens != 0 && s.opts.ChunkTokens != int(m.ChunkTokens) {
		return fmt.Errorf("chunk: store was created with ChunkTokens %d, opened with %d", m.ChunkTokens, s.opts.ChunkTokens)
	}
	s.ct = int(m.ChunkTokens)
	return nil
}

// Close stops the flusher and closes files and the index. It flushes
// nothing: writers still open are abandoned (Writer.Abandon: the whole
// groups they handed to the flusher are committed, the rest is dropped;
// flush or close writers first), and fail with ErrClosed afterwards. It must not run
// concurrently with calls on those writers.
func (s *Store) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	s.closedFlag.Store(true)
	close(s.gcStop)
	// Writers still open lose their unflushed rows: their staging memory
	// is released below, and their methods fail with ErrClosed from now.
	var open []*Writer
	for _, c := range s.ctxs {
		if c.writer != nil {
			open = append(open, c.writer)
		}
	}
	s.mu.Unlock()
	for _, w := range open {
		w.abandon(ErrClosed)
	}
	s.gcWG.Wait()
	// Restores in flight finish (they stop at the next layer) before the
	// files they read are closed.
	s.restores.Wait()
	if !s.readOnly {
		// Every submit that saw the store open has sent its op; later
		// ones see it closed. The flusher handles them all before this.
		s.opsMu.Lock()
		s.opsMu.Unlock() //nolint:staticcheck // a barrier, not a critical section
		done := make(chan error, 1)
		s.ops <- op{kind: opClose, done: done}
		<-done
		s.flusherWG.Wait()
	}
	var firstErr error
	for _, sg := range s.segs {
		if err := sg.close(); err != nil && firstErr == nil {
			firstErr = err
		}
	}
	if err := s.db.Close(); err != nil && firstErr == nil {
		firstErr = err
	}
	s.staging.release()
	s.scratch.release()
	s.readBufs.release()
	if s.ownEng {
		s.eng.Close()
	}
	if s.lock != nil {
		if err := s.lock.Close(); err != nil && firstErr == nil {
			firstErr = err
		}
	}
	return firstErr
}
