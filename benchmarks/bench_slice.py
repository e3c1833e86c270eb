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
Correctness: each output's max error against the float64 module, next to the unfused eager one's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import qkfuse  # noqa: E402
from benchmarks.bench_concat import device_us  # noqa: E402
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
    from torch._dynamo.utils import counters

    form = dataclasses.replace(base, rotated=rotated, B=batch)
    inputs = list(sr.make_inputs(form, 7))
    if block == "attention":
        g = torch.Generator().manual_seed(8)
        inputs.append(torch.randn(batch, rotated + form.plain, form.Hk * form.D, generator=g).to(form.dtype))

    def make(f=form):
        return (sr.SliceRopeQK(f) if block == "qk" else SliceAttention(f)).eval()

    row = {"block": block, "case": name, "tokens": f"{batch}x({rotated}+{form.plain})", "heads": form.H}
    with torch.no_grad():
        ref64 = make(dataclasses.replace(form, dtype=torch.float64)).cuda()(*[t.cuda().double() for t in inputs])
        ref64 = ref64 if isinstance(ref64, tuple) else (ref64,)
        args = [t.cuda() for t in inputs]
        eager = make().cuda()(*args)
        eager = eager if isinstance(eager, tuple) else (eager,)
        row["eager err"] = max(float((e.double() - r).abs().max()) for e, r in zip(eager, ref64))
        for variant, options in (("inductor", None), ("qkfuse", {"qkfuse.kernels": "triton"})):
            torch._dynamo.reset()
            counters.clear()
            backend = "inductor" if options is None else qkfuse.qkfuse_backend
            fn = torch.compile(make().cuda(), backend=backend, options=options)
            out = fn(*args)
            out = out if isinstance(out, tuple) else (out,)
            torch.cuda.synchronize()
            row[f"{variant} err"] = max(float((o.double() - r).abs().max()) for o, r in zip(out, ref64))
            if options is not None:
                row["fused sites"] = counters["qkfuse"].get("norm_slice_rope_sites", 0)
            row[f"{variant} us"] = device_us(fn, args)
    row["speedup"] = row["inductor us"] / row["qkfuse us"]
    print(row, flush=True)
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    ap.add_argument("--blocks", default="qk,attention")
    a = ap.parse_args()
    rows = [run(b, *c) for b in a.blocks.split(",") for c in CASES]
    cols = ["block", "case", "tokens", "heads", "fused sites", "inductor us", "qkfuse us", "speedup", "eager err",
            "inductor err", "qkfuse err"]
    lines = [f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, device time "
             "(CUDA-graph replay, median of 3 x do_bench_cudagraph); qkfuse with kernels='triton'", "",
             "| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(a.out, "slice.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(a.out, "slice.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
