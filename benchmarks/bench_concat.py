"""Norms concatenated before the RoPE (the norm_cat_rope family: Flux's double-stream blocks) on the
GPU: Inductor alone against the pass with kernels="triton" (what kernels="auto" picks since this
benchmark ran), by device time.

    python benchmarks/bench_concat.py [--out DIR]

Two blocks at Flux.1's and Flux.2's attention shapes (bf16, 24 or 48 heads of 128, 512 text tokens):
- ``qk``: the q/k subgraph alone (tests/patterns/test_concat_norm_rope.py's JointQK: text and image q
  and k normed by their own torch.nn.RMSNorm, concatenated along the sequence, diffusers' interleaved
  RoPE with float32 tables);
- ``attention``: the same, then v concatenated and SDPA on the [B, H, S, D] transposes, as Flux's
  attention processor does: what the fused call's layout costs or saves downstream.
Device time: CUDA-graph replay of one call (triton.testing.do_bench_cudagraph, median of 3 runs).
Correctness: each output's max error against the float64 module, next to the unfused eager one's.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from benchmarks.block_bench import compare, max_err, write_table  # noqa: E402
from tests.patterns import test_concat_norm_rope as cr  # noqa: E402

BASE = dataclasses.replace(cr.FLUX, D=128, B=1, dtype=torch.bfloat16)
CASES = [  # name, batch, (text, image) tokens, heads
    ("flux 1024px", 1, (512, 4096), 24),
    ("flux 2048px", 1, (512, 16384), 24),
    ("flux 512px bs4", 4, (512, 1024), 24),
    ("flux2 1024px", 1, (512, 4096), 48),
]


class JointAttention(torch.nn.Module):
    """JointQK, then v joined the same way and SDPA over [B, H, S, D] (Flux's attention processor)."""

    def __init__(self, f, seed=0):
        super().__init__()
        self.qk = cr.JointQK(f, seed)
        self.n = len(f.lengths)

    def forward(self, *args):
        q, k = self.qk(*args[:-self.n])
        v = torch.cat(args[-self.n:], dim=1).unflatten(-1, (q.shape[2], -1))
        return torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                                v.transpose(1, 2))


def run(block, name, batch, lengths, heads):
    form = dataclasses.replace(BASE, B=batch, lengths=lengths, H=heads, Hk=heads)
    inputs = list(cr.make_inputs(form, 7))
    if block == "attention":
        g = torch.Generator().manual_seed(8)
        inputs += [torch.randn(batch, n, heads * form.D, generator=g).to(form.dtype) for n in lengths]

    def make(f=form):
        return (cr.JointQK(f) if block == "qk" else JointAttention(f)).eval()

    row = {"block": block, "case": name, "tokens": f"{batch}x({'+'.join(map(str, lengths))})", "heads": heads}
    with torch.no_grad():
        f64 = dataclasses.replace(form, dtype=torch.float64)
        ref64 = make(f64).cuda()(*[t.cuda().double() for t in inputs])
        args = [t.cuda() for t in inputs]
        row["eager err"] = max_err(make().cuda()(*args), ref64)
        return compare(row, make, args, ref64, "norm_cat_rope")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    ap.add_argument("--blocks", default="qk,attention")
    a = ap.parse_args()
    rows = [run(b, *c) for b in a.blocks.split(",") for c in CASES]
    cols = ["block", "case", "tokens", "heads", "fused sites", "inductor us", "qkfuse us", "speedup", "eager err",
            "inductor err", "qkfuse err"]
    write_table(rows, cols, a.out, "concat")


if __name__ == "__main__":
    main()
