"""Checks of the Python client against a running hcached (run by
cmd/hcached's TestPythonClient): round trips inline and through a shared
region (numpy views), decode appends, and the gRPC codes of bad input.

Usage: test_client.py unix:///path/hcache.sock [HOST:PORT TOKEN]
(with a TCP address and a token granted namespace "py", the TCP checks run too)
"""
import os
import sys
import unittest

import grpc
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hcache_client as hc  # noqa: E402

ADDR = None
TCP, TOKEN = None, None
IDENT = hc.Identity(b"python-test-model", [(hc.HIDDEN, 64), (hc.NONE, 0), (hc.KV, 32)])


def layer_rows(layer, start, n, rb, salt):
    i = np.arange(n * rb, dtype=np.int64)
    return ((i // rb + start) * 7 + (i % rb) * 3 + layer * 37 + salt).astype(np.uint8)


class ClientTest(unittest.TestCase):
    def setUp(self):
        self.c = hc.Client(ADDR)

    def tearDown(self):
        self.c.close()

    def save(self, cid, n, salt):
        w = self.c.create("py", cid, IDENT)
        w.append_layer(0, layer_rows(0, 0, n, 64, salt))
        w.append_layer(2, layer_rows(2, 0, n, 32, salt).tobytes())
        self.assertEqual(w.flush(), n)
        w.close()

    def test_inline_round_trip_and_decode(self):
        self.save("inline", 100, 1)
        w = self.c.append("py", "inline", IDENT)
        self.assertEqual(w.tokens, 100)
        for t in range(100, 103):
            w.append_tokens(1, np.concatenate([layer_rows(0, t, 1, 64, 1), layer_rows(2, t, 1, 32, 1)]))
        w.close()
        got = {l: (n, rows) for l, n, rows in self.c.restore("py", "inline", IDENT)}
        self.assertEqual(sorted(got), [0, 2])
        for l, rb in ((0, 64), (2, 32)):
            n, rows = got[l]
            self.assertEqual(n, 103)
            self.assertEqual(rows, layer_rows(l, 0, 103, rb, 1).tobytes())
        self.assertEqual(self.c.stat("py", "inline").tokens, 103)

    def test_region_round_trip(self):
        g = self.c.region(1 << 20)
        try:
            w = self.c.create("py", "region", IDENT)
            a = g.array(np.uint8, 0, 50 * 64)
            a[:] = layer_rows(0, 0, 50, 64, 2)
            w.append_layer(0, (g, 0, 50 * 64))
            b = g.array(np.uint8, 4096, 50 * 32)
            b[:] = layer_rows(2, 0, 50, 32, 2)
            w.append_layer(2, (g, 4096, 50 * 32))
            w.close()
            g.array()[:] = 0
            placed = list(self.c.restore_into("py", "region", IDENT, g, 8192))
            self.assertEqual([(l, n) for l, n, _, _ in placed], [(0, 50), (2, 50)])
            for (l, n, off, nb), rb in zip(placed, (64, 32)):
                np.testing.assert_array_equal(g.array(np.uint8, off, nb), layer_rows(l, 0, 50, rb, 2))
        finally:
            g.close()

    def code(self, fn):
        with self.assertRaises(hc.Error) as cm:
            r = fn()
            if hasattr(r, "__next__"):
                list(r)
        return cm.exception.code

    def test_error_codes(self):
        self.save("errs", 10, 3)
        other = hc.Identity(b"another-model", IDENT.plan)
        w = self.c.create("py", "open", IDENT)
        cases = [
            ("unknown context", grpc.StatusCode.NOT_FOUND, lambda: self.c.stat("py", "nope")),
            ("unknown context restore", grpc.StatusCode.NOT_FOUND, lambda: self.c.restore("py", "nope", IDENT)),
            ("invalid id", grpc.StatusCode.INVALID_ARGUMENT, lambda: self.c.stat("py", "")),
            ("identity mismatch", grpc.StatusCode.FAILED_PRECONDITION, lambda: self.c.restore("py", "errs", other)),
            ("codec mismatch", grpc.StatusCode.FAILED_PRECONDITION,
             lambda: self.c.restore("py", "errs", hc.Identity(IDENT.model, IDENT.plan, "fp8"))),
            ("codec mismatch on append", grpc.StatusCode.FAILED_PRECONDITION,
             lambda: self.c.append("py", "errs", hc.Identity(IDENT.model, IDENT.plan, hc.CODEC_FP8_BLOCK))),
            ("unknown codec", grpc.StatusCode.INVALID_ARGUMENT,
             lambda: self.c.create("py", "badcodec", hc.Identity(IDENT.model, IDENT.plan, 9))),
            ("exists", grpc.StatusCode.ALREADY_EXISTS, lambda: self.c.create("py", "errs", IDENT)),
            ("wrong row size", grpc.StatusCode.INVALID_ARGUMENT, lambda: w.append_layer(0, b"x" * 65)),
            ("wrong token size", grpc.StatusCode.INVALID_ARGUMENT, lambda: w.append_tokens(1, b"x" * 95)),
            ("layer storing nothing", grpc.StatusCode.INVALID_ARGUMENT, lambda: w.append_layer(1, b"x" * 64)),
            ("unknown region", grpc.StatusCode.FAILED_PRECONDITION,
             lambda: w.append_layer(0, (type("R", (), {"slice": lambda self, o, n: hc.pb.RegionSlice(region="nope", offset=o, length=n)})(), 0, 64))),
        ]
        for name, want, fn in cases:
            with self.subTest(name):
                self.assertEqual(self.code(fn), want)
        w.close()
        # Data intact after all of it.
        rows = {l: r for l, _, r in self.c.restore("py", "errs", IDENT)}
        self.assertEqual(rows[0], layer_rows(0, 0, 10, 64, 3).tobytes())


class RegisterDeadlineTest(unittest.TestCase):
    def test_silent_side_socket(self):
        """A side socket that never answers fails the registration with
        DEADLINE_EXCEEDED instead of holding the caller forever."""
        import socket
        import tempfile

        d = tempfile.mkdtemp()
        path = os.path.join(d, "silent.shm")
        ln = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        ln.bind(path)
        ln.listen(8)  # never accepts: the connect lands in the backlog
        g = hc.Region(4096)
        try:
            with self.assertRaises(hc.Error) as cm:
                g.register(path, timeout=0.5)
            self.assertEqual(cm.exception.code, grpc.StatusCode.DEADLINE_EXCEEDED)
        finally:
            g.close()
            ln.close()
            os.unlink(path)
            os.rmdir(d)


class TCPTest(unittest.TestCase):
    def setUp(self):
        if TCP is None:
            self.skipTest("no TCP address given")

    def test_tcp(self):
        c = hc.Client(TCP, token=TOKEN)
        try:
            w = c.create("py", "tcp", IDENT)
            w.append_layer(0, layer_rows(0, 0, 300, 64, 4))
            w.append_layer(2, layer_rows(2, 0, 300, 32, 4))
            w.close()
            rows = {l: r for l, _, r in c.restore("py", "tcp", IDENT)}
            self.assertEqual(rows[0], layer_rows(0, 0, 300, 64, 4).tobytes())
            self.assertEqual(rows[2], layer_rows(2, 0, 300, 32, 4).tobytes())
            with self.assertRaises(hc.Error) as cm:
                c.region(4096)
            self.assertEqual(cm.exception.code, grpc.StatusCode.FAILED_PRECONDITION)
        finally:
            c.close()
        anon = hc.Client(TCP)
        try:
            with self.assertRaises(hc.Error) as cm:
                anon.stat("py", "tcp")
            self.assertEqual(cm.exception.code, grpc.StatusCode.UNAUTHENTICATED)
        finally:
            anon.close()


if __name__ == "__main__":
    ADDR = sys.argv.pop(1)
    if len(sys.argv) >= 3:
        TCP, TOKEN = sys.argv.pop(1), sys.argv.pop(1)
    unittest.main(verbosity=2)
