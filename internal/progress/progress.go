// Package progress reports the advance of long operations on a writer
// (normally stderr): a line at most every Interval, and a final line.
package progress

import (
	"fmt"
	"io"
	"sync"
	"time"
)

// Interval is the least time between two reports.
const Interval = time.Second

// Bar tracks done/total units of one named operation.
type Bar struct {
	mu    sync.Mutex
	w     io.Writer
	name  string
	unit  string
	total int64
	done  int64
	start time.Time
	last  time.Time
}

// New starts a Bar; a nil writer makes every call a no-op.
func New(w io.Writer, name string, total int64, unit string) *Bar {
	now := time.Now()
	return &Bar{w: w, name: name, total: total, unit: unit, start: now, last: now}
}

// Add records n more units done and reports if Interval has passed.
func (b *Bar) Add(n int64) {
	if b == nil || b.w == nil {
		return
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	b.done += n
	if now := time.Now(); now.Sub(b.last) >= Interval {
		b.last = now
		b.report(now)
	}
}

func (b *Bar) report(now time.Time) {
	pct := 100.0
	if b.total > 0 {
		pct = 100 * float64(b.done) / float64(b.total)
	}
	fmt.Fprintf(b.w, "%s: %d/%d %s (%.0f%%) %.1fs\n", b.name, b.done, b.total, b.unit, pct, now.Sub(b.start).Seconds())
}

// Finish reports the final count.
func (b *Bar) Finish() {
	if b == nil || b.w == nil {
		return
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	b.report(time.Now())
}
