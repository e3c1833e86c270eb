"""Norms concatenated before the RoPE (the ``norm_cat_rope`` family): Flux's double-stream blocks
(and Flux2, Bria, LongCat-Image, Ovis-Image) norm the text and the image q (and k) apart, concatenate
them along the sequence, then rotate the whole:

    q = torch.cat([norm_added_q(encoder_q), norm_q(q)], dim=1); q = apply_rotary_emb(q, (cos, sin))

Drawn: 2 or 3 parts of drawn lengths, the layout (``[B, S, H, D]`` joined along S as Flux,
``[B, H, S, D]`` after a transpose, ``[S, H, D]`` with no batch), the RoPE (diffusers' interleaved
with float32 tables, HF's neox in the input dtype or float32), each part's norm (weight or none, its
own eps), k with fewer heads, dtype, static or dynamic shapes. Asserted: one fused q+k call, no norm
or concatenation left, equal to the unfused graph and no further from float64. Then what is not this
family, and the CUDA path: one launch per part, each writing its rows of the outputs in place.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qkfuse.options import Options
from tests.graph_harness import (assert_equal_to_graph, assert_no_worse_than_graph_in_float64, run_pass,
                                 run_pass_as_cuda, static_widths)

LAYOUTS = ["bshd", "bhsd", "shd"]


@dataclasses.dataclass(frozen=True)
class Form:
    lengths: tuple[int, ...]  # the parts' sequence lengths, in concatenation order
    layout: str
    rope: str  # "interleaved" (diffusers, float32 tables) | "neox" (HF rotate_half)
    table_dtype: torch.dtype
    weights: tuple[bool, ...]  # per part: the norm has a weight
    H: int
    Hk: int
    D: int
    B: int
    dtype: torch.dtype

    @property
    def seq_dim(self) -> int:
        return {"bshd": 1, "bhsd": 2, "shd": 0}[self.layout]


def rope(x, cos, sin, f: Form):
    if f.rope == "interleaved":  # diffusers apply_rotary_emb(use_real_unbind_dim=-1)
        xr, xi = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
        rot = torch.stack([-xi, xr], dim=-1).flatten(-2)
        return (x.float() * cos + rot.float() * sin).to(x.dtype)
    x1, x2 = x[..., : f.D // 2], x[..., f.D // 2:]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def tables_as_broadcast(cos, f: Form):
    """cos [S, D] -> broadcast against the concatenation."""
    return {"bshd": cos[None, :, None, :], "bhsd": cos[None, None], "shd": cos[:, None, :]}[f.layout]


class JointQK(torch.nn.Module):
    """q and k of each part normed by their own torch.nn.RMSNorm, joined along the sequence, rotated."""

    def __init__(self, f: Form, seed: int = 0):
        super().__init__()
        self.f = f
        g = torch.Generator().manual_seed(seed)
        self.norms = torch.nn.ModuleList()
        for i, w in enumerate(f.weights):
            for _ in ("q", "k"):
                m = torch.nn.RMSNorm(f.D, eps=10.0 ** -(5 + i), elementwise_affine=w)
                if w:
                    with torch.no_grad():
                        m.weight.copy_(1 + 0.3 * torch.randn(f.D, generator=g))
                self.norms.append(m)
        self.to(f.dtype)

    def forward(self, *args):
        f = self.f
        n = len(f.lengths)
        qs, ks, cos, sin = args[:n], args[n:2 * n], args[2 * n], args[2 * n + 1]
        cos, sin = tables_as_broadcast(cos, f), tables_as_broadcast(sin, f)
        out = []
        for which, xs, heads in ((0, qs, f.H), (1, ks, f.Hk)):
            parts = []
            for i, x in enumerate(xs):
                x = self.norms[2 * i + which](x.unflatten(-1, (heads, -1)))
                parts.append(x.transpose(1, 2) if f.layout == "bhsd" else x)
            joined = torch.cat(parts, dim=f.seq_dim)
            out.append(rope(joined, cos, sin, f))
        return tuple(out)


def make_inputs(f: Form, seed: int):
    g = torch.Generator().manual_seed(seed)
    lead = () if f.layout == "shd" else (f.B,)
    qs = [torch.randn(*lead, s, f.H * f.D, generator=g).to(f.dtype) for s in f.lengths]
    ks = [torch.randn(*lead, s, f.Hk * f.D, generator=g).to(f.dtype) for s in f.lengths]
    # an independent angle per position and pair: reading another part's rows of the table shows
    angle = torch.rand(sum(f.lengths), f.D // 2, generator=g) * 2 * math.pi
    if f.rope == "interleaved":
        angle = angle.repeat_interleave(2, dim=-1)
    else:
        angle = torch.cat([angle, angle], dim=-1)
    return (*qs, *ks, angle.cos().to(f.table_dtype), angle.sin().to(f.table_dtype))


@st.composite
def forms(draw):
    n = draw(st.integers(2, 3))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    kind = draw(st.sampled_from(["interleaved", "neox"]))
    table_dtype = torch.float32 if kind == "interleaved" else draw(st.sampled_from([torch.float32, dtype]))
    H = draw(st.sampled_from([1, 2, 4]))
    return Form(tuple(draw(st.integers(1, 5)) for _ in range(n)), draw(st.sampled_from(LAYOUTS)), kind, table_dtype,
                tuple(draw(st.booleans()) for _ in range(n)), H, draw(st.sampled_from(sorted({1, H}))),
                draw(st.sampled_from([8, 16])), draw(st.integers(1, 2)), dtype)


def _check_fused(run, f: Form):
    assert [(r.family, r.fused) for r in run.records] == [("norm_cat_rope", True)] * 2, (f, run.records)
    assert all(f"over a concatenation of {len(f.lengths)} parts" in r.recipe for r in run.records), run.records
    assert run.count("qkfuse.qk_norm_rope") == 1  # q and k of every part in one call
    assert run.count("aten.rsqrt") == 0 and run.count("aten.cat") == 0


@settings(max_examples=max(40, settings.default.max_examples))
@given(f=forms(), dynamic=st.sampled_from([False, False, True]), seed=st.integers(0, 2**16))
def test_concatenated_norms_fuse_with_their_rope_equal_to_the_graph(f, dynamic, seed):
    block = JointQK(f, seed)
    args = make_inputs(f, seed)
    if dynamic:  # widths static; batch and sequence symbolic
        static_widths(args)
    run = run_pass(block, *args, dynamic=dynamic)
    _check_fused(run, f)

    assert_equal_to_graph(run, f.dtype, f)
    with torch.no_grad():
        ref64 = JointQK(f, seed).double()(*[t.double() for t in args])
    assert_no_worse_than_graph_in_float64(run, ref64, f.dtype)


FLUX = Form((3, 5), "bshd", "interleaved", torch.float32, (True, True), 2, 2, 16, 2, torch.bfloat16)


@pytest.mark.parametrize("kernels", ["inline", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flux_double_stream_is_exact(dtype, kernels):
    """Flux's spelling (torch.nn.RMSNorm, interleaved RoPE in float32): bit for bit the unfused graph,
    spliced inline or as qkfuse::qk_norm_rope calls per part."""
    f = dataclasses.replace(FLUX, dtype=dtype)
    run = run_pass(JointQK(f), *make_inputs(f, 1), options=Options(kernels=kernels))
    assert [(r.family, r.fused) for r in run.records] == [("norm_cat_rope", True)] * 2, run.records
    for out, ref in zip(run.out, run.ref):
        assert torch.equal(out, ref)


def test_the_family_can_be_switched_off():
    """families without norm_cat_rope: refused, the reason naming the family."""
    run = run_pass(JointQK(FLUX), *make_inputs(FLUX, 2), options=Options(families=("norm_rope",)))
    assert run.fused == [] and len(run.refused) == 2, run.records
    assert all("concatenation" in r.reason and "norm_cat_rope" in r.reason for r in run.refused), run.records
    for out, ref in zip(run.out, run.ref):
        assert torch.equal(out, ref)


# ---- not this family -----------------------------------------------------------------------------


def _joint_fn(f: Form, part_fn):
    """JointQK's q path with part 0 computed by part_fn(x, norm) instead of norm(x)."""
    block = JointQK(f)

    def fn(q0, q1, cos, sin):
        parts = [part_fn(q0.unflatten(-1, (f.H, -1)), block.norms[0]), block.norms[2](q1.unflatten(-1, (f.H, -1)))]
        joined = torch.cat(parts, dim=1)
        return rope(joined, tables_as_broadcast(cos, f), tables_as_broadcast(sin, f), f), parts[0]

    q0, q1, _, _, cos, sin = make_inputs(f, 3)
    return fn, (q0, q1, cos, sin)


@pytest.mark.parametrize("name,part_fn,reason", [
    ("a part with no norm", lambda x, norm: x * 2, "part 0 of the concatenation before the RoPE"),
    ("a part's norm output used again", lambda x, norm: norm(x), "has a user outside the chain"),
])
def test_other_concatenations_are_left_alone(name, part_fn, reason):
    """The function also returns part 0 (so a norm output used again is visible); nothing fused."""
    fn, args = _joint_fn(FLUX, part_fn)
    run = run_pass(fn, *args)
    assert run.fused == [] and run.refused, run.records
    assert all(reason in r.reason for r in run.refused), run.records
    for out, ref in zip(run.out, run.ref):
        assert torch.equal(out, ref)


def test_rope_family_defers_to_a_concatenation_of_norms():
    """With the rope family on and norm_cat_rope off, the RoPE is not fused alone (that would cut
    the norms from the RoPE): refused, naming the family whose site it is."""
    run = run_pass(JointQK(FLUX), *make_inputs(FLUX, 4), options=Options(families=("rope",)))
    assert run.fused == [] and run.refused, run.records
    assert all("a norm_cat_rope site, and family 'norm_cat_rope' is disabled" in r.reason for r in run.refused)


# ---- the CUDA path ---------------------------------------------------------------------------------


def _kwargs(node):
    return node.kwargs["kwargs"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_cuda_path_launches_once_per_part_into_one_output(layout):
    """kernels='triton': part i of q and k in launch i, every launch writing its rows of the two
    whole outputs at an offset (no view, no copy: after Inductor's reinplacing nothing is cloned), its
    rows of cos/sin read at an offset of the whole tables; the outputs are what attention reads."""
    f = dataclasses.replace(FLUX, layout=layout, lengths=(3, 5, 2), weights=(True, False, True))
    run = run_pass_as_cuda(JointQK(f), *make_inputs(f, 5), options=Options(kernels="triton"))
    assert [(r.family, r.fused) for r in run.records] == [("norm_cat_rope", True)] * 2, run.records
    calls = run.kernel_calls()
    assert len(calls) == 3
    outs = {_kwargs(c)["qo_ptr"] for c in calls}, {_kwargs(c)["ko_ptr"] for c in calls}
    assert all(len(o) == 1 for o in outs)  # one buffer each for q and k, written by every launch
    assert all(c.kwargs["tensors_to_clone"] == [] for c in calls)
    q_out = next(iter(outs[0])).meta["val"]
    seq_stride = q_out.stride(f.seq_dim)
    starts = [0, 3, 8]
    assert [_kwargs(c)["qo_off"] for c in calls] == [s * seq_stride for s in starts]
    assert [_kwargs(c)["c_off"] for c in calls] == [s * f.D for s in starts]
    assert [_kwargs(c)["HAS_WEIGHT"] for c in calls] == [True, False, True]
    assert [_kwargs(c)["n_tokens"] for c in calls] == [(1 if layout == "shd" else f.B) * n for n in f.lengths]
    graph_outputs = next(n for n in run.rewritten.graph.nodes if n.op == "output").args[0]
    assert set(graph_outputs) == outs[0] | outs[1]


def test_auto_fuses_it_on_cuda():
    """kernels='auto' (the default) on CUDA picks the Triton kernel for it: measured against Inductor,
    benchmarks/results/2026-12-02-h200-concat.md. The same launches as kernels='triton'."""
    auto = run_pass_as_cuda(JointQK(FLUX), *make_inputs(FLUX, 6))
    triton = run_pass_as_cuda(JointQK(FLUX), *make_inputs(FLUX, 6), options=Options(kernels="triton"))
    assert [(r.family, r.fused) for r in auto.records] == [("norm_cat_rope", True)] * 2, auto.records
    assert len(auto.kernel_calls()) == len(FLUX.lengths) == len(triton.kernel_calls())
    assert [_kwargs(c)["qo_off"] for c in auto.kernel_calls()] == [_kwargs(c)["qo_off"] for c in triton.kernel_calls()]
