"""Independent reference for hcache's Go forward pass, written with PyTorch.

Usage: torch_ref.py MODEL_DIR TOKENS OUT_DIR [CODEC]
Reads config.json and model.safetensors (parsed here with numpy, not with
hcache's reader), runs the prompt through the model in float32 with the same
rounding points as the Go reference (normed hidden state and K/V rounded to
the model dtype), and writes logits.bin and k{l}.bin / v{l}.bin as raw
little-endian float32.

With CODEC (fp8 or fp8-block), it also quantizes with its own fp8 E4M3
quantizer (written here from the format's definition, not from hcache's
state/codec): per token and segment (or block of 128 values) scale =
amax / 448, values rounded to the nearest E4M3 value, ties to the even code,
decoded and rounded to the model dtype. It writes, per layer, kq/vq (K and V
stored under the codec), kh/vh (K and V projected from the hidden state
stored under the codec) and the attention output (before o_proj) of the last
position with the exact, the kq/vq and the kh/vh caches: attn, attnkv,
attnh.
"""
import json
import math
import os
import struct
import sys

import numpy as np
import torch
import torch.nn.functional as F


def load_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        base = 8 + n
        out = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            b, e = info["data_offsets"]
            f.seek(base + b)
            raw = f.read(e - b)
            if info["dtype"] == "F16":
                a = np.frombuffer(raw, dtype="<f2").astype(np.float32)
            elif info["dtype"] == "BF16":
                a = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
            else:
                a = np.frombuffer(raw, dtype="<f4").astype(np.float32)
            out[name] = torch.from_numpy(a.copy()).reshape(info["shape"])
        return out



def rope_inv_freq(cfg, hd):
    """RoPE's inverse frequencies of a Llama/Qwen2 config, with linear or
    llama3 scaling (shared with clients/python/torch_engine.py)."""
    theta = cfg["rope_theta"]
    inv = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    rs = cfg.get("rope_scaling") or {}
    typ = rs.get("rope_type", rs.get("type", ""))
    if typ == "linear":
        inv = inv / rs["factor"]
    elif typ == "llama3":
        factor, lo, hi, old = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"], rs["original_max_position_embeddings"]
        low_wl, high_wl = old / lo, old / hi
        wl = 2 * math.pi / inv
        new = torch.where(wl > low_wl, inv / factor, inv)
        smooth = (old / wl - lo) / (hi - lo)
        smoothed = (1 - smooth) * new / factor + smooth * new
        mid = ~(wl < high_wl) & ~(wl > low_wl)
        inv = torch.where(mid, smoothed, new)
    return inv


def apply_rope(x, cos, sin, interleaved):
    """RoPE on x [n, heads, hd] with cos/sin [n, hd/2]: interleaved pairs
    (GPT-J) or halves (NeoX)."""
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        c, s = cos[:, None, :], sin[:, None, :]
        out = torch.empty_like(x)
        out[..., 0::2] = x1 * c - x2 * s
        out[..., 1::2] = x2 * c + x1 * s
        return out
    half = x.shape[-1] // 2
    c = torch.cat([cos, cos], -1)[:, None, :]
    s = torch.cat([sin, sin], -1)[:, None, :]
    return x * c + torch.cat([-x[..., half:], x[..., :half]], -1) * s

def e4m3_values():
    """The 127 non-negative finite E4M3 values, by code 0..126."""
    out = []
    for q in range(127):
        e, m = q >> 3, q & 7
        out.append(m / 512.0 if e == 0 else (1 + m / 8.0) * 2.0 ** (e - 7))
    return torch.tensor(out, dtype=torch.float64)


E4M3 = e4m3_values()


def fp8_roundtrip(x, block):
    """Quantizes rows x [n, d] (float32) per segment of `block` values
    (block=d: one scale per row) and returns the decoded values (float32)."""
    n, d = x.shape
    out = torch.empty_like(x)
    for lo in range(0, d, block):
        seg = x[:, lo:lo + block]
        amax = seg.abs().amax(-1, keepdim=True)
        scale = amax / 448.0  # float32, as the format specifies
        safe = torch.where(scale == 0, torch.ones_like(scale), scale)
        y = (seg.abs() / safe).double().clamp(max=448.0)
        idx = torch.searchsorted(E4M3, y).clamp(1, 126)
        lo_v, hi_v = E4M3[idx - 1], E4M3[idx]
        dlo, dhi = y - lo_v, hi_v - y
        pick_hi = (dhi < dlo) | ((dhi == dlo) & (idx % 2 == 0))
        code = torch.where(pick_hi, idx, idx - 1)
        code = torch.where(y <= 0, torch.zeros_like(code), code)
        val = E4M3[code].float() * seg.sign()
        out[:, lo:lo + block] = torch.where(scale == 0, torch.zeros_like(seg), val * scale)
    return out


def main():
    mdir, toks, odir = sys.argv[1], [int(t) for t in sys.argv[2].split(",")], sys.argv[3]
    codec = sys.argv[4] if len(sys.argv) > 4 else ""
    if codec not in ("", "fp8", "fp8-block"):
        raise SystemExit(f"unknown codec {codec!r}")
    cfg = json.load(open(os.path.join(mdir, "config.json")))
    W = load_safetensors(os.path.join(mdir, "model.safetensors"))
    arch = cfg["architectures"][0]
    opt = arch == "OPTForCausalLM"
    d = cfg["hidden_size"]
    H = cfg["num_attention_heads"]
    KV = cfg.get("num_key_value_heads", H) if not opt else H
    hd = cfg.get("head_dim", d // H) if not opt else d // H
    L = cfg["num_hidden_layers"]
    dtype = cfg.get("torch_dtype", "float16")

    def rnd(x):
        if dtype == "float16":
            return x.half().float()
        if dtype == "bfloat16":
            return x.bfloat16().float()
        return x

    n = len(toks)
    pos = torch.arange(n)
    ids = torch.tensor(toks)

    if not opt:
        inv = rope_inv_freq(cfg, hd)
        ang = pos[:, None].float() * inv[None, :]
        cos, sin = ang.cos(), ang.sin()
        interleaved = cfg.get("rotary_interleaved", False)

        def rope(x):  # x: [n, heads, hd]
            return apply_rope(x, cos, sin, interleaved)

    def rms(x, w, eps):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    if opt:
        p = "model.decoder."
        x = W[p + "embed_tokens.weight"][ids] + W[p + "embed_positions.weight"][pos + 2]
    else:
        p = "model."
        x = W[p + "embed_tokens.weight"][ids]
    mask = torch.full((n, n), float("-inf")).triu(1)
    for l in range(L):
        lp = f"{p}layers.{l}."
        if opt:
            h = F.layer_norm(x, (d,), W[lp + "self_attn_layer_norm.weight"], W[lp + "self_attn_layer_norm.bias"], 1e-5)
        else:
            h = rms(x, W[lp + "input_layernorm.weight"], cfg["rms_norm_eps"])
        h = rnd(h)
        bias = lambda name: W.get(lp + name)
        q = F.linear(h, W[lp + "self_attn.q_proj.weight"], bias("self_attn.q_proj.bias")).view(n, H, hd)
        k = F.linear(h, W[lp + "self_attn.k_proj.weight"], bias("self_attn.k_proj.bias")).view(n, KV, hd)
        v = F.linear(h, W[lp + "self_attn.v_proj.weight"], bias("self_attn.v_proj.bias")).view(n, KV, hd)
        if not opt:
            q, k = rope(q), rope(k)
        k, v = rnd(k), rnd(v)
        k.reshape(n, -1).numpy().astype("<f4").tofile(os.path.join(odir, f"k{l}.bin"))
        v.reshape(n, -1).numpy().astype("<f4").tofile(os.path.join(odir, f"v{l}.bin"))
        rep = H // KV
        if codec:
            def save(t, name):
                t.reshape(n, -1).numpy().astype("<f4").tofile(os.path.join(odir, f"{name}{l}.bin"))

            def last_attn(kk_, vv_):
                kk_ = kk_.repeat_interleave(rep, dim=1)
                vv_ = vv_.repeat_interleave(rep, dim=1)
                sc = torch.einsum("hd,khd->hk", q[-1], kk_) / math.sqrt(hd)
                return torch.einsum("hk,khd->hd", sc.softmax(-1), vv_).reshape(1, H * hd)

            kvd = KV * hd
            blk = 128 if codec == "fp8-block" else kvd
            kq = rnd(fp8_roundtrip(k.reshape(n, kvd), blk)).view(n, KV, hd)
            vq = rnd(fp8_roundtrip(v.reshape(n, kvd), blk)).view(n, KV, hd)
            hq = rnd(fp8_roundtrip(h, 128 if codec == "fp8-block" else d))
            kh = F.linear(hq, W[lp + "self_attn.k_proj.weight"], bias("self_attn.k_proj.bias")).view(n, KV, hd)
            vh = F.linear(hq, W[lp + "self_attn.v_proj.weight"], bias("self_attn.v_proj.bias")).view(n, KV, hd)
            if not opt:
                kh = rope(kh)
            kh, vh = rnd(kh), rnd(vh)
            for t, name in ((kq, "kq"), (vq, "vq"), (kh, "kh"), (vh, "vh")):
                save(t, name)
            for (kk_, vv_), name in (((k, v), "attn"), ((kq, vq), "attnkv"), ((kh, vh), "attnh")):
                last_attn(kk_, vv_).numpy().astype("<f4").tofile(os.path.join(odir, f"{name}{l}.bin"))
        kk = k.repeat_interleave(rep, dim=1)
        vv = v.repeat_interleave(rep, dim=1)
        sc = torch.einsum("qhd,khd->hqk", q, kk) / math.sqrt(hd) + mask
        a = torch.einsum("hqk,khd->qhd", sc.softmax(-1), vv).reshape(n, H * hd)
        oname = "self_attn.out_proj" if opt else "self_attn.o_proj"
        x = x + F.linear(a, W[lp + oname + ".weight"], bias(oname + ".bias"))
        if opt:
            h2 = F.layer_norm(x, (d,), W[lp + "final_layer_norm.weight"], W[lp + "final_layer_norm.bias"], 1e-5)
            x = x + F.linear(F.relu(F.linear(h2, W[lp + "fc1.weight"], bias("fc1.bias"))), W[lp + "fc2.weight"], bias("fc2.bias"))
        else:
            h2 = rms(x, W[lp + "post_attention_layernorm.weight"], cfg["rms_norm_eps"])
            g = F.linear(h2, W[lp + "mlp.gate_proj.weight"])
            u = F.linear(h2, W[lp + "mlp.up_proj.weight"])
            x = x + F.linear(F.silu(g) * u, W[lp + "mlp.down_proj.weight"])
    if opt:
        x = F.layer_norm(x, (d,), W[p + "final_layer_norm.weight"], W[p + "final_layer_norm.bias"], 1e-5)
        head = W.get("lm_head.weight", W[p + "embed_tokens.weight"])
    else:
        x = rms(x, W[p + "norm.weight"], cfg["rms_norm_eps"])
        head = W.get("lm_head.weight", W[p + "embed_tokens.weight"])
    logits = F.linear(x, head)
    logits.numpy().astype("<f4").tofile(os.path.join(odir, "logits.bin"))


if __name__ == "__main__":
    with torch.no_grad():
        main()
