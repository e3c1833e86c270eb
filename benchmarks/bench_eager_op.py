"""Host cost of one eager call of the fused op, per entry point (CUDA).

    python benchmarks/bench_eager_op.py [--out results.json] [--iters 2000] [--tokens 64]

Variants, all on the same inputs (decode-sized: 64 tokens, 32 q / 8 kv heads, head_dim 128,
bf16, vLLM layout q [T, H, D]):

- ``qkfuse.qk_norm_rope``: the functional API (checks, then the Triton launcher directly);
- ``... (cos_sin_cache)``: the same with a float32 cos|sin cache and positions (plus the range
  check: one reduction and one device sync);
- ``torch.ops.qkfuse.qk_norm_rope``: the custom op through the dispatcher;
- ``tk.launch``: the raw Triton launcher, recipe and layout prepared (the floor of a Python launch);
- ``eager torch (unfused)``: HF Qwen3's RMSNorm and rotate_half RoPE, op by op.

Outputs are checked against the reference first. Per variant, the median over ``--iters`` calls
of: ``host`` (time until the call returns: what a host-bound decode step pays) and ``wall``
(call + torch.cuda.synchronize()), plus ``back-to-back`` (N calls, one sync, divided by N).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import qkfuse  # noqa: E402
from qkfuse.kernels import triton_norm_rope as tk  # noqa: E402
from qkfuse.kernels.reference import norm_rope_reference  # noqa: E402
from qkfuse.ops.recipe import Recipe  # noqa: E402


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def eager_qwen3(q, k, qw, kw, cos, sin, eps=1e-6):
    """Qwen3RMSNorm then apply_rotary_pos_emb, unfused (cos/sin [T, 1, D])."""
    def norm(x, w):
        xf = x.float()
        return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

    q, k = norm(q, qw), norm(k, kw)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def time_calls(fn, iters: int, warmup: int = 50) -> dict:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    host, wall = [], []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        host.append(t1 - t0)
        wall.append(t2 - t0)
    n = max(iters // 10, 10)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    back = (time.perf_counter() - t0) / n
    us = 1e6
    return dict(host_us=statistics.median(host) * us, wall_us=statistics.median(wall) * us,
                back_to_back_us=back * us, host_p90_us=sorted(host)[int(0.9 * len(host))] * us)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--q-heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs CUDA", file=sys.stderr)
        return 2

    T, Hq, Hk, D, dt = args.tokens, args.q_heads, args.kv_heads, args.head_dim, torch.bfloat16
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(T, Hq, D, device="cuda", generator=g).to(dt)
    k = torch.randn(T, Hk, D, device="cuda", generator=g).to(dt)
    qw = (1 + 0.3 * torch.randn(D, device="cuda", generator=g)).to(dt)
    kw = (1 + 0.3 * torch.randn(D, device="cuda", generator=g)).to(dt)
    positions = torch.randint(0, 4096, (T,), device="cuda", generator=g)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, D, 2, device="cuda", dtype=torch.float32) / D))
    freqs = torch.arange(4096, device="cuda", dtype=torch.float32)[:, None] * inv_freq
    cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1)  # vLLM: [max_position, D], float32
    emb = torch.cat((freqs, freqs), dim=-1)[positions]
    cos, sin = emb.cos().to(dt), emb.sin().to(dt)  # HF: [T, D] in the model dtype
    cos3, sin3 = cos[:, None], sin[:, None]
    recipe = Recipe("rms", 0.0, True, dt, dt, dt, D, False)
    op_args = recipe.op_args()

    cached_cos = torch.cat((freqs.cos(), freqs.cos()), dim=-1)[positions][:, None]  # float32 rows
    cached_sin = torch.cat((freqs.sin(), freqs.sin()), dim=-1)[positions][:, None]
    cached_recipe = Recipe("rms", 0.0, True, dt, torch.float32, dt, D, False)  # float32 cache: float32 RoPE

    def reference(c, s, r):
        return norm_rope_reference(q, qw, c, s, 1e-6, r), norm_rope_reference(k, kw, c, s, 1e-6, r)

    hf = reference(cos3, sin3, recipe)
    variants = {  # name: (call, its reference)
        "qkfuse.qk_norm_rope": (lambda: qkfuse.qk_norm_rope(q, k, qw, kw, cos, sin), hf),
        "qkfuse.qk_norm_rope (cos_sin_cache)": (
            lambda: qkfuse.qk_norm_rope(q, k, qw, kw, cos_sin_cache=cache, positions=positions),
            reference(cached_cos, cached_sin, cached_recipe)),
        "torch.ops.qkfuse.qk_norm_rope": (lambda: torch.ops.qkfuse.qk_norm_rope(
            q, k, qw, kw, cos3, sin3, 1e-6, 1e-6, None, None, *op_args), hf),
        "tk.launch": (lambda: tk.launch(q, k, qw, kw, cos3, sin3, 1e-6, 1e-6, recipe), hf),
        "eager torch (unfused)": (lambda: eager_qwen3(q, k, qw, kw, cos3, sin3), hf),
    }

    # Correctness first: every variant within 4 bf16 units of its reference at the tensor's scale.
    ok = True
    with torch.inference_mode():
        for name, (fn, ref) in variants.items():
            for o, r in zip(fn(), ref):
                err = ((o.double() - r.double()).abs().max() / r.double().abs().max()).item()
                if not err <= 4 * 2.0**-8:
                    print(f"MISMATCH {name}: {err:.3g} of the tensor's max", file=sys.stderr)
                    ok = False

    rows = {}
    with torch.inference_mode():
        for name, (fn, _) in variants.items():
            rows[name] = time_calls(fn, args.iters)

    print(f"\n{T} tokens, {Hq}/{Hk} heads, head_dim {D}, bf16 ({torch.cuda.get_device_name()}, "
          f"torch {torch.__version__}); median of {args.iters} calls, us")
    print(f"| {'variant':38} | host | host p90 | wall | back-to-back |")
    print(f"| {'-' * 38} | ---: | ---: | ---: | ---: |")
    for name, r in rows.items():
        print(f"| {name:38} | {r['host_us']:.1f} | {r['host_p90_us']:.1f} | {r['wall_us']:.1f} | "
              f"{r['back_to_back_us']:.1f} |")
    if args.out:
        import triton

        env = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                   cuda=torch.version.cuda, python=platform.python_version())
        shape = dict(tokens=T, q_heads=Hq, kv_heads=Hk, head_dim=D, dtype="bfloat16", iters=args.iters)
        with open(args.out, "w") as f:
            json.dump(dict(env=env, shape=shape, correct=ok, results=rows), f, indent=2)
        print(f"wrote {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
