"""Good and bad calls of the functional API on CUDA, for compute-sanitizer.

    compute-sanitizer --tool memcheck python benchmarks/sanitize_functional.py

Good calls (odd head_dims, partial-rotary tails, token counts off the tile sizes, GQA, transposed
views, strided qkv slices, cached positions at both ends of the cache, no tokens) are checked
against the reference; bad calls (positions out of range, shapes that do not fit) must raise
before any launch. Exit status 1 on a wrong result or a missing error; memcheck reports any
out-of-bounds access. The CUDA caching allocator is switched off so that memcheck sees every
allocation's bounds (an overrun inside a cached block is otherwise invisible).
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("PYTORCH_NO_CUDA_MEMORY_CACHING", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import qkfuse  # noqa: E402
from qkfuse.kernels.reference import cos_sin_from_cache, norm_rope_reference  # noqa: E402
from qkfuse.ops.recipe import Recipe  # noqa: E402

FAILURES: list[str] = []
DEV = "cuda"


def _check(name, outs, xs, ws, cos, sin, recipe, units=4):
    for out, x, w in zip(outs, xs, ws):
        ref = norm_rope_reference(x, w, cos, sin, 1e-6, recipe)
        if out.shape != ref.shape or out.dtype != ref.dtype:
            FAILURES.append(f"{name}: {tuple(out.shape)} {out.dtype} != {tuple(ref.shape)} {ref.dtype}")
            continue
        if not ref.numel():
            continue
        o, r = out.double(), ref.double()
        tol = units * 2.0**-8 * max(r.abs().max().item(), 1.0)  # bf16 units: loose for f32/f16 too
        err = (o - r).abs().max().item()
        if not err <= tol:
            FAILURES.append(f"{name}: error {err:.3g} > {tol:.3g}")


def good_calls():
    g = torch.Generator(device=DEV).manual_seed(0)
    n = 0
    for D, rd in ((64, 64), (80, 80), (96, 48), (128, 32), (256, 64), (40, 40), (24, 8), (72, 72)):
        for T in (1, 7, 33, 65):
            for dt in (torch.bfloat16, torch.float32):  # 2- and 4-byte elements
                for interleaved in (False, True):
                    Hq, Hk = 6, 2
                    q = torch.randn(T, Hq, D, device=DEV, generator=g).to(dt)
                    k = torch.randn(T, Hk, D, device=DEV, generator=g).to(dt)
                    qw = (1 + 0.3 * torch.randn(D, device=DEV, generator=g)).to(dt)
                    kw = (1 + 0.3 * torch.randn(D, device=DEV, generator=g)).to(dt)
                    theta = torch.rand(T, rd, device=DEV, generator=g) * 6.3
                    cos, sin = theta.cos().to(dt), theta.sin().to(dt)
                    recipe = Recipe("rms", 0.0, True, dt, dt, dt, rd, interleaved)
                    outs = qkfuse.qk_norm_rope(q, k, qw, kw, cos, sin, interleaved=interleaved)
                    _check(f"tokens D={D} rd={rd} T={T} {dt} il={interleaved}", outs, (q, k), (qw, kw),
                           cos[:, None], sin[:, None], recipe)
                    # the cache form, positions at both ends of the cache
                    P = T + 5
                    angle = torch.rand(P, rd // 2, device=DEV, generator=g) * 6.3
                    cache = torch.cat((angle.cos(), angle.sin()), -1)
                    positions = torch.randint(0, P, (T,), device=DEV, generator=g)
                    positions[0], positions[-1] = 0, P - 1
                    outs = qkfuse.qk_norm_rope(q, k, qw, kw, cos_sin_cache=cache, positions=positions,
                                               interleaved=interleaved)
                    c, s = cos_sin_from_cache(cache, positions[:, None], interleaved)
                    rope32 = Recipe("rms", 0.0, True, dt, torch.float32, dt, rd, interleaved)
                    _check(f"cache D={D} rd={rd} T={T} {dt} il={interleaved}", outs, (q, k), (qw, kw), c, s, rope32)
                    n += 2
    # HF layouts: [B, S, H, D] and its transposed view; strided qkv slices; no tokens
    for B, S in ((2, 9), (1, 1), (3, 0)):
        D = 128
        q = torch.randn(B, S, 32, D, device=DEV, generator=g).bfloat16()
        k = torch.randn(B, S, 8, D, device=DEV, generator=g).bfloat16()
        theta = torch.rand(B, S, D, device=DEV, generator=g) * 6.3
        cos, sin = theta.cos().bfloat16(), theta.sin().bfloat16()
        recipe = Recipe("rms", 0.0, True, torch.bfloat16, torch.bfloat16, torch.bfloat16, D, False)
        outs = qkfuse.qk_norm_rope(q, k, None, None, cos, sin)
        _check(f"bshd B={B} S={S}", outs, (q, k), (None, None), cos[:, :, None], sin[:, :, None], recipe)
        qt, kt = q.transpose(1, 2), k.transpose(1, 2)
        outs = qkfuse.qk_norm_rope(qt, kt, None, None, cos[:, None], sin[:, None])
        _check(f"bhsd B={B} S={S}", outs, (qt, kt), (None, None), cos[:, None], sin[:, None], recipe)
        qkv = torch.randn(B, S, 48 * D, device=DEV, generator=g).bfloat16()
        qs, ks = qkv[..., : 32 * D].view(B, S, 32, D), qkv[..., 32 * D: 40 * D].view(B, S, 8, D)
        outs = qkfuse.qk_norm_rope(qs, ks, None, None, cos, sin)
        _check(f"qkv slices B={B} S={S}", outs, (qs, ks), (None, None), cos[:, :, None], sin[:, :, None], recipe)
        n += 3
    return n


def bad_calls():
    q = torch.randn(5, 4, 64, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(5, 2, 64, device=DEV, dtype=torch.bfloat16)
    w = torch.ones(64, device=DEV, dtype=torch.bfloat16)
    cache = torch.randn(8, 64, device=DEV)
    cos = torch.randn(5, 64, device=DEV, dtype=torch.bfloat16)
    cases = {
        "position -1": lambda: qkfuse.qk_norm_rope(q, k, w, w, cos_sin_cache=cache,
                                                   positions=torch.tensor([0, 1, -1, 2, 3], device=DEV)),
        "position == rows": lambda: qkfuse.qk_norm_rope(q, k, w, w, cos_sin_cache=cache,
                                                        positions=torch.tensor([0, 1, 8, 2, 3], device=DEV)),
        "position far out": lambda: torch.ops.qkfuse.qk_norm_rope_cached(
            q, k, w, w, cache, torch.tensor([[0], [1], [2], [1 << 40], [3]], device=DEV), 1e-6, 1e-6,
            *Recipe("rms", 0.0, True, torch.bfloat16, torch.float32, torch.bfloat16, 64, False).op_args()),
        "weight too short": lambda: qkfuse.qk_norm_rope(q, k, w[:-2], w, cos, cos),
        "cos too short": lambda: qkfuse.qk_norm_rope(q, k, w, w, cos[:3], cos[:3]),
        "rotary_dim > head_dim": lambda: qkfuse.qk_norm_rope(q, k, w, w, torch.randn(5, 66, device=DEV),
                                                             torch.randn(5, 66, device=DEV)),
        "k head_dim": lambda: qkfuse.qk_norm_rope(q, k[..., :32], None, None, cos[:, :32], cos[:, :32]),
        "k on cpu": lambda: qkfuse.qk_norm_rope(q, k.cpu(), None, None, cos, cos),
        "int q": lambda: qkfuse.qk_norm_rope(q.int(), k, None, None, cos, cos),
    }
    for name, fn in cases.items():
        try:
            fn()
        except (ValueError, TypeError) as e:
            if not str(e).startswith("qkfuse: "):
                FAILURES.append(f"{name}: unexpected message {e}")
        else:
            FAILURES.append(f"{name}: no error")
    return len(cases)


def cache_writes() -> int:
    """The KV-cache write mode of the kernel (what the pass splices for HF's StaticCache): k and v rows
    at positions at both ends of the cache, negative ones, and positions past its end (not written)."""
    from qkfuse.kernels import triton_norm_rope as tk

    g = torch.Generator(device=DEV).manual_seed(7)
    n = 0
    for B, S, L, D in ((1, 1, 16, 128), (3, 5, 37, 80), (2, 4, 8, 256)):
        q = torch.randn(B, S, 4, D, device=DEV, generator=g).bfloat16().transpose(1, 2)
        k = torch.randn(B, S, 2, D, device=DEV, generator=g).bfloat16().transpose(1, 2)
        v = torch.randn(B, S, 2, D, device=DEV, generator=g).bfloat16().transpose(1, 2)
        w = torch.randn(D, device=DEV, generator=g).bfloat16()
        cos = torch.randn(B, 1, S, D, device=DEV, generator=g).bfloat16()
        recipe = Recipe(norm="rms", cast_before_weight=True, norm_dtype=torch.bfloat16,
                        rope_dtype=torch.bfloat16, out_dtype=torch.bfloat16, rotary_dim=D)
        for index in (torch.arange(L - S, L), torch.arange(S) - S, torch.arange(S) + L - 1):
            kc = torch.randn(B, 2, L, D, device=DEV, generator=g).bfloat16()
            vc = torch.randn(B, 2, L, D, device=DEV, generator=g).bfloat16()
            before_v = vc.clone()
            tk.launch(q, k, w, w, cos, cos, 1e-6, 1e-6, recipe,
                      cache=tk.CacheTarget(kc, index.to(DEV), 2, v, vc))
            wrapped = index % L
            inside = (index >= -L) & (index < L)
            expect = before_v.clone()
            expect[:, :, wrapped[inside]] = v[:, :, inside]
            if not torch.equal(vc, expect):
                FAILURES.append(f"cache write B={B} S={S} L={L} D={D} index={index.tolist()}: v cache differs")
            n += 1
    return n


def main() -> int:
    if not torch.cuda.is_available():
        print("needs CUDA", file=sys.stderr)
        return 2
    n_good = good_calls()
    n_bad = bad_calls()
    n_cache = cache_writes()
    torch.cuda.synchronize()
    for f in FAILURES:
        print("FAIL", f)
    print(f"{n_good} good calls, {n_bad} bad calls, {n_cache} cache writes, {len(FAILURES)} failures")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
