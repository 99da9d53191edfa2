package fuzz

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/hcache/hcache/chunk"
	"github.com/hcache/hcache/fuzz/crash"
	"github.com/hcache/hcache/lsm"
)

// TestWriteSeedCorpus regenerates the committed seed files under
// testdata/fuzz when HCACHE_WRITE_CORPUS=1; otherwise it checks they exist.
func TestWriteSeedCorpus(t *testing.T) {
	h := sampleHeader()
	rec := encodeHeader(h)
	torn := append(append([]byte{}, rec...), rec[:1000]...)
	badCRC := append([]byte{}, rec...)
	badCRC[40] ^= 1
	seeds := map[string][]string{
		"FuzzRecordHeader": {bytesLit(rec), bytesLit(badCRC), bytesLit(rec[:200])},
		"FuzzSegmentScan":  {bytesLit(torn) + "\nuint64(0)", bytesLit(append(rec, make([]byte, 8192)...)) + "\nuint64(4096)"},
		"FuzzIndexRecords": {
			bytesLit((&lsm.Chunk{Segment: 2, Offset: 8192, Length: 12288, Tokens: 64, Slices: h.Slices}).Encode()),
			bytesLit((&lsm.Context{Identity: crash.Identity().Encode(), Tokens: 5, Gen: 1}).Encode()),
		},
		"FuzzIdentity": {bytesLit(crash.Identity().Encode()), bytesLit((&chunk.Identity{Model: []byte("m"), Plan: []chunk.LayerPlan{{Kind: chunk.LayerKV, RowBytes: 2}}}).Encode())},
		"FuzzHFConfig": {bytesLit([]byte(`{"architectures":["Qwen2ForCausalLM"],"hidden_size":64,"num_hidden_layers":1,"num_attention_heads":4,"num_key_value_heads":2,"intermediate_size":8,"vocab_size":10,"max_position_embeddings":16,"rms_norm_eps":1e-6}`))},
	}
	write := os.Getenv("HCACHE_WRITE_CORPUS") == "1"
	for target, values := range seeds {
		for i, v := range values {
			path := filepath.Join("testdata", "fuzz", target, fmt.Sprintf("seed-%d", i))
			if write {
				os.MkdirAll(filepath.Dir(path), 0o755)
				if err := os.WriteFile(path, []byte("go test fuzz v1\n"+v+"\n"), 0o644); err != nil {
					t.Fatal(err)
				}
				continue
			}
			if _, err := os.Stat(path); err != nil {
				t.Errorf("seed corpus file missing (HCACHE_WRITE_CORPUS=1 go test ./fuzz -run SeedCorpus): %v", err)
			}
		}
	}
}

func bytesLit(b []byte) string { return "[]byte(" + strconv.Quote(string(b)) + ")" }
