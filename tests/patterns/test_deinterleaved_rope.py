"""DeepSeek's de-interleaved RoPE (HF DeepSeek-V2/V3, Kimi, LongCat-Flash, GLM-4-MoE-Lite, Dots3,
Mistral4 ...: ``apply_rotary_pos_emb_interleave``), read as the recipe's ``deinterleave_input``: the
rotary part of x is read as pairs (x[2i], x[2i+1]) and rotated as neox halves.

Two spellings of it:

- transformers 5 (``modeling_deepseek_v3.py``): the even/odd slices rotated with the first halves of
  HF's ``cat(freqs, freqs)`` tables, ``cat([x1*c - x2*s, x2*c + x1*s], -1)`` (half tables);
- the earlier one: ``x.view(b, h, s, d // 2, 2).transpose(4, 3).reshape(b, h, s, d)`` (a copy), then
  neox RoPE with the full-width tables; the copy joins the site.

It has no norm in front (MLA's q_rot / k_rot are slices of projections): a RoPE-only site, fused
under ``qkfuse.families="rope"`` (or "norm_rope,rope"), not under the default families.

Drawn: the spelling, dtype (float32, bfloat16), tables in the input dtype or float32, batch,
sequence, heads, the pass-through part of q (DeepSeek's qk_nope_head_dim, 0 or 8) and the rotated
width, partial rotary inside the rotated part (a cat after it), q and k rotated together (one call;
k_rot with one head, MLA) or k alone, static or dynamic shapes. Asserted: the sites fused with the
recipe, no RoPE op left, equal to the unfused graph within the dtype and no further from float64.
Then the default families, a norm in front, the CUDA path (held under ``auto``, one launch under
``kernels="triton"``).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qkfuse.options import Options
from tests.graph_harness import (assert_equal_to_graph, assert_left_alone, graph_tolerance, run_pass,
                                 run_pass_as_cuda, scale_error, static_widths)

ROPE = Options(families=("rope",))


def rotate_half(x):
    """transformers' rotate_half."""
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb_interleave(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
    """transformers 5.24's modeling_deepseek_v3.apply_rotary_pos_emb_interleave, literally."""
    cos = cos[..., : cos.shape[-1] // 2].unsqueeze(unsqueeze_dim)
    sin = sin[..., : sin.shape[-1] // 2].unsqueeze(unsqueeze_dim)

    q1, q2 = q[..., 0::2], q[..., 1::2]
    k1, k2 = k[..., 0::2], k[..., 1::2]

    q_embed = torch.cat([q1 * cos - q2 * sin, q2 * cos + q1 * sin], dim=-1)
    k_embed = torch.cat([k1 * cos - k2 * sin, k2 * cos + k1 * sin], dim=-1)
    return q_embed, k_embed


def apply_rotary_pos_emb_interleave_copy(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
    """The earlier spelling (transformers 4's DeepSeek-V2/V3), literally."""
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)

    b, h, s, d = q.shape
    q = q.view(b, h, s, d // 2, 2).transpose(4, 3).reshape(b, h, s, d)

    b, h, s, d = k.shape
    k = k.view(b, h, s, d // 2, 2).transpose(4, 3).reshape(b, h, s, d)

    q_embed = (q * cos) + (rotate_half(q) * sin)
    k_embed = (k * cos) + (rotate_half(k) * sin)
    return q_embed, k_embed


SPELLINGS = {"hf5": apply_rotary_pos_emb_interleave, "copy": apply_rotary_pos_emb_interleave_copy}


@dataclasses.dataclass(frozen=True)
class Form:
    spelling: str  # "hf5" | "copy"
    with_q: bool  # q and k rotated together (one call), else k alone
    nope: int  # q's pass-through part before its rotary part (qk_nope_head_dim)
    rope_dim: int  # the rotated tensors' width (qk_rope_head_dim)
    rd: int  # rotated inside them (rope_dim: all; else a partial-rotary cat after the RoPE)
    table_dtype: torch.dtype | None  # None: the input dtype (HF's rotary embedding)
    B: int
    S: int
    H: int
    lora: int  # kv_lora_rank: the latent before k_rot in the compressed projection
    dtype: torch.dtype

    @property
    def tables(self) -> torch.dtype:
        return self.table_dtype or self.dtype

    @property
    def out_dtype(self) -> torch.dtype:
        return torch.promote_types(self.dtype, self.tables)


def _rope(f: Form, q, k, cos, sin):
    """The spelling on q and k, on their first f.rd dims when partial (the rest passed through)."""
    fn = SPELLINGS[f.spelling]
    if f.rd == f.rope_dim:
        return fn(q, k, cos, sin)
    rd = f.rd
    qr, kr = fn(q[..., :rd], k[..., :rd], cos[..., :rd], sin[..., :rd])
    return (torch.cat([qr, q[..., rd:].to(qr.dtype)], dim=-1), torch.cat([kr, k[..., rd:].to(kr.dtype)], dim=-1))


class DeepseekRope(torch.nn.Module):
    """DeepseekV3Attention.forward up to the RoPE: q from its projection viewed [B, S, H, nope + rope]
    and transposed, split into q_pass / q_rot; k_rot the last rope_dim of the compressed projection,
    viewed as one head [B, 1, S, rope_dim]; then the RoPE and the cat back (q)."""

    def __init__(self, f: Form):
        super().__init__()
        self.f = f

    def forward(self, q_states, compressed_kv, cos, sin):
        f = self.f
        batch_size, seq_length = q_states.shape[:-1]
        q_states = q_states.view(batch_size, seq_length, -1, f.nope + f.rope_dim).transpose(1, 2)
        q_pass, q_rot = torch.split(q_states, [f.nope, f.rope_dim], dim=-1)
        kv_nope, k_rot = torch.split(compressed_kv, [f.lora, f.rope_dim], dim=-1)
        k_rot = k_rot.view(batch_size, 1, seq_length, f.rope_dim)
        if f.with_q:
            q_rot, k_rot = _rope(f, q_rot, k_rot, cos, sin)
        else:  # (q's copy of the spelling's output is the unused one: only k's stays)
            k_rot = _rope(f, k_rot, k_rot, cos, sin)[1]
        return torch.cat((q_pass.to(q_rot.dtype), q_rot), dim=-1), k_rot, kv_nope


def make_inputs(f: Form, seed: int, dtype=None):
    """Fresh random projections; cos/sin [B, S, rope_dim] of independent angles (not cat(freqs,
    freqs): a read of the wrong half or entry gives another answer)."""
    g = torch.Generator().manual_seed(seed)
    dt = dtype or f.dtype
    q = torch.randn(f.B, f.S, f.H * (f.nope + f.rope_dim), generator=g).to(dt)
    ckv = torch.randn(f.B, f.S, f.lora + f.rope_dim, generator=g).to(dt)
    angle = torch.rand(f.B, f.S, f.rope_dim, generator=g) * 2 * math.pi
    tdt = torch.float64 if dt == torch.float64 else f.tables
    return q, ckv, angle.cos().to(tdt), angle.sin().to(tdt)


def recipe_of(f: Form) -> str:
    return f"neox rope[{f.rd}]" + (" half-table" if f.spelling == "hf5" else "") + " de-interleaved"


def copy_permutes(graph) -> list:
    """The de-interleaving copy's permutes (of the 5-d pair views) outside the fused call."""
    return [n for n in graph.nodes if n.target is torch.ops.aten.permute.default and "qkfuse" not in n.meta
            and n.meta["val"].dim() == 5]


def assert_fused(run, f: Form):
    """The sites fused with the recipe, in one call (q and k) or one call of k alone; no RoPE op left."""
    n = 2 if f.with_q else 1
    assert [(r.family, r.fused) for r in run.records] == [("rope", True)] * n, (f, run.records)
    assert all(r.recipe == recipe_of(f) for r in run.records), run.records
    assert run.count("qkfuse") == 1
    assert run.count("qkfuse.qk_norm_rope" if f.with_q else "qkfuse.norm_rope") == 1
    for op in ("aten.mul", "aten.sub", "aten.neg"):
        assert run.count(op) == 0, (op, run.rewritten.graph)
    assert not copy_permutes(run.rewritten.graph)  # (and the clone after it: q's cat with nope=0 is a clone)


@st.composite
def forms(draw):
    rope_dim = draw(st.sampled_from([8, 16, 32]))
    rd = rope_dim // 2 if draw(st.sampled_from([False, False, True])) else rope_dim
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    return Form(draw(st.sampled_from(sorted(SPELLINGS))), draw(st.booleans()), draw(st.sampled_from([0, 8])),
                rope_dim, rd, draw(st.sampled_from([None, None, torch.float32])), draw(st.integers(1, 2)),
                draw(st.integers(1, 5)), draw(st.integers(1, 3)), draw(st.sampled_from([8, 16])), dtype)


@settings(max_examples=max(40, settings.default.max_examples))
@given(f=forms(), dynamic=st.sampled_from([False, False, True]), seed=st.integers(0, 2**16))
def test_deinterleaved_rope_fuses_equal_to_the_graph(f, dynamic, seed):
    args = make_inputs(f, seed)
    if dynamic:  # widths static; batch and sequence symbolic
        static_widths(args)
    run = run_pass(DeepseekRope(f), *args, dynamic=dynamic, options=ROPE)
    assert_fused(run, f)

    assert_equal_to_graph(run, f.out_dtype, f)
    with torch.no_grad():
        ref64 = DeepseekRope(f)(*make_inputs(f, seed, dtype=torch.float64))
    tol = graph_tolerance(f.out_dtype)
    for out, ref, r64 in zip(run.out, run.ref, ref64):
        assert scale_error(out, r64) <= scale_error(ref, r64) + tol, f


# DeepSeek-V3's own layout at a small size: 3 heads, nope 8, rope 16, bfloat16 tables
DEEPSEEK = Form("hf5", True, 8, 16, 16, None, 2, 5, 3, 16, torch.bfloat16)


@pytest.mark.parametrize("spelling", sorted(SPELLINGS))
@pytest.mark.parametrize("kernels", ["inline", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deepseek_attention_is_exact(dtype, kernels, spelling):
    """The same products and sums in the same dtype: bit for bit, spliced inline or as the op."""
    f = dataclasses.replace(DEEPSEEK, spelling=spelling, dtype=dtype)
    run = run_pass(DeepseekRope(f), *make_inputs(f, 1), options=Options(families=("rope",), kernels=kernels))
    assert_fused(run, f)
    for out, ref in zip(run.out, run.ref):
        assert torch.equal(out, ref)


def test_transformers_own_function_fuses():
    """transformers' apply_rotary_pos_emb_interleave itself (whatever spelling the installed version
    has), on DeepSeek's layout."""
    ds = pytest.importorskip("transformers.models.deepseek_v3.modeling_deepseek_v3")
    f = DEEPSEEK
    block = DeepseekRope(f)

    def fn(q_states, ckv, cos, sin):
        q_states = q_states.view(f.B, f.S, -1, f.nope + f.rope_dim).transpose(1, 2)
        q_pass, q_rot = torch.split(q_states, [f.nope, f.rope_dim], dim=-1)
        k_rot = torch.split(ckv, [f.lora, f.rope_dim], dim=-1)[1].view(f.B, 1, f.S, f.rope_dim)
        q_rot, k_rot = ds.apply_rotary_pos_emb_interleave(q_rot, k_rot, cos, sin)
        return torch.cat((q_pass, q_rot), dim=-1), k_rot

    args = make_inputs(f, 3)
    run = run_pass(fn, *args, options=ROPE)
    assert len(run.fused) == 2 and run.count("qkfuse.qk_norm_rope") == 1, run.records
    assert all("de-interleaved" in r.recipe for r in run.records), run.records
    assert_equal_to_graph(run, f.dtype)
    expected = block(*args)
    assert torch.equal(run.out[0], expected[0]) and torch.equal(run.out[1], expected[1])


@pytest.mark.parametrize("families", [("norm_rope", "rope"), ("rope", "norm")])
def test_fuses_with_the_rope_family_among_others(families):
    run = run_pass(DeepseekRope(DEEPSEEK), *make_inputs(DEEPSEEK, 4), options=Options(families=families))
    assert_fused(run, DEEPSEEK)
    assert_equal_to_graph(run, DEEPSEEK.dtype)


# ---- left alone ---------------------------------------------------------------------------------


@pytest.mark.parametrize("spelling", sorted(SPELLINGS))
def test_default_families_leave_it_alone(spelling):
    """No norm in front: a RoPE-only site, and the rope family is opt-in."""
    f = dataclasses.replace(DEEPSEEK, spelling=spelling)
    run = run_pass(DeepseekRope(f), *make_inputs(f, 5))
    assert_left_alone(run, "no RMSNorm")


@pytest.mark.parametrize("spelling", sorted(SPELLINGS))
def test_a_norm_in_front_is_refused_with_the_reason(spelling):
    """A per-head RMSNorm before it: the recipe is for RoPE alone (a weight would be read permuted)."""
    f = dataclasses.replace(DEEPSEEK, dtype=torch.float32)
    g = torch.Generator().manual_seed(6)
    w = 1 + 0.3 * torch.randn(f.rope_dim, generator=g)

    def fn(q, k, cos, sin):
        q, k = (torch.nn.functional.rms_norm(x, (f.rope_dim,), w, 1e-6) for x in (q, k))
        return SPELLINGS[spelling](q, k, cos, sin)

    q = torch.randn(f.B, f.H, f.S, f.rope_dim, generator=g)
    k = torch.randn(f.B, 1, f.S, f.rope_dim, generator=g)
    cos, sin = make_inputs(f, 6)[2:]
    run = run_pass(fn, q, k, cos, sin, options=Options(families=("norm_rope", "rope")))
    assert_left_alone(run, "de-interleaved RoPE (apply_rotary_pos_emb_interleave) after a q/k norm")
    assert {r.family for r in run.records} == {"norm_rope"}


def test_a_copy_that_is_no_de_interleave_stays_neox_rope_of_the_copy():
    """view(.., 2, d/2).transpose: the halves interleaved (the inverse permutation): not DeepSeek's copy,
    so the neox RoPE of the copied tensor is fused as before and the copy stays in the graph."""
    f = dataclasses.replace(DEEPSEEK, dtype=torch.float32)

    def fn(q, k, cos, sin):
        out = []
        for x in (q, k):
            b, h, s, d = x.shape
            x = x.view(b, h, s, 2, d // 2).transpose(4, 3).reshape(b, h, s, d)
            out.append(x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1))
        return tuple(out)

    g = torch.Generator().manual_seed(7)
    q, k = torch.randn(f.B, f.H, f.S, 16, generator=g), torch.randn(f.B, 1, f.S, 16, generator=g)
    run = run_pass(fn, q, k, *make_inputs(f, 7)[2:], options=ROPE)
    assert len(run.fused) == 2 and all(r.recipe == "neox rope[16]" for r in run.records), run.records
    assert run.count("aten.clone") == 2
    assert_equal_to_graph(run, torch.float32)


# ---- CUDA: one launch (kernels="auto" picks the Triton kernel: measured against Inductor,
# benchmarks/results/2026-12-02-h200-deinterleave.md) ----------------------------------------------


@pytest.mark.parametrize("kernels", ["auto", "triton"])
@pytest.mark.parametrize("with_q", [True, False])
@pytest.mark.parametrize("spelling", sorted(SPELLINGS))
def test_cuda_fuses_it_in_one_launch(spelling, with_q, kernels):
    """One launch (q and k, or k alone) with the pairs read from x (X_PAIRS, neox tables and
    output), nothing of the RoPE or of the de-interleaving copy left, nothing cloned."""
    pytest.importorskip("triton")
    f = dataclasses.replace(DEEPSEEK, spelling=spelling, with_q=with_q)
    run = run_pass_as_cuda(DeepseekRope(f), *make_inputs(f, 0), options=Options(families=("rope",), kernels=kernels))
    assert len(run.fused) == (2 if with_q else 1) and len(run.kernel_calls()) == 1, run.records
    assert all(r.recipe == recipe_of(f) for r in run.records), run.records
    aten = torch.ops.aten
    assert not [n for n in run.rewritten.graph.nodes
                if n.target in (aten.mul.Tensor, aten.sub.Tensor, aten.neg.default, aten.clone.default,
                                aten.copy.default, aten._to_copy.default)]
    assert not copy_permutes(run.rewritten.graph)
    call = run.kernel_calls()[0]
    assert call.kwargs["tensors_to_clone"] == []
    args = call.kwargs["kwargs"]
    assert args["X_PAIRS"] is True and args["INTERLEAVED"] is False and args["NORM"] is False
    assert args["HALF_TABLE"] is (spelling == "hf5") and args["HAS_K"] is with_q
    assert args["ROT_DIM"] == args["HEAD_DIM"] == f.rope_dim
