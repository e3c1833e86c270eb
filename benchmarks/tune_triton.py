"""Offline tuning of the Triton kernel's tile shape per shape bucket (run on the GPU).

    python benchmarks/tune_triton.py [--out qkfuse/kernels/triton_configs.json] [--quick]

For each representative shape it times every candidate (BLOCK_T, BLOCK_H, num_warps) with CUDA
graph replay (device time), keeps the fastest, checks it against the reference, and writes the
table that ``triton_norm_rope.choose_config`` reads. The key is the shape bucket
``d<head_dim pow2>_t<token bucket>_h<(q+k heads) pow2>``.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from qkfuse.kernels import triton_norm_rope as tk  # noqa: E402
from qkfuse.kernels.reference import norm_rope_reference  # noqa: E402
from qkfuse.ops.recipe import Recipe  # noqa: E402

TOKENS = [64, 1024, 4096, 32768]
HEAD_DIMS = [64, 128, 256]
HEADS = [(32, 8), (16, 16)]
BT = [1, 2, 4, 8]
BH = [2, 4, 8, 16, 32]
WARPS = [1, 2, 4, 8]


def candidates(D, Hq, Hk):
    d_pad = tk._next_pow2(D)
    for bt, bh, w in itertools.product(BT, BH, WARPS):
        elems = bt * bh * d_pad
        if bh > tk._next_pow2(max(Hq, Hk)) or not 1024 <= elems <= 8192:
            continue
        if not 16 <= elems // (32 * w) <= 128:  # elements per thread
            continue
        yield tk.Config(bt, bh, w)


def inputs(T, Hq, Hk, D, dt=torch.bfloat16):
    q = torch.randn(1, T, Hq, D, device="cuda", dtype=dt).transpose(1, 2)
    k = torch.randn(1, T, Hk, D, device="cuda", dtype=dt).transpose(1, 2)
    cos = torch.randn(1, 1, T, D, device="cuda", dtype=dt)
    sin = torch.randn(1, 1, T, D, device="cuda", dtype=dt)
    qw, kw = torch.randn(D, device="cuda", dtype=dt), torch.randn(D, device="cuda", dtype=dt)
    return q, k, qw, kw, cos, sin


def write_table(path, table, measured):
    """Written after every shape: a run stopped at its time limit keeps what it measured."""
    import triton

    doc = {
        "device": torch.cuda.get_device_properties(0).name,
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "note": "written by benchmarks/tune_triton.py; bf16, Qwen3 layout, device time (CUDA graph replay)",
        "table": table,
        "measured": measured,
    }
    for out in [path] + ([os.path.join(os.environ["OUT"], "triton_configs.json")] if os.environ.get("OUT") else []):
        with open(out, "w") as f:
            json.dump(doc, f, indent=1, sort_keys=True)


def main():
    from triton.testing import do_bench_cudagraph

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(tk.__file__), "triton_configs.json"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--heads", default="", help="e.g. 40/40,8/8: tune only these head counts, merged into --out")
    ap.add_argument("--tokens", default="")
    ap.add_argument("--dims", default="")
    a = ap.parse_args()
    rec = Recipe("rms", 0.0, True, torch.bfloat16, torch.bfloat16, torch.bfloat16, 0, False)
    table, measured = {}, {}
    heads = [tuple(map(int, h.split("/"))) for h in a.heads.split(",")] if a.heads else HEADS
    tokens = [int(t) for t in a.tokens.split(",")] if a.tokens else TOKENS
    dims = [int(d) for d in a.dims.split(",")] if a.dims else HEAD_DIMS
    if a.heads and os.path.exists(a.out):  # merge into the committed table
        with open(a.out) as f:
            old = json.load(f)
        table, measured = old.get("table", {}), old.get("measured", {})
    shapes = list(itertools.product(tokens, dims, heads))
    if a.quick:
        shapes = shapes[::5]
    for T, D, (Hq, Hk) in shapes:
        r = Recipe(**{**rec.__dict__, "rotary_dim": D})
        q, k, qw, kw, cos, sin = inputs(T, Hq, Hk, D)
        key = tk.bucket_key(T, Hq, Hk, D)
        results = []
        for cfg in candidates(D, Hq, Hk):
            fn = lambda: tk.launch(q, k, qw, kw, cos, sin, 1e-6, 1e-6, r, config=cfg)  # noqa: E731
            try:
                fn()
                t = do_bench_cudagraph(fn, rep=30, return_mode="median") * 1e3
            except Exception as e:  # a config the compiler rejects (registers, shared memory)
                print(f"  skip {cfg}: {type(e).__name__}")
                continue
            results.append((t, cfg))
        results.sort(key=lambda x: x[0])
        finals = []
        for _, cfg in results[:4]:
            fn = lambda: tk.launch(q, k, qw, kw, cos, sin, 1e-6, 1e-6, r, config=cfg)  # noqa: E731
            finals.append((do_bench_cudagraph(fn, rep=150, return_mode="median") * 1e3, cfg))
        finals.sort(key=lambda x: x[0])
        t_best, best = finals[0]
        qo, ko = tk.launch(q, k, qw, kw, cos, sin, 1e-6, 1e-6, r, config=best)
        rq = norm_rope_reference(q, qw, cos, sin, 1e-6, r)
        err = float((qo.float() - rq.float()).abs().max() / rq.float().abs().max())
        assert err < 2 * 2**-8, f"{key} {best}: relative error {err}"
        default = tk.choose_config(T, Hq, Hk, D, use_table=False)
        t_default = do_bench_cudagraph(
            lambda: tk.launch(q, k, qw, kw, cos, sin, 1e-6, 1e-6, r, config=default), rep=150, return_mode="median") * 1e3
        moved = (2 * T * (Hq + Hk) * D + 2 * T * D) * 2
        print(f"{key:22s} T={T:6d} {Hq:2d}/{Hk:2d} D={D:3d}: best {best} {t_best:8.1f} us "
              f"({moved / t_best / 1e3:6.0f} GB/s); heuristic {default} {t_default:8.1f} us", flush=True)
        if key not in table or a.heads or t_best < measured[key]["us"]:
            table[key] = [best.block_t, best.block_h, best.num_warps]
            measured[key] = {"us": round(t_best, 2), "gbps": round(moved / t_best / 1e3, 1),
                             "heuristic_us": round(t_default, 2), "shape": [T, Hq, Hk, D]}
        write_table(a.out, table, measured)
    print(f"wrote {len(table)} buckets to {a.out}")


if __name__ == "__main__":
    main()
