"""Sites the pass must leave alone: each states why, and the graph still computes the same thing."""

from __future__ import annotations

import pytest
import torch

from qkfuse.options import Options
from tests.graph_harness import run_pass, scale_error

B, S, HQ, HK, D = 2, 5, 4, 2, 16


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def llama_norm(x, w, eps=1e-6):
    dt = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return w * x.to(dt)


def rope(x, cos, sin):
    return x * cos + rotate_half(x) * sin


def inputs(dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    return r(B, S, HQ, D), r(B, S, HK, D), r(D), r(D), r(B, S, D), r(B, S, D)


def check(fn, args, expect_refused: dict[str, str], fused: int, options: Options | None = None):
    """fn's graph: `fused` sites fused, and a refusal whose reason contains each expected text."""
    run = run_pass(fn, *args, options=options)
    reasons = [r.reason for r in run.refused]
    for text in expect_refused.values():
        assert any(text in r for r in reasons), (text, reasons)
    assert len(run.fused) == fused, run.records
    for out, ref in zip(run.out, run.ref):
        assert out.dtype == ref.dtype and scale_error(out, ref) == 0.0  # untouched sites stay exact
    return run


def test_normed_intermediate_with_another_user_is_refused():
    """q's normalised value is also returned: fusing would have to keep it; the q chain is skipped."""

    def fn(q, k, qw, kw, cos, sin):
        qn = llama_norm(q, qw).transpose(1, 2)
        kn = llama_norm(k, kw).transpose(1, 2)
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        return rope(qn, c, s), rope(kn, c, s), qn * 2

    run = check(fn, inputs(), {"q": "has a user outside the chain"}, fused=1)
    assert run.count("qkfuse.norm_rope") == 1  # k alone, as a single-tensor call


def test_norm_over_another_dim_is_refused():
    def fn(q, k, qw, kw, cos, sin):
        dt = q.dtype
        qf = q.float()
        qf = qf * torch.rsqrt(qf.pow(2).mean(-2, keepdim=True) + 1e-6)  # over heads, not head_dim
        qn = (qw * qf.to(dt)).transpose(1, 2)
        kn = llama_norm(k, kw).transpose(1, 2)
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        return rope(qn, c, s), rope(kn, c, s)

    run = check(fn, inputs(), {"q": "mean is not over the last dim"}, fused=1)
    assert run.count("qkfuse.norm_rope") == 1 and run.count("qkfuse.qk_norm_rope") == 0  # k alone


def test_eps_outside_the_sqrt_is_refused():
    """x / (sqrt(mean) + eps) is another function than x * rsqrt(mean + eps)."""

    def fn(q, k, qw, kw, cos, sin):
        dt = q.dtype
        qf = q.float()
        qf = qf / (qf.pow(2).mean(-1, keepdim=True).sqrt() + 1e-6)
        qn = (qw * qf.to(dt)).transpose(1, 2)
        kn = llama_norm(k, kw).transpose(1, 2)
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        return rope(qn, c, s), rope(kn, c, s)

    run = check(fn, inputs(), {"q": "no RMSNorm"}, fused=1)
    assert run.count("qkfuse.norm_rope") == 1 and run.count("qkfuse.qk_norm_rope") == 0  # k alone


def test_variance_in_low_precision_is_refused():
    """No upcast: the variance is accumulated in bf16, which the fused kernels do not reproduce."""

    def fn(q, k, qw, kw, cos, sin):
        qx = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + 1e-6)
        qn = (qw * qx).transpose(1, 2)
        kn = llama_norm(k, kw).transpose(1, 2)
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        return rope(qn, c, s), rope(kn, c, s)

    run = check(fn, inputs(), {"q": "no RMSNorm"}, fused=1)
    assert run.count("qkfuse.norm_rope") == 1 and run.count("qkfuse.qk_norm_rope") == 0  # k alone


def test_gemma_offset_in_bf16_is_refused():
    """(1 + w) rounded to bf16 before the multiply: not the float32 offset the recipe computes."""

    def fn(q, k, qw, kw, cos, sin):
        qf = q.float()
        qf = qf * torch.rsqrt(qf.pow(2).mean(-1, keepdim=True) + 1e-6)
        qn = (qf * (1.0 + qw)).to(q.dtype).transpose(1, 2)
        kn = llama_norm(k, kw).transpose(1, 2)
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        return rope(qn, c, s), rope(kn, c, s)

    run = check(fn, inputs(), {"q": "(offset + w) computed in torch.bfloat16"}, fused=1)
    assert run.count("qkfuse.norm_rope") == 1 and run.count("qkfuse.qk_norm_rope") == 0  # k alone


def test_weight_varying_over_tokens_is_refused():
    """A norm weight [S, H, D] (a row per token and head) is neither a [D] weight nor a row per head
    (Cohere's [H, D], fused: tests/patterns/test_layer_norm.py)."""

    def fn(q, k, qw, kw, cos, sin):
        qn = llama_norm(q, qw.expand(S, HQ, D) * 1.0).transpose(1, 2)
        kn = llama_norm(k, kw).transpose(1, 2)
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        return rope(qn, c, s), rope(kn, c, s)

    run = check(fn, inputs(), {"q": "is not [heads, (1, ...,) head_dim]"}, fused=1)
    assert run.count("qkfuse.norm_rope") == 1 and run.count("qkfuse.qk_norm_rope") == 0  # k alone


def test_cos_that_depends_on_q_is_refused():
    def fn(q, k, qw, kw, cos, sin):
        qn = llama_norm(q, qw).transpose(1, 2)
        kn = llama_norm(k, kw).transpose(1, 2)
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        cq = c * qn.mean()  # data-dependent "cos"
        return rope(qn, cq, s), rope(kn, c, s)

    run = check(fn, inputs(), {"q": "depends on the rotated tensor"}, fused=1)
    assert run.count("qkfuse.norm_rope") == 1 and run.count("qkfuse.qk_norm_rope") == 0  # k alone


def test_cos_of_another_shape_is_refused():
    """cos broadcast over head_dim (last dim 1): not a RoPE table of the rotated width."""

    def fn(q, k, qw, kw, cos, sin):
        qn = llama_norm(q, qw).transpose(1, 2)
        kn = llama_norm(k, kw).transpose(1, 2)
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        c1 = c[..., :1]
        return rope(qn, c1, s), rope(kn, c, s)

    run = check(fn, inputs(), {"q": "last dim 1 != rotated dim"}, fused=1)
    assert run.count("qkfuse.norm_rope") == 1 and run.count("qkfuse.qk_norm_rope") == 0  # k alone


def test_opposite_rotate_sign_convention_is_not_fused_as_rotate_half():
    """nanochat's cat((x2, -x1)) is the rotation the other way: fused with the recipe's negate_sin
    (exact), not as rotate_half; q's recipe then differs from k's, so each is a call of its own."""

    def fn(q, k, qw, kw, cos, sin):
        qn = llama_norm(q, qw).transpose(1, 2)
        kn = llama_norm(k, kw).transpose(1, 2)
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        h = D // 2
        q_rot = torch.cat((qn[..., h:], -qn[..., :h]), dim=-1)
        return qn * c + q_rot * s, rope(kn, c, s)

    run = check(fn, inputs(), {}, fused=2)
    assert run.count("qkfuse.norm_rope") == 2 and run.count("qkfuse.qk_norm_rope") == 0
    assert sorted("-sin" in r.recipe for r in run.records) == [False, True], run.records


@pytest.mark.parametrize("families,fused", [("norm_rope", 2), ("rope", 0)])
def test_family_switch(families, fused):
    """qkfuse.families selects the families; norm→RoPE sites need the norm_rope family."""

    def fn(q, k, qw, kw, cos, sin):
        qn = llama_norm(q, qw).transpose(1, 2)
        kn = llama_norm(k, kw).transpose(1, 2)
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        return rope(qn, c, s), rope(kn, c, s)

    expect = {} if fused else {"q": "disabled"}
    run = check(fn, inputs(), expect, fused=fused, options=Options(families=families))
    assert run.count("qkfuse.qk_norm_rope") == (1 if fused else 0)


def test_disabled_pass_changes_nothing():
    def fn(q, k, qw, kw, cos, sin):
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        return rope(llama_norm(q, qw).transpose(1, 2), c, s), rope(llama_norm(k, kw).transpose(1, 2), c, s)

    run = check(fn, inputs(), {}, fused=0, options=Options(enable=False))
    assert run.records == [] and run.count("qkfuse") == 0



def _l2_norm_clamped(x, w, eps=1e-6):  # ZAYA: x * (sqrt(D) / max(||x||, eps)): a division, not rsqrt
    return x * (x.shape[-1] ** 0.5 / x.norm(p=2, dim=-1, keepdim=True).clamp_min(eps))


# (LayerNorms, nn.LayerNorm's and Cohere's, are fused now: tests/patterns/test_layer_norm.py)
@pytest.mark.parametrize("norm,kind", [
    (_l2_norm_clamped, "an L2 norm (x scaled by 1 / ||x||) feeds this RoPE"),
], ids=["l2"])
def test_other_norms_are_named_in_the_refusal(norm, kind):
    """A q/k norm that is neither an RMSNorm nor a LayerNorm is left to Inductor, and explain says
    which norm it is."""

    def fn(q, k, qw, kw, cos, sin):
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        return rope(norm(q, qw).transpose(1, 2), c, s), rope(norm(k, kw).transpose(1, 2), c, s)

    run = check(fn, inputs(torch.float32), {"q": kind}, fused=0)
    assert len(run.refused) == 2 and all("not an RMSNorm (not fused yet)" in r.reason for r in run.refused)


def test_a_layer_norm_behind_a_sequence_slice_is_named_as_such():
    """CogView4 / CogVideoX: RoPE on a slice of the sequence of the LayerNorm output (image tokens
    after the text ones) with the rotated slice returned on its own, not assembled back into the
    norm output: refused, and the reason says the rotated slice is not concatenated back."""

    def fn(q, k, qw, kw, cos, sin):
        c, s = cos.unsqueeze(1)[:, :, 3:], sin.unsqueeze(1)[:, :, 3:]
        qn = torch.nn.functional.layer_norm(q, (D,), qw).transpose(1, 2)
        kn = torch.nn.functional.layer_norm(k, (D,), kw).transpose(1, 2)
        return rope(qn[:, :, 3:], c, s), rope(kn[:, :, 3:], c, s)

    run = check(fn, inputs(torch.float32), {"q": "not concatenated back or assigned into it"}, fused=0)
    assert len(run.refused) == 2, run.refused


def test_a_layer_norm_before_the_projection_is_not_a_q_norm():
    """GPT-NeoX / Phi: the layer's input LayerNorm, then q/k projections and RoPE with no q/k norm:
    the reason is that no norm feeds the RoPE (the walk stops at the projection)."""
    wq, wk = torch.randn(HQ * D, HQ * D), torch.randn(HQ * D, HK * D)

    def fn(h, cos, sin):
        x = torch.nn.functional.layer_norm(h, (h.shape[-1],))
        q, k = (x @ wq).view(B, S, HQ, D), (x @ wk).view(B, S, HK, D)
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        return rope(q.transpose(1, 2), c, s), rope(k.transpose(1, 2), c, s)

    _, _, _, _, cos, sin = inputs(torch.float32)
    run = check(fn, (torch.randn(B, S, HQ * D), cos, sin), {"q": "no RMSNorm"}, fused=0)
    assert not any("LayerNorm" in r.reason for r in run.refused)
