#!/usr/bin/env python3
"""PyTorch recompute baseline for `hcache bench gpu --plan` (issue 18).

A Llama-style prefill (token embeddings, then per layer: RMSNorm, Q/K/V
projections, neox RoPE, causal attention through
torch.nn.functional.scaled_dot_product_attention, output projection,
RMSNorm, SiLU-gated MLP, residuals) over random weights of the given shape,
eager, timed with CUDA events on a GPU (time.perf_counter on the CPU), a
median and range over --reps runs after --warmup runs. No LM head: the
layers a restore would recompute, as hcache's own recompute runs them.

Prints one JSON object:
  {"script", "torch", "device", "dtype", "attention", "shape": {...},
   "rows": [{"tokens", "layers", "ms": {"median", "min", "max", "n"}, "samples_ms", "finite"}]}

Example (Llama2-7B shape on a GPU):
  python3 scripts/torch_prefill.py --tokens 1024,4096,16384 --device cuda --dtype fp16
and tiny on the CPU (the Go test):
  python3 scripts/torch_prefill.py --hidden 64 --heads 4 --kv-heads 2 --head-dim 16 \
      --intermediate 128 --layers 2 --vocab 100 --tokens 16,32 --device cpu --dtype fp32
"""
import argparse
import json
import math
import sys
import time

import torch
import torch.nn.functional as F

DTYPES = {"fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--rope-theta", type=float, default=10000.0)
    p.add_argument("--qkv-bias", action="store_true")
    p.add_argument("--tokens", default="1024,4096,16384", help="comma-separated token counts")
    p.add_argument("--reps", type=int, default=5, help="timed runs per token count")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="fp16", choices=sorted(DTYPES))
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args(argv)
    try:
        a.tokens = [int(t) for t in a.tokens.split(",")]
    except ValueError:
        p.error("--tokens: %r is not a comma-separated list of integers" % a.tokens)
    for name in ("hidden", "heads", "kv_heads", "head_dim", "intermediate", "layers", "vocab", "reps"):
        if getattr(a, name) <= 0:
            p.error("--%s must be positive" % name.replace("_", "-"))
    if any(t <= 0 for t in a.tokens):
        p.error("--tokens must be positive")
    if a.heads % a.kv_heads:
        p.error("--heads %d is not a multiple of --kv-heads %d" % (a.heads, a.kv_heads))
    return a


def rand(shape, std, dtype, device, gen):
    return (torch.randn(shape, generator=gen, dtype=torch.float32, device=device) * std).to(dtype)


def make_weights(a, dtype, device):
    gen = torch.Generator(device=device).manual_seed(a.seed)  # on the device: seconds, not minutes, for 7B
    d, qd, kvd, im = a.hidden, a.heads * a.head_dim, a.kv_heads * a.head_dim, a.intermediate
    layers = []
    for _ in range(a.layers):
        lw = {
            "attn_norm": torch.ones(d, dtype=dtype, device=device),
            "wqkv": rand((qd + 2 * kvd, d), 1 / math.sqrt(d), dtype, device, gen),
            "wo": rand((d, qd), 1 / math.sqrt(qd), dtype, device, gen),
            "mlp_norm": torch.ones(d, dtype=dtype, device=device),
            "wgate_up": rand((2 * im, d), 1 / math.sqrt(d), dtype, device, gen),
            "wdown": rand((d, im), 1 / math.sqrt(im), dtype, device, gen),
        }
        if a.qkv_bias:
            lw["bqkv"] = rand((qd + 2 * kvd,), 0.02, dtype, device, gen)
        layers.append(lw)
    embed = rand((a.vocab, d), 1.0, dtype, device, gen)
    return embed, layers


def rms_norm(x, w, eps=1e-5):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def rope_tables(a, n, dtype, device):
    inv = 1.0 / (a.rope_theta ** (torch.arange(0, a.head_dim, 2, dtype=torch.float32, device=device) / a.head_dim))
    f = torch.outer(torch.arange(n, dtype=torch.float32, device=device), inv)
    e = torch.cat((f, f), dim=-1)
    return e.cos().to(dtype), e.sin().to(dtype)


def rotate(x, cos, sin):  # x: [heads, n, head_dim], neox halves
    h = x.shape[-1] // 2
    r = torch.cat((-x[..., h:], x[..., :h]), dim=-1)
    return x * cos + r * sin


def attention(q, k, v):
    """Causal attention, q [H, n, hd], k/v [KVH, n, hd]; returns [H, n, hd]."""
    rep = q.shape[0] // k.shape[0]
    if rep > 1:
        k = k.repeat_interleave(rep, dim=0)
        v = v.repeat_interleave(rep, dim=0)
    if hasattr(F, "scaled_dot_product_attention"):
        return F.scaled_dot_product_attention(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), is_causal=True).squeeze(0)
    # torch < 2.0 (no SDPA): the same arithmetic, eager, with an n x n mask.
    s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    n = q.shape[1]
    mask = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
    s = s.float().masked_fill(mask, float("-inf")).softmax(-1).to(q.dtype)
    return torch.matmul(s, v)


def prefill(a, embed, layers, ids, cos, sin):
    n = ids.shape[0]
    qd, kvd, hd = a.heads * a.head_dim, a.kv_heads * a.head_dim, a.head_dim
    x = F.embedding(ids, embed)
    kv = []
    for lw in layers:
        h = rms_norm(x, lw["attn_norm"])
        qkv = F.linear(h, lw["wqkv"], lw.get("bqkv"))
        q, k, v = qkv.split((qd, kvd, kvd), dim=-1)
        q = rotate(q.view(n, a.heads, hd).transpose(0, 1), cos, sin)
        k = rotate(k.view(n, a.kv_heads, hd).transpose(0, 1), cos, sin)
        v = v.view(n, a.kv_heads, hd).transpose(0, 1)
        kv.append((k, v))  # what a KV cache keeps
        o = attention(q, k, v).transpose(0, 1).reshape(n, qd)
        x = x + F.linear(o, lw["wo"])
        h = rms_norm(x, lw["mlp_norm"])
        g, u = F.linear(h, lw["wgate_up"]).chunk(2, dim=-1)
        x = x + F.linear(F.silu(g) * u, lw["wdown"])
    return x, kv


def spread(v):
    s = sorted(v)
    n = len(s)
    med = s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
    return {"median": med, "min": s[0], "max": s[-1], "n": n}


def main(argv):
    a = parse_args(argv)
    dtype = DTYPES[a.dtype]
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        print("torch_prefill: --device cuda but torch.cuda.is_available() is false", file=sys.stderr)
        return 2
    torch.manual_seed(a.seed)
    embed, layers = make_weights(a, dtype, device)
    rows = []
    with torch.inference_mode():
        for n in a.tokens:
            ids = torch.randint(0, a.vocab, (n,), device=device)
            cos, sin = rope_tables(a, n, dtype, device)
            samples = []
            for i in range(a.warmup + a.reps):
                if cuda:
                    t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    t0.record()
                    out, _ = prefill(a, embed, layers, ids, cos, sin)
                    t1.record()
                    torch.cuda.synchronize()
                    ms = t0.elapsed_time(t1)
                else:
                    t0 = time.perf_counter()
                    out, _ = prefill(a, embed, layers, ids, cos, sin)
                    ms = (time.perf_counter() - t0) * 1e3
                finite = bool(torch.isfinite(out).all())  # recorded: timing does not depend on the values
                if i >= a.warmup:
                    samples.append(ms)
            rows.append({"tokens": n, "layers": a.layers, "ms": spread(samples), "samples_ms": samples, "finite": finite})
            print("torch_prefill: %d tokens, %d layers: median %.2f ms [%.2f-%.2f]" % (
                n, a.layers, rows[-1]["ms"]["median"], rows[-1]["ms"]["min"], rows[-1]["ms"]["max"]), file=sys.stderr)
            del cos, sin, ids
            if cuda:
                torch.cuda.empty_cache()
    dev = torch.cuda.get_device_name(device) if cuda else "cpu"
    json.dump({
        "script": "scripts/torch_prefill.py", "torch": torch.__version__, "device": dev, "dtype": a.dtype,
        "attention": "scaled_dot_product_attention" if hasattr(F, "scaled_dot_product_attention") else "eager matmul+softmax (torch without SDPA)",
        "timer": "cuda events" if cuda else "perf_counter",
        "shape": {"hidden": a.hidden, "heads": a.heads, "kv_heads": a.kv_heads, "head_dim": a.head_dim,
                  "intermediate": a.intermediate, "layers": a.layers, "vocab": a.vocab, "qkv_bias": a.qkv_bias},
        "warmup": a.warmup, "rows": rows,
    }, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
