"""Norms concatenated before the RoPE (norm_cat_rope: Flux's double-stream blocks) on CUDA with
kernels='triton': the compiled code is one launch of our kernel per part (text, image), each writing
q's and k's rows of the joined outputs in place, and nothing else (no norm, cat or copy kernel);
equal to the unfused module within bfloat16's rounding of the float64 result.

    python -m pytest -q -m gpu tests/gpu
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch._dynamo.utils import counters

import qkfuse
from tests.gpu.test_decode_codegen_gpu import launches
from tests.patterns import test_concat_norm_rope as cr

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

# Flux.1's heads (24 x 128), 64 text + 256 image tokens; a three-part form with a weightless norm
CASES = {
    "flux": dataclasses.replace(cr.FLUX, lengths=(64, 256), H=24, Hk=24, D=128, B=1),
    "three_parts_bhsd": dataclasses.replace(cr.FLUX, lengths=(16, 40, 8), layout="bhsd", rope="neox",
                                            weights=(True, False, True), H=8, Hk=2, D=64, B=2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_concatenated_parts_are_one_launch_each_and_match(case):
    from torch._inductor.utils import run_and_get_code

    form = CASES[case]
    inputs = cr.make_inputs(form, 3)
    with torch.no_grad():
        ref64 = cr.JointQK(dataclasses.replace(form, dtype=torch.float64))(*(t.double() for t in inputs))
        module = cr.JointQK(form).eval().cuda()
        args = [t.cuda() for t in inputs]
        eager = module(*args)
        torch._dynamo.reset()
        counters.clear()
        with torch._inductor.config.patch(fx_graph_cache=False):
            fused, codes = run_and_get_code(torch.compile(module, backend=qkfuse.qkfuse_backend, fullgraph=True,
                                                          options={"qkfuse.kernels": "triton"}), *args)
    assert counters["qkfuse"]["norm_cat_rope_calls"] == 1, dict(counters["qkfuse"])
    kernels = launches("\n".join(codes))
    assert len(kernels) == len(form.lengths) and all("qk_norm_rope" in k for k in kernels), kernels
    for e, f, r in zip(eager, fused, ref64):
        r = r.float()
        eager_err = float((e.float().cpu() - r).abs().max())
        fused_err = float((f.float().cpu() - r).abs().max())
        # bfloat16: the eager module rounds at each step; the fused kernel once, in float32
        assert fused_err <= max(eager_err, 2 ** -7 * float(r.abs().max())), (case, fused_err, eager_err)
