"""fp8 per-token against per-128-block scales on synthetic distributions,
with the torch reference's own quantizer (model/testdata/torch_ref.py).
Run from the repository root: /usr/bin/python3 bench/results/codecs-2026-12-03/block_vs_token.py"""
import importlib.util

import torch

spec = importlib.util.spec_from_file_location("ref", "model/testdata/torch_ref.py")
ref = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ref)
torch.manual_seed(1)
dists = [
    ("gaussian", torch.ones(4096)),
    ("log-normal channel scales", torch.randn(4096).exp()),
    ("0.5% channels x100", torch.where(torch.rand(4096) < 0.005, 100.0, 1.0)),
    ("0.5% channels x3000", torch.where(torch.rand(4096) < 0.005, 3000.0, 1.0)),
]
print("| values (256 rows x 4096) | codec | rms rel error | rms rel error of the channels at or below the median scale |")
print("|---|---|---|---|")
for name, ch in dists:
    x = (torch.randn(256, 4096) * ch).float()
    small = ch <= ch.median()  # the channels at or below the median scale
    for blk, label in [(4096, "fp8"), (128, "fp8-block")]:
        y = ref.fp8_roundtrip(x, blk)
        rms = ((y - x).norm() / x.norm()).item()
        rs = ((y - x)[:, small].norm() / x[:, small].norm()).item()
        print(f"| {name} | {label} | {rms:.4f} | {rs:.4f} |")
