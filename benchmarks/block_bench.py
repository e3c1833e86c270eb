"""What the block benchmarks (bench_concat, bench_slice, bench_rope_norm, bench_deinterleave) share:
Inductor against the pass on one module, by device time, and their markdown/JSON table."""

from __future__ import annotations

import json
import os

import torch

import qkfuse

HEADER = ("GPU: {gpu}, torch {torch}, bf16, device time (CUDA-graph replay, median of 3 x do_bench_cudagraph)"
          "; qkfuse with kernels='triton'")


def reference_dtype(block: str) -> torch.dtype:
    """The dtype of the module the errors are taken against: float64 for the qk block; float32 once
    SDPA follows, since float64 SDPA runs the math kernel, which materializes the S x S scores
    (195 GiB at 32k tokens), and float32's memory-efficient kernel is within ~1e-6 of it, far below
    bfloat16's rounding."""
    return torch.float64 if block == "qk" else torch.float32


def device_us(fn, args):
    from triton.testing import do_bench_cudagraph

    return min(do_bench_cudagraph(lambda: fn(*args), rep=200, return_mode="median") for _ in range(3)) * 1e3


def _tuple(out):
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def max_err(outs, refs) -> float:
    return max(float((o.double() - r.double()).abs().max()) for o, r in zip(_tuple(outs), _tuple(refs)))


def compare(row: dict, make, args, ref64, family: str, options: dict | None = None) -> dict:
    """Fill `row` with each variant's error against `ref64`, its device time, the sites of `family`
    fused and the speed-up: `make()` compiled by Inductor alone, then with the qkfuse pass
    (kernels="triton" and `options`)."""
    from torch._dynamo.utils import counters

    for variant, opts in (("inductor", None), ("qkfuse", {"qkfuse.kernels": "triton", **(options or {})})):
        torch._dynamo.reset()
        counters.clear()
        backend = "inductor" if opts is None else qkfuse.qkfuse_backend
        fn = torch.compile(make().cuda(), backend=backend, options=opts)
        out = fn(*args)
        torch.cuda.synchronize()
        row[f"{variant} err"] = max_err(out, ref64)
        if opts is not None:
            row["fused sites"] = counters["qkfuse"].get(f"{family}_sites", 0)
        row[f"{variant} us"] = device_us(fn, args)
    row["speedup"] = row["inductor us"] / row["qkfuse us"]
    print(row, flush=True)
    return row


def write_table(rows: list[dict], cols: list[str], out_dir: str, name: str, json_too: bool = True) -> str:
    """The rows as a markdown table under HEADER, printed and written to <out_dir>/<name>.md (and .json)."""
    lines = [HEADER.format(gpu=torch.cuda.get_device_name(), torch=torch.__version__), "",
             "| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write(text + "\n")
    if json_too:
        with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
            json.dump(rows, f, indent=1)
    return text
