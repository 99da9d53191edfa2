package chunk

import (
	"errors"
	"fmt"
	"io"

	"github.com/hcache/hcache/chunk/format"
)

// The hooks a tier under the store (package chunk/remote) drives: it reads a
// sealed local segment to copy it elsewhere (OpenSealedSegment), and once
// the copy is verified it switches the segment's location to the provider
// holding it (MoveSegment); the local file goes when no restore reads it.

// ErrNotSealed is returned for a segment that is still written (the
// active one), unknown, being removed, or already held by a provider.
var ErrNotSealed = errors.New("chunk: not a sealed local segment")

// sealedReader reads a sealed local segment's written bytes through its
// vfs.File (never the O_DIRECT descriptor: the caller's buffers are
// unaligned) and holds a reference, so GC does not delete the file under it.
type sealedReader struct {
	s    *Store
	sg   *segFile
	size int64
	done bool
}

// OpenSealedSegment opens the written bytes of a sealed local segment
// ([0, Written): the header and every record ever appended) for reading.
// Close it: it holds the file against GC and a move.
func (s *Store) OpenSealedSegment(id uint32) (ObjectReader, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	sg, rec := s.segs[id], s.segRecs[id]
	if s.closed || sg == nil || rec == nil || sg.doomed || sg.obj != nil || rec.Location != "" || (s.active != nil && s.active.id == id) {
		return nil, fmt.Errorf("%w: segment %d", ErrNotSealed, id)
	}
	sg.refs++
	s.restores.Add(1)
	return &sealedReader{s: s, sg: sg, size: int64(rec.Written)}, nil
}

func (r *sealedReader) ReadAt(p []byte, off int64) (int, error) {
	if off >= r.size {
		return 0, io.EOF
	}
	want := len(p)
	if off+int64(want) > r.size {
		p = p[:r.size-off]
	}
	n, err := r.sg.f.ReadAt(p, off)
	if err == nil && n < want {
		err = io.EOF
	}
	return n, err
}

func (r *sealedReader) Size() int64 { return r.size }

func (r *sealedReader) Close() error {
	r.s.mu.Lock()
	defer r.s.mu.Unlock()
	if r.done {
		return nil
	}
	r.done = true
	r.s.unref([]*segFile{r.sg})
	r.s.restores.Done()
	return nil
}

// MoveSegment records that provider loc holds sealed local segment id (its
// object holds at least the segment's written bytes, header first: checked
// here; the caller verified the bytes) and switches reads to it. The local
// file is deleted once no restore reads it. It runs on the flusher, so it
// never races a commit or GC of the segment.
func (s *Store) MoveSegment(id uint32, loc string) error {
	done := make(chan error, 1)
	if err := s.submit(op{kind: opMove, group: id, loc: loc, done: done}); err != nil {
		return err
	}
	return <-done
}

// moveSegment is MoveSegment on the flusher.
func (s *Store) moveSegment(id uint32, loc string) error {
	p, err := s.provider(loc)
	if err != nil {
		return err
	}
	s.mu.Lock()
	sg, rec := s.segs[id], s.segRecs[id]
	if sg == nil || rec == nil || sg.doomed || sg.obj != nil || rec.Location != "" || (s.active != nil && s.active.id == id) {
		s.mu.Unlock()
		return fmt.Errorf("%w: segment %d", ErrNotSealed, id)
	}
	written := rec.Written
	s.mu.Unlock()
	r, err := p.OpenForReading(id)
	if err != nil {
		return fmt.Errorf("chunk: move segment %d to %s: %w", id, loc, err)
	}
	keep := false
	defer func() {
		if !keep {
			r.Close()
		}
	}()
	size := r.Size()
	if so, ok := r.(SizedObject); ok {
		if size, err = so.Stat(); err != nil {
			return fmt.Errorf("chunk: move segment %d to %s: %w", id, loc, err)
		}
	}
	if size < int64(written) {
		return fmt.Errorf("%w: segment %d in %s holds %d bytes, %d written", ErrCorrupt, id, loc, size, written)
	}
	hdr := make([]byte, format.SegmentHeaderBytes)
	if _, err := r.ReadAt(hdr, 0); err != nil {
		return fmt.Errorf("chunk: move segment %d to %s: read header: %w", id, loc, err)
	}
	if h, err := DecodeSegmentHeader(hdr); err != nil || h.ID != id {
		return fmt.Errorf("%w: segment %d in %s: header %v (names %v)", ErrCorrupt, id, loc, err, h)
	}
	s.mu.Lock()
	nrec := *rec
	nrec.Sealed, nrec.Location = true, loc
	s.mu.Unlock()
	b := s.db.NewBatch()
	b.PutSegment(id, &nrec)
	if err := s.commitIndex(b); err != nil {
		return err
	}
	keep = true
	s.mu.Lock()
	defer s.mu.Unlock()
	rec.Sealed, rec.Location = true, loc
	s.segs[id] = &segFile{id: id, name: loc + ":" + segName(id), fd: -1, obj: r, allocated: size}
	sg.doomed = true
	if sg.refs == 0 {
		s.removeSegment(sg)
	}
	return nil
}
