package lsm

import (
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"io"
	"sort"
	"strconv"
	"strings"

	"github.com/cockroachdb/pebble/v2/vfs"
)

// Pebble's WAL wire format (pebble/v2/record): 32 KiB blocks of chunks that
// never straddle a block; a chunk is checksum u32 | length u16 | encoding u8
// [| log number u32 (recyclable and WAL-sync encodings) [| synced offset u64
// (WAL-sync encodings)]] | payload. The checksum is CRC-32C over encoding,
// the rest of the header and the payload, masked as in LevelDB.
const (
	walBlock         = 32 << 10
	walLegacyHeader  = 7
	walRecycleHeader = 11
	walSyncHeader    = 19
)

var walCRC = crc32.MakeTable(crc32.Castagnoli)

func walChecksum(b []byte) uint32 {
	c := crc32.Update(0, walCRC, b)
	return (c>>15 | c<<17) + 0xa282ead8
}

func walHeaderSize(enc byte) int {
	switch {
	case enc >= 1 && enc <= 4:
		return walLegacyHeader
	case enc >= 5 && enc <= 8:
		return walRecycleHeader
	case enc >= 9 && enc <= 12:
		return walSyncHeader
	}
	return 0
}

// CheckWAL reads the WALs in an index directory and reports a record that is
// corrupt although a later record of the same log promises (by its synced
// offset) that the WAL had been synced past it. Pebble performs this check
// only across 32 KiB blocks and otherwise ends the replay at the damage,
// silently dropping every later commit; the store syncs each commit, so a
// lost synced record means acknowledged data is missing from the index.
// A torn tail (an unsynced last write) is not reported.
func CheckWAL(fs vfs.FS, dir string) error {
	names, err := fs.List(dir)
	if err != nil {
		return err
	}
	sort.Strings(names)
	for _, n := range names {
		if !strings.HasSuffix(n, ".log") {
			continue
		}
		num, err := strconv.ParseUint(strings.TrimSuffix(n, ".log"), 10, 32)
		if err != nil {
			continue
		}
		f, err := fs.Open(fs.PathJoin(dir, n))
		if err != nil {
			return err
		}
		b, err := io.ReadAll(f)
		f.Close()
		if err != nil {
			return fmt.Errorf("read WAL %s: %w", n, err)
		}
		if bad, synced, ok := walDamage(b, uint32(num)); ok {
			return fmt.Errorf("%w: WAL %s: the record at offset %d is corrupt, but a record after it says the log was synced to offset %d: commits acknowledged after the damage are missing from the index", ErrCorrupt, n, bad, synced)
		}
	}
	return nil
}

// walDamage walks the chunks of one log; at the first chunk that does not
// check it looks for a later, intact WAL-sync chunk of the same log whose
// synced offset passes the bad one.
func walDamage(b []byte, logNum uint32) (bad, synced int64, found bool) {
	pos := 0
	for pos < len(b) {
		blockEnd := min((pos/walBlock+1)*walBlock, len(b))
		if blockEnd-pos < walLegacyHeader {
			pos = blockEnd
			continue
		}
		sum := binary.LittleEndian.Uint32(b[pos:])
		length := int(binary.LittleEndian.Uint16(b[pos+4:]))
		enc := b[pos+6]
		if sum == 0 && length == 0 && enc == 0 {
			// Zeroed: the end of the log, or block padding.
			if allZero(b[pos:blockEnd]) {
				pos = blockEnd
				continue
			}
			return laterSync(b, pos, logNum)
		}
		hs := walHeaderSize(enc)
		if hs == 0 || pos+hs+length > blockEnd {
			return laterSync(b, pos, logNum)
		}
		if hs > walLegacyHeader && binary.LittleEndian.Uint32(b[pos+7:]) != logNum {
			return 0, 0, false // EOF trailer or a recycled log's old bytes
		}
		if walChecksum(b[pos+6:pos+hs+length]) != sum {
			return laterSync(b, pos, logNum)
		}
		pos += hs + length
	}
	return 0, 0, false
}

func laterSync(b []byte, bad int, logNum uint32) (int64, int64, bool) {
	for p := bad + 1; p+walSyncHeader <= len(b); p++ {
		enc := b[p+6]
		if enc < 9 || enc > 12 || binary.LittleEndian.Uint32(b[p+7:]) != logNum {
			continue
		}
		length := int(binary.LittleEndian.Uint16(b[p+4:]))
		if p%walBlock+walSyncHeader+length > walBlock || p+walSyncHeader+length > len(b) {
			continue
		}
		if walChecksum(b[p+6:p+walSyncHeader+length]) != binary.LittleEndian.Uint32(b[p:]) {
			continue
		}
		if s := int64(binary.LittleEndian.Uint64(b[p+11:])); s > int64(bad) {
			return int64(bad), s, true
		}
	}
	return 0, 0, false
}

func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}
