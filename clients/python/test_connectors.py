"""Tests of the vLLM-shaped connector and the SGLang-shaped storage.

Usage: test_connectors.py [--addr unix:///path/hcache.sock] [--model MODEL_DIR] [--seed N]

Without --addr the connector runs against FakeDaemon, an in-memory test seam
with hcached's token-addressed semantics (whole chunk groups keyed by the
namespace, salt, identity and every token before them); with --addr the same
cases run against the real daemon, and the SGLang storage cases too. With
--model (a synthesized model directory) the paged torch engine runs as well.
Seeded randomness prints its seed; --seed replays it.
"""
import argparse
import os
import random
import sys
import unittest
import zlib

import grpc
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hcache_client as hc  # noqa: E402
import vllm_shapes as vs  # noqa: E402
from hcache_client.sglang_storage import HCacheHiCacheStorage  # noqa: E402
from hcache_client.vllm_connector import HCacheConnector, KVConnectorRole  # noqa: E402

ADDR, MODEL, SEED = None, None, None
NO_LOOKUP = None  # why the daemon at ADDR cannot run the connector cases, if it cannot
CHUNK = 16  # the fake daemon's chunk tokens; a real daemon says its own


class FakeDaemon:
    """hcached's token-addressed semantics in memory (a test seam, not a
    client): Lookup, CREATE with tokens, AppendLayer, AppendTokens with ids,
    CloseContext, Restore by tokens, Delete. Groups are shared by key and
    kept while a context refers to them."""

    def __init__(self, chunk=CHUNK):
        self.chunk = chunk
        self.groups = {}  # key -> (rows per layer, referrers)
        self.ctx = {}  # (ns, id) -> dict

    def info(self):
        return type("Info", (), {"chunk_tokens": self.chunk, "models": [], "shm_socket": ""})()

    def _key(self, ns, ident, salt, tokens, g):
        return (ns, bytes(hc._salt(salt)), ident.model, tuple(ident.plan), tuple(tokens[:(g + 1) * self.chunk]))

    def lookup(self, ns, ident, tokens, salt=None, id=None):
        tokens = hc._token_ids(tokens)
        g = 0
        while (g + 1) * self.chunk <= len(tokens) and self._key(ns, ident, salt, tokens, g) in self.groups:
            g += 1
        return g * self.chunk

    def create(self, ns, cid, ident, pinned=False, tokens=None, salt=None):
        if (ns, cid) in self.ctx:
            raise hc.Error(grpc.StatusCode.ALREADY_EXISTS, f"{ns}/{cid} exists")
        tokens = hc._token_ids(tokens)
        shared = self.lookup(ns, ident, tokens, salt)
        rows = [bytearray() for _ in ident.plan]
        for g in range(shared // self.chunk):
            grows, refs = self.groups[self._key(ns, ident, salt, tokens, g)]
            refs.add((ns, cid))
            for l, r in enumerate(grows):
                rows[l] += r
        c = self.ctx[(ns, cid)] = {"ident": ident, "salt": salt, "tokens": list(tokens), "rows": rows, "groups": shared // self.chunk}
        return FakeWriter(self, ns, cid, c, shared)

    def restore(self, ns, cid, ident, project=False, tokens=None, salt=None):
        if cid is not None:
            raise NotImplementedError("the fake restores by tokens only")
        tokens = hc._token_ids(tokens)
        n = self.lookup(ns, ident, tokens, salt)
        rows = [bytearray() for _ in ident.plan]
        for g in range(n // self.chunk):
            for l, r in enumerate(self.groups[self._key(ns, ident, salt, tokens, g)][0]):
                rows[l] += r
        for l in range(len(ident.plan)):
            yield l, n, bytes(rows[l])

    def delete(self, ns, cid):
        self.ctx.pop((ns, cid))
        for k in [k for k, (_, refs) in self.groups.items() if (ns, cid) in refs]:
            self.groups[k][1].discard((ns, cid))
            if not self.groups[k][1]:
                del self.groups[k]

    def close(self):
        pass


class FakeWriter:
    def __init__(self, d, ns, cid, c, tokens):
        self.d, self.ns, self.cid, self.c, self.tokens = d, ns, cid, c, tokens

    def append_layer(self, layer, rows):
        rb = self.c["ident"].plan[layer][1]
        b = bytes(np.ascontiguousarray(rows).view(np.uint8).reshape(-1))
        if len(b) % rb:
            raise hc.Error(grpc.StatusCode.INVALID_ARGUMENT, f"layer {layer}: {len(b)} bytes")
        self.c["rows"][layer] += b
        return self._complete()

    def append_tokens(self, count, rows, token_ids=None):
        plan = self.c["ident"].plan
        b = bytes(np.ascontiguousarray(rows).view(np.uint8).reshape(-1))
        tb = sum(rb for _, rb in plan)
        if len(b) != count * tb or token_ids is None or len(token_ids) != count:
            raise hc.Error(grpc.StatusCode.INVALID_ARGUMENT, f"{len(b)} bytes for {count} tokens")
        for i in range(count):
            off = i * tb
            for l, (_, rb) in enumerate(plan):
                self.c["rows"][l] += b[off:off + rb]
                off += rb
        self.c["tokens"] += hc._token_ids(token_ids)
        return self._complete()

    def _complete(self):
        plan = self.c["ident"].plan
        self.tokens = min(len(r) // rb for r, (_, rb) in zip(self.c["rows"], plan))
        return self.tokens

    def flush(self):
        return self._complete()

    def close(self, abandon=False):
        n = min(self._complete(), len(self.c["tokens"]))
        d, c, ch = self.d, self.c, self.d.chunk
        for g in range(c["groups"], n // ch):
            k = d._key(self.ns, c["ident"], c["salt"], c["tokens"], g)
            if k not in d.groups:
                rows = [bytes(r[g * ch * rb:(g + 1) * ch * rb]) for r, (_, rb) in zip(c["rows"], c["ident"].plan)]
                d.groups[k] = (rows, set())
            d.groups[k][1].add((self.ns, self.cid))
        c["groups"] = max(c["groups"], n // ch)
        return n


def make_client():
    return hc.Client(ADDR) if ADDR else FakeDaemon()


L, KVH, HD, DT = 3, 2, 8, torch.float16


class Side:
    """One engine: a scheduler-side and a worker-side connector over a paged
    cache of random K/V, driven in vLLM's call order."""

    def __init__(self, client, ns, bs, blocks=64, fingerprint="ab" * 16, transport="inline"):
        self.bs = bs
        cfg = vs.VllmConfig(vs.ModelConfig(L, KVH, HD, DT), vs.CacheConfig(bs),
                            vs.KVTransferConfig(kv_connector_extra_config={"hcache_namespace": ns, "hcache_fingerprint": fingerprint,
                                                                           "hcache_transport": transport, "hcache_region_bytes": 1 << 20}))
        self.sched = HCacheConnector(cfg, KVConnectorRole.SCHEDULER, None, client=client)
        self.worker = HCacheConnector(cfg, KVConnectorRole.WORKER, None, client=client)
        self.names = [f"model.layers.{i}.self_attn.attn" for i in range(L)]
        self.kv = {n: torch.zeros(2, blocks, bs, KVH, HD, dtype=DT) for n in self.names}
        self.worker.register_kv_caches(self.kv)
        self.next_block = 0

    def kv_of(self, tokens, pos):
        """Deterministic K/V of the token at pos given every token before it
        (a stand-in for the model: a row loaded from another prefix differs)."""
        g = torch.Generator().manual_seed(zlib.crc32(np.asarray(tokens[:pos + 1], dtype=np.uint32).tobytes()) * 4099 + pos)
        return torch.randn(L, 2, KVH, HD, generator=g).to(DT)

    def step(self, so, write):
        meta = self.sched.build_connector_meta(so)
        self.worker.bind_connector_metadata(meta)
        self.worker.start_load_kv(vs.ForwardContext())
        for li, n in enumerate(self.names):
            self.worker.wait_for_layer_load(n)
            for b, o, kv in write:
                self.kv[n][:, b, o] = kv[li]
            self.worker.save_kv_layer(n, self.kv[n], None)
        self.worker.wait_for_save()
        self.worker.clear_connector_metadata()

    def serve(self, rid, prompt, gen=0, salt=None, chunk=None):
        """Prefill (loading what hcache holds; chunk: at most that many
        tokens a step, as vLLM's chunked prefill), gen decode steps, finish.
        Returns (external tokens, block table, request)."""
        req = vs.Request(rid, prompt, cache_salt=salt)
        ext, asyn = self.sched.get_num_new_matched_tokens(req, 0)
        assert asyn is False
        need = (len(prompt) + gen + self.bs - 1) // self.bs
        table = list(range(self.next_block, self.next_block + need))
        self.next_block += need
        self.sched.update_state_after_alloc(req, vs.KVCacheBlocks(table), ext)
        pos, first = ext, True
        while pos < len(prompt):
            n = min(len(prompt) - pos, chunk or len(prompt))
            if first:
                so = vs.SchedulerOutput(scheduled_new_reqs=[vs.NewRequestData(rid, prompt, (table,), pos)], num_scheduled_tokens={rid: n})
            else:
                so = vs.SchedulerOutput(scheduled_cached_reqs=vs.CachedRequestData([rid], set(), [], [None], [pos]), num_scheduled_tokens={rid: n})
            self.step(so, [(table[p // self.bs], p % self.bs, self.kv_of(prompt, p)) for p in range(pos, pos + n)])
            pos, first = pos + n, False
        for i in range(gen):
            tok = (7 * pos + 3) % 1000
            req.append_output_token_ids(tok)
            so = vs.SchedulerOutput(scheduled_cached_reqs=vs.CachedRequestData([rid], set(), [], [None], [pos]),
                                    num_scheduled_tokens={rid: 1})
            self.step(so, [(table[pos // self.bs], pos % self.bs, self.kv_of(req.all_token_ids, pos))])
            pos += 1
        self.sched.request_finished(req, table)
        self.sched.build_connector_meta(vs.SchedulerOutput(finished_req_ids={rid}))
        self.worker.get_finished({rid})
        return ext, table, req

    def check_rows(self, tc, table, tokens, start, end):
        for p in range(start, end):
            want = self.kv_of(tokens, p)
            for li, n in enumerate(self.names):
                tc.assertTrue(torch.equal(self.kv[n][:, table[p // self.bs], p % self.bs], want[li]), f"position {p} layer {li}")


class ConnectorTest(unittest.TestCase):
    def setUp(self):
        if NO_LOOKUP:
            self.skipTest(NO_LOOKUP)
        self.c = make_client()
        self.bs = self.c.info().chunk_tokens
        self.rng = random.Random(f"{SEED} {self.id()}")
        self.ns = f"vc{self.rng.randrange(1 << 30)}"

    def tearDown(self):
        self.c.close()

    def toks(self, n):
        return [self.rng.randrange(1, 50000) for _ in range(n)]

    def test_shared_prefix_loads_and_saves_once(self):
        bs = self.bs
        for transport in ("inline", "shm") if ADDR else ("inline",):
            with self.subTest(transport):
                sysp = self.toks(2 * bs + 3)
                a, b = sysp + self.toks(bs), sysp + self.toks(bs + 5)
                s = Side(self.c, self.ns, bs, transport=transport)
                ext, _, _ = s.serve("a" + transport, a, gen=3)
                self.assertEqual(ext, 0)
                self.assertEqual(s.worker.stats["shared_tokens"], 0)
                ext, table, _ = s.serve("b" + transport, b, gen=3)
                self.assertEqual(ext, 2 * bs, "b loads the whole groups of the shared system prompt")
                self.assertEqual(s.worker.stats["loaded_tokens"], 2 * bs)
                self.assertEqual(s.worker.stats["shared_tokens"], 2 * bs, "b's context shares them rather than writing them")
                s.check_rows(self, table, b, 0, 2 * bs)
                if s.worker.region is not None:
                    s.worker.region.close()

    def test_lookup_leaves_the_last_token(self):
        p = self.toks(2 * self.bs)
        s = Side(self.c, self.ns, self.bs)
        s.serve("a", p)
        self.assertEqual(self.c.lookup(self.ns, s.sched.ident, p), 2 * self.bs)
        ext, table, _ = s.serve("b", p)
        self.assertEqual(ext, 2 * self.bs - 1, "the last prompt token is always computed")
        s.check_rows(self, table, p, 0, 2 * self.bs - 1)

    def test_isolation(self):
        """No hit across a salt, a namespace or a model fingerprint."""
        p = self.toks(3 * self.bs)
        s = Side(self.c, self.ns, self.bs)
        s.serve("a", p)
        cases = [
            ("salt", Side(self.c, self.ns, self.bs), "tenant-b"),
            ("namespace", Side(self.c, self.ns + "x", self.bs), None),
            ("model", Side(self.c, self.ns, self.bs, fingerprint="cd" * 16), None),
        ]
        for name, side, salt in cases:
            with self.subTest(name):
                ext, _, _ = side.serve("b-" + name, p, salt=salt)
                self.assertEqual(ext, 0)
        ext, _, _ = Side(self.c, self.ns, self.bs).serve("same", p)
        self.assertEqual(ext, 3 * self.bs - 1)

    def test_decoded_tokens_are_saved_with_their_ids(self):
        p = self.toks(self.bs + 4)
        s = Side(self.c, self.ns, self.bs)
        _, _, req = s.serve("a", p, gen=self.bs + 2)
        hist = list(req.all_token_ids)
        # gen tokens decoded, the last one never computed: bs+4+bs+1 stored.
        self.assertEqual(self.c.lookup(self.ns, s.sched.ident, hist), 2 * self.bs)
        ext, table, _ = s.serve("b", hist + self.toks(3))
        self.assertEqual(ext, 2 * self.bs)
        s.check_rows(self, table, hist, 0, 2 * self.bs)

    def test_chunked_prefill(self):
        """A prompt computed over several steps is saved whole, once."""
        p = self.toks(3 * self.bs + 5)
        s = Side(self.c, self.ns, self.bs)
        s.serve("a", p, chunk=self.bs - 3)
        self.assertEqual(s.worker.stats["saved_tokens"], len(p))
        self.assertEqual(self.c.lookup(self.ns, s.sched.ident, p), 3 * self.bs)
        ext, table, _ = s.serve("b", p + self.toks(2), chunk=7)
        self.assertEqual(ext, 3 * self.bs)
        s.check_rows(self, table, p, 0, 3 * self.bs)

    def test_random_workload(self):
        """Seeded requests that branch off earlier ones at random points, in
        random prefill chunks, with random decode lengths: every request
        loads exactly the whole groups some earlier request computed (a
        model of the store says which), and every loaded row is its own."""
        bs, rng = self.bs, self.rng
        s = Side(self.c, self.ns, bs, blocks=4096)
        stored = set()  # prefixes (whole groups) some request computed
        histories = [[]]
        for i in range(16):
            base = rng.choice(histories)
            p = base[:rng.randrange(len(base) + 1)] + self.toks(rng.randrange(1, 2 * bs))
            k = 0
            while (k + 1) * bs <= len(p) and tuple(p[:(k + 1) * bs]) in stored:
                k += 1
            want = min(k * bs, len(p) - 1)
            gen = rng.randrange(0, bs)
            ext, table, req = s.serve(f"r{i}", p, gen=gen, chunk=rng.choice([None, 5, bs + 1]))
            self.assertEqual(ext, want, f"request {i} (seed {SEED})")
            s.check_rows(self, table, p, 0, ext)
            hist = list(req.all_token_ids)
            for g in range(1, len(hist) // bs + 1):  # Side.serve computes every decoded token
                stored.add(tuple(hist[:g * bs]))
            histories.append(hist)

    def test_load_error_reports_blocks(self):
        """State gone between the lookup and the load: the blocks are
        reported (vLLM recomputes them), nothing wrong is placed."""
        p = self.toks(2 * self.bs + 1)
        s = Side(self.c, self.ns, self.bs)
        s.serve("a", p)
        s2 = Side(self.c, self.ns, self.bs, blocks=64)
        req = vs.Request("b", p)
        ext, _ = s2.sched.get_num_new_matched_tokens(req, 0)
        self.assertEqual(ext, 2 * self.bs)
        self.c.delete(self.ns, "a")
        table = [5, 6, 7]
        s2.sched.update_state_after_alloc(req, vs.KVCacheBlocks(table), ext)
        so = vs.SchedulerOutput(scheduled_new_reqs=[vs.NewRequestData("b", p, (table,), ext)], num_scheduled_tokens={"b": 1})
        meta = s2.sched.build_connector_meta(so)
        s2.worker.bind_connector_metadata(meta)
        s2.worker.start_load_kv(vs.ForwardContext())
        for n in s2.names:
            s2.worker.wait_for_layer_load(n)
        self.assertEqual(s2.worker.get_block_ids_with_load_errors(), {5, 6})
        for n in s2.names:
            self.assertEqual(int(s2.kv[n].abs().sum()), 0, "nothing placed")

class ConfigTest(unittest.TestCase):
    def test_bad_config(self):
        base = {"hcache_namespace": "x", "hcache_fingerprint": "ab"}
        cases = [
            ("no fingerprint", {"hcache_namespace": "x"}, "hcache_fingerprint"),
            ("not hex", dict(base, hcache_fingerprint="zz"), "not hex"),
            ("no address", base, "hcache_addr"),
        ]
        for name, extra, want in cases:
            with self.subTest(name):
                cfg = vs.VllmConfig(vs.ModelConfig(L, KVH, HD, DT), vs.CacheConfig(16), vs.KVTransferConfig(kv_connector_extra_config=extra))
                with self.assertRaisesRegex(ValueError, want):
                    HCacheConnector(cfg, KVConnectorRole.WORKER, None)
        cfg = vs.VllmConfig(vs.ModelConfig(L, KVH, HD, DT), vs.CacheConfig(16), vs.KVTransferConfig(kv_connector_extra_config=base))
        w = HCacheConnector(cfg, KVConnectorRole.WORKER, None, client=FakeDaemon())
        with self.assertRaisesRegex(ValueError, "K\\|V rows"):
            w.register_kv_caches({f"l{i}": torch.zeros(2, 4, 16, KVH, HD + 1, dtype=DT) for i in range(L)})


# vLLM's KVConnectorBase_V1 reduced to what decides whether a subclass can be
# built: an ABC whose abstract methods are base.py's (the scheduler side's
# get_num_new_matched_tokens, update_state_after_alloc, build_connector_meta;
# the worker side's start_load_kv, wait_for_layer_load, save_kv_layer,
# wait_for_save), and an __init__ that needs kv_transfer_config.
VLLM_BASE_STUB = """
import enum
from abc import ABC, abstractmethod

class KVConnectorRole(enum.Enum):
    SCHEDULER = 0
    WORKER = 1

class KVConnectorMetadata(ABC):
    pass

class KVConnectorBase_V1(ABC):
    def __init__(self, vllm_config, role, kv_cache_config):
        self._connector_metadata = None
        self._vllm_config = vllm_config
        if vllm_config.kv_transfer_config is None:
            raise ValueError("kv_transfer_config must be set for KVConnectorBase_V1")
        self._kv_transfer_config = vllm_config.kv_transfer_config
        self._kv_cache_config = kv_cache_config
        self._role = role
        self.use_eagle_prefix_cache_hashing = False

    @abstractmethod
    def start_load_kv(self, forward_context, **kwargs): ...
    @abstractmethod
    def wait_for_layer_load(self, layer_name): ...
    @abstractmethod
    def save_kv_layer(self, layer_name, kv_layer, attn_metadata, **kwargs): ...
    @abstractmethod
    def wait_for_save(self): ...
    @abstractmethod
    def get_num_new_matched_tokens(self, request, num_computed_tokens): ...
    @abstractmethod
    def update_state_after_alloc(self, request, blocks, num_external_tokens): ...
    @abstractmethod
    def build_connector_meta(self, scheduler_output): ...
"""


class VLLMBaseTest(unittest.TestCase):
    def test_subclass_of_vllms_base_when_importable(self):
        """With a vllm package on the path, HCacheConnector derives from its
        KVConnectorBase_V1 and implements every abstract method (an ABC
        with one missing cannot be instantiated)."""
        import subprocess
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            pkg = os.path.join(d, "vllm", "distributed", "kv_transfer", "kv_connector", "v1")
            os.makedirs(pkg)
            for i in range(5):
                open(os.path.join(d, *(["vllm", "distributed", "kv_transfer", "kv_connector", "v1"][:i + 1]), "__init__.py"), "w").close()
            with open(os.path.join(pkg, "base.py"), "w") as f:
                f.write(VLLM_BASE_STUB)
            code = (
                "import sys, torch, vllm_shapes as vs\n"
                "from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1, KVConnectorMetadata\n"
                "from hcache_client.vllm_connector import HCacheConnector, HCacheConnectorMetadata, KVConnectorRole\n"
                "import test_connectors as tc\n"
                "assert issubclass(HCacheConnector, KVConnectorBase_V1)\n"
                "assert issubclass(HCacheConnectorMetadata, KVConnectorMetadata)\n"
                "cfg = vs.VllmConfig(vs.ModelConfig(2, 2, 8, torch.float16), vs.CacheConfig(16),"
                " vs.KVTransferConfig(kv_connector_extra_config={'hcache_fingerprint': 'ab'}))\n"
                "c = HCacheConnector(cfg, KVConnectorRole.WORKER, None, client=tc.FakeDaemon())\n"
                "assert c.use_eagle_prefix_cache_hashing is False and c.role is KVConnectorRole.WORKER\n"
                "print('subclass ok')\n"
            )
            here = os.path.dirname(os.path.abspath(__file__))
            env = dict(os.environ, PYTHONPATH=os.pathsep.join([d, here]))
            out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=here)
            self.assertEqual(out.returncode, 0, out.stdout + out.stderr)
            self.assertIn("subclass ok", out.stdout)


SGLANG_BASE_STUB = """
from abc import ABC, abstractmethod

class HiCacheStorage(ABC):
    def register_mem_pool_host(self, mem_pool_host):
        self.mem_pool_host = mem_pool_host

    @abstractmethod
    def get(self, key, target_location=None, target_sizes=None): ...
    @abstractmethod
    def batch_get(self, keys, target_locations=None, target_sizes=None): ...
    @abstractmethod
    def set(self, key, value=None, target_location=None, target_sizes=None): ...
    @abstractmethod
    def batch_set(self, keys, values=None, target_locations=None, target_sizes=None): ...
    @abstractmethod
    def exists(self, key): ...
"""


class SGLangBaseTest(unittest.TestCase):
    def test_subclass_of_sglangs_base_when_importable(self):
        """With an sglang package on the path (a stub of hicache_storage.py's
        ABC), HCacheHiCacheStorage derives from HiCacheStorage and implements
        its abstract methods."""
        import subprocess
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            parts = ["sglang", "srt", "mem_cache"]
            os.makedirs(os.path.join(d, *parts))
            for i in range(3):
                open(os.path.join(d, *parts[:i + 1], "__init__.py"), "w").close()
            with open(os.path.join(d, *parts, "hicache_storage.py"), "w") as f:
                f.write(SGLANG_BASE_STUB)
            code = (
                "from sglang.srt.mem_cache.hicache_storage import HiCacheStorage\n"
                "from hcache_client.sglang_storage import HCacheHiCacheStorage\n"
                "import test_connectors as tc\n"
                "assert issubclass(HCacheHiCacheStorage, HiCacheStorage)\n"
                "st = HCacheHiCacheStorage(tc.Storage(8, 64, 'ns'), client=object())\n"
                "print('subclass ok')\n"
            )
            here = os.path.dirname(os.path.abspath(__file__))
            env = dict(os.environ, PYTHONPATH=os.pathsep.join([d, here]))
            out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=here)
            self.assertEqual(out.returncode, 0, out.stdout + out.stderr)
            self.assertIn("subclass ok", out.stdout)


class SGLangConfigTest(unittest.TestCase):
    def test_bad_config(self):
        cases = [
            ("no page size", dict(page_size=0), "page of 64 bytes and 0 tokens"),
            ("page bytes not whole rows", dict(page_bytes=65), "page of 65 bytes and 8 tokens"),
            ("no address", dict(hcache_addr=None), "no hcache_addr"),
        ]
        for name, change, want in cases:
            with self.subTest(name):
                cfg = Storage(8, 64, "ns")
                cfg.extra_config.update(change)
                with self.assertRaisesRegex(ValueError, want):
                    HCacheHiCacheStorage(cfg)
        st = HCacheHiCacheStorage(Storage(8, 64, "ns"), client=object())
        with self.assertRaisesRegex(ValueError, "page key ''"):
            st.exists("")
        with self.assertRaisesRegex(ValueError, "2 keys and 1 values"):
            st.batch_set(["a", "b"], [b"x" * 64])


class TokenIdsTest(unittest.TestCase):
    def test_token_ids(self):
        good = [([1, 2, 3], [1, 2, 3]), (np.array([7], dtype=np.uint32), [7]), (torch.tensor([0, 4294967295]), [0, 4294967295]), ([], [])]
        for given, want in good:
            self.assertEqual(hc._token_ids(given), want)
        bad = [([1, -1], "element 1 is -1"), ([1.5], "element 0 is 1.5 \\(float\\), want an int"), ([1, True], "element 1 is True"),
               ([1 << 32], "outside"), ([[1, 2]], "element 0 is \\[1, 2\\] \\(list\\)"), (["a"], "element 0 is 'a' \\(str\\)"),
               (np.array([1.0, 2.5]), "element 0 is 1.0 \\(float64\\), want integers"), (np.zeros((2, 2), np.int32), "one dimension"),
               (torch.tensor([-3]), "element 0 is -3, outside"), ([np.int64(3), np.uint64(1 << 40)], "element 1 is 1099511627776")]
        for given, want in bad:
            with self.subTest(repr(given)):
                with self.assertRaisesRegex(ValueError, want):
                    hc._token_ids(given)
        with self.assertRaisesRegex(ValueError, "2 token ids for 3 tokens"):
            hc.Writer(None, None, None, 0).append_tokens(3, b"", token_ids=[1, 2])
        with self.assertRaisesRegex(ValueError, "give a context id, tokens"):
            list(hc.Client.restore(hc.Client.__new__(hc.Client), "ns", None, hc.Identity(b"m", [(hc.KV, 4)])))


class ClientTokensTest(unittest.TestCase):
    """The client's token-addressed calls against the real daemon: create by
    tokens shares stored groups, lookup, fork, restore by tokens and by id,
    append_tokens with ids; errors carry their gRPC code and change nothing."""

    IDENT = hc.Identity(b"py-tokens-model", [(hc.KV, 32), (hc.NONE, 0), (hc.HIDDEN, 16)])

    def setUp(self):
        if not ADDR:
            self.skipTest("no daemon address (--addr)")
        if NO_LOOKUP:
            self.skipTest(NO_LOOKUP)
        self.c = hc.Client(ADDR)
        self.g = self.c.info().chunk_tokens
        self.rng = random.Random(f"{SEED} {self.id()}")
        self.ns = f"ct{self.rng.randrange(1 << 30)}"

    def tearDown(self):
        self.c.close()

    def rows(self, layer, toks, start, end):
        rb = self.IDENT.plan[layer][1]
        out = bytearray()
        for p in range(start, end):
            out += bytes(((toks[p] * 31 + p + layer * 7 + i) & 0xFF) for i in range(rb))
        return bytes(out)

    def save(self, cid, toks, salt=None):
        w = self.c.create(self.ns, cid, self.IDENT, tokens=toks, salt=salt)
        shared = w.tokens
        for layer in (0, 2):
            w.append_layer(layer, self.rows(layer, toks, shared, len(toks)))
        self.assertEqual(w.close(), len(toks))
        return shared

    def restored(self, cid, tokens=None, salt=None):
        return {l: (n, r) for l, n, r in self.c.restore(self.ns, cid, self.IDENT, tokens=tokens, salt=salt)}

    def test_tokens_api(self):
        g = self.g
        toks = [self.rng.randrange(1, 1 << 31) for _ in range(2 * g + g // 2)]
        self.assertEqual(self.c.lookup(self.ns, self.IDENT, toks), 0)
        self.assertEqual(self.save("a", toks), 0)
        self.assertEqual(self.c.lookup(self.ns, self.IDENT, toks), 2 * g)
        self.assertEqual(self.c.lookup(self.ns, self.IDENT, toks, id="a"), len(toks), "a's own partial tail counts")
        self.assertEqual(self.c.lookup(self.ns, self.IDENT, toks, salt=b"other"), 0)
        # b shares a's whole groups and writes only its tail.
        tb = toks[:2 * g] + [7] * 5
        self.assertEqual(self.save("b", tb), 2 * g)
        got = self.restored("b")
        self.assertEqual(got[0], (len(tb), self.rows(0, tb, 0, len(tb))))
        self.assertEqual(got[2], (len(tb), self.rows(2, tb, 0, len(tb))))
        # Restore by tokens: the longest stored prefix, whole groups.
        got = self.restored(None, tokens=toks + [1, 2, 3])
        self.assertEqual(got[0], (2 * g, self.rows(0, toks, 0, 2 * g)))
        # Decode appends carry their ids: a continues past a group boundary.
        # APPEND names the stored tokens; the new ones come with their rows.
        w = self.c.append(self.ns, "a", self.IDENT, tokens=toks)
        self.assertEqual(w.tokens, len(toks))
        ext = toks + [9] * g
        for p in range(len(toks), len(ext)):
            row = self.rows(0, ext, p, p + 1) + self.rows(2, ext, p, p + 1)
            w.append_tokens(1, row, token_ids=[9])
        self.assertEqual(w.close(), len(ext))
        self.assertEqual(self.c.lookup(self.ns, self.IDENT, ext), (len(ext) // g) * g)
        # Fork: c starts from a's first g + 3 tokens.
        self.assertEqual(self.c.fork(self.ns, "a", "c", g + 3), g + 3)
        got = self.restored("c")
        self.assertEqual(got[0], (g + 3, self.rows(0, ext, 0, g + 3)))
        self.assertEqual(self.c.lookup(self.ns, self.IDENT, ext[:g + 3], id="c"), g + 3)

    def test_errors(self):
        g = self.g
        toks = [self.rng.randrange(1, 1 << 31) for _ in range(g + 1)]
        self.save("a", toks)
        ztoks = [t + 1 for t in toks]
        self.save("z", ztoks)
        before = self.restored("a")
        other = hc.Identity(b"another-model", self.IDENT.plan)
        cases = [
            ("fork onto an existing context", grpc.StatusCode.ALREADY_EXISTS, lambda: self.c.fork(self.ns, "a", "z", 1)),
            ("fork onto itself", grpc.StatusCode.INVALID_ARGUMENT, lambda: self.c.fork(self.ns, "a", "a", 1)),
            ("fork of a missing context", grpc.StatusCode.NOT_FOUND, lambda: self.c.fork(self.ns, "nope", "d", 1)),
            ("lookup in a bad namespace", grpc.StatusCode.INVALID_ARGUMENT, lambda: self.c.lookup("", self.IDENT, toks)),
            ("create by tokens that exists", grpc.StatusCode.ALREADY_EXISTS, lambda: self.c.create(self.ns, "a", self.IDENT, tokens=toks)),
            ("restore by name, another identity", grpc.StatusCode.FAILED_PRECONDITION, lambda: list(self.c.restore(self.ns, "a", other))),
        ]
        for name, want, fn in cases:
            with self.subTest(name):
                with self.assertRaises(hc.Error) as cm:
                    fn()
                self.assertEqual(cm.exception.code, want)
        # Requests by tokens that match nothing stored serve nothing (never
        # another identity's or another prompt's rows).
        nothing = [
            ("a by tokens, another identity", lambda: list(self.c.restore(self.ns, "a", other, tokens=toks))),
            ("the namespace by tokens under a salt", lambda: list(self.c.restore(self.ns, None, self.IDENT, tokens=toks, salt=b"s"))),
        ]
        for name, fn in nothing:
            with self.subTest(name):
                self.assertEqual([x for x in fn() if x[1] or x[2]], [])
        # Naming a by tokens a does not start with serves those tokens' own
        # stored prefix (z's group: the namespace's groups plus a's tail only
        # where a's chain ends), never a's rows.
        got = {l: (n, r) for l, n, r in self.c.restore(self.ns, "a", self.IDENT, tokens=ztoks)}
        n = self.c.lookup(self.ns, self.IDENT, ztoks, id="a")
        self.assertEqual(n, g)
        self.assertEqual(got, {0: (n, self.rows(0, ztoks, 0, n)), 2: (n, self.rows(2, ztoks, 0, n))})
        self.assertEqual(self.restored("a"), before, "the errors changed nothing")


class PackedTest(unittest.TestCase):
    def test_packed_tokens_parse_as_protobuf_builds_them(self):
        rng = random.Random(f"{SEED} {self.id()}")
        cases = [[], [0], [127, 128, 16383, 16384], [2 ** 21 - 1, 2 ** 21, 2 ** 28 - 1, 2 ** 28, 2 ** 32 - 1],
                 [rng.randrange(1 << rng.randrange(1, 33)) for _ in range(5000)]]
        for toks in cases:
            for typ in (list, lambda t: np.array(t, dtype=np.uint32), lambda t: torch.tensor(t, dtype=torch.int64)):
                msg = hc.pb.LookupRequest(namespace="n", salt=b"s", id="i")
                got = hc.pb.LookupRequest.FromString(hc._with_tokens(msg, typ(toks)))
                self.assertEqual(got, hc.pb.LookupRequest(namespace="n", salt=b"s", id="i", tokens=toks), f"seed {SEED}")


class RequestsTest(unittest.TestCase):
    """What the client puts on the wire for the token calls (no daemon: the
    stubs are replaced by a recorder)."""

    def test_requests(self):
        pb = hc.pb
        c = hc.Client("unix:///nonexistent.sock")
        sent = []

        def rec(name, reply):
            def stub(req, metadata=None):
                if isinstance(req, bytes):
                    req = hc._METHODS[name][0].FromString(req)
                sent.append((name, req))
                return reply
            return stub

        c._stubs.update({
            "Lookup": rec("Lookup", pb.LookupReply(tokens=32, chunk_tokens=16)),
            "OpenContext": rec("OpenContext", pb.OpenContextReply(tokens=16, chunk_tokens=16)),
            "AppendTokens": rec("AppendTokens", pb.AppendReply(tokens=17)),
            "Fork": rec("Fork", pb.ForkReply(tokens=5)),
            "Restore": rec("Restore", iter([pb.RestoreChunk(layer=0, tokens=16, inline=b"ab", layer_done=True)])),
        })
        ident = hc.Identity(b"m", [(hc.KV, 2)])
        self.assertEqual(c.lookup("ns", ident, [1, 2], salt="s", id="x"), 32)
        w = c.create("ns", "a", ident, tokens=np.array([3, 4], dtype=np.int64), salt=b"\x00s")
        self.assertEqual(w.tokens, 16)
        self.assertEqual(w.append_tokens(1, b"zz", token_ids=[9]), 17)
        self.assertEqual(c.fork("ns", "a", "b", 5), 5)
        self.assertEqual(list(c.restore("ns", None, ident, tokens=[7])), [(0, 16, b"ab")])
        want = [
            ("Lookup", pb.LookupRequest(namespace="ns", identity=ident.proto(), tokens=[1, 2], salt=b"s", id="x")),
            ("OpenContext", pb.OpenContextRequest(ctx=pb.ContextRef(namespace="ns", id="a"), identity=ident.proto(), mode=pb.CREATE,
                                                  tokens=[3, 4], salt=b"\x00s")),
            ("AppendTokens", pb.AppendTokensRequest(ctx=pb.ContextRef(namespace="ns", id="a"), count=1, rows=pb.Rows(inline=b"zz"), token_ids=[9])),
            ("Fork", pb.ForkRequest(src=pb.ContextRef(namespace="ns", id="a"), dst_id="b", tokens=5)),
            ("Restore", pb.RestoreRequest(ctx=pb.ContextRef(namespace="ns", id=""), identity=ident.proto(), tokens=[7])),
        ]
        self.assertEqual(sent, want)
        c.close()


class Storage:
    def __init__(self, page_size, page_bytes, ns, model="m"):
        self.tp_rank, self.tp_size, self.is_mla_model, self.model_name = 0, 1, False, model
        self.extra_config = {"hcache_addr": ADDR, "hcache_namespace": ns, "page_size": page_size, "page_bytes": page_bytes}


class SGLangStorageTest(unittest.TestCase):
    """HiCacheStorage's calls against the real daemon (pages as named contexts)."""

    def setUp(self):
        if not ADDR:
            self.skipTest("no daemon address (--addr)")
        self.rng = random.Random(f"{SEED} {self.id()}")
        self.ns = f"sg{self.rng.randrange(1 << 30)}"

    def test_pages(self):
        ps, pb = 8, 8 * 64
        st = HCacheHiCacheStorage(Storage(ps, pb, self.ns))
        keys = [f"{self.rng.getrandbits(256):064x}" for _ in range(5)]
        vals = [torch.randint(0, 255, (pb,), dtype=torch.uint8) for _ in keys]
        self.assertEqual(st.batch_exists(keys), 0)
        self.assertTrue(st.batch_set(keys[:3], vals[:3]))
        self.assertEqual(st.batch_exists(keys), 3)
        self.assertTrue(st.batch_set(keys[:3], vals[:3]), "setting a stored page is a no-op")
        targets = [torch.zeros(pb, dtype=torch.uint8) for _ in keys]
        got = st.batch_get(keys, targets)
        for i in range(3):
            self.assertTrue(torch.equal(got[i], vals[i]))
        self.assertEqual(got[3:], [None, None])
        other = HCacheHiCacheStorage(Storage(ps, pb, self.ns, model="another-model"))
        self.assertEqual(other.batch_exists(keys), 0, "another model's pages under the same hashes are not ours")
        self.assertIsNone(other.get(keys[0]))
        with self.assertRaisesRegex(ValueError, "page of 10 bytes"):
            st.batch_set(keys[3:4], [torch.zeros(10, dtype=torch.uint8)])
        self.assertEqual(st.batch_exists(keys), 3, "the bad page stored nothing")
        st.clear()
        self.assertEqual(st.batch_exists(keys), 0)


class PagedEngineTest(unittest.TestCase):
    """torch_engine's paged engine against the fake daemon (the Go test runs
    it against hcached): tokens equal to an uninterrupted run, prefixes
    loaded through the connector."""

    def test_paged_engine(self):
        if not MODEL:
            self.skipTest("no model directory (--model)")
        import torch_engine as te

        m = te.Model(MODEL)
        a = argparse.Namespace(block_size=0, seed=SEED, transport="inline", systems=1, system_len=40, conversations=3, salted=1, turns=2,
                               prompt=12, gen=6, namespace="pe", keep_local=False)
        import contextlib
        import io
        import json

        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), torch.no_grad():
            te.paged_main(a, m, FakeDaemon())
        res = json.loads(buf.getvalue())
        self.assertTrue(res["tokens_equal"])
        self.assertEqual(res["max_loaded_row_diff"], 0.0)
        hits = {(r["conversation"], r["turn"]): r["external_hit"] for r in res["requests"]}
        self.assertEqual(hits[("c0", 0)], 0)
        self.assertEqual(hits[("c1", 0)], 32, "c1 shares c0's system prompt: two whole 16-token groups")
        self.assertEqual(hits[("c2", 0)], 0, "c2 is salted")
        for c in ("c0", "c1", "c2"):
            self.assertGreater(hits[(c, 1)], 40, f"{c}'s second turn loads its history")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--addr")
    ap.add_argument("--model")
    ap.add_argument("--seed", type=int, default=None)
    a, rest = ap.parse_known_args()
    ADDR, MODEL = a.addr, a.model
    SEED = a.seed if a.seed is not None else random.SystemRandom().randrange(1 << 31)
    print(f"test_connectors: seed {SEED} (replay with --seed {SEED})", file=sys.stderr)
    if ADDR:
        try:
            hc.Client(ADDR).lookup("probe", hc.Identity(b"probe", [(hc.KV, 4)]), [1, 2, 3])
        except hc.Error as e:
            if e.code == grpc.StatusCode.UNIMPLEMENTED:
                NO_LOOKUP = f"the daemon lacks Lookup ({e})"
                print("test_connectors: " + NO_LOOKUP, file=sys.stderr)
    unittest.main(argv=[sys.argv[0]] + rest, verbosity=2)
