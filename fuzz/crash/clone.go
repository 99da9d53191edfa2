package crash

import (
	"fmt"
	"hash/crc32"
	"hash/crc64"
	"io"
	"math/rand/v2"
	"sort"
	"strings"

	"github.com/cockroachdb/pebble/v2/vfs"
)

// cloneBlock is the unit in which unsynced data survives a crash (as in
// Pebble's MemFS.CrashClone).
const cloneBlock = 4096

// crashClone returns the state of mem after a power cut that kept pct
// percent of the unsynced data (directory entries and 4 KiB blocks), drawn
// with seed. Pebble's CrashClone draws in map order, so one seed gives
// another state each run; this one draws per path (see draws) from two
// deterministic clones (0%: what was synced; 100%: everything), so a seed
// replays. The states it makes are ones CrashClone can make: a kept
// unsynced entry keeps all its data, and a file whose entry was synced keeps
// its synced bytes and each unsynced block independently.
func crashClone(mem *vfs.MemFS, pct int, seed int64) (*vfs.MemFS, error) {
	fixed := func(p int) *vfs.MemFS {
		return mem.CrashClone(vfs.CrashCloneCfg{UnsyncedDataPercent: p, RNG: rand.New(rand.NewPCG(1, 2))})
	}
	if pct <= 0 {
		return fixed(0), nil
	}
	if pct >= 100 {
		return fixed(100), nil
	}
	synced, all := fixed(0), fixed(100)
	out := vfs.NewCrashableMem()
	c := &cloner{synced: synced, all: all, out: out, pct: pct, seed: uint64(seed)}
	if err := c.dir("/", true); err != nil {
		return nil, err
	}
	return out, nil
}

type cloner struct {
	synced, all, out *vfs.MemFS
	pct              int
	seed             uint64
}

// draws returns the random draws of one path: each path has its own, so
// that files another goroutine creates or removes at its own pace (Pebble
// deletes obsolete files after it opens) do not shift the draws of others.
func (c *cloner) draws(path, what string) func() bool {
	h := crc64.Checksum([]byte(what+"\x00"+path), crc64.MakeTable(crc64.ECMA))
	r := rand.New(rand.NewPCG(c.seed, h))
	return func() bool { return r.IntN(100) < c.pct }
}

// dir clones directory path; inSynced says the path is reachable through
// synced entries (so the synced clone has it).
func (c *cloner) dir(path string, inSynced bool) error {
	names := map[string]bool{}
	var syncedNames []string
	if inSynced {
		var err error
		if syncedNames, err = c.synced.List(path); err != nil {
			return err
		}
		for _, n := range syncedNames {
			names[n] = true
		}
	}
	allNames, err := c.all.List(path)
	if err != nil && !inSynced {
		return err
	}
	inAll := map[string]bool{}
	for _, n := range allNames {
		inAll[n] = true
		names[n] = true
	}
	inSyncedSet := map[string]bool{}
	for _, n := range syncedNames {
		inSyncedSet[n] = true
	}
	sorted := make([]string, 0, len(names))
	for n := range names {
		sorted = append(sorted, n)
	}
	sort.Strings(sorted)
	for _, n := range sorted {
		p := c.out.PathJoin(path, n)
		switch {
		case inSyncedSet[n] && inAll[n]:
			sdir, aDir := isDir(c.synced, p), isDir(c.all, p)
			switch {
			case sdir && aDir:
				if err := c.out.MkdirAll(p, 0o755); err != nil {
					return err
				}
				if err := c.dir(p, true); err != nil {
					return err
				}
			case !sdir && !aDir:
				if err := c.file(p); err != nil {
					return err
				}
			default: // replaced by another kind: keep the synced one
				if err := copyTree(c.synced, c.out, p); err != nil {
					return err
				}
			}
		case inSyncedSet[n]: // removed or renamed away, not synced
			if err := copyTree(c.synced, c.out, p); err != nil {
				return err
			}
		default: // an unsynced entry: kept whole, or not at all
			if c.draws(p, "entry")() {
				if err := copyTree(c.all, c.out, p); err != nil {
					return err
				}
			}
		}
	}
	return syncDir(c.out, path)
}

// file clones a file whose entry was synced: its synced bytes, then each
// unsynced block kept with probability pct.
func (c *cloner) file(p string) error {
	data, err := readFile(c.synced, p)
	if err != nil {
		return err
	}
	cur, err := readFile(c.all, p)
	if err != nil {
		return err
	}
	if len(cur) >= len(data) {
		keep := c.draws(p, "blocks")
		for i := 0; i < len(cur); i += cloneBlock {
			if !keep() {
				continue
			}
			block := cur[i:min(i+cloneBlock, len(cur))]
			if grow := i + len(block) - len(data); grow > 0 {
				data = append(data, make([]byte, grow)...)
			}
			copy(data[i:], block)
		}
	}
	return writeFile(c.out, p, data)
}

func isDir(fs vfs.FS, p string) bool {
	fi, err := fs.Stat(p)
	return err == nil && fi.IsDir()
}

func readFile(fs vfs.FS, p string) ([]byte, error) {
	f, err := fs.Open(p)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	buf := make([]byte, fi.Size())
	if _, err := io.ReadFull(f, buf); err != nil {
		return nil, err
	}
	return buf, nil
}

func writeFile(fs vfs.FS, p string, data []byte) error {
	f, err := fs.Create(p, vfs.WriteCategoryUnspecified)
	if err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

func syncDir(fs vfs.FS, p string) error {
	d, err := fs.OpenDir(p)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// copyTree copies file or directory p from one file system to another, in
// sorted order, synced.
func copyTree(from, to vfs.FS, p string) error {
	if !isDir(from, p) {
		data, err := readFile(from, p)
		if err != nil {
			return err
		}
		return writeFile(to, p, data)
	}
	if err := to.MkdirAll(p, 0o755); err != nil {
		return err
	}
	names, err := from.List(p)
	if err != nil {
		return err
	}
	sort.Strings(names)
	for _, n := range names {
		if err := copyTree(from, to, from.PathJoin(p, n)); err != nil {
			return err
		}
	}
	return syncDir(to, p)
}

// stateDigest is a CRC-32C of every path and file's bytes under p, in sorted
// order: two crash clones with one digest are (almost surely) one state.
// Pebble's WAL files count by length only: the store builds each index
// batch from maps, so one batch holds the same keys in another order each
// run (same length, same index once replayed). Pebble's obsolete files (a
// MANIFEST, OPTIONS or WAL file with a newer one beside it) are left out:
// Pebble deletes them on a goroutine of its own after it opens, so whether
// a crash point finds one depends on timing, and a reopen ignores them.
func stateDigest(fs vfs.FS, p string) (uint32, error) {
	h := crc32.New(crc32.MakeTable(crc32.Castagnoli))
	var walk func(p string) error
	walk = func(p string) error {
		io.WriteString(h, p)
		if !isDir(fs, p) {
			data, err := readFile(fs, p)
			if err != nil {
				return err
			}
			h.Write([]byte{0})
			if strings.HasSuffix(p, ".log") {
				fmt.Fprint(h, len(data))
			} else {
				h.Write(data)
			}
			return nil
		}
		h.Write([]byte{1})
		names, err := fs.List(p)
		if err != nil {
			return err
		}
		sort.Strings(names)
		newest := map[string]string{}
		for _, n := range names {
			if kind, num, ok := pebbleFile(n); ok && num > newest[kind] {
				newest[kind] = num
			}
		}
		for _, n := range names {
			if kind, num, ok := pebbleFile(n); ok && num != newest[kind] {
				continue
			}
			if err := walk(fs.PathJoin(p, n)); err != nil {
				return err
			}
		}
		return nil
	}
	err := walk(p)
	return h.Sum32(), err
}

// pebbleFile recognizes Pebble's MANIFEST-N, OPTIONS-N and N.log files (N
// six digits, so they sort as numbers).
func pebbleFile(name string) (kind, num string, ok bool) {
	for _, prefix := range []string{"MANIFEST-", "OPTIONS-"} {
		if rest, found := strings.CutPrefix(name, prefix); found {
			return prefix, rest, true
		}
	}
	if rest, found := strings.CutSuffix(name, ".log"); found {
		return ".log", rest, true
	}
	return "", "", false
}
