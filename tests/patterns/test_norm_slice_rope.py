"""RoPE on a slice of a norm output's rows, the rows put back together (the ``norm_slice_rope``
family): video and image DiTs that append text tokens rotate only the image rows of the normed q/k.

    HunyuanVideo, HunyuanImage:  q = cat([apply_rotary_emb(q[:, :-T], freqs), q[:, -T:]], dim=1)
    CogView4, CogVideoX:         q[:, :, T:] = apply_rotary_emb(q[:, :, T:], freqs)

Drawn: the spelling (concatenation with the rotated rows first or last, slice assignment of the
head or the tail rows), the layout (``[B, S, H, D]`` sliced along S, ``[B, H, S, D]`` after a
transpose), the norm (RMSNorm or LayerNorm, weight or none), the RoPE (diffusers' interleaved with
float32 tables, HF's neox in the input dtype or float32), the lengths, k with fewer heads, dtype,
static or dynamic shapes. Asserted: one fused q+k call, no norm, slice or concatenation left, equal
to the unfused graph and no further from float64. Then what is not this family, and the CUDA path:
one launch per part reading its rows of the one input and writing its rows of the output in place.
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

SPELLINGS = ["cat_rotated_first", "cat_rotated_last", "assign_tail", "assign_head"]


@dataclasses.dataclass(frozen=True)
class Form:
    spelling: str
    rotated: int  # rows rotated
    plain: int  # rows passed through (the text tokens)
    layout: str  # "bshd" (sliced along dim 1) | "bhsd" (transposed after the norm, sliced along 2)
    norm: str  # "rms" | "layer"
    weight: bool
    rope: str  # "interleaved" (diffusers, float32 tables) | "neox" (HF rotate_half)
    table_dtype: torch.dtype
    H: int
    Hk: int
    D: int
    B: int
    dtype: torch.dtype

    @property
    def seq_dim(self) -> int:
        return {"bshd": 1, "bhsd": 2}[self.layout]

    @property
    def rotated_first(self) -> bool:
        return self.spelling in ("cat_rotated_first", "assign_head")


def rope(x, cos, sin, f: Form):
    if f.rope == "interleaved":  # diffusers apply_rotary_emb(use_real_unbind_dim=-1)
        xr, xi = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
        rot = torch.stack([-xi, xr], dim=-1).flatten(-2)
        return (x.float() * cos + rot.float() * sin).to(x.dtype)
    x1, x2 = x[..., : f.D // 2], x[..., f.D // 2:]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def rows(x, f: Form, start=None, end=None):
    return x[:, start:end] if f.seq_dim == 1 else x[:, :, start:end]


class SliceRopeQK(torch.nn.Module):
    """q and k normed per head, the image rows rotated and put back with the text rows."""

    def __init__(self, f: Form, seed: int = 0):
        super().__init__()
        self.f = f
        g = torch.Generator().manual_seed(seed)
        if f.norm == "rms":
            self.norms = torch.nn.ModuleList(torch.nn.RMSNorm(f.D, eps=1e-6, elementwise_affine=f.weight)
                                             for _ in "qk")
        else:
            self.norms = torch.nn.ModuleList(torch.nn.LayerNorm(f.D, eps=1e-5, elementwise_affine=f.weight)
                                             for _ in "qk")
        if f.weight:
            with torch.no_grad():
                for m in self.norms:
                    m.weight.copy_(1 + 0.3 * torch.randn(f.D, generator=g))
                    if getattr(m, "bias", None) is not None:
                        m.bias.copy_(0.2 * torch.randn(f.D, generator=g))
        self.to(f.dtype)

    def forward(self, q, k, cos, sin):
        f = self.f
        cos, sin = (t[None, :, None, :] if f.seq_dim == 1 else t[None, None] for t in (cos, sin))
        out = []
        for norm, x, heads in ((self.norms[0], q, f.H), (self.norms[1], k, f.Hk)):
            x = norm(x.unflatten(-1, (heads, -1)))
            if f.layout == "bhsd":
                x = x.transpose(1, 2)
            # the rotated rows: [0, rotated) or [plain, plain + rotated)
            cut = f.rotated if f.rotated_first else f.plain
            if f.spelling == "cat_rotated_first":  # HunyuanVideo: q[:, :-T] rotated, q[:, -T:] kept
                x = torch.cat([rope(rows(x, f, None, -f.plain), cos, sin, f), rows(x, f, -f.plain)], f.seq_dim)
            elif f.spelling == "cat_rotated_last":
                x = torch.cat([rows(x, f, None, cut), rope(rows(x, f, cut), cos, sin, f)], f.seq_dim)
            elif f.spelling == "assign_tail":  # CogView4: q[:, :, T:] = rope(q[:, :, T:])
                if f.seq_dim == 1:
                    x[:, cut:] = rope(x[:, cut:], cos, sin, f)
                else:
                    x[:, :, cut:] = rope(x[:, :, cut:], cos, sin, f)
            else:
                if f.seq_dim == 1:
                    x[:, :cut] = rope(x[:, :cut], cos, sin, f)
                else:
                    x[:, :, :cut] = rope(x[:, :, :cut], cos, sin, f)
            out.append(x)
        return tuple(out)


def make_inputs(f: Form, seed: int):
    g = torch.Generator().manual_seed(seed)
    s = f.rotated + f.plain
    q = torch.randn(f.B, s, f.H * f.D, generator=g).to(f.dtype)
    k = torch.randn(f.B, s, f.Hk * f.D, generator=g).to(f.dtype)
    angle = torch.rand(f.rotated, f.D // 2, generator=g) * 2 * math.pi
    angle = angle.repeat_interleave(2, dim=-1) if f.rope == "interleaved" else torch.cat([angle, angle], dim=-1)
    return q, k, angle.cos().to(f.table_dtype), angle.sin().to(f.table_dtype)


@st.composite
def forms(draw):
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    kind = draw(st.sampled_from(["interleaved", "neox"]))
    table_dtype = torch.float32 if kind == "interleaved" else draw(st.sampled_from([torch.float32, dtype]))
    H = draw(st.sampled_from([1, 2, 4]))
    return Form(draw(st.sampled_from(SPELLINGS)), draw(st.integers(2, 6)), draw(st.integers(1, 4)),
                draw(st.sampled_from(["bshd", "bhsd"])), draw(st.sampled_from(["rms", "layer"])),
                draw(st.booleans()), kind, table_dtype, H, draw(st.sampled_from(sorted({1, H}))),
                draw(st.sampled_from([8, 16])), draw(st.integers(1, 2)), dtype)


def _check_fused(run, f: Form):
    assert [(r.family, r.fused) for r in run.records] == [("norm_slice_rope", True)] * 2, (f, run.records)
    assert all("over a concatenation of 2 parts" in r.recipe for r in run.records), run.records
    assert run.count("qkfuse.qk_norm_rope") == 1  # both parts of q and k in one call
    for left in ("aten.rsqrt", "aten.cat", "aten.slice_scatter", "aten.var_mean"):
        assert run.count(left) == 0, (left, run.rewritten.graph)


@settings(max_examples=max(40, settings.default.max_examples))
@given(f=forms(), dynamic=st.sampled_from([False, False, True]), seed=st.integers(0, 2**16))
def test_rope_on_a_slice_of_the_norm_rows_fuses_equal_to_the_graph(f, dynamic, seed):
    block = SliceRopeQK(f, seed)
    args = make_inputs(f, seed)
    if dynamic:  # widths static; batch and sequence symbolic
        static_widths(args)
    run = run_pass(block, *args, dynamic=dynamic)
    _check_fused(run, f)

    assert_equal_to_graph(run, f.dtype, f)
    with torch.no_grad():
        ref64 = SliceRopeQK(f, seed).double()(*[t.double() for t in args])
    assert_no_worse_than_graph_in_float64(run, ref64, f.dtype)


HUNYUAN = Form("cat_rotated_first", 6, 3, "bshd", "rms", True, "interleaved", torch.float32, 2, 2, 16, 2,
               torch.bfloat16)
COGVIEW = Form("assign_tail", 5, 3, "bhsd", "layer", False, "neox", torch.float32, 2, 2, 16, 1, torch.bfloat16)


@pytest.mark.parametrize("kernels", ["inline", "reference"])
@pytest.mark.parametrize("form", [HUNYUAN, COGVIEW], ids=["hunyuan_video", "cogview4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hunyuan_and_cogview_spellings_are_exact(form, dtype, kernels):
    """The models' own spellings, spliced inline or as qkfuse::qk_norm_rope calls per part: with
    RMSNorm bit for bit the unfused graph; with CogView4's LayerNorm equal within the dtype's
    rounding (the variance is summed in another order than var_mean's)."""
    f = dataclasses.replace(form, dtype=dtype)
    run = run_pass(SliceRopeQK(f), *make_inputs(f, 1), options=Options(kernels=kernels))
    assert [(r.family, r.fused) for r in run.records] == [("norm_slice_rope", True)] * 2, run.records
    if f.norm == "rms":
        for out, ref in zip(run.out, run.ref):
            assert torch.equal(out, ref)
    else:
        assert_equal_to_graph(run, dtype, f)
    cog_rms = dataclasses.replace(f, norm="rms")
    run = run_pass(SliceRopeQK(cog_rms), *make_inputs(cog_rms, 1), options=Options(kernels=kernels))
    assert [r.fused for r in run.records] == [True, True], run.records
    for out, ref in zip(run.out, run.ref):
        assert torch.equal(out, ref)


def test_the_family_can_be_switched_off():
    """families without norm_slice_rope: refused, the reason naming the family; nothing changes."""
    run = run_pass(SliceRopeQK(HUNYUAN), *make_inputs(HUNYUAN, 2), options=Options(families=("norm_rope",)))
    assert run.fused == [] and len(run.refused) == 2, run.records
    assert all("norm_slice_rope" in r.reason for r in run.refused), run.records
    for out, ref in zip(run.out, run.ref):
        assert torch.equal(out, ref)


# ---- not this family -----------------------------------------------------------------------------

F = dataclasses.replace(HUNYUAN, dtype=torch.float32)


def _cos_sin(n, seed=3):
    angle = torch.rand(n, F.D // 2, generator=torch.Generator().manual_seed(seed)) * 2 * math.pi
    angle = angle.repeat_interleave(2, dim=-1)
    return angle.cos()[None, :, None, :], angle.sin()[None, :, None, :]


def _refused(fn, reason, *shapes):
    g = torch.Generator().manual_seed(7)
    run = run_pass(fn, *(torch.randn(*s, generator=g) for s in shapes))
    assert run.fused == [] and run.refused, run.records
    assert all(reason in r.reason for r in run.refused), run.records
    for out, ref in zip(run.out, run.ref):
        assert torch.equal(out, ref)
    return run


def test_two_rotated_parts_are_left_alone():
    """Both slices rotated (with their own tables): the other part is not plain rows, not fused yet."""
    c, s = _cos_sin(4)

    def fn(q):
        x = torch.nn.functional.rms_norm(q, (F.D,), eps=1e-6)
        return (torch.cat([rope(x[:, :4], c, s, F), rope(x[:, 4:], c, s, F)], 1),)

    _refused(fn, "a RoPE on each part", (1, 8, 2, F.D))


def test_a_norm_output_used_elsewhere_is_left_alone():
    """The normed rows also returned: the norm cannot go, so nothing is fused."""
    c, s = _cos_sin(5)

    def fn(q):
        x = torch.nn.functional.rms_norm(q, (F.D,), eps=1e-6)
        return torch.cat([rope(x[:, :5], c, s, F), x[:, 5:]], 1), x

    _refused(fn, "outside", (1, 8, 2, F.D))


def test_parts_that_do_not_tile_the_rows_are_left_alone():
    """The rows put back skip some (rows 5..6 dropped): not the norm output re-assembled."""
    c, s = _cos_sin(5)

    def fn(q):
        x = torch.nn.functional.rms_norm(q, (F.D,), eps=1e-6)
        return (torch.cat([rope(x[:, :5], c, s, F), x[:, 6:]], 1),)

    _refused(fn, "cover the norm output's rows", (1, 8, 2, F.D))


def test_a_part_from_another_tensor_is_left_alone():
    """The pass-through rows come from another tensor (not the norm output): refused."""
    c, s = _cos_sin(5)

    def fn(q, other):
        x = torch.nn.functional.rms_norm(q, (F.D,), eps=1e-6)
        return (torch.cat([rope(x[:, :5], c, s, F), other[:, 5:]], 1),)

    _refused(fn, "not rows of the same norm output", (1, 8, 2, F.D), (1, 8, 2, F.D))


# ---- the CUDA path ---------------------------------------------------------------------------------


def _kwargs(node):
    return node.kwargs["kwargs"]


@pytest.mark.parametrize("form", [HUNYUAN, COGVIEW], ids=["hunyuan_video", "cogview4"])
def test_cuda_path_launches_once_per_part_into_one_output(form):
    """kernels='triton': part i of q and k in launch i, each reading its rows of the one norm input at
    an offset and writing its rows of the one output at an offset (after Inductor's reinplacing
    nothing is cloned); the rotated part reads the RoPE's tables from row 0, the other has none."""
    run = run_pass_as_cuda(SliceRopeQK(form), *make_inputs(form, 5), options=Options(kernels="triton"))
    assert [(r.family, r.fused) for r in run.records] == [("norm_slice_rope", True)] * 2, run.records
    calls = run.kernel_calls()
    assert len(calls) == 2
    outs = {_kwargs(c)["qo_ptr"] for c in calls}, {_kwargs(c)["ko_ptr"] for c in calls}
    ins = {_kwargs(c)["q_ptr"] for c in calls}, {_kwargs(c)["k_ptr"] for c in calls}
    assert all(len(o) == 1 for o in (*outs, *ins))  # one buffer each, read or written by every launch
    # the graph's inputs (through their head views), read where they lie
    assert all(n.op == "placeholder" or n.args[0].op == "placeholder" for n in (*ins[0], *ins[1]))
    assert all(c.kwargs["tensors_to_clone"] == [] for c in calls)
    q_in, q_out = next(iter(ins[0])).meta["val"], next(iter(outs[0])).meta["val"]
    starts = [0, form.rotated] if form.rotated_first else [0, form.plain]
    assert [_kwargs(c)["q_off"] for c in calls] == [s * q_in.stride(1) for s in starts]  # x is [B, S, H, D]
    assert [_kwargs(c)["qo_off"] for c in calls] == [s * q_out.stride(form.seq_dim) for s in starts]
    rotated_call = 0 if form.rotated_first else 1
    assert _kwargs(calls[rotated_call])["c_off"] == 0
    assert [_kwargs(c)["n_tokens"] for c in calls] == [
        form.B * n for n in ((form.rotated, form.plain) if form.rotated_first else (form.plain, form.rotated))]
    graph_outputs = next(n for n in run.rewritten.graph.nodes if n.op == "output").args[0]
    assert set(graph_outputs) == outs[0] | outs[1]


def test_auto_fuses_it_on_cuda():
    """kernels='auto' on CUDA picks the Triton kernel (benchmarks/bench_slice.py measured it faster
    than Inductor: 1.58x-3.79x on the q/k block, 1.01x-1.17x with SDPA after it, H200): one launch per
    part, the records fused."""
    run = run_pass_as_cuda(SliceRopeQK(HUNYUAN), *make_inputs(HUNYUAN, 6))
    assert [(r.family, r.fused) for r in run.records] == [("norm_slice_rope", True)] * 2, run.records
    assert len(run.kernel_calls()) == 2, run.kernel_calls()  # the rotated rows and the pass-through rows