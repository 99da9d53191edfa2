package chunk

import "github.com/hcache/hcache/chunk/format"

// The on-disk encodings live in package format (pure, no I/O); these
// aliases keep the engine's exported names.

// BlockBytes is the unit of every segment write and read (O_DIRECT alignment).
const BlockBytes = format.BlockBytes

// RecordTombstone is the header flag of a deletion record.
const RecordTombstone = format.RecordTombstone

// ErrCorrupt is wrapped by every error about bytes that fail their checks.
var ErrCorrupt = format.ErrCorrupt

type (
	SegmentHeader = format.SegmentHeader
	RecordHeader  = format.RecordHeader
	ScannedRecord = format.ScannedRecord
)

// DecodeSegmentHeader parses a segment header block (format.DecodeSegmentHeader).
func DecodeSegmentHeader(b []byte) (*SegmentHeader, error) { return format.DecodeSegmentHeader(b) }

// DecodeRecordHeader parses and checks a record header (format.DecodeRecordHeader).
func DecodeRecordHeader(b []byte) (*RecordHeader, error) { return format.DecodeRecordHeader(b) }

// ScanRecords walks records laid back to back (format.ScanRecords).
func ScanRecords(data []byte, base uint64) []ScannedRecord { return format.ScanRecords(data, base) }
