package daemon_test

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/hcache/hcache/chunk"
	hc "github.com/hcache/hcache/clients/hcacheclient"
	"github.com/hcache/hcache/daemon"
)

// TestFullDiskThroughDaemon fills a real 48 MB file system (tmpfs, mounted
// by the test: it needs root) through the daemon until a write is refused:
// the client gets RESOURCE_EXHAUSTED (not INTERNAL), every acknowledged
// context still restores byte for byte, and the daemon keeps serving. Where
// mounting is not permitted it is skipped, unless HCACHE_REQUIRE_TMPFS=1
// (for .ci/run to set, as it sets HCACHE_REQUIRE_TORCH: a skip there is a
// failure).
func TestFullDiskThroughDaemon(t *testing.T) {
	mnt := filepath.Join(t.TempDir(), "mnt")
	os.MkdirAll(mnt, 0o755)
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", mnt).CombinedOutput(); err != nil {
		if os.Getenv("HCACHE_REQUIRE_TMPFS") == "1" {
			t.Fatalf("cannot mount a tmpfs (HCACHE_REQUIRE_TMPFS is set): %v: %s", err, out)
		}
		t.Skipf("cannot mount a 48 MB tmpfs here (%v: %s)", err, out)
	}
	t.Cleanup(func() { exec.Command("umount", mnt).Run() })
	st, err := chunk.Open(chunk.Options{Dir: filepath.Join(mnt, "store"), CapacityBytes: -1, BallastBytes: 4 << 20, GCInterval: -1, SegmentBytes: 8 << 20, CacheBytes: 0, Logf: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	sd, err := os.MkdirTemp("", "hcd")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(sd)
	sock := filepath.Join(sd, "s")
	s, err := daemon.New(daemon.Config{Store: st, Listen: sock, GCInterval: -1, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		s.Stop()
		st.Close()
	}()
	c, err := hc.Dial("unix://" + sock)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx := context.Background()
	const n = 256 // tokens per append; 64 appends per layer: 16384 tokens, 1.5 MB per context
	var saved []string
	var refused error
	for i := 0; refused == nil && i < 10000; i++ {
		id := fmt.Sprintf("c%d", i)
		w, err := c.Create(ctx, "ns", id, ident, false)
		if err != nil {
			refused = err
			break
		}
		for l, p := range ident.Plan {
			if p.RowBytes > 0 && refused == nil {
				// 64 appends of n tokens each.
				for k := 0; k < 64 && refused == nil; k++ {
					refused = w.AppendLayer(ctx, l, rows(id, l, k*n, n, int(p.RowBytes)))
				}
			}
		}
		if refused == nil {
			refused = w.Close(ctx)
			if refused == nil {
				saved = append(saved, id)
			}
		} else {
			w.Close(ctx)
		}
	}
	if refused == nil {
		t.Fatal("10000 contexts fit a 48 MB file system")
	}
	if status.Code(refused) != codes.ResourceExhausted {
		t.Fatalf("write on a full disk: %v, want RESOURCE_EXHAUSTED", refused)
	}
	if len(saved) < 3 {
		t.Fatalf("only %d contexts written before the disk was full (%v)", len(saved), refused)
	}
	t.Logf("%d contexts written, then: %v", len(saved), refused)
	for _, id := range saved {
		got := map[int][]byte{}
		tokens, err := c.Restore(ctx, "ns", id, ident, func(l int, r []byte) error {
			got[l] = append(got[l], r...)
			return nil
		})
		if err != nil || tokens != 64*n {
			t.Fatalf("restore %s on a full disk: %d tokens, %v", id, tokens, err)
		}
		for l, p := range ident.Plan {
			if p.RowBytes == 0 {
				continue
			}
			for k := 0; k < 64; k++ {
				want := rows(id, l, k*n, n, int(p.RowBytes))
				off := k * n * int(p.RowBytes)
				if string(got[l][off:off+len(want)]) != string(want) {
					t.Fatalf("%s layer %d: bytes differ at token %d", id, l, k*n)
				}
			}
		}
	}
	if _, err := c.Info(ctx); err != nil {
		t.Fatalf("the daemon stopped serving after a full disk: %v", err)
	}
}
