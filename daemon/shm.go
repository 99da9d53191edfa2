package daemon

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	hcachev1 "github.com/hcache/hcache/proto/hcache/v1"
)

// The shared-memory side socket. A unix client registers a region by
// connecting to it and sending one message: the 8 bytes ShmMagic with a
// memfd in SCM_RIGHTS. The memfd must carry F_SEAL_SHRINK, so that the
// client cannot shrink it under the daemon's mapping (which would turn the
// daemon's accesses into SIGBUS). The daemon maps it (MAP_SHARED) and answers
// one line, "OK REGION SIZE\n" or "ERR MESSAGE\n". The region lives while
// that connection stays open: when the client closes it (or dies) the region
// is released, and requests naming it fail with FAILED_PRECONDITION; requests
// already using it finish first (the daemon unmaps after the last one).

// ShmMagic opens a region registration.
const ShmMagic = "HCSHM001"

type region struct {
	id       string
	uid      uint32
	mem      []byte
	refs     int
	released bool
}

type regions struct {
	mu    sync.Mutex
	byID  map[string]*region
	byUID map[uint32]int
	bytes int64
}

func (r *regions) init() {
	r.byID = map[string]*region{}
	r.byUID = map[uint32]int{}
}

// acquire returns the bytes [off, off+n) of a region registered by uid,
// with a reference held; call release after use.
func (r *regions) acquire(c *caller, sl *hcachev1.RegionSlice) (*region, []byte, error) {
	if !c.unix {
		return nil, nil, status.Error(codes.FailedPrecondition, "shared regions are only for unix socket clients")
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	g := r.byID[sl.GetRegion()]
	if g == nil || g.released || g.uid != c.uid {
		return nil, nil, status.Errorf(codes.FailedPrecondition, "shared region %q is not registered by this user (released, or never registered)", sl.GetRegion())
	}
	size := uint64(len(g.mem))
	if sl.GetOffset() > size || sl.GetLength() > size-sl.GetOffset() {
		return nil, nil, status.Errorf(codes.OutOfRange, "shared region %q: bytes [%d, %d) past its size %d", sl.GetRegion(), sl.GetOffset(), sl.GetOffset()+sl.GetLength(), size)
	}
	g.refs++
	return g, g.mem[sl.GetOffset() : sl.GetOffset()+sl.GetLength()], nil
}

func (r *regions) release(g *region) {
	r.mu.Lock()
	defer r.mu.Unlock()
	g.refs--
	r.maybeUnmap(g)
}

func (r *regions) maybeUnmap(g *region) {
	if g.released && g.refs == 0 && g.mem != nil {
		unix.Munmap(g.mem)
		r.bytes -= int64(len(g.mem))
		g.mem = nil
		delete(r.byID, g.id)
		r.byUID[g.uid]--
	}
}

func (r *regions) drop(g *region) {
	r.mu.Lock()
	defer r.mu.Unlock()
	g.released = true
	r.maybeUnmap(g)
}

func (r *regions) size() int64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.bytes
}

// serveShm accepts region registrations until the listener closes (ln is a
// steadyListener: transient accept errors are retried there). A connection
// from a user granted nothing is answered ERR and closed at once; so is one
// past the limits of side connections not registered yet (per user, and in
// all), so that no user can hold the daemon's file descriptors with silent
// connections. A pending connection has SideRegisterTimeout to register.
func (s *Server) serveShm(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		uc, ok := c.(*net.UnixConn)
		if !ok {
			c.Close()
			continue
		}
		cred, err := ucred(uc)
		if err != nil {
			s.refuseSide(uc, fmt.Errorf("SO_PEERCRED: %v", err))
			continue
		}
		if len(s.uidGrant(cred.Uid)) == 0 {
			s.refuseSide(uc, fmt.Errorf("uid %d is granted no namespace", cred.Uid))
			continue
		}
		release, err := s.takeSidePending(cred.Uid)
		if err != nil {
			s.metrics.sideRefused.Inc()
			s.refuseSide(uc, err)
			continue
		}
		s.shmConns.Add(1)
		go func() {
			defer s.shmConns.Done()
			s.handleShm(uc, cred, release)
		}()
	}
}

// refuseSide answers a side connection ERR and closes it, without waiting on
// the peer.
func (s *Server) refuseSide(c *net.UnixConn, err error) {
	s.log.Warn("side connection refused", "err", err)
	c.SetWriteDeadline(time.Now().Add(100 * time.Millisecond))
	fmt.Fprintf(c, "ERR %s\n", oneLine(err.Error()))
	c.Close()
}

// takeSidePending takes a slot of the side connections not registered yet,
// or refuses; the returned func gives it back (once).
func (s *Server) takeSidePending(uid uint32) (func(), error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if n := s.sidePending[uid]; n >= s.cfg.MaxSidePendingPerUID {
		return nil, fmt.Errorf("uid %d already has %d side connections waiting to register (--max-side-pending-per-uid)", uid, n)
	}
	if s.sidePendingTotal >= s.cfg.MaxSidePending {
		return nil, fmt.Errorf("%d side connections are waiting to register (--max-side-pending)", s.sidePendingTotal)
	}
	s.sidePending[uid]++
	s.sidePendingTotal++
	var once sync.Once
	return func() {
		once.Do(func() {
			s.mu.Lock()
			if s.sidePending[uid]--; s.sidePending[uid] == 0 {
				delete(s.sidePending, uid)
			}
			s.sidePendingTotal--
			s.mu.Unlock()
		})
	}, nil
}

func (s *Server) handleShm(c *net.UnixConn, cred *unix.Ucred, release func()) {
	defer c.Close()
	defer release()
	// Stop closes every side connection, registered or not.
	s.shmMu.Lock()
	s.shmOpen[c] = true
	s.shmMu.Unlock()
	defer func() {
		s.shmMu.Lock()
		delete(s.shmOpen, c)
		s.shmMu.Unlock()
	}()
	c.SetDeadline(time.Now().Add(s.cfg.SideRegisterTimeout))
	g, err := s.registerRegion(c, cred)
	if err != nil {
		s.log.Warn("shared region refused", "err", err)
		c.SetWriteDeadline(time.Now().Add(100 * time.Millisecond))
		fmt.Fprintf(c, "ERR %s\n", oneLine(err.Error()))
		return
	}
	s.log.Info("shared region registered", "region", g.id, "uid", g.uid, "bytes", len(g.mem))
	if _, err := fmt.Fprintf(c, "OK %s %d\n", g.id, len(g.mem)); err != nil {
		s.regions.drop(g)
		return
	}
	c.SetDeadline(time.Time{})
	// Registered: the connection now counts against --max-regions instead.
	release()
	// The region lives as long as the connection.
	io.Copy(io.Discard, c)
	s.regions.drop(g)
	s.log.Info("shared region released", "region", g.id)
}

func oneLine(s string) string { return string(bytes.ReplaceAll([]byte(s), []byte("\n"), []byte(" "))) }

func (s *Server) registerRegion(c *net.UnixConn, cred *unix.Ucred) (*region, error) {
	if len(s.uidGrant(cred.Uid)) == 0 {
		return nil, fmt.Errorf("uid %d is granted no namespace", cred.Uid)
	}
	buf := make([]byte, len(ShmMagic))
	oob := make([]byte, unix.CmsgSpace(4*4))
	n, oobn, _, _, err := c.ReadMsgUnix(buf, oob)
	if err != nil {
		return nil, err
	}
	var fds []int
	if cmsgs, err := unix.ParseSocketControlMessage(oob[:oobn]); err == nil {
		for _, m := range cmsgs {
			if f, err := unix.ParseUnixRights(&m); err == nil {
				fds = append(fds, f...)
			}
		}
	}
	defer func() {
		for _, fd := range fds {
			unix.Close(fd)
		}
	}()
	if n != len(ShmMagic) || string(buf) != ShmMagic {
		return nil, fmt.Errorf("bad registration: want the %d bytes %q", len(ShmMagic), ShmMagic)
	}
	if len(fds) != 1 {
		return nil, fmt.Errorf("registration carries %d file descriptors, want one memfd", len(fds))
	}
	fd := fds[0]
	seals, err := unix.FcntlInt(uintptr(fd), unix.F_GET_SEALS, 0)
	if err != nil {
		return nil, fmt.Errorf("the descriptor is not a sealable memfd (F_GET_SEALS: %v)", err)
	}
	if seals&unix.F_SEAL_SHRINK == 0 {
		return nil, errors.New("the memfd lacks F_SEAL_SHRINK (add it with fcntl F_ADD_SEALS before registering)")
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, err
	}
	if st.Size <= 0 {
		return nil, errors.New("the memfd is empty")
	}
	if st.Size > s.cfg.MaxRegionBytes {
		return nil, fmt.Errorf("region of %d bytes exceeds --max-region %d", st.Size, s.cfg.MaxRegionBytes)
	}
	s.regions.mu.Lock()
	if s.regions.byUID[cred.Uid] >= s.cfg.MaxRegionsPerUID {
		s.regions.mu.Unlock()
		return nil, fmt.Errorf("uid %d already has %d regions (--max-regions)", cred.Uid, s.cfg.MaxRegionsPerUID)
	}
	s.regions.byUID[cred.Uid]++
	s.regions.mu.Unlock()
	mem, err := unix.Mmap(fd, 0, int(st.Size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		s.regions.mu.Lock()
		s.regions.byUID[cred.Uid]--
		s.regions.mu.Unlock()
		return nil, fmt.Errorf("mmap: %w", err)
	}
	var idb [16]byte
	rand.Read(idb[:])
	g := &region{id: hex.EncodeToString(idb[:]), uid: cred.Uid, mem: mem}
	s.regions.mu.Lock()
	s.regions.byID[g.id] = g
	s.regions.bytes += int64(len(mem))
	s.regions.mu.Unlock()
	return g, nil
}
