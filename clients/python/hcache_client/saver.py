"""Saving an engine's rows through hcached without stalling the engine.

    s = hcache_client.Saver(client, region_bytes=256 << 20, device="cuda:0")
    w = client.create("engine-a", "req-1", ident)
    s.append_layer(w, l, h)                     # prefill: layer l's rows as computed (a tensor on its device)
    s.append_tokens([w0, w1, ...], step_rows)   # decode: one token per writer, rows [batch, token bytes]
    s.flush()                                   # returns once everything handed before it is durable

Every append copies the rows into a shared region registered with the daemon
(Client.region) and returns; a background thread names the region slice in
AppendLayer / AppendTokens once the copy is complete. On CUDA the region is
page-locked (cudaHostRegister) and the copy is an asynchronous DMA on the
saver's own stream, which first waits for the work the engine's stream has
queued (the rows' producer) and is followed by an event; the background
thread waits on that event, never the engine's stream. Where the region
cannot be registered (cudaHostRegister refused) the copy goes to a pinned
staging buffer of the same size instead and the background thread moves it
into the region after the event: the engine still never waits (stats["mode"]
says which). CPU tensors (and numpy arrays) are copied into the region
synchronously and the same background thread sends them.

The region is a bounded ring. An append that does not fit raises SaverFull
and counts it (stats["full"]); nothing of that append was taken, so the
engine can retry the same call (after wait_room) or give the request up
(abandon it: its rows past the last flush are then not saved). Nothing is
dropped silently.

Acknowledgement: flush() returns (per writer, the daemon's durable token
count) only after every append handed before it was sent and the daemon's
Flush of each writer returned. An engine that dies with copies in flight
loses only what no flush had acknowledged: those rows were never claimed
durable. A failed background send stops the saver (later appends would
leave holes): the next call raises SaverError naming it.

Rows handed to the saver are read after the engine's work queued so far on
its stream, at some later time: do not write into them in place afterwards
(a fresh activation, or rows of a KV cache that are only appended to, are
fine). The saver keeps a reference to them until the copy is complete.
"""
import collections
import queue
import threading
import time

import numpy as np

__all__ = ["Saver", "SaverFull", "SaverError"]

ALIGN = 256  # bytes; region slices start on this boundary


class SaverFull(Exception):
    """The region has no room for an append: nothing of it was taken.
    .needed bytes, .free bytes at the time, .capacity of the region."""

    def __init__(self, needed, free, capacity):
        super().__init__(f"saver region full: {needed} bytes needed, {free} free of {capacity} "
                         f"(retry after Saver.wait_room, flush, or give the request up)")
        self.needed, self.free, self.capacity = needed, free, capacity


class SaverError(Exception):
    """A background send failed; .cause is the original error (hcache_client.Error
    with its gRPC code, usually). The saver takes no more appends."""

    def __init__(self, what, cause):
        super().__init__(f"{what}: {cause}")
        self.cause = cause


class _Ring:
    """Allocations of a region in FIFO order: each [off, off+n) contiguous,
    freed oldest first. Thread-safe."""

    def __init__(self, size):
        self.size = size
        self.live = collections.deque()  # (off, end) in allocation order
        self.used = 0  # bytes held, padding at a wrap included
        self.cv = threading.Condition()

    def _fit(self, n):
        if not self.live:
            return 0 if n <= self.size else None
        oldest, newest = self.live[0], self.live[-1]
        if newest[0] >= oldest[0]:  # not wrapped: free at the end, then before the oldest
            if self.size - newest[1] >= n:
                return newest[1]
            if oldest[0] >= n:
                return 0
            return None
        return newest[1] if oldest[0] - newest[1] >= n else None

    def free_bytes(self):
        with self.cv:
            if not self.live:
                return self.size
            oldest, newest = self.live[0], self.live[-1]
            if newest[0] >= oldest[0]:
                return max(self.size - newest[1], oldest[0])
            return oldest[0] - newest[1]

    @staticmethod
    def rounded(n):
        return max(ALIGN, -(-n // ALIGN) * ALIGN)

    def wait_fit(self, n, timeout=None):
        """Waits until n bytes would fit (True) or timeout seconds pass (False)."""
        n = self.rounded(n)
        with self.cv:
            return self.cv.wait_for(lambda: self._fit(n) is not None, timeout)

    def alloc(self, n, timeout=0.0):
        """The offset of n bytes, or None when they do not fit within timeout seconds."""
        n = self.rounded(n)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.cv:
            while True:
                off = self._fit(n)
                if off is not None:
                    self.live.append((off, off + n))
                    self.used += n
                    return off
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self.cv.wait(left)

    def free(self, off):
        with self.cv:
            o, e = self.live.popleft()
            if o != off:
                raise AssertionError(f"saver ring: freed {off}, oldest is {o}")
            self.used -= e - o
            self.cv.notify_all()


class _Item:
    __slots__ = ("kind", "writers", "layer", "count", "ids", "off", "n", "event", "keep", "done", "result", "close")

    def __init__(self, kind, **kw):
        self.kind = kind
        self.writers, self.layer, self.count, self.ids = None, None, None, None
        self.off, self.n, self.event, self.keep = None, 0, None, None
        self.done, self.result, self.close = None, None, False
        for k, v in kw.items():
            setattr(self, k, v)


def _torch():
    import torch

    return torch


class Saver:
    """Asynchronous saving of rows (torch tensors on a GPU or the CPU, numpy
    arrays) through one shared region and one background thread, for any
    number of writers of one client. Not safe for concurrent use by several
    engine threads (one engine thread, plus the saver's own)."""

    def __init__(self, client, region_bytes=64 << 20, device=None, region=None, decode_group=1):
        """decode_group K > 1: batched decode steps (append_tokens with a
        list of writers, torch tensors) gather K steps in a buffer on the
        rows' device (one small copy per step on the saver's stream) and go
        out as one copy to the region and one AppendTokens of K tokens per
        writer: K times fewer RPCs in the background thread, whose Python
        competes with the engine's for the GIL. flush() sends a partial
        group first."""
        if decode_group < 1:
            raise ValueError(f"decode_group {decode_group}, want at least 1")
        self.decode_group = decode_group
        self._lane = None  # the decode group being gathered
        self.c = client
        self.region = region if region is not None else client.region(region_bytes)
        self._own_region = region is None
        self.ring = _Ring(self.region.size)
        self.stats = {"mode": "cpu", "appends": 0, "bytes": 0, "full": 0, "sends": 0, "flushes": 0,
                      "max_pending_bytes": 0, "event_wait_s": 0.0, "send_s": 0.0, "dropped_after_error": 0}
        self.durable = {}  # (ns, id) -> tokens the daemon's Flush acknowledged
        self._host = None  # torch uint8 view of the region
        self._staging = None  # pinned staging when the region cannot be registered
        self._registered = False
        self._stream = None
        self._device = None
        self._err = None
        self._touched = {}  # (ns, id) -> writer, appended to since its last flush (background thread)
        self._q = queue.SimpleQueue()
        self._closed = False
        if device is not None:
            self._init_device(device)
        self._t = threading.Thread(target=self._run, name="hcache-saver", daemon=True)
        self._t.start()

    # -- device setup -------------------------------------------------------

    def _init_device(self, device):
        torch = _torch()
        dev = torch.device(device)
        if dev.type != "cuda":
            return
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        self._device = dev
        self._stream = torch.cuda.Stream(dev)
        host = self._host_view()
        try:
            rc = torch.cuda.cudart().cudaHostRegister(host.data_ptr(), self.region.size, 1)  # cudaHostRegisterPortable
            ok = int(getattr(rc, "value", rc)) == 0
        except Exception as e:  # noqa: BLE001 (any failure: fall back to staging)
            ok, rc = False, e
        if ok:
            self._registered = True
            self.stats["mode"] = "registered-region"
        else:
            # The failed call left its error as the runtime's last error, which
            # torch's next kernel launch check would report as its own: a
            # small op takes it (once) here.
            for _ in range(2):
                try:
                    torch.zeros(1, device=dev).add_(1)
                    torch.cuda.synchronize(dev)
                    break
                except RuntimeError:
                    continue
            self._staging = torch.empty(self.region.size, dtype=torch.uint8, pin_memory=True)
            self.stats["mode"] = "pinned-staging"
            self.stats["register_error"] = str(rc)

    def _host_view(self):
        if self._host is None:
            self._host = self.region.tensor(_torch().uint8)
        return self._host

    # -- the engine's side ----------------------------------------------------

    def _check(self):
        if self._err is not None:
            raise self._err
        if self._closed:
            raise SaverError("saver", RuntimeError("closed"))

    @staticmethod
    def _nbytes(rows):
        if hasattr(rows, "element_size"):  # torch.Tensor
            return rows.numel() * rows.element_size()
        if isinstance(rows, np.ndarray):
            return rows.nbytes
        return len(memoryview(rows).cast("B"))

    def _copy_in(self, rows, stream, timeout):
        """Takes room in the ring and starts the copy of rows into it:
        returns (offset, nbytes, event or None, references to keep)."""
        n = self._nbytes(rows)
        if _Ring.rounded(n) > self.ring.size:
            raise ValueError(f"saver: {n} bytes of rows exceed the whole region ({self.ring.size} bytes, slices aligned to {ALIGN})")
        off = self.ring.alloc(n, timeout)
        if off is None:
            self.stats["full"] += 1
            raise SaverFull(n, self.ring.free_bytes(), self.ring.size)
        try:
            ev, keep = self._copy(rows, off, n, stream)
        except BaseException:
            self._unalloc(off)
            raise
        pending = self.ring.used
        if pending > self.stats["max_pending_bytes"]:
            self.stats["max_pending_bytes"] = pending
        self.stats["appends"] += 1
        self.stats["bytes"] += n
        return off, n, ev, keep

    def _unalloc(self, off):
        with self.ring.cv:
            o, e = self.ring.live.pop()
            if o != off:
                raise AssertionError(f"saver ring: undid {off}, newest is {o}")
            self.ring.used -= e - o
            self.ring.cv.notify_all()

    def _copy(self, rows, off, n, stream):
        if hasattr(rows, "device") and rows.device.type == "cuda":
            return self._copy_cuda(rows, off, n, stream)
        if hasattr(rows, "numpy"):  # CPU torch tensor
            torch = _torch()
            src = rows.detach().reshape(-1)
            if not src.is_contiguous():
                src = src.contiguous()
            self._host_view()[off:off + n].copy_(src.view(torch.uint8))
            return None, None
        a = rows if isinstance(rows, np.ndarray) else np.frombuffer(memoryview(rows).cast("B"), np.uint8)
        self.region.array(np.uint8, off, n)[:] = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
        return None, None

    def _copy_cuda(self, rows, off, n, stream):
        torch = _torch()
        if self._stream is None:
            self._init_device(rows.device)
        elif rows.device != self._device:
            raise ValueError(f"saver: rows on {rows.device}, the saver copies from {self._device}")
        engine = stream if stream is not None else torch.cuda.current_stream(rows.device)
        side = self._stream
        side.wait_stream(engine)  # the side stream waits; the engine's never does
        with torch.cuda.stream(side):
            src = rows.detach().reshape(-1)
            if not src.is_contiguous():
                src = src.contiguous()
            src = src.view(torch.uint8)
            dst = (self._host_view() if self._registered else self._staging)[off:off + n]
            dst.copy_(src, non_blocking=True)
            ev = torch.cuda.Event(blocking=True)
            ev.record(side)
        return ev, (rows, src)

    def append_layer(self, writer, layer, rows, stream=None, timeout=0.0):
        """Prefill: rows of one layer (all of writer's new tokens, in order)
        for writer (a Writer of this saver's client). rows: a tensor on its
        device (stream: the engine's stream that produces it, default the
        current one), a CPU tensor or a numpy array. Returns once the copy is
        queued; raises SaverFull (nothing taken) when the region has no room
        within timeout seconds, ValueError for rows that do not fit the plan."""
        self._check()
        if self._lane is not None:  # keep the order: the gathered steps go first
            self._push_lane(stream, timeout)
        plan = writer.ident.plan
        if not 0 <= layer < len(plan):
            raise ValueError(f"append_layer: layer {layer} out of range [0, {len(plan)})")
        rb = plan[layer][1]
        if rb == 0:
            raise ValueError(f"append_layer: layer {layer} stores nothing in this identity's plan")
        n = self._nbytes(rows)
        if n % rb:
            raise ValueError(f"append_layer: layer {layer}: {n} bytes is not a whole number of {rb}-byte rows")
        off, n, ev, keep = self._copy_in(rows, stream, timeout)
        self._q.put(_Item("layer", writers=[writer], layer=layer, off=off, n=n, event=ev, keep=keep))

    def append_tokens(self, writers, rows, token_ids=None, stream=None, timeout=0.0):
        """Decode. writers: one Writer, and rows are its next tokens
        (token-major: every stored layer's row of a token, then the next
        token); or a list of Writers, one token each, and rows are [len,
        token bytes] (row i is writer i's token). token_ids: the tokens' ids
        (a list for one writer, one id per writer for a list), required by
        token-addressed contexts. As append_layer otherwise."""
        self._check()
        batch = isinstance(writers, (list, tuple))
        ws = list(writers) if batch else [writers]
        if not ws:
            raise ValueError("append_tokens: no writers")
        tb = ws[0].ident.token_bytes()
        for w in ws[1:]:
            if w.ident.token_bytes() != tb:
                raise ValueError(f"append_tokens: writers with different token sizes ({tb} and {w.ident.token_bytes()} bytes)")
        n = self._nbytes(rows)
        if batch:
            count = 1
            if n != len(ws) * tb:
                raise ValueError(f"append_tokens: {len(ws)} writers need {len(ws) * tb} bytes ({tb} a token), got {n}")
            ids = None
            if token_ids is not None:
                from . import _token_ids

                ids = _token_ids(token_ids)
                if len(ids) != len(ws):
                    raise ValueError(f"append_tokens: {len(ids)} token ids for {len(ws)} writers")
                ids = [[i] for i in ids]
        else:
            if n == 0 or n % tb:
                raise ValueError(f"append_tokens: {n} bytes is not a whole number of {tb}-byte tokens")
            count = n // tb
            ids = None
            if token_ids is not None:
                from . import _token_ids

                ids = [_token_ids(token_ids)]
                if len(ids[0]) != count:
                    raise ValueError(f"append_tokens: {len(ids[0])} token ids for {count} tokens")
        if batch and self.decode_group > 1 and hasattr(rows, "element_size"):
            return self._lane_append(ws, rows, None if ids is None else [i[0] for i in ids], stream, timeout)
        if self._lane is not None:  # keep the order: the gathered steps go first
            self._push_lane(stream, timeout)
        off, n, ev, keep = self._copy_in(rows, stream, timeout)
        self._q.put(_Item("tokens", writers=ws, count=count, ids=ids, off=off, n=n, event=ev, keep=keep))

    def _lane_append(self, ws, rows, ids, stream, timeout):
        torch = _torch()
        tb = ws[0].ident.token_bytes()
        if _Ring.rounded(len(ws) * self.decode_group * tb) > self.ring.size:
            raise ValueError(f"saver: a decode group of {self.decode_group} steps of {len(ws)} writers ({len(ws) * self.decode_group * tb} bytes) "
                             f"exceeds the whole region ({self.ring.size} bytes)")
        key = tuple(id(w) for w in ws)  # the writers stay referenced while the group lives
        L = self._lane
        if L is not None and (L["key"] != key or L["k"] == self.decode_group):
            self._push_lane(stream, timeout)  # SaverFull here: this step was not taken
            L = None
        cuda = rows.device.type == "cuda"
        if cuda and self._stream is None:
            self._init_device(rows.device)
        if L is None:
            if cuda:
                with torch.cuda.stream(self._stream):
                    buf = torch.empty(len(ws), self.decode_group, tb, dtype=torch.uint8, device=rows.device)
            else:
                buf = torch.empty(len(ws), self.decode_group, tb, dtype=torch.uint8)
            L = self._lane = {"key": key, "writers": ws, "buf": buf, "k": 0, "ids": [], "keep": []}
        if cuda:
            engine = stream if stream is not None else torch.cuda.current_stream(rows.device)
            self._stream.wait_stream(engine)
            with torch.cuda.stream(self._stream):
                src = rows.detach().reshape(len(ws), -1)
                if not src.is_contiguous():
                    src = src.contiguous()
                L["buf"][:, L["k"]].copy_(src.view(torch.uint8))
            L["keep"].append((rows, src))  # until the group's copy to the region completes
        else:
            L["buf"][:, L["k"]].copy_(rows.detach().reshape(len(ws), -1).contiguous().view(torch.uint8))
        L["ids"].append(ids)
        L["k"] += 1
        self.stats["grouped_steps"] = self.stats.get("grouped_steps", 0) + 1
        if L["k"] == self.decode_group:
            try:
                self._push_lane(stream, 0.0)
            except SaverFull:
                pass  # taken: it goes out with the next call (which raises if there is still no room)

    def _push_lane(self, stream, timeout):
        """Sends the gathered decode steps: one copy into the region, one
        AppendTokens of k tokens per writer. Raises SaverFull (the group
        stays) when the region has no room."""
        torch = _torch()
        L = self._lane
        k, buf = L["k"], L["buf"]
        cuda = buf.device.type == "cuda"
        if k < self.decode_group:
            if cuda:
                with torch.cuda.stream(self._stream):
                    buf = buf[:, :k].contiguous()
            else:
                buf = buf[:, :k].contiguous()
        off, n, ev, keep = self._copy_in(buf, stream if not cuda else self._stream, timeout)
        ids = None
        if all(i is not None for i in L["ids"]):
            ids = [[L["ids"][s][b] for s in range(k)] for b in range(len(L["writers"]))]
        elif any(i is not None for i in L["ids"]):
            raise ValueError("append_tokens: token ids given for some steps of a decode group and not others")
        self._q.put(_Item("tokens", writers=L["writers"], count=k, ids=ids, off=off, n=n, event=ev,
                          keep=(keep, L["keep"], L["buf"])))
        self._lane = None

    def wait_room(self, nbytes, timeout=None):
        """Waits until nbytes fit in the region (True), or timeout seconds (False)."""
        self._check()
        if _Ring.rounded(nbytes) > self.ring.size:
            raise ValueError(f"saver: {nbytes} bytes exceed the whole region ({self.ring.size} bytes, slices aligned to {ALIGN})")
        return self.ring.wait_fit(nbytes, timeout)

    def flush(self, writers=None, close=False, timeout=None):
        """Returns {(ns, id): durable tokens} once every append handed before
        it was sent and each writer (writers, default every one appended to
        since its last flush) was flushed by the daemon (close: closed, which
        flushes too). Raises SaverError if a send or the flush failed."""
        self._check()
        if self._lane is not None:
            self._push_lane(None, None)
        done = threading.Event()
        it = _Item("flush", writers=None if writers is None else list(writers), done=done, close=close)
        self._q.put(it)
        if not done.wait(timeout):
            raise TimeoutError(f"saver flush: not done within {timeout} s")
        if isinstance(it.result, BaseException):
            raise it.result
        return it.result

    def close(self, flush=True):
        """Flushes (unless flush is False), stops the background thread and
        releases the region."""
        if self._closed:
            return
        try:
            if flush and self._err is None:
                self.flush()
        finally:
            self._closed = True
            self._q.put(None)
            self._t.join()
            if self._stream is not None:
                self._stream.synchronize()
            if self._registered:
                _torch().cuda.cudart().cudaHostUnregister(self._host.data_ptr())
                self._registered = False
            self._host = None
            self._staging = None
            if self._own_region:
                self.region.close()

    # -- the background thread ------------------------------------------------

    def _run(self):
        while True:
            it = self._q.get()
            if it is None:
                return
            if it.kind == "flush":
                self._do_flush(it)
                continue
            try:
                if self._err is None:
                    self._send(it)
                else:
                    self.stats["dropped_after_error"] += 1
            except BaseException as e:  # noqa: BLE001 (kept and raised to the engine)
                what = f"background {'AppendLayer of layer %d' % it.layer if it.kind == 'layer' else 'AppendTokens'}"
                self._err = SaverError(what + " for " + ", ".join(f"{w.ref.namespace}/{w.ref.id}" for w in it.writers), e)
            finally:
                it.keep = None
                it.event = None
                self.ring.free(it.off)

    def _send(self, it):
        if it.event is not None:
            t0 = time.perf_counter()
            it.event.synchronize()
            self.stats["event_wait_s"] += time.perf_counter() - t0
            if self._staging is not None:
                self._host_view()[it.off:it.off + it.n].copy_(self._staging[it.off:it.off + it.n])
        it.keep = None  # the copy is complete: the engine's tensors can go
        t0 = time.perf_counter()
        if it.kind == "layer":
            w = it.writers[0]
            self._touched[(w.ref.namespace, w.ref.id)] = w
            w.append_layer(it.layer, (self.region, it.off, it.n))
        else:
            per = it.n // len(it.writers)
            for i, w in enumerate(it.writers):
                self._touched[(w.ref.namespace, w.ref.id)] = w
                w.append_tokens(it.count, (self.region, it.off + i * per, per),
                                token_ids=None if it.ids is None else it.ids[i])
                self.stats["sends"] += 1
        if it.kind == "layer":
            self.stats["sends"] += 1
        self.stats["send_s"] += time.perf_counter() - t0

    def _do_flush(self, it):
        if self._err is not None:
            it.result = self._err
            it.done.set()
            return
        ws = list(self._touched.values()) if it.writers is None else it.writers
        out = {}
        try:
            for w in ws:
                key = (w.ref.namespace, w.ref.id)
                out[key] = w.close() if it.close else w.flush()
                self.durable[key] = out[key]
                self._touched.pop(key, None)
            self.stats["flushes"] += 1
            it.result = out
        except BaseException as e:  # noqa: BLE001
            self._err = SaverError("background " + ("CloseContext" if it.close else "Flush"), e)
            it.result = self._err
        it.done.set()
