package main

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	hc "github.com/hcache/hcache/clients/hcacheclient"
	"github.com/hcache/hcache/internal/testseed"
)

// saverIdent is test_saver.py's IDENT.
var saverIdent = hc.Identity{Model: []byte("saver-test-model"), Plan: []hc.LayerPlan{
	{Kind: hc.LayerHidden, RowBytes: 64}, {Kind: hc.LayerNone}, {Kind: hc.LayerKV, RowBytes: 48}, {Kind: hc.LayerHidden, RowBytes: 64}}}

// saverRow is test_saver.py's row_bytes: the row of context c, layer l,
// token t, computed here independently of the Python that wrote it.
func saverRow(seed uint32, c, l, t, rb int) []byte {
	k := seed*0x9E3779B1 + uint32(c)*0x85EBCA77 + uint32(l)*0xC2B2AE3D + uint32(t)*0x27D4EB2F
	b := make([]byte, rb)
	for i := range b {
		x := k + uint32(i)*0x165667B1
		x ^= x >> 15
		x *= 0x2C1B3C6D
		x ^= x >> 12
		x *= 0x297A2D39
		x ^= x >> 15
		b[i] = byte(x >> 24)
	}
	return b
}

// TestPythonSaver runs clients/python/test_saver.py against hcached: the
// Saver's round trips (CPU tensors, numpy, CUDA where torch sees a GPU),
// backpressure, ordering of flush after earlier appends, background errors
// and bad input.
func TestPythonSaver(t *testing.T) {
	py := torchPython(t)
	seed := testseed.Seed(t) & 0x7fffffff
	addr, stop := startPrefixDaemon(t)
	defer stop()
	out, err := exec.Command(py, pyScript(t, "test_saver.py"), "--addr", addr, "--seed", strconv.FormatInt(seed, 10)).CombinedOutput()
	if err != nil || !bytes.Contains(out, []byte("\nOK")) {
		t.Fatalf("test_saver.py: %v\n%s", err, out)
	}
	if bytes.Contains(out, []byte("skipped")) {
		t.Fatalf("a test skipped against the daemon:\n%s", out)
	}
	t.Logf("%s", out)
}

// TestPythonSaverKill SIGKILLs a Python engine that saves through a Saver
// (test_saver.py --engine: three contexts, a prefill of every layer, then
// decode steps of all three, a flush every 7 steps, each background append
// slowed so that copies and appends are in flight) at points of its run,
// then restarts the daemon on the same directory (after SIGTERM, or after a
// SIGKILL of its own) and checks what the engine was told: every context
// restores at least the tokens its last flush acknowledged, no more than
// were handed to the saver, and every restored row bit for bit.
func TestPythonSaverKill(t *testing.T) {
	py := torchPython(t)
	seed := testseed.Seed(t)
	rng := rand.New(rand.NewSource(seed))
	bin := hcachedBinary(t)
	script := pyScript(t, "test_saver.py")
	const contexts, prefill, layers = 3, 40, 3
	cases := []struct {
		name string
		// kill at the handed-th HANDING line after the acks-th ACK line
		acks, handed int
		killDaemon   bool
		region       int
		group        int // the Saver's decode_group
	}{
		{"mid-prefill", 0, 2, false, 1 << 16, 1},
		{"mid-prefill/daemon-killed", 0, 2, true, 1 << 16, 1},
		{"decode/after-2-acks", 3, 3, false, 1 << 16, 1},
		{"decode/after-2-acks/daemon-killed", 3, 3, true, 1 << 16, 1},
		{"decode/right-after-ack/daemon-killed", 2, 1, true, 1 << 16, 1},
		// A region of 4 KiB, five decode steps of the three contexts (528
		// bytes, 768 with alignment): the engine waits for room when it dies.
		{"decode/region-full/daemon-killed", 4, 5, true, 4 << 10, 1},
		// Decode steps gathered four at a time before they go to the region.
		{"decode/grouped/daemon-killed", 3, 6, true, 1 << 16, 4},
	}
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			pyseed := uint32(rng.Int31())
			delay := time.Duration(rng.Intn(3000)) * time.Microsecond // after the kill point: lands in a copy, a send or a flush
			sd, err := os.MkdirTemp("", "hcd")
			if err != nil {
				t.Fatal(err)
			}
			defer os.RemoveAll(sd)
			dir := t.TempDir()
			sock := filepath.Join(sd, "s.sock")
			args := []string{"--dir", dir, "--listen", "unix://" + sock, "--metrics", "", "--chunk-tokens", "16", "--cache", "0"}
			d := &daemonProc{t: t, bin: bin, sock: sock, args: args}
			d.start()
			eng := exec.Command(py, script, "--engine", "--addr", "unix://"+sock, "--seed", strconv.FormatUint(uint64(pyseed), 10),
				"--contexts", strconv.Itoa(contexts), "--prefill", strconv.Itoa(prefill), "--steps", "60", "--flush-every", "7",
				"--slow", "0.003", "--region", strconv.Itoa(tc.region), "--decode-group", strconv.Itoa(tc.group))
			var stderr bytes.Buffer
			eng.Stderr = &stderr
			stdout, err := eng.StdoutPipe()
			if err != nil {
				t.Fatal(err)
			}
			if err := eng.Start(); err != nil {
				t.Fatal(err)
			}
			acked := make([]int, contexts)
			handed, acks, after := 0, 0, 0
			killed := false
			sc := bufio.NewScanner(stdout)
			for sc.Scan() {
				f := strings.Fields(sc.Text())
				switch {
				case len(f) == contexts+1 && f[0] == "ACK":
					for c := range acked {
						n, err := strconv.Atoi(f[c+1])
						if err != nil || n < acked[c] {
							t.Fatalf("engine line %q: acknowledgement went back from %d", sc.Text(), acked[c])
						}
						acked[c] = n
					}
					acks++
					after = 0
				case len(f) == 3 && f[0] == "HANDING":
					handed, _ = strconv.Atoi(f[2])
					if acks == tc.acks {
						after++
					}
				case len(f) == 1 && f[0] == "DONE":
					t.Fatalf("the engine finished before its kill point")
				default:
					eng.Process.Kill()
					eng.Wait()
					t.Fatalf("engine line %q\n%s", sc.Text(), stderr.String())
				}
				if acks == tc.acks && after == tc.handed {
					time.Sleep(delay)
					eng.Process.Kill()
					killed = true
					break
				}
			}
			eng.Wait()
			if !killed {
				t.Fatalf("engine ended before its kill point (scan: %v): %v\n%s", sc.Err(), eng.ProcessState, stderr.String())
			}
			// Lines written between the kill point and the kill: the last word
			// on what was acknowledged and handed (a HANDING line comes before
			// its append, so handed bounds what the daemon can hold).
			for sc.Scan() {
				f := strings.Fields(sc.Text())
				if len(f) == contexts+1 && f[0] == "ACK" {
					for c := range acked {
						acked[c], _ = strconv.Atoi(f[c+1])
					}
				} else if len(f) == 3 && f[0] == "HANDING" {
					handed, _ = strconv.Atoi(f[2])
				}
			}
			if tc.killDaemon {
				d.signal(syscall.SIGKILL)
			} else {
				d.signal(syscall.SIGTERM)
			}
			d = &daemonProc{t: t, bin: bin, sock: sock, args: args}
			d.start()
			defer d.signal(syscall.SIGTERM)
			c, err := hc.Dial("unix://" + sock)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			ctx := context.Background()
			for ci := 0; ci < contexts; ci++ {
				id := fmt.Sprintf("k%d", ci)
				got := map[int]int{}
				n, err := c.Restore(ctx, "kill", id, saverIdent, func(l int, rows []byte) error {
					rb := int(saverIdent.Plan[l].RowBytes)
					if len(rows)%rb != 0 {
						return fmt.Errorf("layer %d: %d bytes, not whole %d-byte rows", l, len(rows), rb)
					}
					for tok := 0; tok < len(rows)/rb; tok++ {
						if want := saverRow(pyseed, ci, l, tok, rb); !bytes.Equal(rows[tok*rb:(tok+1)*rb], want) {
							return fmt.Errorf("layer %d token %d: restored row differs from the one handed to the saver", l, tok)
						}
					}
					got[l] = len(rows) / rb
					return nil
				})
				if err != nil && acked[ci] > 0 {
					t.Fatalf("%s: restore after the kill: %v (acknowledged %d tokens)", id, err, acked[ci])
				}
				if err != nil {
					t.Logf("%s: nothing acknowledged, restore says %v", id, err)
					continue
				}
				if int(n) < acked[ci] || int(n) > handed {
					t.Fatalf("%s: %d tokens restored; acknowledged %d, handed %d", id, n, acked[ci], handed)
				}
				if n > 0 && len(got) != layers {
					t.Fatalf("%s: %d layers restored, want %d", id, len(got), layers)
				}
				for l, k := range got {
					if k != int(n) {
						t.Fatalf("%s: layer %d restores %d tokens, the context %d", id, l, k, n)
					}
				}
				t.Logf("case %d %s: acknowledged %d, handed %d, restored %d (killed %v after the kill point; daemon killed %v)", i, id, acked[ci], handed, n, delay, tc.killDaemon)
			}
		})
	}
}
