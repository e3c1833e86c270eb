"""Why RoPE-then-norm (Recipe.rope_first) lost to Inductor at HunYuan's shapes: the kernel alone on
HunYuan's q/k (4096 tokens, 32/8 heads of 128, bf16, [B, H, S, D] views of [B, S, H*D]), with the
rope_first recipe and, on the same inputs, the norm-first one (same bytes moved: what rope_first
costs over it), at the tuned config and at other tiles; Inductor's compiled q/k block for scale.

    python benchmarks/tune_rope_first.py [--out DIR] [--tokens 4096]

Device time: CUDA-graph replay (do_bench_cudagraph, median). Lines are printed as they come (a
short device call still leaves what it measured).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from qkfuse.kernels import triton_norm_rope as tk  # noqa: E402
from qkfuse.ops.recipe import Recipe  # noqa: E402

CONFIGS = [(2, 8, 2), (2, 8, 4), (1, 8, 2), (1, 8, 4), (4, 8, 4), (4, 4, 2), (2, 4, 2), (1, 4, 1), (8, 8, 8),
           (2, 16, 4)]


def us(fn):
    from triton.testing import do_bench_cudagraph

    return do_bench_cudagraph(fn, rep=40, return_mode="median") * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    ap.add_argument("--tokens", type=int, default=4096)
    a = ap.parse_args()
    S, H, Hk, D, dt = a.tokens, 32, 8, 128, torch.bfloat16
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, S, H * D, device="cuda", generator=g).to(dt).view(1, S, H, D).transpose(1, 2)
    k = torch.randn(1, S, Hk * D, device="cuda", generator=g).to(dt).view(1, S, Hk, D).transpose(1, 2)
    qw = (1 + 0.3 * torch.randn(D, device="cuda", generator=g)).to(dt)
    kw = (1 + 0.3 * torch.randn(D, device="cuda", generator=g)).to(dt)
    angle = torch.rand(S, D // 2, device="cuda", generator=g) * 6.28
    angle = torch.cat([angle, angle], -1)
    cos, sin = angle.cos().to(dt)[None, None], angle.sin().to(dt)[None, None]
    rope_first = Recipe(norm="rms", cast_before_weight=True, norm_dtype=dt, rope_dtype=dt, out_dtype=dt, rotary_dim=D,
                        rope_first=True)
    rows = []

    def record(**row):
        rows.append(row)
        print(row, flush=True)
        with open(os.path.join(a.out, "tune_rope_first.json"), "w") as f:
            json.dump(rows, f, indent=1)

    def block(x, kx):  # HunYuan: HF neox RoPE in bf16, then the RMSNorm with the weight after the cast
        def rope(t):
            t1, t2 = t[..., : D // 2], t[..., D // 2:]
            return t * cos + torch.cat((-t2, t1), -1) * sin

        def norm(t, w):
            h = t.float()
            return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).to(t.dtype)

        return norm(rope(x), qw), norm(rope(kx), kw)

    compiled = torch.compile(block)
    compiled(q, k)
    record(variant="inductor block", us=us(lambda: compiled(q, k)))
    tuned = tk.choose_config(S, H, Hk, D)
    norm_first = dataclasses.replace(rope_first, rope_first=False)
    plan = [("rope_first", rope_first, tuned), ("norm_first", norm_first, tuned)]  # (the bytes-moved baseline)
    plan += [("rope_first", rope_first, tk.Config(*c)) for c in CONFIGS if tk.Config(*c) != tuned]
    for name, recipe, cfg in plan:
        try:
            t = us(lambda: tk.launch(q, k, qw, kw, cos, sin, 1e-6, 1e-6, recipe, config=cfg))
        except Exception as e:  # a tile that does not compile for this shape
            record(variant=name, config=dataclasses.astuple(cfg), error=f"{type(e).__name__}: {e}"[:200])
            continue
        record(variant=name, config=dataclasses.astuple(cfg), tuned=cfg == tuned, us=t)

if __name__ == "__main__":
    main()
