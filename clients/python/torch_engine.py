"""A small PyTorch serving loop whose conversations keep their state in hcached.

Usage: torch_engine.py --addr unix:///path/hcache.sock --model MODEL_DIR [--transport shm|inline]
       [--project NAME] [--conversations 2] [--turns 3] [--prompt 40] [--gen 12] [--seed 1] [--namespace engine]
       torch_engine.py --mode paged --addr ... --model MODEL_DIR [--systems 1] [--system-len 40]
       [--salted 0] [--keep-local] [--conversations 3] [--turns 3] [--prompt 20] [--gen 8]

--mode paged (see PagedEngine) is a small paged-attention engine: a block
table per request, blocks of the daemon's chunk tokens, a local prefix cache
of blocks by chained block hashes, and hcache behind it through the
vLLM-shaped connector (hcache_client.vllm_connector), driven in vLLM's call
order with the stand-ins of vllm_shapes.py. Conversations share system
prompts; every turn is a new request carrying the whole history, so its
prefix comes from the local cache or, with the local cache dropped between
requests (the default), from hcache by tokens.

--mode conversations (the default) keeps each conversation in a named context:

The model is the repository's independent PyTorch reference
(model/testdata/torch_ref.py: its safetensors reader and the same math,
rounding the normed hidden state and K/V to the model dtype), run here
incrementally with a KV cache. For each conversation and turn the engine

  1. (turn > 1) restores the context from the daemon, layer by layer, and
     rebuilds each layer's K and V while the next layer is still streaming:
     hidden-state layers by projection (K = rope(h Wk), V = h Wv), KV layers as
     stored; with --project NAME the daemon projects (its model NAME, loaded
     with hcached --model NAME=DIR of the same weights) and every layer
     arrives as K|V;
  2. prefills the turn's tokens, saving every layer's row (the hidden state
     entering the K/V projection, or K|V for KV layers) as it is computed
     (AppendLayer), then decodes greedily, saving each token's rows of every
     layer (AppendTokens);
  3. flushes (durable), closes the writer and drops its KV cache.

The same conversations run uninterrupted (KV kept in memory) alongside; the
program prints one JSON line and exits 1 unless every generated token is equal
and every restored row is byte-identical to the one saved.
"""
import argparse
import hashlib
import json
import math
import os
import sys

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "..", "model", "testdata"))
from torch_ref import apply_rope, load_safetensors, rope_inv_freq  # noqa: E402

import hcache_client as hc  # noqa: E402
import vllm_shapes as vs  # noqa: E402
from hcache_client.vllm_connector import HCacheConnector, KVConnectorRole  # noqa: E402

ROW_LAYOUT = b"torch_engine rows v1: hidden = layer input after the pre-attention norm, in the model dtype; kv = K (after rope) then V, [kv_heads x head_dim] each"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class Model:
    def __init__(self, mdir):
        with open(os.path.join(mdir, "config.json"), "rb") as f:
            raw_cfg = f.read()
        cfg = json.loads(raw_cfg)
        if cfg["architectures"][0] == "OPTForCausalLM":
            raise SystemExit("torch_engine: OPT models are not supported (use a Llama, Mistral or Qwen2 config)")
        self.cfg = cfg
        self.W = load_safetensors(os.path.join(mdir, "model.safetensors"))
        self.d = cfg["hidden_size"]
        self.H = cfg["num_attention_heads"]
        self.KV = cfg.get("num_key_value_heads", self.H)
        self.hd = cfg.get("head_dim", self.d // self.H)
        self.L = cfg["num_hidden_layers"]
        self.eps = cfg["rms_norm_eps"]
        self.dtype = DTYPES[cfg.get("torch_dtype", "float16")]
        self.esize = torch.tensor([], dtype=self.dtype).element_size()
        self.inv = rope_inv_freq(cfg, self.hd)
        self.interleaved = cfg.get("rotary_interleaved", False)
        h = hashlib.sha256()
        h.update(raw_cfg)
        with open(os.path.join(mdir, "model.safetensors"), "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        h.update(ROW_LAYOUT)
        self.fingerprint = h.digest()

    def rnd(self, x):
        return x.to(self.dtype).float()

    def rope(self, x, pos):
        ang = pos[:, None].float() * self.inv[None, :]
        return apply_rope(x, ang.cos(), ang.sin(), self.interleaved)

    def rms(self, x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * w

    def w(self, l, name):
        return self.W.get(f"model.layers.{l}.{name}")

    def kv(self, l, h, pos):
        """K and V of layer l from its normed hidden state h [n, d]."""
        n = h.shape[0]
        k = F.linear(h, self.w(l, "self_attn.k_proj.weight"), self.w(l, "self_attn.k_proj.bias")).view(n, self.KV, self.hd)
        v = F.linear(h, self.w(l, "self_attn.v_proj.weight"), self.w(l, "self_attn.v_proj.bias")).view(n, self.KV, self.hd)
        return self.rnd(self.rope(k, pos)), self.rnd(v)

    def forward(self, ids, pos0, cache, save=None):
        """Runs tokens ids at positions pos0.. against cache (a list of
        (K, V) per layer, extended in place); save(l, h, k, v) sees each
        layer's rows as computed. Returns the last token's logits."""
        n = len(ids)
        pos = torch.arange(pos0, pos0 + n)
        x = self.W["model.embed_tokens.weight"][torch.tensor(ids)]
        for l in range(self.L):
            h = self.rnd(self.rms(x, self.w(l, "input_layernorm.weight")))
            q = F.linear(h, self.w(l, "self_attn.q_proj.weight"), self.w(l, "self_attn.q_proj.bias")).view(n, self.H, self.hd)
            q = self.rope(q, pos)
            k, v = self.kv(l, h, pos)
            if save is not None:
                save(l, h, k, v)
            if cache[l] is not None:
                k, v = torch.cat([cache[l][0], k]), torch.cat([cache[l][1], v])
            cache[l] = (k, v)
            T = k.shape[0]
            mask = torch.where(torch.arange(T)[None, :] > pos[:, None], float("-inf"), 0.0)
            rep = self.H // self.KV
            kk, vv = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            sc = torch.einsum("qhd,khd->hqk", q, kk) / math.sqrt(self.hd) + mask
            a = torch.einsum("hqk,khd->qhd", sc.softmax(-1), vv).reshape(n, self.H * self.hd)
            x = x + F.linear(a, self.w(l, "self_attn.o_proj.weight"), self.w(l, "self_attn.o_proj.bias"))
            h2 = self.rms(x, self.w(l, "post_attention_layernorm.weight"))
            g = F.linear(h2, self.w(l, "mlp.gate_proj.weight"))
            u = F.linear(h2, self.w(l, "mlp.up_proj.weight"))
            x = x + F.linear(F.silu(g) * u, self.w(l, "mlp.down_proj.weight"))
        x = self.rms(x[-1:], self.W["model.norm.weight"])
        head = self.W.get("lm_head.weight", self.W["model.embed_tokens.weight"])
        return F.linear(x, head)[0]


def forward_paged(m, ids, pos0, kv, table, bs, names, conn=None):
    """Model.forward over a paged KV cache: kv[l] is [2, blocks, bs, KV, hd]
    in the model dtype, table the request's block ids; positions [pos0,
    pos0+n) are written, [0, pos0+n) attended to. conn (a worker-side
    connector) sees wait_for_layer_load before a layer's attention and
    save_kv_layer after its K/V are in the cache, as in vLLM. The math is
    Model.forward's, op for op."""
    n = len(ids)
    pos = torch.arange(pos0, pos0 + n)
    T = pos0 + n
    allpos = torch.arange(T)
    tb = torch.tensor(table, dtype=torch.long)
    bi, bo = tb[allpos // bs], allpos % bs
    x = m.W["model.embed_tokens.weight"][torch.tensor(ids)]
    for l in range(m.L):
        h = m.rnd(m.rms(x, m.w(l, "input_layernorm.weight")))
        q = F.linear(h, m.w(l, "self_attn.q_proj.weight"), m.w(l, "self_attn.q_proj.bias")).view(n, m.H, m.hd)
        q = m.rope(q, pos)
        k, v = m.kv(l, h, pos)
        if conn is not None:
            conn.wait_for_layer_load(names[l])
        kv[l][0, bi[pos0:], bo[pos0:]] = k.to(m.dtype)
        kv[l][1, bi[pos0:], bo[pos0:]] = v.to(m.dtype)
        if conn is not None:
            conn.save_kv_layer(names[l], kv[l], None)
        k, v = kv[l][0, bi, bo].float(), kv[l][1, bi, bo].float()
        mask = torch.where(torch.arange(T)[None, :] > pos[:, None], float("-inf"), 0.0)
        rep = m.H // m.KV
        kk, vv = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        sc = torch.einsum("qhd,khd->hqk", q, kk) / math.sqrt(m.hd) + mask
        a = torch.einsum("hqk,khd->qhd", sc.softmax(-1), vv).reshape(n, m.H * m.hd)
        x = x + F.linear(a, m.w(l, "self_attn.o_proj.weight"), m.w(l, "self_attn.o_proj.bias"))
        h2 = m.rms(x, m.w(l, "post_attention_layernorm.weight"))
        g = F.linear(h2, m.w(l, "mlp.gate_proj.weight"))
        u = F.linear(h2, m.w(l, "mlp.up_proj.weight"))
        x = x + F.linear(F.silu(g) * u, m.w(l, "mlp.down_proj.weight"))
    x = m.rms(x[-1:], m.W["model.norm.weight"])
    head = m.W.get("lm_head.weight", m.W["model.embed_tokens.weight"])
    return F.linear(x, head)[0]


def as_bytes(t, dtype):
    """A float tensor's rows in the model dtype, as a uint8 tensor."""
    return t.to(dtype).contiguous().view(torch.uint8).reshape(t.shape[0], -1)


class Engine:
    """The hcache side: saves rows through the daemon, restores them."""

    def __init__(self, model, client, ns, plan_kinds, transport, project=None):
        self.m, self.c, self.ns, self.transport = model, client, ns, transport
        d, kvd = model.d, model.KV * model.hd
        self.rowbytes = [(d if k == hc.HIDDEN else 2 * kvd) * model.esize for k in plan_kinds]
        self.kinds = plan_kinds
        fingerprint = model.fingerprint
        self.project = project is not None
        if self.project:
            # States for the daemon's model NAME carry its fingerprint (this
            # engine's row layout is the daemon's: serve.RowLayout); only
            # valid because both were given the same model directory.
            found = [x for x in client.info().models if x.name == project]
            if not found:
                raise SystemExit(f"torch_engine: the daemon has no model {project!r} (hcached --model {project}=DIR)")
            fingerprint = found[0].fingerprint
        self.ident = hc.Identity(fingerprint, list(zip(plan_kinds, self.rowbytes)))
        self.max_proj_diff = 0.0
        self.region = client.region(64 << 20) if transport == "shm" else None
        self.save_area = 32 << 20  # the region's first half stages saves, the second receives restores
        self.saved = {}  # conversation -> per-layer list of saved row bytes (to check restores)

    def row(self, l, h, k, v):
        if self.kinds[l] == hc.HIDDEN:
            return as_bytes(h, self.m.dtype)
        n = k.shape[0]
        return torch.cat([as_bytes(k.reshape(n, -1), self.m.dtype), as_bytes(v.reshape(n, -1), self.m.dtype)], 1)

    def send(self, rows, at):
        """rows (uint8 tensor) as the client sends them: via the region or inline."""
        if self.region is None:
            return rows.numpy()
        flat = rows.reshape(-1)
        self.region.tensor(torch.uint8, at, flat.numel()).copy_(flat)
        return (self.region, at, flat.numel())

    def turn(self, conv, first, ids, pos0, gen):
        """One turn: restore (unless first), prefill ids, decode gen tokens."""
        m = self.m
        stats = {}
        if first:
            w = self.c.create(self.ns, conv, self.ident)
            cache = [None] * m.L
            self.saved[conv] = [[] for _ in range(m.L)]
        else:
            cache = self.restore(conv, pos0, stats)
            w = self.c.append(self.ns, conv, self.ident)
            if w.tokens != pos0:
                raise SystemExit(f"torch_engine: {conv}: daemon holds {w.tokens} tokens, the engine expected {pos0}")
        saved = self.saved[conv]

        def save_layer(l, h, k, v):  # prefill: one layer, every token (vLLM: save_kv_layer)
            r = self.row(l, h, k, v)
            saved[l].append(r.clone())
            w.append_layer(l, self.send(r, 0))

        step = []

        def save_token(l, h, k, v):  # decode: gathered over the layers, then one AppendTokens
            r = self.row(l, h, k, v)
            saved[l].append(r.clone())
            step.append(r.reshape(-1))

        out = []
        logits = m.forward(ids, pos0, cache, save_layer)
        pos = pos0 + len(ids)
        for i in range(gen):
            t = int(logits.argmax())
            out.append(t)
            if i == gen - 1:
                break
            step.clear()
            logits = m.forward([t], pos, cache, save_token)
            w.append_tokens(1, self.send(torch.cat(step), 0))
            pos += 1
        w.flush()  # vLLM: wait_for_save
        w.close()
        return out, pos, stats

    def restore(self, conv, tokens, stats):
        """Rebuilds the KV cache from the daemon, layer by layer."""
        m = self.m
        cache = [None] * m.L
        pos = torch.arange(tokens)
        saved = self.saved[conv]
        if self.region is not None:
            layers = ((l, n, self.region.tensor(torch.uint8, off, nb)) for l, n, off, nb in
                      self.c.restore_into(self.ns, conv, self.ident, self.region, self.save_area, project=self.project))
        else:
            layers = ((l, n, torch.frombuffer(bytearray(b), dtype=torch.uint8)) for l, n, b in
                      self.c.restore(self.ns, conv, self.ident, project=self.project))
        got = 0
        for l, n, raw in layers:  # vLLM: wait_for_layer_load(l)
            if n != tokens:
                raise SystemExit(f"torch_engine: {conv}: restored {n} tokens, expected {tokens}")
            rows = raw.reshape(n, -1)
            want = torch.cat(saved[l])
            kvd = m.KV * m.hd
            if self.project and self.kinds[l] == hc.HIDDEN:
                # Projected by the daemon: compare with this engine's own
                # projection of the saved hidden state.
                vals = rows.clone().view(m.dtype).float()
                k, v = vals[:, :kvd].reshape(n, m.KV, m.hd), vals[:, kvd:].reshape(n, m.KV, m.hd)
                rk, rv = m.kv(l, want.clone().view(m.dtype).float(), pos)
                scale = max(float(rk.abs().max()), float(rv.abs().max()), 1e-6)
                self.max_proj_diff = max(self.max_proj_diff, float((k - rk).abs().max()) / scale, float((v - rv).abs().max()) / scale)
                cache[l] = (k, v)
                got += 1
                continue
            if not torch.equal(rows, want):
                raise SystemExit(f"torch_engine: {conv} layer {l}: restored rows differ from the saved ones")
            vals = rows.clone().view(m.dtype).float()
            if self.kinds[l] == hc.HIDDEN:
                cache[l] = m.kv(l, vals, pos)
            else:
                cache[l] = (vals[:, :kvd].reshape(n, m.KV, m.hd), vals[:, kvd:].reshape(n, m.KV, m.hd))
            got += 1
        if got != m.L:
            raise SystemExit(f"torch_engine: {conv}: restored {got} layers of {m.L}")
        stats["restored"] = tokens
        return cache


class PagedEngine:
    """A paged-attention engine over hcache, vLLM-shaped.

    Blocks of block_size tokens (the daemon's chunk tokens) in a pool per
    layer, [2, blocks, block_size, KV, hd] in the model dtype (FlashAttention's
    layout in vLLM); a block table per request; a local prefix cache that maps
    chained block hashes (vLLM's scheme: parent hash, the block's tokens, the
    cache salt in the first block) to resident blocks, shared by reference
    count across requests. Behind it hcache through HCacheConnector, with a
    scheduler-side and a worker-side instance called in vLLM's order each step:
    get_num_new_matched_tokens, update_state_after_alloc, build_connector_meta
    (scheduler); bind_connector_metadata, start_load_kv, wait_for_layer_load /
    save_kv_layer per layer, wait_for_save, clear_connector_metadata (worker);
    request_finished and get_finished when a request ends."""

    def __init__(self, model, client, ns, fingerprint, block_size, num_blocks, keep_local=False, transport="inline"):
        self.m, self.bs, self.keep_local = model, block_size, keep_local
        self.names = [f"model.layers.{l}.self_attn.attn" for l in range(model.L)]
        self.kv = {n: torch.zeros(2, num_blocks, block_size, model.KV, model.hd, dtype=model.dtype) for n in self.names}
        self.kvl = [self.kv[n] for n in self.names]
        self.free = list(range(num_blocks - 1, -1, -1))
        self.ref = [0] * num_blocks
        self.cached = {}  # block hash -> block id (local prefix cache)
        self.hash_of = {}  # block id -> block hash
        cfg = vs.VllmConfig(vs.ModelConfig(model.L, model.KV, model.hd, model.dtype), vs.CacheConfig(block_size),
                            vs.KVTransferConfig(kv_connector_extra_config={"hcache_namespace": ns, "hcache_fingerprint": fingerprint.hex(),
                                                                   "hcache_transport": transport}))
        self.sched = HCacheConnector(cfg, KVConnectorRole.SCHEDULER, None, client=client)
        self.worker = HCacheConnector(cfg, KVConnectorRole.WORKER, None, client=client)
        self.worker.register_kv_caches(self.kv)
        self.ident = self.sched.ident
        self.n = 0

    def block_hashes(self, tokens, salt):
        out, parent = [], b""
        for i in range(len(tokens) // self.bs):
            h = hashlib.sha256(parent)
            h.update(torch.tensor(tokens[i * self.bs:(i + 1) * self.bs], dtype=torch.int64).numpy().tobytes())
            if i == 0 and salt:
                h.update(b"cache_salt" + salt.encode())
            parent = h.digest()
            out.append(parent)
        return out

    def alloc(self):
        while not self.free:
            # Evict an unreferenced cached block.
            victim = next((b for b, h in self.hash_of.items() if self.ref[b] == 0), None)
            if victim is None:
                raise SystemExit("torch_engine: out of KV blocks")
            del self.cached[self.hash_of.pop(victim)]
            self.free.append(victim)
        b = self.free.pop()
        self.ref[b] = 1
        return b

    def release(self, b):
        self.ref[b] -= 1
        if self.ref[b] == 0 and b not in self.hash_of:
            self.free.append(b)

    def step(self, so, ids, pos0, table, meta_check=None):
        """One engine step: scheduler metadata to the worker, the forward pass."""
        meta = self.sched.build_connector_meta(so)
        self.worker.bind_connector_metadata(meta)
        self.worker.start_load_kv(vs.ForwardContext())
        logits = forward_paged(self.m, ids, pos0, self.kvl, table, self.bs, self.names, self.worker)
        self.worker.wait_for_save()
        self.worker.clear_connector_metadata()
        bad = self.worker.get_block_ids_with_load_errors()
        if bad:
            raise SystemExit(f"torch_engine: blocks {sorted(bad)} failed to load")
        return logits

    def run(self, prompt, gen, salt=None, check=None):
        """Serves one request: returns (generated tokens, stats). check(table,
        start, end) may inspect the loaded blocks after the prefill."""
        self.n += 1
        rid = f"req-{self.n}"
        req = vs.Request(rid, prompt, cache_salt=salt)
        hashes = self.block_hashes(prompt, salt)
        table = []
        for h in hashes:  # local prefix cache: longest run of resident blocks
            b = self.cached.get(h)
            if b is None:
                break
            self.ref[b] += 1
            table.append(b)
        local = len(table) * self.bs
        if local >= len(prompt):  # always compute the last prompt token
            self.release(table.pop())
            local -= self.bs
        ext, _ = self.sched.get_num_new_matched_tokens(req, local)
        need = (len(prompt) + self.bs - 1) // self.bs
        table += [self.alloc() for _ in range(need - len(table))]
        self.sched.update_state_after_alloc(req, vs.KVCacheBlocks(table), ext)
        computed = local + ext
        so = vs.SchedulerOutput(scheduled_new_reqs=[vs.NewRequestData(rid, list(prompt), (list(table),), computed)],
                                num_scheduled_tokens={rid: len(prompt) - computed})
        logits = self.step(so, prompt[computed:], computed, table)
        if check is not None and ext:
            check(table, local, computed)
        req.num_computed_tokens = len(prompt)
        out, pos = [], len(prompt)
        for i in range(gen):
            t = int(logits.argmax())
            out.append(t)
            req.append_output_token_ids(t)
            if i == gen - 1:
                break
            new = None
            if pos // self.bs >= len(table):
                table.append(self.alloc())
                new = ([table[-1]],)
            so = vs.SchedulerOutput(scheduled_cached_reqs=vs.CachedRequestData([rid], set(), [], [new], [pos]),
                                    num_scheduled_tokens={rid: 1})
            logits = self.step(so, [t], pos, table)
            pos += 1
            req.num_computed_tokens = pos
        # Finish: the scheduler tells the connector, the worker closes (flushes).
        self.sched.request_finished(req, list(table))
        self.sched.build_connector_meta(vs.SchedulerOutput(finished_req_ids={rid}))
        self.worker.get_finished({rid})
        # Full blocks join the local prefix cache (unless dropped).
        full = self.block_hashes(req.all_token_ids[:pos], salt)
        for i, b in enumerate(table):
            if self.keep_local and i < len(full) and full[i] not in self.cached and b not in self.hash_of:
                self.cached[full[i]] = b
                self.hash_of[b] = full[i]
            self.release(b)
        if not self.keep_local:
            self.drop_local()
        return out, {"request": rid, "prompt": len(prompt), "local_hit": local, "external_hit": ext}

    def drop_local(self):
        for b in list(self.hash_of):
            del self.cached[self.hash_of.pop(b)]
            if self.ref[b] == 0:
                self.free.append(b)


def paged_main(a, m, client):
    """--mode paged: conversations under shared system prompts, every turn a
    request with the whole history, against an uninterrupted run."""
    bs = client.info().chunk_tokens if a.block_size == 0 else a.block_size
    if isinstance(client, hc.Client):
        try:  # the connector takes a failed lookup for a miss: say plainly when there is no Lookup at all
            client.lookup(a.namespace, hc.Identity(b"probe", [(hc.KV, 4)]), [1])
        except hc.Error as e:
            if e.code.name == "UNIMPLEMENTED":
                raise SystemExit(f"torch_engine: the daemon lacks Lookup ({e})")
    vocab = m.W["model.embed_tokens.weight"].shape[0]
    g = torch.Generator().manual_seed(a.seed)
    systems = [torch.randint(0, vocab, (a.system_len,), generator=g).tolist() for _ in range(a.systems)]
    convs = [f"c{i}" for i in range(a.conversations)]
    # The last --salted conversations carry a cache salt of their own tenant.
    salts = {c: (f"tenant-{c}" if i >= a.conversations - a.salted else None) for i, c in enumerate(convs)}
    users = {c: [torch.randint(0, vocab, (a.prompt + 7 * t,), generator=g).tolist() for t in range(a.turns)] for c in convs}
    per_req = (a.system_len + a.turns * (a.prompt + 7 * a.turns + a.gen)) // bs + 2
    eng = PagedEngine(m, client, a.namespace, m.fingerprint, bs, per_req * 2 + 8, keep_local=a.keep_local, transport=a.transport)
    ref_cache = {c: [None] * m.L for c in convs}
    history = {c: list(systems[i % a.systems]) for i, c in enumerate(convs)}
    ref_last = {c: [] for c in convs}
    ref_pos = {c: 0 for c in convs}
    equal, reqs, max_row_diff = True, [], 0.0

    def checker(c):
        def check(table, start, end):  # loaded rows against this conversation's uninterrupted K/V
            nonlocal max_row_diff
            pos = torch.arange(start, end)
            bi, bo = torch.tensor(table)[pos // bs], pos % bs
            for l in range(m.L):
                rk, rv = ref_cache[c][l]
                k, v = eng.kvl[l][0, bi, bo].float(), eng.kvl[l][1, bi, bo].float()
                max_row_diff = max(max_row_diff, float((k - rk[start:end]).abs().max()), float((v - rv[start:end]).abs().max()))
        return check

    for t in range(a.turns):
        for i, c in enumerate(convs):
            # Uninterrupted reference: the KV cache stays in memory.
            ids = (history[c] if t == 0 else ref_last[c]) + users[c][t]
            logits = m.forward(ids, ref_pos[c], ref_cache[c])
            pos = ref_pos[c] + len(ids)
            ref_out = []
            for j in range(a.gen):
                tok = int(logits.argmax())
                ref_out.append(tok)
                if j == a.gen - 1:
                    break
                logits = m.forward([tok], pos, ref_cache[c])
                pos += 1
            ref_pos[c], ref_last[c] = pos, [ref_out[-1]]
            # The paged engine: one request with the whole history.
            prompt = history[c] + users[c][t]
            out, st = eng.run(prompt, a.gen, salt=salts[c], check=checker(c))
            st.update(conversation=c, turn=t, salted=salts[c] is not None)
            reqs.append(st)
            equal = equal and out == ref_out
            history[c] = prompt + out
    res = {"mode": "paged", "tokens_equal": equal, "block_size": bs, "transport": a.transport, "requests": reqs,
           "max_loaded_row_diff": max_row_diff, "connector": eng.sched.stats | {k: v for k, v in eng.worker.stats.items() if v},
           "lookup_errors": eng.sched.lookup_errors}
    print(json.dumps(res))
    eng.worker.shutdown()
    if not equal:
        sys.exit(1)

# --mode bench: time between tokens, generating with and without saving.

BENCH_SHAPES = {
    # hidden, layers, heads, kv heads, ffn, vocab
    "llama2-7b": (4096, 32, 32, 32, 11008, 32000),
    "small": (1024, 8, 8, 8, 2816, 8000),
    "tiny": (256, 4, 4, 4, 688, 1000),
}


class BenchModel:
    """A Llama-shaped decoder with seeded random weights on a device (eager
    PyTorch, a static KV cache, rope, SDPA attention). Each layer's normed
    hidden state of a decode step is written (out=, no extra kernel) into a
    step buffer [batch, layers, hidden]: the rows HCache saves."""

    def __init__(self, shape, device, dtype, seed):
        self.d, self.L, self.H, self.KV, self.ffn, self.vocab = BENCH_SHAPES[shape]
        self.hd = self.d // self.H
        self.dev, self.dtype = torch.device(device), dtype
        g = torch.Generator(device=self.dev).manual_seed(seed)

        def w(*s):
            return (torch.randn(*s, generator=g, device=self.dev, dtype=torch.float32) * 0.02).to(dtype)

        self.emb = w(self.vocab, self.d)
        self.layers = [dict(ln1=torch.ones(self.d, device=self.dev, dtype=dtype), wqkv=w((self.H + 2 * self.KV) * self.hd, self.d),
                            wo=w(self.d, self.d), ln2=torch.ones(self.d, device=self.dev, dtype=dtype), wgu=w(2 * self.ffn, self.d),
                            wd=w(self.d, self.ffn)) for _ in range(self.L)]
        self.norm = torch.ones(self.d, device=self.dev, dtype=dtype)
        self.head = w(self.vocab, self.d)
        self.inv = 1.0 / (10000 ** (torch.arange(0, self.hd, 2, device=self.dev, dtype=torch.float32) / self.hd))
        self.sdpa = getattr(F, "scaled_dot_product_attention", None)

    def cache(self, batch, tokens):
        return [torch.zeros(2, batch, self.KV, tokens, self.hd, device=self.dev, dtype=self.dtype) for _ in range(self.L)]

    def rms(self, x, w, out=None):
        xf = x.float()
        n = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(self.dtype)
        return torch.mul(n, w, out=out) if out is not None else n * w

    def rope(self, x, pos):  # x [B, heads, n, hd]
        ang = pos[:, None].float() * self.inv[None, :]
        cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).flatten(-2)

    def attend(self, q, k, v, causal):
        if self.H != self.KV:
            k, v = k.repeat_interleave(self.H // self.KV, 1), v.repeat_interleave(self.H // self.KV, 1)
        if self.sdpa is not None:
            return self.sdpa(q, k, v, is_causal=causal)
        sc = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(self.hd)
        if causal:
            n = q.shape[2]
            sc = sc + torch.triu(torch.full((n, n), float("-inf"), device=q.device), 1)
        return (sc.softmax(-1) @ v.float()).to(q.dtype)

    def forward(self, ids, pos0, kv, step=None, on_layer=None):
        """ids [B, n] at positions pos0..; step: the decode step buffer
        [B, L, d] (n == 1); on_layer(l, h): prefill rows of layer l [B, n, d].
        Returns the next token of each sequence (greedy), on the device."""
        B, n = ids.shape
        pos = torch.arange(pos0, pos0 + n, device=self.dev)
        x = self.emb[ids]
        for l, p in enumerate(self.layers):
            if step is not None:
                h = self.rms(x[:, 0], p["ln1"], out=step[:, l]).unsqueeze(1)
            else:
                h = self.rms(x, p["ln1"])
                if on_layer is not None:
                    on_layer(l, h)
            q, k, v = (h @ p["wqkv"].t()).split([self.H * self.hd, self.KV * self.hd, self.KV * self.hd], -1)
            q = self.rope(q.view(B, n, self.H, self.hd).transpose(1, 2), pos)
            k = self.rope(k.view(B, n, self.KV, self.hd).transpose(1, 2), pos)
            kv[l][0, :, :, pos0:pos0 + n] = k
            kv[l][1, :, :, pos0:pos0 + n] = v.view(B, n, self.KV, self.hd).transpose(1, 2)
            a = self.attend(q, kv[l][0, :, :, :pos0 + n], kv[l][1, :, :, :pos0 + n], n > 1)
            x = x + a.transpose(1, 2).reshape(B, n, self.d) @ p["wo"].t()
            g, u = (self.rms(x, p["ln2"]) @ p["wgu"].t()).chunk(2, -1)
            x = x + (F.silu(g) * u) @ p["wd"].t()
        return (self.rms(x[:, -1], self.norm) @ self.head.t()).argmax(-1)


def _dist(xs):
    xs = sorted(xs)
    p = lambda q: xs[min(len(xs) - 1, int(math.ceil(q * len(xs))) - 1)]  # noqa: E731 (nearest rank)
    return {"n": len(xs), "mean_ms": 1e3 * sum(xs) / len(xs), "p50_ms": 1e3 * p(0.50), "p99_ms": 1e3 * p(0.99), "max_ms": 1e3 * xs[-1]}


def bench_run(a, m, client, saver, batch, run_id):
    """One generation of a.steps tokens after an a.prompt-token prefill, for
    batch sequences; with saver, every layer's rows are saved through it
    (prefill per layer, decode per step) and flushed at the end. Returns
    the times between tokens (s) and what was saved."""
    import time as _t

    torch.manual_seed(run_id)
    kv = m.cache(batch, a.prompt + a.steps + 1)
    ids = torch.randint(0, m.vocab, (batch, a.prompt), device=m.dev)
    ws = None
    if saver is not None:
        ident = hc.Identity(b"torch_engine bench " + a.shape.encode() + str(m.dtype).encode(),
                            [(hc.HIDDEN, m.d * m.emb.element_size())] * m.L)
        ws = [client.create(a.namespace, f"bench-{os.getpid()}-{run_id}-{b}", ident) for b in range(batch)]

    def on_layer(l, h):
        for b in range(batch):
            saver.append_layer(ws[b], l, h[b], timeout=None)

    nxt = m.forward(ids, 0, kv, on_layer=on_layer if ws else None)
    tok = nxt.tolist()
    prev = _t.perf_counter()
    tbt = []
    for i in range(a.steps):
        step = torch.empty(batch, m.L, m.d, device=m.dev, dtype=m.dtype)
        nxt = m.forward(nxt[:, None], a.prompt + i, kv, step=step)
        if ws:
            saver.append_tokens(ws, step.view(batch, -1))  # SaverFull propagates: never a silent drop
        tok = nxt.tolist()  # the engine's host sync: the step's tokens
        now = _t.perf_counter()
        tbt.append(now - prev)
        prev = now
    out = {"last_tokens": tok}
    if ws:
        t0 = _t.perf_counter()
        acked = saver.flush(ws, close=True)
        out["flush_s"] = _t.perf_counter() - t0
        out["durable_tokens_ok"] = all(v == a.prompt + a.steps for v in acked.values())
    return tbt, out


def bench_main(a):
    """--mode bench: mean and p99 time between tokens at each batch size,
    generating without and with saving through hcached (runs alternated),
    as one JSON document."""
    import platform
    import time as _t

    dev = a.device
    if dev == "cuda" and not torch.cuda.is_available():
        raise SystemExit("torch_engine: --device cuda, but torch sees no GPU")
    dtype = DTYPES[a.dtype]
    t0 = _t.perf_counter()
    m = BenchModel(a.shape, dev, dtype, a.seed)
    if dev == "cuda":
        torch.cuda.synchronize()
    load_s = _t.perf_counter() - t0
    client = hc.Client(a.addr, token=a.token)
    saver = hc.Saver(client, a.region_mb << 20, device=dev if dev == "cuda" else None, decode_group=a.decode_group)
    batches = [int(x) for x in a.batch.split(",")]
    res = {"mode": "bench", "shape": a.shape, "hidden": m.d, "layers": m.L, "dtype": a.dtype, "device": dev,
           "gpu": torch.cuda.get_device_name() if dev == "cuda" else None, "torch": torch.__version__,
           "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "loadavg_before": os.getloadavg(),
           "prompt": a.prompt, "steps": a.steps, "reps": a.reps, "region_bytes": a.region_mb << 20,
           "saver_mode": saver.stats["mode"], "decode_group": a.decode_group, "weights_s": load_s, "batches": [],
           "targets": {"mean_ratio_max": 1.04, "p99_ratio_max": 1.10},
           "what": "time between tokens (host sync of each step's tokens to the next), greedy decode after a prefill; "
                   "save = every layer's normed hidden state saved through hcache_client.Saver (prefill per layer, "
                   "decode steps gathered decode_group at a time, one AppendTokens per sequence per group) and flushed (not timed) after the last token; "
                   "runs alternate nosave/save"}
    run_id = a.seed * 1000
    for batch in batches:
        bench_run(a, m, client, None, batch, run_id)  # warm-up (allocator, kernels)
        run_id += 1
        times = {"nosave": [], "save": []}
        steady = {"nosave": [], "save": []}  # without each run's first 8 steps (while the prefill's rows are still being sent)
        per_rep = []
        outs = []
        for r in range(a.reps):
            order = ("nosave", "save") if r % 2 == 0 else ("save", "nosave")
            rep = {}
            for mode in order:
                tbt, out = bench_run(a, m, client, saver if mode == "save" else None, batch, run_id)
                run_id += 1
                times[mode] += tbt
                steady[mode] += tbt[8:]
                rep[mode] = sum(tbt) / len(tbt)
                if mode == "save":
                    outs.append(out)
            per_rep.append(rep["save"] / rep["nosave"])
        ns, sv = _dist(times["nosave"]), _dist(times["save"])
        sns, ssv = (_dist(steady["nosave"]), _dist(steady["save"])) if steady["save"] else ({}, {})
        res["batches"].append({"batch": batch, "nosave": ns, "save": sv,
                               "mean_ratio": sv["mean_ms"] / ns["mean_ms"], "p99_ratio": sv["p99_ms"] / ns["p99_ms"],
                               "steady_nosave": sns, "steady_save": ssv,
                               "steady_mean_ratio": ssv["mean_ms"] / sns["mean_ms"] if ssv else None,
                               "steady_p99_ratio": ssv["p99_ms"] / sns["p99_ms"] if ssv else None,
                               "mean_ratio_per_rep": per_rep, "flush_s": [o["flush_s"] for o in outs],
                               "durable_tokens_ok": all(o["durable_tokens_ok"] for o in outs),
                               "saved_bytes_per_step": batch * m.L * m.d * m.emb.element_size()})
    res["saver"] = {k: v for k, v in saver.stats.items()}
    res["loadavg_after"] = os.getloadavg()
    saver.close()
    client.close()
    res["pass"] = all(b["mean_ratio"] <= 1.04 and b["p99_ratio"] <= 1.10 and b["durable_tokens_ok"] for b in res["batches"])
    print(json.dumps(res))
    if not all(b["durable_tokens_ok"] for b in res["batches"]):
        sys.exit(1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--addr", required=True)
    ap.add_argument("--model", default=None, help="model directory (not for --mode bench)")
    ap.add_argument("--token", default=None)
    ap.add_argument("--namespace", default="engine")
    ap.add_argument("--transport", choices=["shm", "inline"], default="shm")
    ap.add_argument("--project", default=None, metavar="NAME", help="let the daemon project hidden states with its model NAME")
    ap.add_argument("--conversations", type=int, default=2)
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=40)
    ap.add_argument("--gen", type=int, default=12)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--mode", choices=["conversations", "paged", "bench"], default="conversations")
    ap.add_argument("--shape", choices=sorted(BENCH_SHAPES), default="tiny", help="bench: the synthetic model's shape")
    ap.add_argument("--device", default="cpu", help="bench: cpu or cuda")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="bench: weights and activations")
    ap.add_argument("--batch", default="1,8", help="bench: batch sizes")
    ap.add_argument("--steps", type=int, default=64, help="bench: decode steps per run")
    ap.add_argument("--reps", type=int, default=3, help="bench: runs of each kind per batch size")
    ap.add_argument("--region-mb", type=int, default=256, help="bench: the saver's shared region")
    ap.add_argument("--decode-group", type=int, default=8, help="bench: decode steps the saver gathers per AppendTokens (Saver decode_group)")
    ap.add_argument("--systems", type=int, default=1, help="paged: shared system prompts")
    ap.add_argument("--system-len", type=int, default=40, help="paged: tokens of a system prompt")
    ap.add_argument("--salted", type=int, default=0, help="paged: the last N conversations carry a cache salt of their own")
    ap.add_argument("--block-size", type=int, default=0, help="paged: tokens per block (0: the daemon's chunk tokens)")
    ap.add_argument("--keep-local", action="store_true", help="paged: keep the local prefix cache between requests")
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    if a.mode == "bench":
        return bench_main(a)
    if a.model is None:
        ap.error("--model is required (except with --mode bench)")
    m = Model(a.model)
    if a.mode == "paged":
        return paged_main(a, m, hc.Client(a.addr, token=a.token))
    # Plan: the last layer keeps K|V, the others their hidden state.
    kinds = [hc.HIDDEN] * (m.L - 1) + [hc.KV]
    client = hc.Client(a.addr, token=a.token)
    eng = Engine(m, client, a.namespace, kinds, a.transport, a.project)
    vocab = m.W["model.embed_tokens.weight"].shape[0]
    g = torch.Generator().manual_seed(a.seed)
    convs = [f"conv-{a.seed}-{i}" for i in range(a.conversations)]
    prompts = {c: [torch.randint(0, vocab, (a.prompt + 7 * t,), generator=g).tolist() for t in range(a.turns)] for c in convs}
    ref_cache = {c: [None] * m.L for c in convs}
    state = {c: {"pos": 0, "last": [], "pos_ref": 0, "last_ref": []} for c in convs}
    ref_tokens = {c: [] for c in convs}
    hc_tokens = {c: [] for c in convs}
    restored = []
    # Interleave the conversations turn by turn, as a server would.
    for t in range(a.turns):
        for c in convs:
            s = state[c]
            # Uninterrupted reference: the KV cache stays in memory.
            ids = s["last_ref"] + prompts[c][t]
            logits = m.forward(ids, s["pos_ref"], ref_cache[c])
            pos = s["pos_ref"] + len(ids)
            out = []
            for i in range(a.gen):
                tok = int(logits.argmax())
                out.append(tok)
                if i == a.gen - 1:
                    break
                logits = m.forward([tok], pos, ref_cache[c])
                pos += 1
            ref_tokens[c].append(out)
            s["pos_ref"], s["last_ref"] = pos, [out[-1]]
            # Through hcached: restore, continue, save, drop.
            ids = s["last"] + prompts[c][t]
            out, pos, st = eng.turn(c, t == 0, ids, s["pos"], a.gen)
            hc_tokens[c].append(out)
            if "restored" in st:
                restored.append(st["restored"])
            s["pos"], s["last"] = pos, [out[-1]]
    equal = ref_tokens == hc_tokens
    stored = {c: client.stat(a.namespace, c).tokens for c in convs}
    print(json.dumps({"tokens_equal": equal, "conversations": len(convs), "turns": a.turns, "transport": a.transport,
                      "restores": len(restored), "restored_tokens": restored, "stored_tokens": stored,
                      "generated": sum(len(x) for v in hc_tokens.values() for x in v),
                      "plan": [("hidden" if k == hc.HIDDEN else "kv") for k in kinds],
                      "projected_by_daemon": eng.project, "max_projection_diff": eng.max_proj_diff}))
    if eng.region is not None:
        eng.region.close()
    client.close()
    if not equal:
        print(json.dumps({"reference": ref_tokens, "hcache": hc_tokens}), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    with torch.no_grad():
        main()
