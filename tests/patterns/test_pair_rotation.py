"""The explicit pair rotation (diffusers Wan, SkyReels-V2, Wan-Animate): RoPE written out per pair,

    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1); cos = freqs_cos[..., 0::2]; sin = freqs_sin[..., 1::2]
    out = torch.empty_like(x); out[..., 0::2] = x1 * cos - x2 * sin; out[..., 1::2] = x1 * sin + x2 * cos

read as RoPE with half-width tables (the recipe's ``half_table``), after the norm across heads Wan
has (``torch.nn.RMSNorm(heads * head_dim)``) or a per-head norm.

Drawn: the assembly (setitem into ``empty_like`` as Wan, of the pairs or of the halves; ``stack(..,
-1).flatten(-2)``; ``cat`` of the halves), how the pairs are taken (``unflatten + unbind``, step-2
slices, ``chunk``, half slices), the tables (Wan's step-2 views of full-width float32 freqs, or
half-width tensors, in float32 or the input dtype), operand orders, the norm (across heads or per
head), partial rotary (cat forms), transpose after RoPE, dtype, static or dynamic shapes.
Asserted: one fused q+k call with the half-table recipe, no norm or scatter left, equal to the
unfused graph and no further from float64. Then the forms that are not this rotation, and the CUDA
path (one launch under ``auto``, the table views passed as they are).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qkfuse.options import Options
from tests.graph_harness import (assert_equal_to_graph, assert_left_alone, assert_no_worse_than_graph_in_float64,
                                 run_pass, run_pass_as_cuda, static_widths)

ASSEMBLIES = ["setitem_pairs", "setitem_halves", "stack", "cat"]


@dataclasses.dataclass(frozen=True)
class Form:
    assembly: str
    split: str  # "unbind" | "slice" (pairs) / "chunk" | "slice" (halves)
    tables: str  # "wan_views": freqs[..., 0::2] / [..., 1::2] of full-width tables; "half": [.., rd/2]
    table_dtype: torch.dtype
    order: int  # operand orders (bit 0: table first in the products; bit 1: the sum's terms swapped)
    across: bool  # the norm spans all heads (Wan), else per head
    transpose: bool
    B: int
    S: int
    H: int
    D: int
    rd: int
    dtype: torch.dtype

    @property
    def interleaved(self) -> bool:
        return self.assembly in ("setitem_pairs", "stack")


def pairs(x, f: Form):
    if f.interleaved:
        return x.unflatten(-1, (-1, 2)).unbind(-1) if f.split == "unbind" else (x[..., 0::2], x[..., 1::2])
    h = x.shape[-1] // 2
    return x.chunk(2, dim=-1) if f.split == "chunk" else (x[..., :h], x[..., h:])


def rotate_pairs(x, cos, sin, f: Form):
    xr, xp = (x, None) if f.rd == f.D else (x[..., : f.rd], x[..., f.rd:])
    a, b = pairs(xr, f)

    def mul(p, t):
        return t * p if f.order & 1 else p * t

    first = mul(a, cos) - mul(b, sin)
    second = mul(b, cos) + mul(a, sin) if f.order & 2 else mul(a, sin) + mul(b, cos)
    if f.assembly.startswith("setitem"):
        out = torch.empty_like(xr)
        if f.interleaved:
            out[..., 0::2], out[..., 1::2] = first, second
        else:
            out[..., : f.rd // 2], out[..., f.rd // 2:] = first, second
        out = out.type_as(x)
    elif f.assembly == "stack":
        out = torch.stack((first, second), dim=-1).flatten(-2).type_as(x)
    else:
        out = torch.cat((first, second), dim=-1).type_as(x)
    return out if xp is None else torch.cat([out, xp], dim=-1)


class WanQK(torch.nn.Module):
    def __init__(self, f: Form, seed: int = 0):
        super().__init__()
        self.f = f
        g = torch.Generator().manual_seed(seed)
        n = f.H * f.D if f.across else f.D
        self.norm_q = torch.nn.RMSNorm(n, eps=1e-6)
        self.norm_k = torch.nn.RMSNorm(n, eps=1e-6)
        with torch.no_grad():  # a different weight per head
            for m in (self.norm_q, self.norm_k):
                m.weight.copy_(1 + 0.3 * torch.randn(n, generator=g))
        self.to(f.dtype)

    def forward(self, q, k, freqs_cos, freqs_sin):
        f = self.f
        if f.tables == "wan_views":
            cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
        else:
            cos, sin = freqs_cos, freqs_sin
        out = []
        for x, norm in ((q, self.norm_q), (k, self.norm_k)):
            x = norm(x).unflatten(2, (f.H, -1)) if f.across else norm(x.unflatten(2, (f.H, -1)))
            x = rotate_pairs(x, cos, sin, f)
            out.append(x.transpose(1, 2) if f.transpose else x)
        return tuple(out)


def make_inputs(f: Form, seed: int, dtype=None):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(f.B, f.S, f.H * f.D, generator=g).to(dtype or f.dtype) for _ in range(2))
    # an independent angle per entry: reading the wrong entry of a table shows
    width = f.rd if f.tables == "wan_views" else f.rd // 2
    angle = torch.rand(1, f.S, 1, width, generator=g) * 2 * math.pi
    tdt = dtype or f.table_dtype
    return q, k, angle.cos().to(tdt), angle.sin().to(tdt)


@st.composite
def forms(draw):
    assembly = draw(st.sampled_from(ASSEMBLIES))
    interleaved = assembly in ("setitem_pairs", "stack")
    D = draw(st.sampled_from([8, 16, 32]))
    # partial rotary where it is written (a cat after the rotated part)
    rd = D // 2 if assembly in ("stack", "cat") and draw(st.booleans()) else D
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    return Form(assembly, draw(st.sampled_from(["unbind", "slice"] if interleaved else ["chunk", "slice"])),
                draw(st.sampled_from(["wan_views", "half"])), draw(st.sampled_from([torch.float32, dtype])),
                draw(st.integers(0, 3)), draw(st.booleans()), draw(st.booleans()), draw(st.integers(1, 2)),
                draw(st.integers(1, 5)), draw(st.sampled_from([1, 2, 3])), D, rd, dtype)


@settings(max_examples=max(40, settings.default.max_examples))
@given(f=forms(), dynamic=st.sampled_from([False, False, True]), seed=st.integers(0, 2**16))
def test_pair_rotation_fuses_as_one_call_equal_to_the_graph(f, dynamic, seed):
    block = WanQK(f, seed)
    args = make_inputs(f, seed)
    if dynamic:  # widths static; batch and sequence symbolic
        static_widths(args)
    run = run_pass(block, *args, dynamic=dynamic)

    assert [(r.family, r.fused) for r in run.records] == [("norm_rope", True)] * 2, (f, run.records)
    kind = "interleaved" if f.interleaved else "neox"
    assert all(f"{kind} rope[{f.rd}] half-table" in r.recipe for r in run.records), run.records
    assert all(("across heads" in r.recipe) == f.across for r in run.records), run.records
    assert run.count("qkfuse.qk_norm_rope") == 1
    assert run.count("aten.rsqrt") == 0 and run.count("aten.slice_scatter") == 0

    assert_equal_to_graph(run, f.dtype, f)
    with torch.no_grad():
        block64 = WanQK(f, seed).double()
        ref64 = block64(*[t.double() for t in args])
    assert_no_worse_than_graph_in_float64(run, ref64, f.dtype)


WAN = Form("setitem_pairs", "unbind", "wan_views", torch.float32, 0, True, True, 2, 4, 3, 16, 16, torch.bfloat16)


@pytest.mark.parametrize("kernels", ["inline", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wan_attention_is_exact(dtype, kernels):
    """Wan's own spelling, float32 freqs: the fused graph equals the unfused one bit for bit (float32
    products and sums, one rounding into the empty_like's dtype), spliced inline or as the
    qkfuse::qk_norm_rope op (its schema's half_table field, its fake impl's table checks)."""
    f = dataclasses.replace(WAN, dtype=dtype)
    run = run_pass(WanQK(f), *make_inputs(f, 1), options=Options(kernels=kernels))
    assert len(run.fused) == 2 and run.count("qkfuse.qk_norm_rope") == 1, run.records
    assert all(r.recipe == "rms across heads + interleaved rope[16] half-table" for r in run.records)
    for out, ref in zip(run.out, run.ref):
        assert torch.equal(out, ref)


# ---- not this rotation ---------------------------------------------------------------------------


def _left_alone(rope_fn, reason: str | None = None):
    """Wan's block with `rope_fn` as its RoPE: nothing fused, exact."""
    f = WAN
    block = WanQK(f)

    def fn(q, k, fc, fs):
        out = []
        for x, norm in ((q, block.norm_q), (k, block.norm_k)):
            out.append(rope_fn(norm(x).unflatten(2, (f.H, -1)), fc[..., 0::2], fs[..., 1::2]))
        return tuple(out)

    run = run_pass(fn, *make_inputs(f, 2))
    assert_left_alone(run, reason)


def _setitem(first_fn, second_fn):
    def rope(x, cos, sin):
        x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
        out = torch.empty_like(x)
        out[..., 0::2] = first_fn(x1, x2, cos, sin)
        out[..., 1::2] = second_fn(x1, x2, cos, sin)
        return out
    return rope


@pytest.mark.parametrize("name,rope", [
    ("a sign flipped", _setitem(lambda a, b, c, s: a * c + b * s, lambda a, b, c, s: a * s + b * c)),
    ("the partners swapped", _setitem(lambda a, b, c, s: a * c - b * s, lambda a, b, c, s: b * s + a * c)),
    ("cos and sin swapped in one output", _setitem(lambda a, b, c, s: a * c - b * s,
                                                   lambda a, b, c, s: a * c + b * s)),
    ("another table in the second output", _setitem(lambda a, b, c, s: a * c - b * s,
                                                    lambda a, b, c, s: a * s + b * (c * 2))),
])
def test_other_pair_arithmetic_is_not_a_rotation(name, rope):
    _left_alone(rope)


def test_a_half_left_unwritten_is_not_a_rotation():
    """out[..., 0::2] written twice, out[..., 1::2] never: garbage there; not a candidate."""
    def rope(x, cos, sin):
        x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
        out = torch.empty_like(x)
        out[..., 0::2] = x1 * cos - x2 * sin
        out[..., 0::2] = x1 * sin + x2 * cos
        return out[..., 0::2] * 1  # (only the written half leaves the function)
    _left_alone(rope)


def test_deepseek_de_interleaved_output_after_a_norm_is_refused():
    """Pairs taken as step-2 slices but written back as halves: DeepSeek's de-interleaved RoPE, read as
    a pair rotation with the recipe's deinterleave_input, which is for RoPE alone (the rope family:
    tests/patterns/test_deinterleaved_rope.py); after Wan's norm it is refused with the reason."""
    def rope(x, cos, sin):
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    _left_alone(rope, "de-interleaved RoPE (apply_rotary_pos_emb_interleave) after a q/k norm")


def test_pairs_from_halves_written_as_pairs_is_not_a_rotation():
    """The inverse permutation (halves read as pairs, written interleaved): no recipe reads it, and it
    is no candidate."""
    def rope(x, cos, sin):
        h = x.shape[-1] // 2
        x1, x2 = x[..., :h], x[..., h:]
        return torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
    _left_alone(rope)


# ---- CUDA: one launch, the views passed ----------------------------------------------------------


@pytest.mark.parametrize("kernels", ["auto", "triton"])
def test_cuda_fuses_it_in_one_launch(kernels):
    """On CUDA the Triton kernel's half-table mode serves Wan, under 'auto' too (it beat Inductor by
    1.96x-2.88x device time on the H200, benchmarks/results/2026-12-02-h200-wan.md): one launch for
    q and k, the step-2 views passed as they are."""
    pytest.importorskip("triton")
    run = run_pass_as_cuda(WanQK(WAN), *make_inputs(WAN, 0), options=Options(kernels=kernels))
    assert len(run.fused) == 2 and len(run.kernel_calls()) == 1, run.records
    graph = run.rewritten.graph
    assert not [n for n in graph.nodes if n.target in (torch.ops.aten.rsqrt.default,
                                                       torch.ops.aten.slice_scatter.default)]
    call = run.kernel_calls()[0]
    tables = [call.kwargs["kwargs"][name] for name in ("cos_ptr", "sin_ptr")]
    assert all(t.target is torch.ops.aten.slice.Tensor and t.args[4] == 2 for t in tables), tables
