"""RoPE first, then a per-head norm of its output (the ``rope_norm`` family): Llama4 (its weightless
L2Norm after the complex RoPE), HunYuan dense/MoE (``query_layernorm`` after the RoPE), nanochat.

    q = apply_rotary_emb(q, cos, sin); q = q_norm(q)

Drawn: the RoPE (HF's neox in the input dtype, diffusers' interleaved in float32 cast back, Llama4's
complex multiply, partial rotary, nanochat's rotation the other way ``cat(x2, -x1)``), the norm (HF's RMSNorm with its weight cast before, ``F.rms_norm``
with or without a weight, Llama4's ``x * rsqrt(mean(x^2) + eps)``, LayerNorm), the layout (RoPE and
norm on ``[B, S, H, D]`` before the transpose, or on ``[B, H, S, D]`` after it), k with fewer heads,
dtype, static or dynamic shapes. Asserted: one fused q+k call, no RoPE or norm left, equal to the
unfused graph and no further from float64. Then what is not this family, and the CUDA path.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qkfuse.ops.recipe import DTYPE_CODES
from qkfuse.options import Options
from tests.graph_harness import (assert_equal_to_graph, assert_no_worse_than_graph_in_float64, run_pass,
                                 run_pass_as_cuda, static_widths)


@dataclasses.dataclass(frozen=True)
class Form:
    # "neox" | "interleaved" | "complex" | "partial" | "flipped" (nanochat) | "complex_f32" (Llama4's RoPE
    # with no type_as before the norm's x.float(): the graph torch < 2.13's joint-graph pass makes of it)
    rope: str
    norm: str  # "hf_rms" (weight, cast before) | "rms_w" | "rms" (F.rms_norm) | "l2" (Llama4) | "layer"
    layout: str  # "bshd" | "bhsd"
    H: int
    Hk: int
    D: int
    B: int
    S: int
    dtype: torch.dtype

    @property
    def rotary_dim(self) -> int:
        return self.D // 2 if self.rope == "partial" else self.D


def rope(x, cos, sin, f: Form):
    if f.rope == "interleaved":  # diffusers apply_rotary_emb(use_real_unbind_dim=-1)
        xr, xi = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
        rot = torch.stack([-xi, xr], dim=-1).flatten(-2)
        return (x.float() * cos + rot.float() * sin).to(x.dtype)
    if f.rope in ("complex", "complex_f32"):  # Llama4: view_as_complex(x pairs) * freqs_cis (here `cos`), type_as(x)
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        out = torch.view_as_real(xc * cos).flatten(-2)
        return out if f.rope == "complex_f32" else out.type_as(x)
    rd = f.rotary_dim
    xr, xp = x[..., :rd], x[..., rd:]
    x1, x2 = xr[..., : rd // 2], xr[..., rd // 2:]
    if f.rope == "flipped":  # nanochat's rotate_half: cat(x2, -x1), the rotation the other way
        return xr * cos + torch.cat((x2, -x1), dim=-1) * sin
    out = xr * cos + torch.cat((-x2, x1), dim=-1) * sin
    return torch.cat((out, xp), dim=-1) if rd < f.D else out


class HFRMSNorm(torch.nn.Module):  # Llama / HunYuan: float32 statistics, cast back, then the weight
    def __init__(self, d, eps):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def l2norm(x, eps=1e-6, like=None):  # Llama4's L2Norm (no weight); the result in like's dtype (x's)
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x if like is None else like)


class RopeNormQK(torch.nn.Module):
    def __init__(self, f: Form, seed: int = 0):
        super().__init__()
        self.f = f
        g = torch.Generator().manual_seed(seed)
        if f.norm == "hf_rms":
            self.norms = torch.nn.ModuleList(HFRMSNorm(f.D, 1e-6) for _ in "qk")
        elif f.norm == "layer":
            self.norms = torch.nn.ModuleList(torch.nn.LayerNorm(f.D, eps=1e-5) for _ in "qk")
        else:
            self.norms = torch.nn.ModuleList(torch.nn.RMSNorm(f.D, eps=1e-5 if i else 1e-6,
                                                              elementwise_affine=f.norm == "rms_w")
                                             for i in range(2))
        with torch.no_grad():
            for m in self.norms:
                if getattr(m, "weight", None) is not None:
                    m.weight.copy_(1 + 0.3 * torch.randn(f.D, generator=g))
                if getattr(m, "bias", None) is not None:
                    m.bias.copy_(0.2 * torch.randn(f.D, generator=g))
        self.to(f.dtype)

    def forward(self, q, k, cos, sin):
        f = self.f
        cos, sin = (t[None, :, None, :] if f.layout == "bshd" else t[None, None] for t in (cos, sin))
        if f.rope.startswith("complex"):  # one freqs_cis for q and k, as Llama4's rotary embedding returns
            cos, sin = torch.complex(cos, sin), None
        out = []
        for norm, x, heads in ((self.norms[0], q, f.H), (self.norms[1], k, f.Hk)):
            x = x.unflatten(-1, (heads, -1))
            if f.layout == "bhsd":
                x = x.transpose(1, 2)
            x = l2norm(rope(x, cos, sin, f), like=x) if f.norm == "l2" else norm(rope(x, cos, sin, f))
            out.append(x.transpose(1, 2) if f.layout == "bshd" else x)
        return tuple(out)


def make_inputs(f: Form, seed: int):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(f.B, f.S, f.H * f.D, generator=g).to(f.dtype)
    k = torch.randn(f.B, f.S, f.Hk * f.D, generator=g).to(f.dtype)
    angle = torch.rand(f.S, f.rotary_dim // 2, generator=g) * 2 * math.pi
    if f.rope.startswith("complex"):  # one angle per pair: the real and imaginary parts of freqs_cis, float32
        return q, k, angle.cos(), angle.sin()
    if f.rope == "interleaved":
        angle = angle.repeat_interleave(2, dim=-1)
        return q, k, angle.cos(), angle.sin()
    angle = torch.cat([angle, angle], dim=-1)  # HF: tables in the input dtype
    return q, k, angle.cos().to(f.dtype), angle.sin().to(f.dtype)


@st.composite
def forms(draw):
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    H = draw(st.sampled_from([1, 2, 4]))
    rope = draw(st.sampled_from(["neox", "interleaved", "complex", "partial", "flipped", "complex_f32"]))
    # (a float32 RoPE output into a norm with a weight in x's dtype mixes dtypes: the l2 norm, or none)
    norms = ["l2", "rms"] if rope == "complex_f32" else ["hf_rms", "rms_w", "rms", "l2", "layer"]
    return Form(rope, draw(st.sampled_from(norms)),
                draw(st.sampled_from(["bshd", "bhsd"])), H, draw(st.sampled_from(sorted({1, H}))),
                draw(st.sampled_from([8, 16])), draw(st.integers(1, 2)), draw(st.integers(1, 5)), dtype)


def _check_fused(run, f: Form):
    assert [(r.family, r.fused) for r in run.records] == [("rope_norm", True)] * 2, (f, run.records)
    assert all(" then " in r.recipe for r in run.records), run.records
    assert run.count("qkfuse.qk_norm_rope") == 1, run.rewritten.graph  # q and k in one call
    for left in ("aten.rsqrt", "aten.var_mean", "aten.cat", "aten.view_as_complex"):
        assert run.count(left) == 0, (left, run.rewritten.graph)


@settings(max_examples=max(40, settings.default.max_examples))
@given(f=forms(), dynamic=st.sampled_from([False, False, True]), seed=st.integers(0, 2**16))
def test_rope_then_norm_fuses_equal_to_the_graph(f, dynamic, seed):
    block = RopeNormQK(f, seed)
    args = make_inputs(f, seed)
    if dynamic:  # widths static; batch and sequence symbolic
        static_widths(args)
    run = run_pass(block, *args, dynamic=dynamic)
    _check_fused(run, f)

    assert_equal_to_graph(run, f.dtype, f)
    with torch.no_grad():
        ref64 = RopeNormQK(f, seed).double()(*[t.double() for t in args])
    assert_no_worse_than_graph_in_float64(run, ref64, f.dtype)


LLAMA4 = Form("complex", "l2", "bshd", 4, 2, 16, 2, 5, torch.bfloat16)
LLAMA4_F32 = dataclasses.replace(LLAMA4, rope="complex_f32")  # Llama4's graph on torch < 2.13
HUNYUAN = Form("neox", "hf_rms", "bhsd", 4, 2, 16, 2, 5, torch.bfloat16)
NANOCHAT = Form("flipped", "rms", "bhsd", 4, 2, 16, 2, 5, torch.bfloat16)


@pytest.mark.parametrize("kernels", ["inline", "reference"])
@pytest.mark.parametrize("form", [LLAMA4, LLAMA4_F32, HUNYUAN, NANOCHAT],
                         ids=["llama4", "llama4_f32", "hunyuan", "nanochat"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_llama4_and_hunyuan_are_exact(form, dtype, kernels):
    """The models' own spellings: bit for bit the unfused graph, spliced inline or as
    qkfuse::qk_norm_rope calls."""
    f = dataclasses.replace(form, dtype=dtype)
    run = run_pass(RopeNormQK(f), *make_inputs(f, 1), options=Options(kernels=kernels))
    _check_fused(run, f)
    for out, ref in zip(run.out, run.ref):
        assert torch.equal(out, ref)


def test_a_layer_norm_of_a_transposed_rope_is_read_through_its_clone():
    """F.layer_norm on a [B, H, S, D] RoPE output (a transposed view) makes it contiguous first: a
    clone between the RoPE and the var_mean. Both sites fuse (Hypothesis found q refused there)."""
    f = Form("neox", "layer", "bhsd", 2, 1, 8, 1, 2, torch.float32)
    run = run_pass(RopeNormQK(f), *make_inputs(f, 0))
    assert any(n.target == torch.ops.aten.clone.default for n in run.original.graph.nodes)
    _check_fused(run, f)
    assert_equal_to_graph(run, f.dtype, f)


def test_the_family_can_be_switched_off():
    run = run_pass(RopeNormQK(HUNYUAN), *make_inputs(HUNYUAN, 2), options=Options(families=("norm_rope",)))
    assert run.fused == [] and len(run.refused) == 2, run.records
    for out, ref in zip(run.out, run.ref):
        assert torch.equal(out, ref)


def test_rope_family_defers_to_it():
    """With the rope family on and rope_norm off, the RoPE is not fused alone (that would cut it
    from its norm): refused, naming the family whose site it is."""
    run = run_pass(RopeNormQK(HUNYUAN), *make_inputs(HUNYUAN, 3), options=Options(families=("rope",)))
    assert run.fused == [] and run.refused, run.records
    assert all("a rope_norm site, and family 'rope_norm' is disabled" in r.reason for r in run.refused), run.records


# ---- not this family -----------------------------------------------------------------------------

F = dataclasses.replace(HUNYUAN, dtype=torch.float32)


def _tables(f: Form, dtype=None):
    _, _, cos, sin = make_inputs(f, 4)
    return cos[None, None].to(dtype or cos.dtype), sin[None, None].to(dtype or sin.dtype)


def _left_alone(fn, reason, *args):
    run = run_pass(fn, *args)
    assert run.fused == [] and run.refused, run.records
    assert all(reason in r.reason for r in run.refused), run.records
    for out, ref in zip(run.out, run.ref):
        assert torch.equal(out, ref)


def _q(f: Form, dtype=torch.float32):
    return torch.randn(f.B, f.H, f.S, f.D, generator=torch.Generator().manual_seed(5)).to(dtype)


def test_a_rotated_q_used_elsewhere_is_left_alone():
    """The RoPE output also returned: the RoPE cannot go, so nothing is fused."""
    c, s = _tables(F)

    def fn(q):
        r = rope(q, c, s, F)
        return torch.nn.functional.rms_norm(r, (F.D,), eps=1e-6), r

    _left_alone(fn, "outside", _q(F))


def test_a_rope_that_promotes_fuses_with_its_float32_output_kept():
    """float32 tables on a bfloat16 q (no cast back): the RoPE returns float32 and the norm reads that,
    unrounded (Recipe.keep_rope_dtype); equal to the graph."""
    f = dataclasses.replace(F, dtype=torch.bfloat16)
    c, s = _tables(f, torch.float32)

    def fn(q):
        return (torch.nn.functional.rms_norm(rope(q, c, s, f), (f.D,), eps=1e-6),)

    run = run_pass(fn, _q(f, torch.bfloat16))
    assert [(r.family, r.fused) for r in run.records] == [("rope_norm", True)], run.records
    assert "(float32 into the norm)" in run.records[0].recipe, run.records
    assert_equal_to_graph(run, torch.float32)  # (the result is float32)


def test_a_rope_cast_to_a_third_dtype_is_left_alone():
    """A bfloat16 RoPE whose output is cast to float16 before the norm: neither rounded to the input's
    dtype nor kept as the RoPE computed it; refused."""
    f = dataclasses.replace(F, dtype=torch.bfloat16)
    c, s = _tables(f)

    def fn(q):
        return (torch.nn.functional.rms_norm(rope(q, c, s, f).half(), (f.D,), eps=1e-6),)

    _left_alone(fn, "the recipe rounds its output to the input's dtype or keeps it", _q(f, torch.bfloat16))


def test_a_norm_after_a_transpose_is_not_this_family():
    """RoPE on [B, H, S, D], then the norm of its transpose: no per-head norm reads the RoPE's output
    in its layout (the site would need the tables permuted); left alone."""
    c, s = _tables(F)

    def fn(q):
        return (torch.nn.functional.rms_norm(rope(q, c, s, F).transpose(1, 2), (F.D,), eps=1e-6),)

    _left_alone(fn, "feeds this RoPE", _q(F))


# ---- the CUDA path ---------------------------------------------------------------------------------


def _kwargs(node):
    return node.kwargs["kwargs"]


@pytest.mark.parametrize("form", [LLAMA4, LLAMA4_F32, HUNYUAN, NANOCHAT],
                         ids=["llama4", "llama4_f32", "hunyuan", "nanochat"])
def test_cuda_path_is_one_launch_with_the_rope_first(form):
    """kernels='triton': q and k in one launch of the kernel with ROPE_FIRST, reading the graph's
    inputs where they lie, writing outputs that are what the graph returns (no clone)."""
    run = run_pass_as_cuda(RopeNormQK(form), *make_inputs(form, 5), options=Options(kernels="triton"))
    assert [(r.family, r.fused) for r in run.records] == [("rope_norm", True)] * 2, run.records
    (call,) = run.kernel_calls()
    kw = _kwargs(call)
    assert kw["ROPE_FIRST"] is True and kw["HAS_K"] is True
    assert kw["HAS_WEIGHT"] is (form.norm not in ("l2", "rms")) and kw["HALF_TABLE"] is form.rope.startswith("complex")
    assert kw["NEG_SIN"] is (form.rope == "flipped")
    # the norm reads the RoPE's output as x's dtype, or as float32 where the graph does (Llama4 on torch < 2.13)
    assert kw["X_CODE"] == DTYPE_CODES[torch.float32 if form.rope == "complex_f32" else form.dtype]
    assert call.kwargs["tensors_to_clone"] == []
    graph_outputs = next(n for n in run.rewritten.graph.nodes if n.op == "output").args[0]
    assert {kw["qo_ptr"], kw["ko_ptr"]} <= {a.args[0] if a.op == "call_function" else a for a in graph_outputs} | set(
        graph_outputs)


def test_auto_leaves_it_to_inductor_on_cuda():
    """kernels='auto' on CUDA: with full-width tables (HunYuan) the kernel measured slower than
    Inductor, so left unfused, with the reason (kernels='triton' fuses it)."""
    run = run_pass_as_cuda(RopeNormQK(HUNYUAN), *make_inputs(HUNYUAN, 6))
    assert run.fused == [] and len(run.records) == 2, run.records
    assert all("measured slower than Inductor" in r.reason for r in run.records), run.records
    assert run.kernel_calls() == []


@pytest.mark.parametrize("form", [LLAMA4, LLAMA4_F32], ids=["llama4", "llama4_f32"])
def test_auto_fuses_llama4_on_cuda(form):
    """kernels='auto' on CUDA: Llama4's complex RoPE (a half table; Inductor runs complex ops eagerly)
    then its L2 norm is fused, q and k in one launch (measured 3.1x-3.4x on the H200)."""
    run = run_pass_as_cuda(RopeNormQK(form), *make_inputs(form, 6))
    assert [(r.family, r.fused, r.reason) for r in run.records] == [("rope_norm", True, "triton")] * 2, run.records
    assert len(run.kernel_calls()) == 1
