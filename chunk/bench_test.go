package chunk

import (
	"testing"
	"time"
)

// BenchmarkAppendToken is the decode producer's caller-side cost for the
// Llama2-7B shape (32 layers x 4096 fp16 = 256 KiB a token), reported with
// the cost of a plain copy of the same bytes into a layer-major buffer timed
// in the same run (copy-ratio; target <= 1.5).
func BenchmarkAppendToken(b *testing.B) {
	plan := make([]LayerPlan, 32)
	for i := range plan {
		plan[i] = LayerPlan{Kind: LayerHidden, RowBytes: 8192}
	}
	s, err := Open(Options{Dir: b.TempDir(), CacheBytes: 0, CapacityBytes: -1, Logf: b.Logf})
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	rows := make([][]byte, len(plan))
	for l := range rows {
		rows[l] = make([]byte, 8192)
		for i := range rows[l] {
			rows[l][i] = byte(i * l)
		}
	}
	w, _ := s.Create("bench", "decode", &Identity{Model: []byte("llama2-7b shape"), Plan: plan}, CreateOptions{})
	// Steady state of decoding: slabs recycle, the disk is far from busy
	// (a token every few ms per sequence). Each timed round appends one
	// group of tokens; the flush between rounds is not timed.
	for i := 0; i < 2*64; i++ {
		w.AppendToken(rows)
	}
	w.Flush()
	b.SetBytes(32 * 8192)
	b.ResetTimer()
	var appendDur time.Duration
	for done := 0; done < b.N; {
		n := min(64, b.N-done)
		start := time.Now()
		for i := 0; i < n; i++ {
			if err := w.AppendToken(rows); err != nil {
				b.Fatal(err)
			}
		}
		appendDur += time.Since(start)
		done += n
		b.StopTimer()
		w.Flush()
		b.StartTimer()
	}
	appendNs := float64(appendDur.Nanoseconds()) / float64(b.N)
	b.StopTimer()
	w.Close()
	// One destination, reused, as the store reuses the slab a flush returned.
	buf := make([]byte, 64*32*8192)
	for i := range buf {
		buf[i] = 1
	}
	start := time.Now()
	for i := 0; i < b.N; i++ {
		t := i % 64
		for l, r := range rows {
			copy(buf[l*64*8192+t*8192:], r)
		}
	}
	copyNs := float64(time.Since(start).Nanoseconds()) / float64(b.N)
	b.ReportMetric(appendNs/copyNs, "copy-ratio")
}
