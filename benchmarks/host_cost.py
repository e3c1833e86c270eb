"""Python host cost of qkfuse's eager CUDA path, measurable on any machine (no GPU needed).

    python benchmarks/host_cost.py [--profile]

The Triton launch is replaced by a stub and the direct-kernel test forced, so what is timed is the
Python that runs on the host before every eager launch: ``qkfuse.qk_norm_rope`` (checks, recipe,
dispatch) and ``triton_norm_rope.launch`` (layout plan, outputs, arguments). Decode shape: 64 tokens,
32/8 heads, head_dim 128, bf16. The real per-call cost adds Triton's own launch (on the H200 host,
tens of microseconds: benchmarks/bench_eager_op.py measures it end to end on the GPU).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import qkfuse  # noqa: E402
from qkfuse import functional  # noqa: E402
from qkfuse.kernels import triton_norm_rope as tk  # noqa: E402
from qkfuse.ops.recipe import Recipe  # noqa: E402


class _StubKernel:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def per_call_us(fn, calls=3000) -> float:
    for _ in range(200):
        fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", action="store_true")
    a = ap.parse_args()
    tk.qk_norm_rope_kernel = _StubKernel()
    functional._direct_kernel = lambda q: True
    T, Hq, Hk, D = 64, 32, 8, 128
    q = torch.randn(1, T, Hq, D, dtype=torch.bfloat16)
    k = torch.randn(1, T, Hk, D, dtype=torch.bfloat16)
    cos, sin = torch.randn(1, T, D, dtype=torch.bfloat16), torch.randn(1, T, D, dtype=torch.bfloat16)
    qw, kw = torch.randn(D, dtype=torch.bfloat16), torch.randn(D, dtype=torch.bfloat16)
    recipe = Recipe("rms", 0.0, True, torch.bfloat16, torch.bfloat16, torch.bfloat16, D, False)
    c4, s4 = cos.unsqueeze(2), sin.unsqueeze(2)
    with torch.no_grad():
        api = per_call_us(lambda: qkfuse.qk_norm_rope(q, k, qw, kw, cos, sin))
        launch = per_call_us(lambda: tk.launch(q, k, qw, kw, c4, s4, 1e-6, 1e-6, recipe))
        print(f"torch {torch.__version__}: qkfuse.qk_norm_rope {api:.1f} us/call, "
              f"triton_norm_rope.launch {launch:.1f} us/call (Python only, launch stubbed)")
        if a.profile:
            cProfile.runctx("for _ in range(2000): qkfuse.qk_norm_rope(q, k, qw, kw, cos, sin)", globals(),
                            dict(q=q, k=k, qw=qw, kw=kw, cos=cos, sin=sin, qkfuse=qkfuse), "/tmp/host_cost.prof")
            pstats.Stats("/tmp/host_cost.prof").sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
