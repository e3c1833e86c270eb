"""RoPE written as a complex multiply (diffusers QwenImage, Lumina2, Z-Image; transformers Llama4,
DeepSeek-V2):

    x_c = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    out = torch.view_as_real(x_c * freqs_cis.unsqueeze(1)).flatten(3).type_as(x)

(a + ib)(c + id) = (ac - bd) + i(ad + bc): the interleaved pair rotation with one (cos, sin) =
(real, imag) of freqs per pair, the recipe's ``half_table``. The tables are no graph nodes; the pass
passes ``view_as_real(freqs)[..., 0]`` / ``[..., 1]`` (float32 views, last-dim stride 2).

Numerics: torch's CPU complex multiply rounds each product and the sum (what the recipe does) in its
vectorised loop, but uses an FMA (``fma(a, c, -round(b*d))``) in its scalar loop, which takes the
pairs left over after whole vectors (8 complex64 on AVX512, 4 on AVX2): so for those the fused call
differs from the graph by one float32 rounding of a product. The drawn tests hold it to the dtype's
rounding; the exact test uses a pair count that whole vectors cover.

Drawn: dtype, the layout (RoPE on [B, S, H, D] then a transpose, or on [B, H, S, D] after it), a
per-head RMSNorm in front or none (the ``rope`` family), how the pairs are viewed (``reshape`` /
``unflatten``) and flattened back (``flatten(3)`` / ``flatten(-2)``), the operand order, freqs per
position ([S, D/2], QwenImage) or per batch and position ([B, S, D/2], Llama4), of any modulus,
partial rotary (a cat after it), static or dynamic shapes. Asserted: one fused q+k call, no complex
op left, equal to the unfused graph within the dtype's rounding and no further from float64. Then
the forms that must be left alone, and the CUDA path (one launch, the views passed, no copy).
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


@dataclasses.dataclass(frozen=True)
class Form:
    norm: bool  # a per-head RMSNorm in front (norm_rope), else none (the rope family)
    heads_first: bool  # x is [B, H, S, D] (transposed before norm and RoPE), else [B, S, H, D]
    pairs: str  # "reshape" | "unflatten"
    flatten: str  # "flatten3" | "flatten_last"
    freqs_first: bool  # freqs * x_c
    per_batch: bool  # freqs [B, S, D/2] (Llama4), else [S, D/2] (QwenImage)
    B: int
    S: int
    H: int
    D: int
    rd: int
    dtype: torch.dtype

    @property
    def family(self) -> str:
        return "norm_rope" if self.norm else "rope"


def _wide(x):
    # float32 as the models write it (x.float()); float64 for the reference
    return x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)


def complex_rope(x, freqs, f: Form):
    """freqs: complex, already shaped to broadcast against x's pairs."""
    xr, xp = (x, None) if f.rd == f.D else (x[..., : f.rd], x[..., f.rd:])
    w = _wide(xr)
    pairs = w.reshape(*w.shape[:-1], -1, 2) if f.pairs == "reshape" else w.unflatten(-1, (-1, 2))
    xc = torch.view_as_complex(pairs)
    prod = freqs * xc if f.freqs_first else xc * freqs
    out = torch.view_as_real(prod)
    out = (out.flatten(3) if f.flatten == "flatten3" else out.flatten(-2)).type_as(x)
    return out if xp is None else torch.cat([out, xp], dim=-1)


class QwenQK(torch.nn.Module):
    def __init__(self, f: Form, seed: int = 0):
        super().__init__()
        self.f = f
        g = torch.Generator().manual_seed(seed)
        self.norm_q = torch.nn.RMSNorm(f.D, eps=1e-6)
        self.norm_k = torch.nn.RMSNorm(f.D, eps=1e-6)
        with torch.no_grad():
            for m in (self.norm_q, self.norm_k):
                m.weight.copy_(1 + 0.3 * torch.randn(f.D, generator=g))
        self.to(f.dtype)

    def forward(self, q, k, freqs):
        f = self.f
        # freqs [S, P] or [B, S, P] -> broadcast to the pairs of x ([B, S, H, P] or [B, H, S, P])
        if f.per_batch:
            fr = freqs[:, None] if f.heads_first else freqs[:, :, None]
        else:
            fr = freqs if f.heads_first else freqs.unsqueeze(1)
        out = []
        for x, norm in ((q, self.norm_q), (k, self.norm_k)):
            x = x.unflatten(2, (f.H, f.D))
            x = x.transpose(1, 2) if f.heads_first else x
            x = norm(x) if f.norm else x
            x = complex_rope(x, fr, f)
            out.append(x if f.heads_first else x.transpose(1, 2))
        return tuple(out)


def make_inputs(f: Form, seed: int, dtype=None, modulus: bool = True):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(f.B, f.S, f.H * f.D, generator=g).to(dtype or f.dtype) for _ in range(2))
    lead = (f.B, f.S) if f.per_batch else (f.S,)
    angle = torch.rand(*lead, f.rd // 2, generator=g) * 2 * math.pi  # an independent angle per entry
    r = 0.5 + torch.rand(*lead, f.rd // 2, generator=g) if modulus else torch.ones(*lead, f.rd // 2)
    return q, k, torch.polar(r, angle)


@st.composite
def forms(draw):
    D = draw(st.sampled_from([8, 16, 32]))
    rd = D // 2 if draw(st.booleans()) else D
    return Form(draw(st.booleans()), draw(st.booleans()), draw(st.sampled_from(["reshape", "unflatten"])),
                draw(st.sampled_from(["flatten3", "flatten_last"])), draw(st.booleans()), draw(st.booleans()),
                draw(st.integers(1, 2)), draw(st.integers(1, 5)), draw(st.sampled_from([1, 2, 3])), D, rd,
                draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16])))


@settings(max_examples=max(40, settings.default.max_examples))
@given(f=forms(), dynamic=st.sampled_from([False, False, True]), seed=st.integers(0, 2**16))
def test_complex_rope_fuses_as_one_call_equal_to_the_graph(f, dynamic, seed):
    block = QwenQK(f, seed)
    args = make_inputs(f, seed)
    if dynamic:  # widths static; batch and sequence symbolic
        static_widths(args)
    run = run_pass(block, *args, dynamic=dynamic, options=Options(families=("norm_rope", "rope")))

    assert [(r.family, r.fused) for r in run.records] == [(f.family, True)] * 2, (f, run.records)
    assert all(f"interleaved rope[{f.rd}] half-table" in r.recipe for r in run.records), run.records
    assert run.count("qkfuse.qk_norm_rope") == 1
    assert run.count("aten.view_as_complex") == 0 and run.count("aten.rsqrt") == 0
    # the tables: views of freqs, nothing complex computed
    assert not [n for n in run.rewritten.graph.nodes if n.op == "call_function" and "qkfuse" not in n.meta
                and isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].is_complex()
                and n.target not in (torch.ops.aten.unsqueeze.default, torch.ops.aten.slice.Tensor,
                                     torch.ops.aten.reshape.default)]

    assert_equal_to_graph(run, f.dtype, f)
    with torch.no_grad():
        ref64 = QwenQK(f, seed).double()(*[t.to(torch.complex128 if t.is_complex() else torch.float64)
                                           for t in args])
    assert_no_worse_than_graph_in_float64(run, ref64, f.dtype)


# QwenImage's own spelling: per-head RMSNorm on [B, S, H, D], freqs [S, D/2].unsqueeze(1)
QWEN = Form(True, False, "reshape", "flatten3", False, False, 2, 4, 3, 32, 32, torch.bfloat16)


@pytest.mark.parametrize("kernels", ["inline", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qwenimage_attention_is_exact(dtype, kernels):
    """16 pairs per head (whole vectors of torch's complex multiply on AVX2 and AVX512: no FMA tail):
    the fused graph equals the unfused one bit for bit, spliced inline or as the op."""
    f = dataclasses.replace(QWEN, dtype=dtype)
    run = run_pass(QwenQK(f), *make_inputs(f, 1), options=Options(kernels=kernels))
    assert len(run.fused) == 2 and run.count("qkfuse.qk_norm_rope") == 1, run.records
    assert all(r.recipe == "rms + interleaved rope[32] half-table" for r in run.records), run.records
    for out, ref in zip(run.out, run.ref):
        assert torch.equal(out, ref)


def test_torch_complex_multiply_rounds_like_the_recipe_or_with_an_fma():
    """The numerics claim of the module docstring, on this machine: every element of torch's complex
    product is either the recipe's round(round(ac) - round(bd)) or the FMA's round(ac - round(bd))."""
    g = torch.Generator().manual_seed(0)
    for pairs in (4, 7, 16, 23):
        x, fr = torch.randn(64, 5, pairs, 2, generator=g), torch.randn(5, pairs, 2, generator=g)
        p = torch.view_as_real(torch.view_as_complex(x) * torch.view_as_complex(fr)).double()
        a, b = x[..., 0].double(), x[..., 1].double()
        c, d = fr[..., 0].double().expand_as(a), fr[..., 1].double().expand_as(a)

        def f32(t):
            return t.float().double()

        recipe = (f32(f32(a * c) - f32(b * d)), f32(f32(a * d) + f32(b * c)))
        fma = (f32(a * c - f32(b * d)), f32(a * d + f32(b * c)))
        for part in (0, 1):
            assert bool(((p[..., part] == recipe[part]) | (p[..., part] == fma[part])).all()), pairs


# ---- left alone ---------------------------------------------------------------------------------


def _left_alone(rope_fn, reason: str | None, freqs=None, families=("norm_rope", "rope")):
    """QWEN's block with `rope_fn(x, freqs)` as its RoPE: nothing fused, exact."""
    f = QWEN
    block = QwenQK(dataclasses.replace(f, dtype=torch.float32))
    q, k, fr = make_inputs(f, 2, dtype=torch.float32)
    fr = fr if freqs is None else freqs(fr)

    def fn(q, k, fr):
        return tuple(rope_fn(norm(x.unflatten(2, (f.H, f.D))), fr)
                     for x, norm in ((q, block.norm_q), (k, block.norm_k)))

    run = run_pass(fn, q, k, fr, options=Options(families=families))
    assert_left_alone(run, reason)


def _qwen_rope(x, fr):
    return complex_rope(x, fr.unsqueeze(1), dataclasses.replace(QWEN, dtype=torch.float32))


def test_complex128_freqs_are_refused():
    """float32 pairs times complex128 freqs: the product is complex128 (float64 arithmetic)."""
    _left_alone(_qwen_rope, "not complex64", freqs=lambda fr: fr.to(torch.complex128))


def test_complex128_pairs_are_refused():
    """AnyFlow's spelling: the pairs viewed in float64."""
    def rope(x, fr):
        xc = torch.view_as_complex(x.double().unflatten(3, (-1, 2)))
        return torch.view_as_real(xc * fr.unsqueeze(1)).flatten(3).type_as(x)
    _left_alone(rope, "not complex64", freqs=lambda fr: fr.to(torch.complex128))


def test_a_multiply_that_broadcasts_x_is_refused():
    """freqs with an extra leading dim: x's pairs broadcast into a larger product."""
    def rope(x, fr):
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * fr[:, None, :, None, :]).flatten(-2).sum(0)
    _left_alone(rope, "broadcasts x", freqs=lambda fr: torch.stack([fr, fr]))


def test_one_frequency_for_every_pair_is_refused():
    """freqs [S, 1]: one value broadcast over the pairs (a table the recipe does not index)."""
    _left_alone(_qwen_rope, "rotated pairs", freqs=lambda fr: fr[:, :1])


@pytest.mark.parametrize("name,rope", [
    ("conjugated", lambda x, fr: torch.view_as_real(
        torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2)).conj() * fr.unsqueeze(1)).flatten(3)),
    ("pairs are the halves", lambda x, fr: torch.view_as_real(
        torch.view_as_complex(x.float().reshape(*x.shape[:-1], 2, -1).transpose(-1, -2).contiguous())
        * fr.unsqueeze(1)).flatten(3)),
    ("divided", lambda x, fr: torch.view_as_real(
        torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2)) / fr.unsqueeze(1)).flatten(3)),
])
def test_other_complex_arithmetic_is_not_a_rotation(name, rope):
    _left_alone(rope, None)


# ---- CUDA: one launch, the views passed -----------------------------------------------------------


@pytest.mark.parametrize("kernels", ["auto", "triton"])
def test_cuda_passes_the_views_of_freqs_in_one_launch(kernels):
    """On CUDA the Triton kernel's half-table mode serves it, under 'auto' too (measured on the H200,
    benchmarks/results/2026-12-02-h200-wan.md): one launch for q and k, cos/sin the real and
    imaginary views of freqs (float32, last-dim stride 2, no copy, nothing cloned)."""
    pytest.importorskip("triton")
    run = run_pass_as_cuda(QwenQK(QWEN), *make_inputs(QWEN, 0), options=Options(kernels=kernels))
    assert len(run.fused) == 2 and len(run.kernel_calls()) == 1, run.records
    aten = torch.ops.aten
    graph = run.rewritten.graph
    assert not [n for n in graph.nodes if n.target in (aten.rsqrt.default, aten.view_as_complex.default,
                                                       aten.mul.Tensor, aten.clone.default,
                                                       aten.copy.default, aten._to_copy.default)]
    call = run.kernel_calls()[0]
    assert call.kwargs["tensors_to_clone"] == []
    args = call.kwargs["kwargs"]
    for name, part in (("cos_ptr", 0), ("sin_ptr", 1)):
        t = args[name]
        assert t.target is aten.select.int and t.args[2] == part, t.format_node()
        assert t.args[0].target is aten.view_as_real.default, t.args[0].format_node()
        assert t.meta["val"].dtype == torch.float32 and t.meta["val"].stride(-1) == 2
    assert args["c_sd"] == args["s_sd"] == 2


def test_a_single_complex_scalar_is_refused():
    """A 0-d complex factor: one frequency for all pairs, not a table."""
    def rope(x, fr):
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * fr).flatten(3)
    _left_alone(rope, "0-d", freqs=lambda fr: fr[0, 0])
