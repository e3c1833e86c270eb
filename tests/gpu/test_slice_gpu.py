"""RoPE on a slice of a norm output's rows (norm_slice_rope: HunyuanVideo's cat, CogView4's slice
assignment) on CUDA with kernels='triton': the compiled code is one launch of our kernel per part
(rotated rows, pass-through rows), each reading its rows of the one input and writing its rows of
the outputs, and nothing else (no norm, cat, slice_scatter or copy kernel); equal to the unfused
module within bfloat16's rounding of the float64 result.

    python -m pytest -q -m gpu tests/gpu
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch._dynamo.utils import counters

import qkfuse
from tests.gpu.test_decode_codegen_gpu import launches
from tests.patterns import test_norm_slice_rope as sr

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

CASES = {  # the models' heads of 128, a few hundred image tokens after or before the text ones
    "hunyuan_video": dataclasses.replace(sr.HUNYUAN, rotated=320, plain=64, H=24, Hk=24, D=128, B=1),
    "cogview4": dataclasses.replace(sr.COGVIEW, rotated=256, plain=48, H=32, Hk=32, D=128, B=2),
    "assign_head_gqa": dataclasses.replace(sr.COGVIEW, spelling="assign_head", norm="rms", weight=True,
                                           rotated=100, plain=28, H=8, Hk=2, D=64, B=2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_slice_parts_are_one_launch_each_and_match(case):
    from torch._inductor.utils import run_and_get_code

    form = CASES[case]
    inputs = sr.make_inputs(form, 3)
    with torch.no_grad():
        ref64 = sr.SliceRopeQK(dataclasses.replace(form, dtype=torch.float64))(*(t.double() for t in inputs))
        module = sr.SliceRopeQK(form).eval().cuda()
        args = [t.cuda() for t in inputs]
        eager = module(*args)
        torch._dynamo.reset()
        counters.clear()
        with torch._inductor.config.patch(fx_graph_cache=False):
            fused, codes = run_and_get_code(torch.compile(module, backend=qkfuse.qkfuse_backend, fullgraph=True,
                                                          options={"qkfuse.kernels": "triton"}), *args)
    assert counters["qkfuse"]["norm_slice_rope_calls"] == 1, dict(counters["qkfuse"])
    kernels = launches("\n".join(codes))
    assert len(kernels) == 2 and all("qk_norm_rope" in k for k in kernels), kernels
    for e, f, r in zip(eager, fused, ref64):
        assert f.shape == e.shape and f.dtype == e.dtype
        r = r.float()
        eager_err = float((e.float().cpu() - r).abs().max())
        fused_err = float((f.float().cpu() - r).abs().max())
        # bfloat16: the eager module rounds at each step; the fused kernel once, in float32
        assert fused_err <= max(eager_err, 2 ** -7 * float(r.abs().max())), (case, fused_err, eager_err)
