"""Tile sweep for the norm-across-heads mode of the Triton kernel (OLMo2 / OLMoE / MiniMax-M2), on the GPU.

    python benchmarks/tune_across.py [--out DIR]

For each shape it times the heuristic (``across_config``) and every (BLOCK_T, num_warps) candidate
by CUDA-graph replay (device time), checks the best against the reference, and times Inductor on
the same OLMo2-style function: the numbers behind ``kernels/policy.py``'s across-heads rule.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from qkfuse.kernels import triton_norm_rope as tk  # noqa: E402
from qkfuse.kernels.reference import norm_rope_reference  # noqa: E402
from qkfuse.ops.recipe import Recipe  # noqa: E402

SHAPES = [(64, 32, 32), (4096, 32, 32), (32768, 32, 32), (4096, 16, 16),
          (4096, 48, 8), (32768, 48, 8)]
D = 128
# OLMo2: float32 norm, (w * n) rounded to bf16, RoPE in float32 with float32 cos/sin, out bf16.
RECIPE = Recipe("rms", 0.0, False, torch.bfloat16, torch.float32, torch.bfloat16, D, False, norm_heads_dim=-2)


def olmo2(q, k, qw, kw, cos, sin, hq, hk):
    def norm(x, w):
        xf = x.float()
        return (w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6))).to(x.dtype)

    def rot(x):
        a, b = x.chunk(2, -1)
        return torch.cat((-b, a), -1)

    q = norm(q, qw).view(1, -1, hq, D).transpose(1, 2)
    k = norm(k, kw).view(1, -1, hk, D).transpose(1, 2)
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    qf, kf = q.float(), k.float()
    return (qf * c + rot(qf) * s).to(q.dtype), (kf * c + rot(kf) * s).to(k.dtype)


def candidates(hq, hk):
    row = tk._next_pow2(max(hq, hk)) * D
    for bt, w in itertools.product([1, 2, 4], [2, 4, 8, 16]):
        per_thread = bt * row // (32 * w)
        if 8 <= per_thread <= 256:
            yield tk.Config(bt, 0, w)


def main():
    from triton.testing import do_bench_cudagraph

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    a = ap.parse_args()
    torch._inductor.config.fx_graph_cache = False
    rows = []
    for T, hq, hk in SHAPES:
        g = torch.Generator(device="cuda").manual_seed(T + hq)
        r = lambda *s, dt=torch.bfloat16: torch.randn(*s, device="cuda", dtype=dt, generator=g)  # noqa: E731
        q2, k2 = r(1, T, hq * D), r(1, T, hk * D)
        qw, kw = r(hq * D) * 0.5 + 1, r(hk * D) * 0.5 + 1
        ang = torch.rand(1, T, D // 2, device="cuda", generator=g) * 6.28
        cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
        q4, k4 = q2.view(1, T, hq, D), k2.view(1, T, hk, D)
        cos4, sin4 = cos.unsqueeze(2), sin.unsqueeze(2)  # broadcast over the heads (dim -2)

        def ours(cfg):
            return lambda: tk.launch(q4, k4, qw, kw, cos4, sin4, 1e-6, 1e-6, RECIPE, config=cfg)

        times = {}
        heuristic = tk.across_config(T, hq, hk, D, None)
        for cfg in [heuristic, *candidates(hq, hk)]:
            if cfg in times:
                continue
            try:
                ours(cfg)()
                times[cfg] = do_bench_cudagraph(ours(cfg), rep=40, return_mode="median") * 1e3
            except Exception as e:  # registers / shared memory
                print(f"  skip {cfg}: {type(e).__name__}", flush=True)
        best = min(times, key=times.get)
        t_best = do_bench_cudagraph(ours(best), rep=150, return_mode="median") * 1e3
        t_heur = do_bench_cudagraph(ours(heuristic), rep=150, return_mode="median") * 1e3
        qo, ko = ours(best)()
        rq = norm_rope_reference(q4, qw, cos4, sin4, 1e-6, RECIPE)
        eq, _ = olmo2(q2, k2, qw, kw, cos, sin, hq, hk)
        err = float((qo.float() - rq.float()).abs().max() / rq.float().abs().max())
        err_eager = float((qo.float() - eq.transpose(1, 2).float()).abs().max() / eq.float().abs().max())
        compiled = torch.compile(lambda *x: olmo2(*x, hq, hk))
        args = (q2, k2, qw, kw, cos, sin)
        compiled(*args)
        t_ind = do_bench_cudagraph(lambda: compiled(*args), rep=150, return_mode="median") * 1e3
        row = dict(tokens=T, hq=hq, hk=hk, best=[best.block_t, best.num_warps], best_us=round(t_best, 2),
                   heuristic=[heuristic.block_t, heuristic.num_warps], heuristic_us=round(t_heur, 2), inductor_us=round(t_ind, 2),
                   speedup_best=round(t_ind / t_best, 3), speedup_heuristic=round(t_ind / t_heur, 3),
                   err_vs_reference=err, err_vs_eager=err_eager)
        rows.append(row)
        print(json.dumps(row), flush=True)
    with open(os.path.join(a.out, "tune-across.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)
    print("| tokens | q/kv heads | heuristic (bt, warps) us | best (bt, warps) us | Inductor us | x ind (heur / best) |")
    print("|---:|---|---|---|---:|---|")
    for r in rows:
        print(f"| {r['tokens']} | {r['hq']}/{r['hk']} | {tuple(r['heuristic'])} {r['heuristic_us']} | "
              f"{tuple(r['best'])} {r['best_us']} | {r['inductor_us']} | {r['speedup_heuristic']} / {r['speedup_best']} |")


if __name__ == "__main__":
    main()
