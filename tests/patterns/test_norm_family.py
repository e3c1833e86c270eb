"""Family ``norm``: per-head q and k RMSNorms with no RoPE after them, one call for the pair.

Drawn: the norm body (Llama/Qwen3, OLMo2, Gemma (1+w), torch.rms_norm, no weight), the layout
(norm before or after the transpose, no transpose, packed [N, H, D] without a batch dim), GQA,
head_dim, dtype. Asserted: one fused call for q+k, no norm left, equal to the unfused graph. And
what the family must leave alone: the default families, hidden-state norms, norms that feed a
RoPE, a norm without a partner.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._dynamo.utils import counters

from qkfuse.options import Options
from tests.graph_harness import assert_equal_to_graph, run_pass, run_pass_as_cuda, scale_error
from tests.patterns.test_norm_rope_equivalence import QKBlock, Spec
from tests.patterns.test_norm_rope_negative import llama_norm, rope

NORM = Options(families=("norm_rope", "norm"))
LAYOUTS = ["norm_then_transpose", "transpose_then_norm", "no_transpose", "packed"]


def norms_only(block: QKBlock, layout: str):
    """q/k projections [..., H*D] viewed per head and normalised; no RoPE."""
    D = block.spec.D

    def fn(q, k):
        q, k = q.view(*q.shape[:-1], -1, D), k.view(*k.shape[:-1], -1, D)
        if layout == "transpose_then_norm":
            q, k = q.transpose(1, 2), k.transpose(1, 2)
        q, k = block.norm(q, block.q_weight, block.q_eps), block.norm(k, block.k_weight, block.k_eps)
        if layout == "norm_then_transpose":
            q, k = q.transpose(1, 2), k.transpose(1, 2)
        return q, k

    return fn


@settings(max_examples=max(20, settings.default.max_examples // 2))
@given(body=st.sampled_from(["llama", "olmo", "gemma", "torch", "noweight"]), layout=st.sampled_from(LAYOUTS),
       hk=st.sampled_from([1, 2]), ratio=st.sampled_from([1, 2]), D=st.sampled_from([16, 64, 80]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), seed=st.integers(0, 2**16))
def test_q_and_k_norms_become_one_call_equal_to_the_graph(body, layout, hk, ratio, D, dtype, seed):
    spec = Spec(B=2, S=3, Hq=hk * ratio, Hk=hk, D=D, rd=D, dtype=dtype, eps=1e-6, body=body, layout=layout,
                cos_bsd=True, rotate="slice", order=0, weight_first=seed % 2 == 0, dynamic=False)
    g = torch.Generator().manual_seed(seed)
    lead = (spec.B * spec.S,) if layout == "packed" else (spec.B, spec.S)
    q, k = (torch.randn(*lead, h * D, generator=g).to(dtype) for h in (spec.Hq, spec.Hk))
    counters.clear()  # (per example)
    run = run_pass(norms_only(QKBlock(spec), layout), q, k, options=NORM)
    assert [(r.family, r.fused) for r in run.records] == [("norm", True)] * 2, run.records
    assert run.count("qkfuse.qk_norm_rope") == 1 and run.count("aten.rsqrt") == 0
    assert counters["qkfuse"]["norm_sites"] == 2 and counters["qkfuse"]["norm_calls"] == 1
    assert_equal_to_graph(run, dtype)


B, S, HQ, HK, D, HIDDEN = 2, 5, 4, 2, 16, 32


def _weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return r(B, S, HIDDEN), r(HIDDEN, HQ * D), r(HIDDEN, HK * D), 1 + 0.2 * r(D), 1 + 0.2 * r(D), 1 + 0.2 * r(HIDDEN)


def attention_without_rope(h, wq, wk, qw, kw, hw):
    """A hidden-state norm (not per head), then q/k projections with per-head norms."""
    h = llama_norm(h, hw)
    q = llama_norm((h @ wq).view(B, S, HQ, D), qw).transpose(1, 2)
    k = llama_norm((h @ wk).view(B, S, HK, D), kw).transpose(1, 2)
    return (torch.nn.functional.scaled_dot_product_attention(q, k, k, enable_gqa=True),)


def test_off_by_default():
    run = run_pass(attention_without_rope, *_weights())
    assert run.records == [] and run.count("qkfuse") == 0


def test_hidden_state_norm_is_not_a_candidate():
    run = run_pass(attention_without_rope, *_weights(), options=NORM)
    assert [r.shape for r in run.fused] == [(B, S, HQ, D), (B, S, HK, D)] and run.refused == []
    assert run.count("qkfuse.qk_norm_rope") == 1 and run.count("aten.rsqrt") == 1  # the hidden norm stays
    assert scale_error(run.out[0], run.ref[0]) <= 1e-6


@pytest.mark.parametrize("rope_fused", [True, False])
def test_norms_that_feed_a_rope_are_left_to_norm_rope(rope_fused):
    """The norm_rope sites fuse them; a RoPE refused there keeps its norm too (not a norm site)."""

    def fn(q, k, qw, kw, cos, sin):
        qn, kn = llama_norm(q, qw).transpose(1, 2), llama_norm(k, kw).transpose(1, 2)
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        return rope(qn, c, s), rope(kn, c if rope_fused else c * kn.mean(), s)

    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    args = r(B, S, HQ, D), r(B, S, HK, D), r(D), r(D), r(B, S, D), r(B, S, D)
    run = run_pass(fn, *args, options=NORM)
    assert {r.family for r in run.records} == {"norm_rope"}
    assert len(run.fused) == (2 if rope_fused else 1)
    for out, ref in zip(run.out, run.ref):
        assert scale_error(out, ref) <= 1e-6


def test_a_norm_without_partner_is_left_to_inductor():
    def fn(h, wq, wk, qw, kw, hw):
        q = llama_norm((h @ wq).view(B, S, HQ, D), qw).transpose(1, 2)
        k = (h @ wk).view(B, S, HK, D).transpose(1, 2)
        return (torch.nn.functional.scaled_dot_product_attention(q, k, k, enable_gqa=True),)

    run = run_pass(fn, *_weights(), options=NORM)
    assert run.fused == [] and [r.family for r in run.refused] == ["norm"]
    assert "no q/k partner" in run.refused[0].reason
    assert run.count("qkfuse") == 0 and scale_error(run.out[0], run.ref[0]) == 0.0


def test_the_pair_is_one_triton_kernel_call_on_cuda():
    pytest.importorskip("triton")
    run = run_pass_as_cuda(attention_without_rope, *_weights(), options=NORM)
    assert [r.reason for r in run.fused] == ["triton", "triton"] and len(run.kernel_calls()) == 1
    assert sum(n.target is torch.ops.aten.rsqrt.default for n in run.rewritten.graph.nodes) == 1  # hidden norm
