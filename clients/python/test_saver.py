"""Checks of hcache_client.Saver (asynchronous saving through a shared region).

Usage: test_saver.py [--addr unix:///path/hcache.sock] [--seed N] [unittest args]
       test_saver.py --engine --addr ... --seed N [--contexts 3] [--prefill 40] [--steps 60]
                     [--flush-every 7] [--slow 0.002] [--device cpu|cuda] [--decode-group 1]

Without --addr only the ring's checks run (the rest skip). The round trips run
on CPU tensors, numpy arrays and, where torch sees a GPU, CUDA tensors.

--engine is the writer that cmd/hcached's TestPythonSaverKill SIGKILLs: it
saves --contexts contexts of IDENT (rows from row_bytes, which the Go test
recomputes) through one Saver: a prefill of every layer, then decode steps of
all contexts at once, flushing every --flush-every steps. Each append is
slowed by --slow seconds in the background thread (a seam standing for a
busy daemon), so that copies and appends are in flight when it dies. It
prints, unbuffered, one line per event:
  HANDING <step> <tokens>   before an append is handed (whole tokens per context once it is)
  ACK <tokens> ...          after a flush returned (durable tokens of each context)
  DONE                      at the end
--verify --acked A0,A1,.. --handed N checks a killed engine's contexts the
same way (for scripts/gpu-save-check.sh, where there is no Go).
"""
import argparse
import json
import os
import random
import sys
import threading
import unittest

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hcache_client as hc  # noqa: E402
from hcache_client.saver import ALIGN, _Ring  # noqa: E402

ADDR = None
SEED = 1
IDENT = hc.Identity(b"saver-test-model", [(hc.HIDDEN, 64), (hc.NONE, 0), (hc.KV, 48), (hc.HIDDEN, 64)])
M32 = 0xFFFFFFFF


def row_bytes(seed, c, l, t, rb):
    """Row of context c, layer l, token t: rb bytes of a 32-bit mix (the Go
    test computes the same, cmd/hcached/pysaver_test.go saverRow)."""
    k = (seed * 0x9E3779B1 + c * 0x85EBCA77 + l * 0xC2B2AE3D + t * 0x27D4EB2F) & M32
    x = (np.uint32(k) + np.arange(rb, dtype=np.uint32) * np.uint32(0x165667B1)).astype(np.uint32)
    x ^= x >> np.uint32(15)
    x *= np.uint32(0x2C1B3C6D)
    x ^= x >> np.uint32(12)
    x *= np.uint32(0x297A2D39)
    x ^= x >> np.uint32(15)
    return (x >> np.uint32(24)).astype(np.uint8)


def layer_rows(seed, c, l, t0, n):
    rb = IDENT.plan[l][1]
    return np.concatenate([row_bytes(seed, c, l, t, rb) for t in range(t0, t0 + n)]) if n else np.zeros(0, np.uint8)


def token_rows(seed, c, t):
    return np.concatenate([row_bytes(seed, c, l, t, rb) for l, (_, rb) in enumerate(IDENT.plan) if rb])


def devices():
    out = ["cpu", "numpy"]
    try:
        import torch

        if torch.cuda.is_available():
            out.append("cuda")
    except ImportError:
        out.remove("cpu")
    return out


def as_rows(a, dev):
    """a (uint8 numpy) as the engine would hand it: numpy, or a torch tensor
    (as bfloat16 values when the length allows: the saver copies bytes)."""
    if dev == "numpy":
        return a
    import torch

    t = torch.from_numpy(a.copy())
    if a.size % 2 == 0:
        t = t.view(torch.bfloat16)
    return t.to(dev) if dev == "cuda" else t


class Gate:
    """Holds a writer's appends in the background thread until opened (a
    seam: a daemon that is slow to answer)."""

    def __init__(self, w):
        self.open, self.entered = threading.Event(), threading.Event()
        for name in ("append_layer", "append_tokens"):
            real = getattr(w, name)

            def gated(*a, _real=real, **kw):
                self.entered.set()
                self.open.wait()
                return _real(*a, **kw)

            setattr(w, name, gated)


class RingTest(unittest.TestCase):
    def test_random_fifo(self):
        seed = SEED
        print(f"ring: seed {seed}", file=sys.stderr)
        rng = random.Random(seed)
        for size in (4096, 10000, 1 << 16):
            r = _Ring(size)
            live = []
            for _ in range(3000):
                if live and (rng.random() < 0.45 or len(live) > 40):
                    off, n = live.pop(0)
                    r.free(off)
                    continue
                n = rng.randint(1, size // 3)
                off = r.alloc(n, 0)
                if off is None:
                    # Refused only when it truly does not fit: free space is
                    # less than n rounded, in the contiguous sense.
                    self.assertLess(r.free_bytes(), _Ring.rounded(n), f"seed {seed} size {size}: refused {n} with {r.free_bytes()} free")
                    continue
                self.assertEqual(off % ALIGN, 0)
                end = off + _Ring.rounded(n)
                self.assertLessEqual(end, size, f"seed {seed}: [{off}, {end}) past {size}")
                for o, m in live:
                    e = o + _Ring.rounded(m)
                    self.assertTrue(end <= o or e <= off, f"seed {seed}: [{off}, {end}) overlaps [{o}, {e})")
                live.append((off, n))
            for off, _ in live:
                r.free(off)
            self.assertEqual(r.used, 0)
            self.assertEqual(r.free_bytes(), size)

    def test_free_out_of_order_is_a_bug(self):
        r = _Ring(4096)
        a = r.alloc(100)
        r.alloc(100)
        self.assertEqual(a, 0)
        with self.assertRaises(AssertionError):
            r.free(256)


class SaverTest(unittest.TestCase):
    def setUp(self):
        if ADDR is None:
            self.skipTest("no daemon address (--addr)")
        self.c = hc.Client(ADDR)
        self.n = 0

    def tearDown(self):
        self.c.close()

    def create(self, name):
        return self.c.create("saver", f"{name}-{SEED}-{os.getpid()}", IDENT)

    def check_restored(self, w, c, seed, n):
        got = {l: (k, rows) for l, k, rows in self.c.restore(w.ref.namespace, w.ref.id, IDENT)}
        self.assertEqual(sorted(got), [0, 2, 3])
        for l in got:
            k, rows = got[l]
            self.assertEqual(k, n, f"{w.ref.id} layer {l}")
            self.assertEqual(rows, layer_rows(seed, c, l, 0, n).tobytes(), f"{w.ref.id} layer {l}: rows differ")

    def test_round_trip(self):
        for dev in devices():
            for group in (1, 3):
                with self.subTest(dev=dev, decode_group=group):
                    self.round_trip(dev, group)

    def round_trip(self, dev, group):
        s = hc.Saver(self.c, 1 << 20, device="cuda" if dev == "cuda" else None, decode_group=group)
        try:
            ws = [self.create(f"rt-{dev}-{group}-{i}") for i in range(3)]
            for c, w in enumerate(ws):  # prefill, 20 tokens, in two appends per layer
                for l in (0, 2, 3):
                    s.append_layer(w, l, as_rows(layer_rows(SEED, c, l, 0, 13), dev))
                    s.append_layer(w, l, as_rows(layer_rows(SEED, c, l, 13, 7), dev))
            for t in range(20, 30):  # decode, all three at once
                s.append_tokens(ws, as_rows(np.stack([token_rows(SEED, c, t) for c in range(3)]), dev))
            # Then two of them (a decode group of other writers), then one alone.
            for t in range(30, 34):
                s.append_tokens(ws[:2], as_rows(np.stack([token_rows(SEED, c, t) for c in range(2)]), dev))
            s.append_tokens(ws[0], as_rows(np.concatenate([token_rows(SEED, 0, t) for t in (34, 35)]), dev))
            want = {0: 36, 1: 34, 2: 30}
            acked = s.flush()
            self.assertEqual(acked, {("saver", w.ref.id): want[c] for c, w in enumerate(ws)})
            self.assertEqual(s.durable, acked)
            for c, w in enumerate(ws):
                w.close()
                self.check_restored(w, c, SEED, want[c])
            if dev == "cuda":
                self.assertIn(s.stats["mode"], ("registered-region", "pinned-staging"))
            self.assertEqual(s.stats["full"], 0)
            if group == 1 or dev == "numpy":
                self.assertEqual(s.stats["sends"], 3 * 6 + 3 * 10 + 2 * 4 + 1)
            else:  # 10 steps of three: groups of 3, 3, 3, 1; 4 steps of two: 3, 1
                self.assertEqual(s.stats["sends"], 3 * 6 + 3 * 4 + 2 * 2 + 1)
        finally:
            s.close()

    def test_backpressure(self):
        # A region of 4 KiB; appends of 1 KiB (16 tokens of layer 0): the
        # fifth does not fit while the sender is held.
        s = hc.Saver(self.c, 4096)
        w = self.create("full")
        g = Gate(w)
        try:
            for i in range(4):
                s.append_layer(w, 0, as_rows(layer_rows(SEED, 0, 0, 16 * i, 16), "cpu"))
            with self.assertRaises(hc.SaverFull) as cm:
                s.append_layer(w, 0, as_rows(layer_rows(SEED, 0, 0, 64, 16), "cpu"))
            self.assertEqual((cm.exception.needed, cm.exception.free, cm.exception.capacity), (1024, 0, 4096))
            self.assertEqual(s.stats["full"], 1)
            self.assertFalse(s.wait_room(1024, timeout=0))
            g.open.set()
            self.assertTrue(s.wait_room(1024, timeout=None))
            s.append_layer(w, 0, as_rows(layer_rows(SEED, 0, 0, 64, 16), "cpu"))  # the refused call, again
            for l in (2, 3):
                for t0 in (0, 40):
                    s.append_layer(w, l, as_rows(layer_rows(SEED, 0, l, t0, 40), "cpu"), timeout=None)
            self.assertEqual(s.flush(), {("saver", w.ref.id): 80})
            w.close()
            self.check_restored(w, 0, SEED, 80)
            self.assertEqual(s.stats["full"], 1)
        finally:
            g.open.set()
            s.close()

    def test_flush_waits_for_earlier_appends(self):
        s = hc.Saver(self.c, 1 << 16)
        w = self.create("order")
        g = Gate(w)
        try:
            for l in (0, 2, 3):
                s.append_layer(w, l, as_rows(layer_rows(SEED, 0, l, 0, 5), "numpy"))
            g.entered.wait()  # the sender holds the first append
            res = {}
            th = threading.Thread(target=lambda: res.update(s.flush()))
            th.start()
            self.assertTrue(th.is_alive())
            self.assertEqual(res, {})  # cannot have returned: the appends before it are held
            self.assertEqual(self.c.stat("saver", w.ref.id).tokens, 0)
            g.open.set()
            th.join()
            self.assertEqual(res, {("saver", w.ref.id): 5})
            self.assertEqual(self.c.stat("saver", w.ref.id).tokens, 5)
            w.close()
        finally:
            g.open.set()
            s.close()

    def test_background_error_is_raised(self):
        s = hc.Saver(self.c, 1 << 16)
        try:
            w = self.create("err")
            w.close()  # the saver's appends to it now fail in the background
            s.append_layer(w, 0, as_rows(layer_rows(SEED, 0, 0, 0, 3), "cpu"))
            try:
                s.append_layer(w, 2, as_rows(layer_rows(SEED, 0, 2, 0, 3), "cpu"))
                queued = 1
            except hc.SaverError as e:  # the background thread met layer 0's failure first
                self.assertIn("AppendLayer of layer 0", str(e))
                queued = 0
            with self.assertRaises(hc.SaverError) as cm:
                s.flush()
            self.assertIsInstance(cm.exception.cause, hc.Error)
            self.assertEqual(cm.exception.cause.code.name, "FAILED_PRECONDITION")
            self.assertIn("AppendLayer of layer 0", str(cm.exception))
            with self.assertRaises(hc.SaverError):
                s.append_layer(w, 3, as_rows(layer_rows(SEED, 0, 3, 0, 3), "cpu"))
            # flush raises as soon as the error is known, possibly before the
            # background thread has reached layer 2's append: close joins it.
            s.close(flush=False)
            # layer 2's append, when it was queued, is not sent after the failure
            self.assertEqual(s.stats["dropped_after_error"], queued)
        finally:
            s.close()

    def test_bad_input(self):
        s = hc.Saver(self.c, 4096)
        try:
            w = self.create("bad")
            cases = [
                (lambda: s.append_layer(w, 4, np.zeros(64, np.uint8)), "layer 4 out of range"),
                (lambda: s.append_layer(w, 1, np.zeros(64, np.uint8)), "layer 1 stores nothing"),
                (lambda: s.append_layer(w, 0, np.zeros(65, np.uint8)), "65 bytes is not a whole number of 64-byte rows"),
                (lambda: s.append_layer(w, 0, np.zeros(64 * 65, np.uint8)), "exceed the whole region"),
                (lambda: s.append_tokens(w, np.zeros(100, np.uint8)), "100 bytes is not a whole number of 176-byte tokens"),
                (lambda: s.append_tokens([w, w], np.zeros(176, np.uint8)), "2 writers need 352 bytes"),
                (lambda: s.append_tokens([w], np.zeros(176, np.uint8), token_ids=[1, 2]), "2 token ids for 1 writers"),
            ]
            for fn, want in cases:
                with self.subTest(want=want):
                    with self.assertRaises(ValueError) as cm:
                        fn()
                    self.assertIn(want, str(cm.exception))
            self.assertEqual(s.stats["appends"], 0)
            self.assertEqual(s.flush(), {})
            if "cpu" in devices():  # a decode group (torch tensors) larger than the region
                s2 = hc.Saver(self.c, 4096, decode_group=8)
                try:
                    with self.assertRaises(ValueError) as cm:
                        s2.append_tokens([w, w, w], as_rows(np.zeros(3 * 176, np.uint8), "cpu"))
                    self.assertIn("a decode group of 8 steps of 3 writers (4224 bytes) exceeds the whole region", str(cm.exception))
                finally:
                    s2.close()
            w.close()
        finally:
            s.close()


def engine(a):
    """The writer that TestPythonSaverKill kills (see the module doc)."""
    dev = a.device
    c = hc.Client(a.addr)
    s = hc.Saver(c, a.region, device="cuda" if dev == "cuda" else None, decode_group=a.decode_group)
    real = {n: getattr(hc.Writer, n) for n in ("append_layer", "append_tokens")}

    def slow(name):
        def f(self, *x, **kw):
            threading.Event().wait(a.slow)
            return real[name](self, *x, **kw)
        return f

    if a.slow > 0:
        for n in real:
            setattr(hc.Writer, n, slow(n))
    ws = [c.create("kill", f"k{i}", IDENT) for i in range(a.contexts)]
    stored = [l for l, (_, rb) in enumerate(IDENT.plan) if rb]
    step = 0
    for l in stored:
        # Whole tokens once this layer is handed: the prefill's, after its last layer.
        print(f"HANDING {step} {a.prefill if l == stored[-1] else 0}", flush=True)
        for i, w in enumerate(ws):
            s.append_layer(w, l, as_rows(layer_rows(a.seed, i, l, 0, a.prefill), dev), timeout=None)
        step += 1
    ack = s.flush()
    print("ACK " + " ".join(str(ack[("kill", f"k{i}")]) for i in range(a.contexts)), flush=True)
    for k in range(a.steps):
        t = a.prefill + k
        print(f"HANDING {step} {t + 1}", flush=True)
        s.append_tokens(ws, as_rows(np.stack([token_rows(a.seed, i, t) for i in range(a.contexts)]), dev), timeout=None)
        step += 1
        if (k + 1) % a.flush_every == 0:
            ack = s.flush()
            print("ACK " + " ".join(str(ack[("kill", f"k{i}")]) for i in range(a.contexts)), flush=True)
    ack = s.flush(close=True)
    print("ACK " + " ".join(str(ack[("kill", f"k{i}")]) for i in range(a.contexts)), flush=True)
    s.close()
    print("DONE", flush=True)


def verify(a):
    """After a killed --engine run (scripts/gpu-save-check.sh, where there is
    no Go for TestPythonSaverKill): every context restores at least its
    acknowledged tokens, at most the handed ones, each row as row_bytes."""
    c = hc.Client(a.addr)
    acked = [int(x) for x in a.acked.split(",")]
    res = {"acked": acked, "handed": a.handed, "restored": [], "ok": True, "errors": []}
    for i in range(a.contexts):
        try:
            got = list(c.restore("kill", f"k{i}", IDENT))
        except hc.Error as e:
            got = []
            if acked[i] > 0:
                res["errors"].append(f"k{i}: {e} with {acked[i]} tokens acknowledged")
        n = got[0][1] if got else 0
        res["restored"].append(n)
        if not acked[i] <= n <= a.handed:
            res["errors"].append(f"k{i}: {n} tokens restored, acknowledged {acked[i]}, handed {a.handed}")
        for l, k, rows in got:
            if k != n or rows != layer_rows(a.seed, i, l, 0, n).tobytes():
                res["errors"].append(f"k{i} layer {l}: restored rows differ from the handed ones")
    res["ok"] = not res["errors"]
    print(json.dumps(res))
    c.close()
    sys.exit(0 if res["ok"] else 1)


def main():
    global ADDR, SEED
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--addr")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--engine", action="store_true")
    ap.add_argument("--contexts", type=int, default=3)
    ap.add_argument("--prefill", type=int, default=40)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--flush-every", type=int, default=7)
    ap.add_argument("--slow", type=float, default=0.002)
    ap.add_argument("--region", type=int, default=1 << 16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--decode-group", type=int, default=1)
    ap.add_argument("--verify", action="store_true")
    ap.add_argument("--acked", default="")
    ap.add_argument("--handed", type=int, default=0)
    a, rest = ap.parse_known_args()
    ADDR = a.addr
    SEED = a.seed if a.seed is not None else random.SystemRandom().randrange(1 << 31)
    if a.engine:
        return engine(a)
    if a.verify:
        return verify(a)
    print(f"test_saver: seed {SEED} (replay with --seed {SEED})", file=sys.stderr)
    unittest.main(argv=[sys.argv[0]] + rest, verbosity=2)


if __name__ == "__main__":
    main()
