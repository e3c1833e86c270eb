"""Registers, spills and SASS size of the fused kernel for sm_90, compiled here without a GPU
(Triton's front end, then its bundled ptxas and cuobjdump): the rope_first recipe (HunYuan's RoPE
then RMSNorm) against the norm-first one on the same shape, at a few tiles. A kernel body that needs
more registers, spills or many more instructions would show here; equal numbers point elsewhere
(memory access, occupancy, the grid).

    python benchmarks/diag_kernel_resources.py [--out benchmarks/results/<name>.txt]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from qkfuse.kernels import triton_norm_rope as tk  # noqa: E402
from qkfuse.ops.recipe import Recipe  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
TYPES = {torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.float16: "*fp16", torch.int64: "*i64",
         torch.int32: "*i32"}
TILES = [(2, 8, 2), (2, 8, 4), (1, 8, 4), (4, 8, 4)]


class _Capture:
    """Stands in for the kernel in the launcher: keeps the arguments of the launch it is given."""

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.args, self.kwargs = args, kwargs
        return launch


def compile_for_sm90(launch_args) -> "triton.compiler.CompiledKernel":
    args, kwargs = launch_args.args, dict(launch_args.kwargs)
    options = {"num_warps": kwargs.pop("num_warps", 4)}
    if "num_stages" in kwargs:
        options["num_stages"] = kwargs.pop("num_stages")
    fn = tk.qk_norm_rope_kernel
    values = dict(zip([p.name for p in fn.params], args)) | kwargs
    signature, constants = {}, {}
    for p in fn.params:
        v = values[p.name]
        if p.is_constexpr or v is None:
            signature[p.name], constants[p.name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            signature[p.name] = TYPES[v.dtype]
        elif isinstance(v, bool):
            signature[p.name] = "i1"
        elif isinstance(v, int):
            signature[p.name] = "i64" if abs(v) >= 2**31 else "i32"
        else:
            signature[p.name] = "fp32"
    return triton.compile(ASTSource(fn, signature, constants), target=TARGET, options=options)


def resources(kernel) -> str:
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([os.path.join(tools, "cuobjdump"), "--dump-resource-usage", f.name],
                               capture_output=True, text=True).stdout
        sass = subprocess.run([os.path.join(tools, "cuobjdump"), "-sass", f.name], capture_output=True, text=True).stdout
    regs = next((line.strip() for line in usage.splitlines() if "REG:" in line), usage.strip()[:120])
    instructions = sum(1 for line in sass.splitlines() if line.strip().startswith("/*") and ";" in line)
    return f"{' '.join(regs.split()[:4])}, {instructions} SASS instructions"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    S, H, Hk, D, dt = 64, 32, 8, 128, torch.bfloat16  # (the tokens only size the grid)
    q = torch.randn(1, S, H * D).to(dt).view(1, S, H, D).transpose(1, 2)
    k = torch.randn(1, S, Hk * D).to(dt).view(1, S, Hk, D).transpose(1, 2)
    w = torch.ones(D, dtype=dt)
    angle = torch.rand(S, D // 2).repeat(1, 2)
    cos, sin = angle.cos().to(dt)[None, None], angle.sin().to(dt)[None, None]
    rope_first = Recipe(norm="rms", cast_before_weight=True, norm_dtype=dt, rope_dtype=dt, out_dtype=dt, rotary_dim=D,
                        rope_first=True)
    lines = [f"triton {triton.__version__}, target sm_90; HunYuan's q/k: {H}/{Hk} heads of {D}, bf16, [B, H, S, D] views"]
    for name, recipe in (("rope_first", rope_first), ("norm_first", dataclasses.replace(rope_first, rope_first=False))):
        for tile in TILES:
            cap = _Capture()
            tk._launch_full(q, k, w, w, cos, sin, 1e-6, 1e-6, recipe, False, tk.Config(*tile), None, None, None, None,
                            None, None, None, kernel=cap)
            lines.append(f"{name:10s} tile (block_t, block_h, warps) {tile}: {resources(compile_for_sm90(cap))}")
            print(lines[-1], flush=True)
    if a.out:
        with open(a.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
