"""DeepSeek's de-interleaved RoPE (Recipe.deinterleave_input) on the GPU: Inductor alone against the
pass with kernels="triton" (what kernels="auto" picks since this benchmark ran), by device time.

    python benchmarks/bench_deinterleave.py [--out DIR]

The block is DeepSeek-V3's attention up to its RoPE, both spellings of apply_rotary_pos_emb_interleave
(tests/patterns/test_deinterleaved_rope.py): q from its projection viewed per head and split into
q_pass / q_rot, k_rot one head of the compressed projection, the RoPE, and q's cat back. What Inductor
alone generates for it fuses the RoPE into that cat; the fused call writes q_rot, which the cat then
copies. Device time: CUDA-graph replay of one call (triton.testing.do_bench_cudagraph, median).
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
from tests.patterns import test_deinterleaved_rope as ds  # noqa: E402

# DeepSeek-V3: 128 heads of qk_nope_head_dim 128 + qk_rope_head_dim 64, kv_lora_rank 512
V3 = dataclasses.replace(ds.DEEPSEEK, nope=128, rope_dim=64, rd=64, B=1, H=128, lora=512)
CASES = [("decode 64", 64, 128), ("prefill 4k", 4096, 128), ("prefill 8k", 8192, 128),
         ("prefill 4k, 16 heads", 4096, 16)]


def run(spelling, name, tokens, heads):
    form = dataclasses.replace(V3, spelling=spelling, S=tokens, H=heads)
    inputs = ds.make_inputs(form, 7)
    row = {"spelling": spelling, "case": name}
    with torch.no_grad():
        ref64 = [r.cuda() for r in ds.DeepseekRope(form)(*[t.cuda() for t in ds.make_inputs(form, 7, torch.float64)])]
        args = [t.cuda() for t in inputs]
        row["eager err"] = max_err(ds.DeepseekRope(form)(*args), ref64)
        return compare(row, lambda: ds.DeepseekRope(form), args, ref64, "rope", {"qkfuse.families": "rope"})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    a = ap.parse_args()
    rows = [run(s, *c) for s in sorted(ds.SPELLINGS) for c in CASES]
    cols = ["spelling", "case", "fused sites", "inductor us", "qkfuse us", "speedup", "eager err", "inductor err",
            "qkfuse err"]
    write_table(rows, cols, a.out, "deinterleave", json_too=False)


if __name__ == "__main__":
    main()
