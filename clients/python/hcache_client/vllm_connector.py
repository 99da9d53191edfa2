"""A KV connector with the shape of vLLM's KVConnectorBase_V1, over hcached.

vLLM is not installed here and this class has never run inside vLLM: it
implements the methods of vllm/distributed/kv_transfer/kv_connector/v1/base.py
(read from vLLM's source) with the arguments vLLM passes them, and is tested
through stand-ins of the engine objects it receives (clients/python/vllm_shapes.py,
written from vLLM's source) and through torch_engine.py's paged engine. When
vLLM is importable the class derives from its KVConnectorBase_V1.

State is addressed by its tokens: the scheduler side asks hcached's Lookup how
many leading prompt tokens are stored (whole chunk groups, under the model's
identity, the namespace and the request's cache_salt); the worker side
restores them by tokens into the request's paged blocks, layer by layer, and
saves every computed token's K|V rows into a token-addressed context named by
the request id (groups already stored in the namespace are shared, not
written again). See clients/python/README.md for the method-by-method mapping.

Configuration: kv_transfer_config.kv_connector_extra_config keys
  hcache_addr         daemon address ("unix:///run/hcache/hcache.sock" or host:port)
  hcache_token        bearer token (TCP)
  hcache_namespace    namespace of the contexts (default "vllm")
  hcache_fingerprint  hex of the model fingerprint (weights, dtype, rope, layout)
  hcache_save_decode  also save decoded tokens (default True)
  hcache_transport    "inline" (default) or "shm": rows through a shared memory
                      region registered with the daemon (unix socket only)
  hcache_region_bytes the region's size (default 64 MiB): the first half
                      stages saves, the second receives restores
The rows are K then V of one token, [num_kv_heads x head_size] each, in the
KV cache dtype: the paged cache layout of vLLM's FlashAttention backend,
[2, num_blocks, block_size, num_kv_heads, head_size] per layer.
"""
import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from . import KV, Client, Error, Identity

try:  # the real base class when vLLM is installed
    from vllm.distributed.kv_transfer.kv_connector.v1.base import (  # type: ignore
        KVConnectorBase_V1 as _Base,
        KVConnectorMetadata as _MetaBase,
        KVConnectorRole,
    )
except Exception:  # noqa: BLE001 - vLLM absent (or broken): stand alone
    import enum

    _Base = object
    _MetaBase = object

    class KVConnectorRole(enum.Enum):
        SCHEDULER = 0
        WORKER = 1


log = logging.getLogger("hcache_client.vllm_connector")

ROW_LAYOUT = b"hcache vllm connector rows v1: K then V of one token, [num_kv_heads x head_size] each, flash-attn paged layout"


@dataclass
class LoadSpec:
    """A request's tokens to load: positions [start, end) of token_ids, into block_ids."""
    req_id: str
    token_ids: list
    start: int
    end: int
    block_ids: list
    salt: bytes = b""


@dataclass
class SaveSpec:
    """A request's rows to save this step: positions [start, end). prompt:
    the token ids the context is created with (CREATE); past: the ids of
    positions [len(prompt), end)."""
    req_id: str
    prompt: list
    past: list
    start: int
    end: int
    block_ids: list
    salt: bytes = b""


@dataclass
class HCacheConnectorMetadata(_MetaBase):
    loads: list = field(default_factory=list)
    saves: list = field(default_factory=list)


def _extra(vllm_config, key, default=None):
    kt = vllm_config.kv_transfer_config
    return kt.get_from_extra_config(key, default)


def _salt(s):
    if s is None:
        return b""
    return s.encode() if isinstance(s, str) else bytes(s)


def identity_of(vllm_config, fingerprint=None):
    """The hcache identity of this engine's KV rows: the model fingerprint,
    bound to the row layout, the KV cache dtype and the tensor-parallel rank
    (each rank stores its own heads), and a plan of one KV layer per
    attention layer."""
    mc, pc = vllm_config.model_config, vllm_config.parallel_config
    if fingerprint is None:
        fingerprint = _extra(vllm_config, "hcache_fingerprint")
    if not fingerprint:
        raise ValueError("hcache connector: kv_connector_extra_config has no hcache_fingerprint (hex of the model fingerprint)")
    if isinstance(fingerprint, str):
        try:
            fingerprint = bytes.fromhex(fingerprint)
        except ValueError:
            raise ValueError(f"hcache connector: hcache_fingerprint {fingerprint[:16]!r}... is not hex") from None
    layers, kv_heads, head = mc.get_num_layers(pc), mc.get_num_kv_heads(pc), mc.get_head_size()
    dtype = mc.dtype
    esize = torch.tensor([], dtype=dtype).element_size()
    tp = (getattr(pc, "rank", 0), pc.tensor_parallel_size)
    model = bytes(fingerprint) + ROW_LAYOUT + f"|dtype={dtype}|tp={tp[0]}/{tp[1]}|heads={kv_heads}x{head}".encode()
    return Identity(model, [(KV, 2 * kv_heads * head * esize)] * layers)


class HCacheConnector(_Base):
    """KVConnectorBase_V1 over hcached (see the module doc)."""

    def __init__(self, vllm_config, role, kv_cache_config=None, client=None):
        if _Base is not object:  # inside vLLM: the base sets what it keeps
            super().__init__(vllm_config, role, kv_cache_config)
        # What the base's __init__ stores, for when it is absent.
        self._connector_metadata = None
        self._vllm_config = vllm_config
        self._kv_transfer_config = vllm_config.kv_transfer_config
        self._kv_cache_config = kv_cache_config
        self._role = role
        self._block_size = vllm_config.cache_config.block_size
        self.ns = _extra(vllm_config, "hcache_namespace", "vllm")
        self.save_decode = bool(_extra(vllm_config, "hcache_save_decode", True))
        self.transport = _extra(vllm_config, "hcache_transport", "inline")
        if self.transport not in ("inline", "shm"):
            raise ValueError(f"hcache connector: hcache_transport {self.transport!r} (inline or shm)")
        self.region_bytes = int(_extra(vllm_config, "hcache_region_bytes", 64 << 20))
        self.region = None
        self.ident = identity_of(vllm_config)
        if client is None:
            addr = _extra(vllm_config, "hcache_addr")
            if not addr:
                raise ValueError("hcache connector: kv_connector_extra_config has no hcache_addr")
            client = Client(addr, token=_extra(vllm_config, "hcache_token"))
        self.c = client
        # Scheduler side.
        self._requests = {}  # req id -> Request (token ids of cached requests)
        self._hits = {}  # req id -> (num_computed_tokens, stored tokens) of the last lookup
        self._loads = {}  # req id -> LoadSpec waiting for build_connector_meta
        self._blocks = {}  # req id -> block ids (kv cache group 0)
        self._prompts = {}  # req id -> token ids the context is created with
        self.lookup_errors = 0
        # Worker side.
        self._layers = []  # layer names in registration order: layer i of the plan
        self._layer_index = {}
        self._kv = {}  # layer name -> paged tensor [2, num_blocks, block_size, kv_heads, head]
        self._pending = []  # (LoadSpec, iterator of (layer, tokens, rows), next layer)
        self._writers = {}  # req id -> [Writer, per-layer positions], or False after a failure
        self._decode = {}  # req id -> (SaveSpec, rows gathered per layer) for one AppendTokens
        self._load_errors = set()
        self.stats = {"lookups": 0, "hit_tokens": 0, "loaded_tokens": 0, "saved_tokens": 0, "shared_tokens": 0}

    @property
    def role(self):
        return self._role

    # ---- metadata binding (KVConnectorBase_V1 does the same) ----

    def bind_connector_metadata(self, connector_metadata):
        self._connector_metadata = connector_metadata

    def clear_connector_metadata(self):
        self._connector_metadata = None

    def _get_connector_metadata(self):
        assert self._connector_metadata is not None
        return self._connector_metadata

    def has_connector_metadata(self):
        return self._connector_metadata is not None

    # ==============================
    # Scheduler side
    # ==============================

    def get_num_new_matched_tokens(self, request, num_computed_tokens):
        """Tokens beyond num_computed_tokens whose state hcached holds: one
        Lookup (index only). The last prompt token is never matched (the
        engine computes it for the logits). A daemon error is a miss."""
        tokens = list(request.all_token_ids)
        salt = _salt(getattr(request, "cache_salt", None))
        try:
            stored = self.c.lookup(self.ns, self.ident, tokens, salt=salt)
        except Error as e:
            self.lookup_errors += 1
            log.warning("hcache lookup for %s failed: %s", request.request_id, e)
            stored = 0
        self.stats["lookups"] += 1
        hit = min(int(stored), len(tokens) - 1)
        self._requests[request.request_id] = request
        self._hits[request.request_id] = (num_computed_tokens, hit, int(stored))
        ext = max(0, hit - num_computed_tokens)
        return ext, False

    def update_state_after_alloc(self, request, blocks, num_external_tokens):
        """Records the request's blocks, and the load when num_external_tokens > 0."""
        rid = request.request_id
        self._requests[rid] = request
        block_ids = list(blocks.get_block_ids()[0]) if blocks is not None else []
        if num_external_tokens > 0:
            computed, _, stored = self._hits.get(rid, (0, 0, 0))
            # Restore by the stored prefix (whole groups), place [computed, +external).
            upto = max(stored, computed + num_external_tokens)
            self._loads[rid] = LoadSpec(rid, list(request.all_token_ids[:upto]), computed,
                                        computed + num_external_tokens, block_ids, _salt(getattr(request, "cache_salt", None)))
            self.stats["hit_tokens"] += num_external_tokens

    def build_connector_meta(self, scheduler_output):
        """This step's loads (from update_state_after_alloc) and saves: every
        request's tokens computed in this step, with its whole block table."""
        meta = HCacheConnectorMetadata()
        for new in scheduler_output.scheduled_new_reqs:
            rid = new.req_id
            self._blocks[rid] = list(new.block_ids[0])
            prompt = list(new.prompt_token_ids or [])
            self._prompts[rid] = prompt
            if rid in self._loads:
                ld = self._loads.pop(rid)
                ld.block_ids = self._blocks[rid]
                meta.loads.append(ld)
            n = scheduler_output.num_scheduled_tokens.get(rid, 0)
            self._add_save(meta, rid, prompt, 0, new.num_computed_tokens + n)
        cached = scheduler_output.scheduled_cached_reqs
        for i, rid in enumerate(cached.req_ids):
            nb = cached.new_block_ids[i]
            if rid in cached.resumed_req_ids:
                self._blocks[rid] = list(nb[0]) if nb is not None else []
            elif nb is not None:
                self._blocks.setdefault(rid, []).extend(nb[0])
            if rid in self._loads:
                ld = self._loads.pop(rid)
                ld.block_ids = self._blocks[rid]
                meta.loads.append(ld)
            n = scheduler_output.num_scheduled_tokens.get(rid, 0)
            self._add_save(meta, rid, self._prompts.get(rid), 0, cached.num_computed_tokens[i] + n)
        for rid in scheduler_output.finished_req_ids:
            self._forget(rid)
        return meta

    def _add_save(self, meta, rid, prompt, start, end):
        req = self._requests.get(rid)
        if req is None or prompt is None or end <= start:
            return
        if not self.save_decode:
            end = min(end, len(prompt))
            if end <= start:
                return
        # Only the ids past the prompt travel (the decode steps' AppendTokens).
        past = list(req.all_token_ids[len(prompt):end]) if end > len(prompt) else []
        meta.saves.append(SaveSpec(rid, prompt, past, start, end, self._blocks[rid], _salt(getattr(req, "cache_salt", None))))

    def _forget(self, rid):
        for d in (self._requests, self._hits, self._loads, self._blocks, self._prompts):
            d.pop(rid, None)

    def request_finished(self, request, block_ids):
        """Saves are copied out of the paged blocks during the step (the rows
        are in the daemon when save_kv_layer/wait_for_save return): the blocks
        can be freed now. The worker closes the context (durable) in
        get_finished."""
        self._forget(request.request_id)
        return False, None

    def take_events(self):
        return ()

    # ==============================
    # Worker side
    # ==============================

    def register_kv_caches(self, kv_caches):
        """kv_caches: layer name -> paged tensor [2, num_blocks, block_size,
        num_kv_heads, head_size]; their order is the plan's layer order."""
        if self.transport == "shm" and self.region is None:
            self.region = self.c.region(self.region_bytes)
        self._layers = list(kv_caches)
        self._layer_index = {n: i for i, n in enumerate(self._layers)}
        self._kv = dict(kv_caches)
        if len(self._layers) != len(self.ident.plan):
            raise ValueError(f"hcache connector: {len(self._layers)} KV cache layers, the identity plans {len(self.ident.plan)}")
        for i, n in enumerate(self._layers):
            t = self._kv[n]
            rb = 2 * t.shape[3] * t.shape[4] * t.element_size()
            if t.dim() != 5 or t.shape[0] != 2 or t.shape[2] != self._block_size or rb != self.ident.plan[i][1]:
                raise ValueError(f"hcache connector: layer {n}: cache of shape {tuple(t.shape)} and {t.dtype}, "
                                 f"want [2, blocks, {self._block_size}, heads, head] with {self.ident.plan[i][1]}-byte K|V rows")

    def _slots(self, block_ids, start, end):
        """(block, offset) of positions [start, end) through a block table."""
        bs = self._block_size
        pos = torch.arange(start, end)
        b = torch.tensor(block_ids[start // bs:(end - 1) // bs + 1], dtype=torch.long)[pos // bs - start // bs]
        return b, pos % bs

    def start_load_kv(self, forward_context, **kwargs):
        """Starts one restore by tokens per request to load (the stream
        yields layers in order); wait_for_layer_load places them."""
        meta = self._get_connector_metadata()
        self._pending = []
        at = self.region_bytes // 2  # the restore half of the region
        for ld in meta.loads:
            need = len(ld.token_ids) * sum(rb for _, rb in self.ident.plan)
            if self.region is not None and at + need <= self.region_bytes:
                # Each load gets its own range: the layers land back to back in it.
                rs = self.c.restore_into(self.ns, None, self.ident, self.region, at, need, tokens=ld.token_ids, salt=ld.salt)
                it = ((layer, n, self.region.array(np.uint8, off, nb)) for layer, n, off, nb in rs)
                at += need
            else:
                it = iter(self.c.restore(self.ns, None, self.ident, tokens=ld.token_ids, salt=ld.salt))
            self._pending.append([ld, it, 0])

    def wait_for_layer_load(self, layer_name):
        """Blocks until layer_name's rows of every load are in its paged cache."""
        li = self._layer_index[layer_name]
        for p in self._pending:
            ld, it, nxt = p
            while nxt is not None and nxt <= li:
                try:
                    layer, ntok, rows = next(it)
                except StopIteration:
                    self._fail(ld, "the restore ended at layer %d" % nxt)
                    p[2] = nxt = None
                    break
                except Error as e:
                    self._fail(ld, str(e))
                    p[2] = nxt = None
                    break
                if ntok < ld.end:
                    self._fail(ld, f"{ntok} tokens stored, {ld.end} expected (evicted since the lookup?)")
                    p[2] = nxt = None
                    break
                self._place(layer, ld, rows)
                p[2] = nxt = layer + 1
                if layer == len(self._layers) - 1:
                    p[2] = nxt = None
                    self.stats["loaded_tokens"] += ld.end - ld.start

    def _place(self, layer, ld, rows):
        kv = self._kv[self._layers[layer]]
        _, _, _, heads, head = kv.shape
        if isinstance(rows, np.ndarray):  # a view of the region (copied into the cache below)
            r = torch.from_numpy(rows)
        else:
            r = torch.frombuffer(bytearray(rows), dtype=torch.uint8)
        r = r.view(kv.dtype).view(-1, 2, heads, head)
        r = r[ld.start:ld.end]
        b, o = self._slots(ld.block_ids, ld.start, ld.end)
        kv[0, b, o] = r[:, 0].to(kv.device)
        kv[1, b, o] = r[:, 1].to(kv.device)

    def _fail(self, ld, why):
        log.warning("hcache load of %s failed: %s", ld.req_id, why)
        first = ld.start // self._block_size
        last = (ld.end - 1) // self._block_size
        self._load_errors.update(ld.block_ids[first:last + 1])

    def get_block_ids_with_load_errors(self):
        out, self._load_errors = self._load_errors, set()
        return out

    def _ctx(self, sv):
        """The request's open context: [writer, per-layer positions], opened
        (CREATE with the prompt's tokens) at its first save; None after a
        failure (the request is then not saved, which is only a later miss)."""
        c = self._writers.get(sv.req_id)
        if c is None:
            try:
                w = self.c.create(self.ns, sv.req_id, self.ident, tokens=sv.prompt, salt=sv.salt)
            except Error as e:
                log.warning("hcache save of %s: %s", sv.req_id, e)
                self._writers[sv.req_id] = False
                return None
            self.stats["shared_tokens"] += w.tokens
            c = self._writers[sv.req_id] = [w, [w.tokens] * len(self._layers)]
        return c or None

    def _drop(self, rid, why):
        log.warning("hcache save of %s: %s", rid, why)
        c = self._writers.get(rid)
        if c:
            try:
                c[0].close(abandon=True)
            except Error:
                pass
        self._writers[rid] = False

    def save_kv_layer(self, layer_name, kv_layer, attn_metadata, **kwargs):
        """Copies this step's rows of one layer out of the paged buffer:
        prompt tokens go to the daemon at once (AppendLayer); tokens past the
        prompt are gathered for wait_for_save's one AppendTokens. Rows the
        context holds already (shared groups, earlier steps) are skipped."""
        li = self._layer_index[layer_name]
        meta = self._get_connector_metadata()
        for sv in meta.saves:
            c = self._ctx(sv)
            if c is None:
                continue
            w, pos = c
            start = max(sv.start, pos[li])
            pend = min(sv.end, len(sv.prompt))
            if start < pend:
                try:
                    w.append_layer(li, self._send(self._gather(kv_layer, sv, start, pend)))
                except Error as e:
                    self._drop(sv.req_id, f"layer {li}: {e}")
                    continue
                pos[li] = pend
                if li == len(self._layers) - 1:
                    self.stats["saved_tokens"] += pend - start
            dstart = max(sv.start, len(sv.prompt), pos[li])
            if dstart < sv.end:
                d = self._decode.setdefault(sv.req_id, (sv, dstart, {}))
                if d[1] != dstart:
                    self._drop(sv.req_id, f"layer {li} continues at {dstart}, layer 0 at {d[1]}")
                    continue
                d[2][li] = self._gather(kv_layer, sv, dstart, sv.end)

    def _gather(self, kv_layer, sv, start, end):
        """Rows [start, end) as uint8 [n, row_bytes]: K then V of each token."""
        b, o = self._slots(sv.block_ids, start, end)
        k, v = kv_layer[0, b, o], kv_layer[1, b, o]
        n = end - start
        return torch.cat([k.reshape(n, -1), v.reshape(n, -1)], 1).contiguous().cpu().view(torch.uint8).reshape(n, -1)

    def _send(self, rows):
        """Rows (uint8 tensor) as the client sends them: staged in the
        region's save half (the daemon has read them when the call returns),
        or inline."""
        flat = rows.reshape(-1)
        if self.region is None or flat.numel() > self.region_bytes // 2:
            return flat.numpy()
        self.region.array(np.uint8, 0, flat.numel())[:] = flat.numpy()
        return (self.region, 0, flat.numel())

    def wait_for_save(self):
        """Sends the step's decoded tokens (one AppendTokens per request, with
        their token ids). The rows are with the daemon when it returns;
        durability comes when the request finishes (get_finished)."""
        for rid, (sv, start, per_layer) in self._decode.items():
            c = self._writers.get(rid)
            if not c:
                continue
            w, pos = c
            if len(per_layer) != len(self._layers):
                self._drop(rid, f"{len(per_layer)} of {len(self._layers)} layers saved this step")
                continue
            rows = torch.cat([per_layer[i] for i in range(len(self._layers))], 1)  # token-major
            n = sv.end - start
            try:
                p = len(sv.prompt)
                w.append_tokens(n, self._send(rows), token_ids=sv.past[start - p:sv.end - p])
            except Error as e:
                self._drop(rid, str(e))
                continue
            pos[:] = [sv.end] * len(pos)
            self.stats["saved_tokens"] += n
        self._decode = {}

    def get_finished(self, finished_req_ids):
        """Closes (flushes) the contexts of finished requests. Returns
        (None, None): no request waits on an asynchronous transfer."""
        for rid in finished_req_ids:
            c = self._writers.pop(rid, None)
            if c:
                try:
                    c[0].close()
                except Error as e:
                    log.warning("hcache close of %s: %s", rid, e)
        return None, None

    def shutdown(self):
        self.get_finished(set(self._writers))
        if self.region is not None:
            self.region.close()
            self.region = None
        self.c.close()
