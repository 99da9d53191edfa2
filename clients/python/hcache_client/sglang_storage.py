"""A storage backend with the shape of SGLang's HiCacheStorage, over hcached.

SGLang is not installed here and this class has never run inside SGLang: it
implements the calls of python/sglang/srt/mem_cache/hicache_storage.py
(HiCacheStorage: get, batch_get, set, batch_set, exists, batch_exists) with
the arguments SGLang passes them, and derives from SGLang's HiCacheStorage
when SGLang is importable. It is tested against hcached (test_connectors.py).

How page hashes map onto hcache. SGLang names a page (page_size tokens of
every layer's K and V, one flat tensor from its host pool) by a chained
SHA-256 of the page's tokens and its parent page's hash (get_hash_str); the
backend sees only the hash string, never the tokens. hcache's chain keys need
the tokens (and bind the identity and namespace as well), so they cannot be
recomputed from SGLang's hash. Each page is therefore a named context:

    namespace  ns (default "sglang"), one per tenant
    id         "p" + the page hash (64 hex characters)
    identity   the model fingerprint bound to the page layout, the tp rank
               and the page size; plan: one KV layer of page_bytes / page_size
               bytes per token (the page's bytes, opaque to hcache)
    tokens     page_size

What that costs, against a token-addressed context: one index entry and one
context record per page (a 64-token page of a 32-layer 8x128 bf16 model is
8 MiB of rows under ~100 bytes of metadata); batch_exists is one Stat per
page until the first miss (a token-addressed Lookup answers a whole prompt in
one call); batch_set is three calls per page (open, append, close: the close
waits for durability); and hcache cannot check a page's tokens on restore:
a page is served by its name and identity alone, as SGLang's own file backend
does. Pages are stored once per hash (set of an existing page is a no-op),
which is the dedup SGLang's chained hash already gives. Use the vLLM-shaped
connector (token-addressed) where the engine can pass token ids.
"""
import logging

import numpy as np

from . import KV, Client, Error, Identity

try:  # the real base class when SGLang is installed
    from sglang.srt.mem_cache.hicache_storage import HiCacheStorage as _Base  # type: ignore
except Exception:  # noqa: BLE001 - SGLang absent (or broken): stand alone
    _Base = object

log = logging.getLogger("hcache_client.sglang_storage")

PAGE_LAYOUT = b"hcache sglang storage v1: one page of an SGLang host KV pool, flat, opaque"


class HCacheHiCacheStorage(_Base):
    """HiCacheStorage over hcached (see the module doc).

    storage_config: SGLang's HiCacheStorageConfig (tp_rank, tp_size,
    model_name, is_mla_model, extra_config with hcache_addr, hcache_token,
    hcache_namespace, hcache_fingerprint (hex), page_size, page_bytes)."""

    def __init__(self, storage_config, client=None, page_size=None, page_bytes=None):
        extra = dict(getattr(storage_config, "extra_config", None) or {})
        self.ns = extra.get("hcache_namespace", "sglang")
        fp = extra.get("hcache_fingerprint") or (getattr(storage_config, "model_name", None) or "").encode().hex()
        if not fp:
            raise ValueError("hcache storage: no hcache_fingerprint in extra_config and no model_name")
        self.page_size = int(page_size or extra.get("page_size") or 0)
        self.page_bytes = int(page_bytes or extra.get("page_bytes") or 0)
        if self.page_size <= 0 or self.page_bytes <= 0 or self.page_bytes % self.page_size:
            raise ValueError(f"hcache storage: page of {self.page_bytes} bytes and {self.page_size} tokens "
                             "(both > 0, bytes a multiple of tokens)")
        tp = (getattr(storage_config, "tp_rank", 0), getattr(storage_config, "tp_size", 1))
        if getattr(storage_config, "is_mla_model", False):
            tp = (0, 1)  # MLA pages are the same on every rank (as HiCacheFile's key suffix)
        model = bytes.fromhex(fp) + PAGE_LAYOUT + f"|tp={tp[0]}/{tp[1]}|page={self.page_size}".encode()
        self.ident = Identity(model, [(KV, self.page_bytes // self.page_size)])
        if client is None:
            addr = extra.get("hcache_addr")
            if not addr:
                raise ValueError("hcache storage: extra_config has no hcache_addr")
            client = Client(addr, token=extra.get("hcache_token"))
        self.c = client
        self.mem_pool_host = None

    def register_mem_pool_host(self, mem_pool_host):
        self.mem_pool_host = mem_pool_host

    @staticmethod
    def _id(key):
        if not isinstance(key, str) or not key or len(key) > 254:
            raise ValueError(f"hcache storage: page key {key!r} (a non-empty string of at most 254 bytes)")
        return "p" + key

    def _bytes(self, value):
        if hasattr(value, "cpu"):  # torch.Tensor
            import torch

            value = value.detach().contiguous().cpu().view(torch.uint8).numpy()
        b = np.ascontiguousarray(value).view(np.uint8).reshape(-1)
        if b.size != self.page_bytes:
            raise ValueError(f"hcache storage: page of {b.size} bytes, want {self.page_bytes}")
        return b

    # ---- HiCacheStorage ----

    def exists(self, key):
        cid = self._id(key)
        try:
            info = self.c.stat(self.ns, cid)
        except Error:
            return False
        # Stat does not check the identity: a page of another model (or tp
        # rank) under the same hash is not ours.
        return (info.identity.model == self.ident.model and not info.damaged
                and info.tokens == self.page_size)

    def batch_exists(self, keys, extra_info=None):
        """The number of consecutive stored pages from the start."""
        for i, k in enumerate(keys):
            if not self.exists(k):
                return i
        return len(keys)

    def get(self, key, target_location=None, target_sizes=None):
        """The page's bytes into target_location (a tensor of page_bytes), or
        a new uint8 tensor; None when absent or not this identity's."""
        import torch

        try:
            got = list(self.c.restore(self.ns, self._id(key), self.ident))
        except Error as e:
            log.debug("hcache storage get %s: %s", key, e)
            return None
        if len(got) != 1 or got[0][1] != self.page_size or len(got[0][2]) != self.page_bytes:
            return None
        data = torch.frombuffer(bytearray(got[0][2]), dtype=torch.uint8)
        if target_location is None:
            return data
        target_location.view(-1).view(torch.uint8).copy_(data)
        return target_location

    def batch_get(self, keys, target_locations=None, target_sizes=None):
        locs = target_locations or [None] * len(keys)
        return [self.get(k, t) for k, t in zip(keys, locs)]

    def set(self, key, value=None, target_location=None, target_sizes=None):
        return self.batch_set([key], [value])

    def batch_set(self, keys, values=None, target_locations=None, target_sizes=None):
        """Stores every page not stored yet; True when all are stored. The
        pages are opened and appended first, then closed (each close waits
        for durability; later ones find their rows durable already)."""
        for k in keys:
            self._id(k)
        if values is None or len(values) != len(keys):
            raise ValueError(f"hcache storage: {len(keys)} keys and {0 if values is None else len(values)} values")
        open_ = []
        ok = True
        for k, v in zip(keys, values):
            if self.exists(k):
                continue
            rows = self._bytes(v)
            try:
                w = self.c.create(self.ns, self._id(k), self.ident)
            except Error as e:
                if e.code.name != "ALREADY_EXISTS":  # a concurrent writer of the same page
                    log.warning("hcache storage set %s: %s", k, e)
                    ok = False
                continue
            try:
                w.append_layer(0, rows)
                open_.append((k, w))
            except Error as e:
                log.warning("hcache storage set %s: %s", k, e)
                w.close(abandon=True)
                ok = False
        for k, w in open_:
            try:
                if w.close() != self.page_size:
                    ok = False
            except Error as e:
                log.warning("hcache storage set %s: %s", k, e)
                ok = False
        return ok

    def clear(self):
        for ci in self.c.list(self.ns):
            if ci.id.startswith("p") and ci.identity.model == self.ident.model:
                self.c.delete(self.ns, ci.id)

    def get_stats(self):
        return None
