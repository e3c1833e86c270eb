"""Half-table RoPE on CUDA under kernels='auto' (the policy fuses it since the H200 measurement of
2026-12-02, benchmarks/results/2026-12-02-h200-wan.md): Wan's pair rotation (norm across heads,
float32 freqs passed as step-2 views) and QwenImage's complex multiply (the real and imaginary views
of complex64 freqs) compile to one launch of our kernel for q and k, equal to the unfused module
within bfloat16's rounding of the float64 result.

    python -m pytest -q -m gpu tests/gpu
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch._dynamo.utils import counters

import qkfuse
from tests.gpu.test_decode_codegen_gpu import launches
from tests.patterns import test_complex_rope as cx
from tests.patterns import test_pair_rotation as pr

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

CASES = {
    # Wan2.1-1.3B's heads (12 x 128, norm across heads), 512 tokens
    "wan": (pr.WanQK, pr.make_inputs, dataclasses.replace(pr.WAN, B=1, S=512, H=12, D=128, rd=128)),
    # QwenImage's heads (24 x 128, per-head norm), 512 tokens
    "qwenimage": (cx.QwenQK, cx.make_inputs, dataclasses.replace(cx.QWEN, B=1, S=512, H=24, D=128, rd=128)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_half_table_fuses_under_auto_and_matches(case):
    from torch._inductor.utils import run_and_get_code

    module_cls, make, form = CASES[case]
    module = module_cls(form).eval()
    inputs = make(form, 3)
    with torch.no_grad():
        ref64 = module.double()(*(t.double() if not t.is_complex() else t.to(torch.complex128) for t in inputs))
        module = module_cls(form).eval().cuda()
        args = [t.cuda() for t in inputs]
        eager = module(*args)
        torch._dynamo.reset()
        counters.clear()
        with torch._inductor.config.patch(fx_graph_cache=False):
            fused, codes = run_and_get_code(torch.compile(module, backend=qkfuse.qkfuse_backend, fullgraph=True),
                                            *args)
    assert counters["qkfuse"]["norm_rope_calls"] == 1, dict(counters["qkfuse"])
    ours = [name for name in launches("\n".join(codes)) if "qk_norm_rope" in name]
    assert len(ours) == 1, launches("\n".join(codes))
    for e, f, r in zip(eager, fused, ref64):
        r = r.float()
        eager_err = float((e.float().cpu() - r).abs().max())
        fused_err = float((f.float().cpu() - r).abs().max())
        # bfloat16: the eager module rounds at each step; the fused kernel once, in float32
        assert fused_err <= max(eager_err, 2 ** -7 * float(r.abs().max())), (case, fused_err, eager_err)


@pytest.mark.parametrize("strided", [False, True], ids=["dense", "strided"])
@pytest.mark.parametrize("rd", [64, 32], ids=["full_rotary", "partial_rotary"])
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "interleaved"])
def test_functional_half_table_is_one_launch_and_the_float64_rope(interleaved, rd, strided):
    """qkfuse.qk_norm_rope(..., half_table=True) in eager CUDA code: one launch of the Triton kernel
    (the tables read at their stride, no copy), the float64 transcription within bfloat16's units."""
    from tests.gpu.test_functional_gpu import KERNEL_UNITS, kernel_launches
    from tests.test_functional import assert_close_to_eager, half_inputs, norm_half_rope_f64

    q, k, qw, kw, cos, sin = (t.cuda() for t in half_inputs(torch.bfloat16, rd, strided, seed=40 + rd + strided))
    with kernel_launches() as grids:
        outs = qkfuse.qk_norm_rope(q, k, qw, kw, cos, sin, interleaved=interleaved, half_table=True)
        torch.cuda.synchronize()
    assert len(grids) == 1, grids
    for out, x, w in zip(outs, (q, k), (qw, kw)):
        ref = norm_half_rope_f64(x.cpu(), w.cpu(), cos.cpu(), sin.cpu(), 1e-6, interleaved).to(torch.bfloat16)
        assert_close_to_eager(out.cpu(), ref, units=KERNEL_UNITS)
