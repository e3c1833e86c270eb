"""DeepSeek's de-interleaved RoPE (Recipe.deinterleave_input) on CUDA: DeepSeek-V3's attention up to
its RoPE (tests/patterns/test_deinterleaved_rope.py's block, both spellings, at DeepSeek-V3's widths)
compiled with families="rope" and kernels="triton" is one launch of our kernel for q_rot and k_rot,
equal to the unfused module within bfloat16's rounding of the float64 result; kernels="auto" launches
it too (measured faster than Inductor: benchmarks/results/2026-12-02-h200-deinterleave.md).

    python -m pytest -q -m gpu tests/gpu
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch._dynamo.utils import counters

import qkfuse
from tests.gpu.test_decode_codegen_gpu import launches
from tests.patterns import test_deinterleaved_rope as ds

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

# DeepSeek-V3's attention widths (128 heads of nope 128 + rope 64, kv_lora_rank 512) with 32 heads, 512 tokens
FORM = dataclasses.replace(ds.DEEPSEEK, nope=128, rope_dim=64, rd=64, B=1, S=512, H=32, lora=512)


def _compile(module, args, kernels):
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False):
        out, codes = run_and_get_code(
            torch.compile(module, backend=qkfuse.qkfuse_backend, fullgraph=True,
                          options={"qkfuse.families": "rope", "qkfuse.kernels": kernels}), *args)
    ours = [name for name in launches("\n".join(codes)) if "qk_norm_rope" in name]
    return out, ours


@pytest.mark.parametrize("spelling", sorted(ds.SPELLINGS))
def test_deinterleaved_rope_is_one_launch_under_triton_and_matches(spelling):
    form = dataclasses.replace(FORM, spelling=spelling)
    inputs = ds.make_inputs(form, 3)
    with torch.no_grad():
        ref64 = ds.DeepseekRope(form)(*ds.make_inputs(form, 3, dtype=torch.float64))
        args = [t.cuda() for t in inputs]
        eager = ds.DeepseekRope(form)(*args)
    fused, ours = _compile(ds.DeepseekRope(form), args, "triton")
    assert counters["qkfuse"]["rope_calls"] == 1 and counters["qkfuse"]["rope_sites"] == 2, dict(counters["qkfuse"])
    assert len(ours) == 1, ours
    for e, f, r in zip(eager, fused, ref64):
        r = r.float()
        eager_err = float((e.float().cpu() - r).abs().max())
        fused_err = float((f.float().cpu() - r).abs().max())
        # the same products and sums in bfloat16, rounded where the module rounds them
        assert fused_err <= max(eager_err, 2 ** -7 * float(r.abs().max())), (spelling, fused_err, eager_err)


def test_auto_fuses_it():
    """kernels='auto' launches our kernel for DeepSeek's de-interleaved RoPE (benchmarks/bench_deinterleave.py
    measured it faster than Inductor), equal to eager within bfloat16's rounding."""
    args = [t.cuda() for t in ds.make_inputs(FORM, 4)]
    with torch.no_grad():
        eager = ds.DeepseekRope(FORM)(*args)
    fused, ours = _compile(ds.DeepseekRope(FORM), args, "auto")
    assert len(ours) == 1 and counters["qkfuse"]["rope_calls"] == 1, (ours, dict(counters["qkfuse"]))
    for e, f in zip(eager, fused):
        assert float((e.float() - f.float()).abs().max()) <= 2 ** -7 * float(e.float().abs().max())
