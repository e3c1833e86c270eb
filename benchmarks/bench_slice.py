"""RoPE on a slice of a norm output's rows, the rows put back (the norm_slice_rope family:
HunyuanVideo, HunyuanImage, CogView4) on the GPU: Inductor alone against the pass with
kernels="triton" (what kernels="auto" picks), by device time.

    python benchmarks/bench_slice.py [--out DIR]

Two spellings at the models' attention shapes (bf16, heads of 128):
- HunyuanVideo: ``[B, S, H, D]``, RMSNorm with weight, diffusers' interleaved RoPE with float32
  tables on the image rows, ``cat([rope(q[:, :-T]), q[:, -T:]], 1)`` with 256 text tokens, 24 heads;
- CogView4: ``[B, H, S, D]`` after the transpose, a weightless LayerNorm, neox RoPE in float32,
  ``q[:, :, T:] = rope(q[:, :, T:])`` with 224 text tokens, 32 heads.
Blocks: ``qk`` (tests/patterns/test_norm_slice_rope.py's SliceRopeQK alone) and ``attention`` (then
SDPA over the [B, H, S, D] q/k with a v of the same shape: what the fused call's layout costs or
saves downstream). Device time: CUDA-graph replay of one call (median of 3 x do_bench_cudagraph).
Correctness: each output's max error against the float64 module (float32 once SDPA follows:
block_bench.reference_dtype), next to the unfused eager one's.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from benchmarks.block_bench import compare, max_err, reference_dtype, write_table  # noqa: E402
from tests.patterns import test_norm_slice_rope as sr  # noqa: E402

HUNYUAN = dataclasses.replace(sr.HUNYUAN, D=128, H=24, Hk=24, B=1, plain=256)
COGVIEW = dataclasses.replace(sr.COGVIEW, D=128, H=32, Hk=32, B=1, plain=224)
CASES = [  # name, form, image (rotated) tokens, batch
    ("hunyuan_video 4k", HUNYUAN, 4096, 1),
    ("hunyuan_video 16k", HUNYUAN, 16384, 1),
    ("hunyuan_video 32k", HUNYUAN, 32768, 1),
    ("cogview4 1024px", COGVIEW, 4096, 1),
    ("cogview4 2048px", COGVIEW, 16384, 1),
    ("cogview4 512px bs4", COGVIEW, 1024, 4),
]


class SliceAttention(torch.nn.Module):
    """SliceRopeQK, then SDPA over [B, H, S, D] with v."""

    def __init__(self, f, seed=0):
        super().__init__()
        self.qk = sr.SliceRopeQK(f, seed)
        self.f = f

    def forward(self, q, k, cos, sin, v):
        q, k = self.qk(q, k, cos, sin)
        if self.f.layout == "bshd":
            q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.unflatten(-1, (self.f.Hk, -1)).transpose(1, 2)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def run(block, name, base, rotated, batch):
    form = dataclasses.replace(base, rotated=rotated, B=batch)
    inputs = list(sr.make_inputs(form, 7))
    if block == "attention":
        g = torch.Generator().manual_seed(8)
        inputs.append(torch.randn(batch, rotated + form.plain, form.Hk * form.D, generator=g).to(form.dtype))

    def make(f=form):
        return (sr.SliceRopeQK(f) if block == "qk" else SliceAttention(f)).eval()

    row = {"block": block, "case": name, "tokens": f"{batch}x({rotated}+{form.plain})", "heads": form.H}
    with torch.no_grad():
        ref_dtype = reference_dtype(block)
        ref64 = make(dataclasses.replace(form, dtype=ref_dtype)).cuda()(*[t.cuda().to(ref_dtype) for t in inputs])
        args = [t.cuda() for t in inputs]
        row["eager err"] = max_err(make().cuda()(*args), ref64)
        return compare(row, make, args, ref64, "norm_slice_rope")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    ap.add_argument("--blocks", default="qk,attention")
    a = ap.parse_args()
    rows = [run(b, *c) for b in a.blocks.split(",") for c in CASES]
    cols = ["block", "case", "tokens", "heads", "fused sites", "inductor us", "qkfuse us", "speedup", "eager err",
            "inductor err", "qkfuse err"]
    write_table(rows, cols, a.out, "slice")


if __name__ == "__main__":
    main()
