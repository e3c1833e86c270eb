"""RoPE first, then a per-head norm (the rope_norm family: Llama4, HunYuan) on the GPU: Inductor
alone against the pass with kernels="triton", by device time. kernels="auto" leaves this family to
Inductor on CUDA until this benchmark says it wins (qkfuse/kernels/policy.py).

    python benchmarks/bench_rope_norm.py [--out DIR] [--blocks qk,attention] [--only llama4]

Two spellings at the models' attention shapes (bf16, heads of 128), prefill token counts:
- Llama4 (Scout): 40 q / 8 kv heads, the complex RoPE on [B, S, H, D], then the weightless L2Norm;
- HunYuan (dense 7B): 32 q / 8 kv heads, HF's neox RoPE on [B, H, S, D], then the RMSNorm with weight.
Blocks: ``qk`` (tests/patterns/test_rope_norm.py's RopeNormQK alone) and ``attention`` (then SDPA
with a v of k's shape, GQA expanded as HF's repeat_kv does). Device time: CUDA-graph replay of one
call (median of 3 x do_bench_cudagraph). Correctness: max error against the float64 module (float32
once SDPA follows: block_bench.reference_dtype), next to the unfused eager one's.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from benchmarks.block_bench import compare, max_err, reference_dtype, write_table  # noqa: E402
from tests.patterns import test_rope_norm as rn  # noqa: E402

LLAMA4 = dataclasses.replace(rn.LLAMA4, H=40, Hk=8, D=128, B=1)
HUNYUAN = dataclasses.replace(rn.HUNYUAN, H=32, Hk=8, D=128, B=1)
CASES = [  # name, form, batch, tokens
    ("llama4 1x4096", LLAMA4, 1, 4096),
    ("llama4 1x16384", LLAMA4, 1, 16384),
    ("llama4 8x512", LLAMA4, 8, 512),
    ("hunyuan 1x4096", HUNYUAN, 1, 4096),
    ("hunyuan 1x16384", HUNYUAN, 1, 16384),
    ("hunyuan 8x512", HUNYUAN, 8, 512),
]


class RopeNormAttention(torch.nn.Module):
    def __init__(self, f, seed=0):
        super().__init__()
        self.qk = rn.RopeNormQK(f, seed)
        self.f = f

    def forward(self, q, k, cos, sin, v):
        q, k = self.qk(q, k, cos, sin)  # [B, H, S, D] in either layout
        v = v.unflatten(-1, (self.f.Hk, -1)).transpose(1, 2)
        rep = self.f.H // self.f.Hk
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


def run(block, name, base, batch, tokens):
    form = dataclasses.replace(base, B=batch, S=tokens)
    inputs = list(rn.make_inputs(form, 7))
    if block == "attention":
        g = torch.Generator().manual_seed(8)
        inputs.append(torch.randn(batch, tokens, form.Hk * form.D, generator=g).to(form.dtype))

    def make(f=form):
        return (rn.RopeNormQK(f) if block == "qk" else RopeNormAttention(f)).eval()

    row = {"block": block, "case": name, "tokens": f"{batch}x{tokens}", "heads": f"{form.H}/{form.Hk}"}
    with torch.no_grad():
        ref_dtype = reference_dtype(block)
        ref64 = make(dataclasses.replace(form, dtype=ref_dtype)).cuda()(*[t.cuda().to(ref_dtype) for t in inputs])
        args = [t.cuda() for t in inputs]
        row["eager err"] = max_err(make().cuda()(*args), ref64)
        return compare(row, make, args, ref64, "rope_norm")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    ap.add_argument("--blocks", default="qk,attention")
    ap.add_argument("--only", default="", help="cases whose name starts with this (llama4, hunyuan)")
    a = ap.parse_args()
    rows = [run(b, *c) for b in a.blocks.split(",") for c in CASES if c[0].startswith(a.only)]
    cols = ["block", "case", "tokens", "heads", "fused sites", "inductor us", "qkfuse us", "speedup",
            "eager err", "inductor err", "qkfuse err"]
    write_table(rows, cols, a.out, "rope_norm")


if __name__ == "__main__":
    main()
