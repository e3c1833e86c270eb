"""RoPE first, then the per-head norm (rope_norm: Llama4's complex RoPE + L2Norm, HunYuan's neox RoPE +
RMSNorm) on CUDA with kernels='triton': the compiled code is one launch of our kernel for q and k and
nothing else; equal to the unfused module within two bfloat16 roundings at the tensor's scale (the CPU
tests' graph_tolerance), and no further from the float64 result than that.

    python -m pytest -q -m gpu tests/gpu
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch._dynamo.utils import counters

import qkfuse
from qkfuse.passes.records import collect
from tests.gpu.test_decode_codegen_gpu import launches
from tests.graph_harness import graph_tolerance, scale_error
from tests.patterns import test_rope_norm as rn

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

CASES = {
    "llama4": dataclasses.replace(rn.LLAMA4, H=40, Hk=8, D=128, B=1, S=300),
    "hunyuan": dataclasses.replace(rn.HUNYUAN, H=32, Hk=8, D=128, B=2, S=77),
    "partial_layer_norm": dataclasses.replace(rn.HUNYUAN, rope="partial", norm="layer", H=8, Hk=2, D=64, B=2, S=33),
}


@pytest.mark.parametrize("case", list(CASES))
def test_rope_then_norm_is_one_launch_and_matches(case):
    from torch._inductor.utils import run_and_get_code

    form = CASES[case]
    inputs = rn.make_inputs(form, 3)
    with torch.no_grad():
        ref64 = rn.RopeNormQK(dataclasses.replace(form, dtype=torch.float64))(*(t.double() for t in inputs))
        module = rn.RopeNormQK(form).eval().cuda()
        args = [t.cuda() for t in inputs]
        eager = module(*args)
        torch._dynamo.reset()
        counters.clear()
        with torch._inductor.config.patch(fx_graph_cache=False), collect() as records:
            fused, codes = run_and_get_code(torch.compile(module, backend=qkfuse.qkfuse_backend, fullgraph=True,
                                                          options={"qkfuse.kernels": "triton"}), *args)
    assert counters["qkfuse"]["rope_norm_calls"] == 1, (dict(counters["qkfuse"]), [r.reason for r in records])
    kernels = launches("\n".join(codes))
    assert len(kernels) == 1 and "qk_norm_rope" in kernels[0], kernels
    tol = graph_tolerance(form.dtype)  # the CPU tests' contract: the unfused graph's result within 2 roundings
    for e, f, r in zip(eager, fused, ref64):
        assert f.shape == e.shape and f.dtype == e.dtype
        assert scale_error(f.cpu(), e.cpu()) <= tol, (case, scale_error(f.cpu(), e.cpu()))
        r = r.float()
        eager_err = float((e.float().cpu() - r).abs().max())
        fused_err = float((f.float().cpu() - r).abs().max())
        # no further from float64 than the unfused module, but for those two roundings at the tensor's
        # scale (the norm after RoPE scales the RoPE's bfloat16 rounding by rsqrt(mean(x^2)) * weight)
        assert fused_err <= eager_err + tol * float(r.abs().max()), (case, fused_err, eager_err)
