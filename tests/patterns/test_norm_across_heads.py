"""``norm_rope`` with a norm across heads: RMSNorm over the flat projection [..., H*D] with a
[H*D] weight, then the head view, then RoPE (OLMo2/3, OLMoE, FlexOlmo, MiniMax-M2).

Drawn: the norm body, layout (transposed to [B,H,S,D], RoPE on [B,S,H,D], packed [N,H*D]), GQA,
head_dim, partial rotary, rotate_half spelling, dtype, cos in float32 (OLMo2) or x's dtype, static
or dynamic shapes.
Asserted: one fused q+k call whose recipe reduces over the heads, no norm left, equal to the
unfused graph and no further from float64. On CUDA, ``kernels="auto"`` fuses it as "triton" does
(measured faster than Inductor on the H200: benchmarks/results/2026-12-02-h200-across.md).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qkfuse.options import Options
from tests.graph_harness import (assert_equal_to_graph, assert_no_worse_than_graph_in_float64, run_pass,
                                 run_pass_as_cuda)
from tests.patterns.test_norm_rope_equivalence import QKBlock, Spec

LAYOUTS = ["transposed", "bshd", "packed"]


class AcrossHeads(torch.nn.Module):
    """q_norm / k_norm over all heads of the projection, then view(..., H, D) and RoPE."""

    def __init__(self, spec: Spec, layout: str, seed: int = 0):
        super().__init__()
        self.block, self.spec, self.layout = QKBlock(spec), spec, layout
        g = torch.Generator().manual_seed(seed)
        # a different weight per head: a kernel using one head's weight for all would be caught
        self.q_weight = torch.nn.Parameter((1 + 0.3 * torch.randn(spec.Hq * spec.D, generator=g)).to(spec.dtype))
        self.k_weight = torch.nn.Parameter((1 + 0.3 * torch.randn(spec.Hk * spec.D, generator=g)).to(spec.dtype))

    def forward(self, q, k, cos, sin):
        s, b = self.spec, self.block
        q = b.norm(q, self.q_weight, s.eps).view(*q.shape[:-1], -1, s.D)
        k = b.norm(k, self.k_weight, s.eps).view(*k.shape[:-1], -1, s.D)
        if self.layout == "transposed":  # OLMo2: [B, S, H, D] -> [B, H, S, D]; cos [B, 1, S, rd]
            q, k = q.transpose(1, 2), k.transpose(1, 2)
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        else:  # [B, S, H, D] or packed [N, H, D]: cos [.., S, 1, rd]
            cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
        q, k = b.rope(q, cos, sin), b.rope(k, cos, sin)
        return q.to(s.dtype), k.to(s.dtype)  # OLMo2 casts back (its cos/sin stay float32)


def inputs(spec: Spec, layout: str, cos_dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    lead = (spec.B * spec.S,) if layout == "packed" else (spec.B, spec.S)
    q, k = (torch.randn(*lead, h * spec.D, generator=g).to(spec.dtype) for h in (spec.Hq, spec.Hk))
    angle = torch.rand(*lead, spec.rd // 2, generator=g) * 6.3
    cos, sin = (torch.cat([f(angle)] * 2, -1).to(cos_dtype) for f in (torch.cos, torch.sin))
    return q, k, cos, sin


def spec_of(body, hk, ratio, D, rd, dtype, rotate, weight_first) -> Spec:
    return Spec(B=2, S=3, Hq=hk * ratio, Hk=hk, D=D, rd=rd, dtype=dtype, eps=1e-6, body=body, layout="",
                cos_bsd=True, rotate=rotate, order=0, weight_first=weight_first, dynamic=False)


@settings(max_examples=max(25, settings.default.max_examples // 2))
@given(body=st.sampled_from(["olmo", "llama", "torch", "noweight"]), layout=st.sampled_from(LAYOUTS),
       hk=st.sampled_from([1, 2]), ratio=st.sampled_from([1, 2, 4]), D=st.sampled_from([16, 32, 64]),
       partial=st.booleans(), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       cos_f32=st.booleans(), rotate=st.sampled_from(["slice", "chunk", "split"]), weight_first=st.booleans(),
       dynamic=st.booleans(), seed=st.integers(0, 2**16))
def test_across_heads_site_is_one_call_equal_to_the_graph(body, layout, hk, ratio, D, partial, dtype, cos_f32,
                                                          rotate, weight_first, dynamic, seed):
    spec = spec_of(body, hk, ratio, D, D // 2 if partial else D, dtype, rotate, weight_first)
    block = AcrossHeads(spec, layout, seed)
    # (float32 cos with partial rotary leaves the two parts in different dtypes: refused per head too)
    args = inputs(spec, layout, torch.float32 if cos_f32 and not partial else dtype, seed)
    if dynamic:  # widths come from Linear weights / configs in real models: static (as in
        for t in args:  # test_norm_rope_equivalence); batch and sequence become symbolic
            torch._dynamo.mark_static(t, t.dim() - 1)
    run = run_pass(block, *args, dynamic=dynamic)

    assert [(r.family, r.fused) for r in run.records] == [("norm_rope", True)] * 2, run.records
    assert all("across heads" in r.recipe for r in run.records), run.records
    assert run.count("qkfuse.qk_norm_rope") == 1 and run.count("aten.rsqrt") == 0

    assert_equal_to_graph(run, dtype)
    with torch.no_grad():
        block64 = AcrossHeads(spec_of(body, hk, ratio, D, spec.rd, torch.float64, rotate, weight_first),
                              layout, seed)
        ref64 = block64(*[t.double() for t in args])
    assert_no_worse_than_graph_in_float64(run, ref64, dtype)


def test_a_view_that_regroups_heads_is_not_a_norm_across_heads():
    """A norm over more than one token's heads (here a whole sequence, [B, S*H*D]) then viewed as
    heads is not a norm across heads: refused, both norms stay."""
    spec = spec_of("olmo", 2, 1, 16, 16, torch.float32, "slice", True)
    block = AcrossHeads(spec, "bshd")

    def fn(q, k, cos, sin):  # the norm spans [B, S*H*D]: the sequence too, not a token's heads
        b = block.block
        qn = b.norm(q.flatten(1), block.q_weight.repeat(3), 1e-6).view(2, 3, -1, 16)
        kn = b.norm(k.flatten(1), block.k_weight.repeat(3), 1e-6).view(2, 3, -1, 16)
        c, s = cos.unsqueeze(-2), sin.unsqueeze(-2)
        return b.rope(qn, c, s), b.rope(kn, c, s)

    run = run_pass(fn, *inputs(spec, "bshd", torch.float32, 0))
    assert run.records and not run.fused, run.records
    assert run.count("aten.rsqrt") == 2  # both norms stay
    for out, ref in zip(run.out, run.ref):
        assert torch.equal(out, ref)


@pytest.mark.parametrize("kernels", ["auto", "triton"])
def test_cuda_path_fuses_it_in_one_launch(kernels):
    """On CUDA the Triton kernel serves a norm across heads under 'auto' as under 'triton': one
    launch for q and k, no norm left."""
    pytest.importorskip("triton")
    spec = spec_of("olmo", 2, 2, 32, 32, torch.bfloat16, "slice", True)
    block = AcrossHeads(spec, "transposed")
    run = run_pass_as_cuda(block, *inputs(spec, "transposed", torch.float32, 0),
                           options=Options(kernels=kernels))
    assert len(run.fused) == 2 and len(run.kernel_calls()) == 1, run.records
    assert not [n for n in run.rewritten.graph.nodes if n.target is torch.ops.aten.rsqrt.default]
