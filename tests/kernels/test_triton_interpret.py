"""The Triton kernel, run by Triton's CPU interpreter, against the plain-torch reference.

The interpreter is chosen when ``@triton.jit`` decorates a function (TRITON_INTERPRET=1), so the
session-wide env var would turn every Triton kernel of the run into an interpreted one. Instead
the fixture below executes a private copy of ``triton_norm_rope.py`` with the variable set only
while the copy is decorated, and calls its raw launcher (``wrap_triton`` needs a real GPU).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import math
import os
import sys

import pytest
import torch

triton = pytest.importorskip("triton")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from qkfuse.kernels import triton_norm_rope as tk  # noqa: E402
from qkfuse.kernels.reference import norm_rope_reference  # noqa: E402
from qkfuse.ops.norm_rope import check_qk  # noqa: E402
from qkfuse.ops.recipe import Recipe, check_recipe  # noqa: E402
from tests.conftest import UNIT_ROUNDOFF, coarsest_rounding  # noqa: E402

_MISSING = object()


@contextlib.contextmanager
def _interpreted_triton_language():
    """Let interpreted kernels call triton.language's own @jit helpers, and undo what the
    interpreter leaves behind.

    triton.language was imported (by ``import qkfuse``) without TRITON_INTERPRET, so its @jit
    helpers (tl.zeros, tl.sum, ...) are compiled-mode JITFunctions, which refuse to run inside an
    interpreted kernel. They are swapped for interpreted twins here. The interpreter also patches
    tl/tl.core attributes on every device-function call without restoring them, adds names to
    tl.standard's globals and caches rewritten functions; all of it is undone on exit, so later
    tests that compile real Triton kernels in this process see an untouched triton.language.
    """
    import triton.language as tl
    import triton.language.math as tl_math
    import triton.language.standard as tl_standard
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    with contextlib.suppress(Exception):
        # Imported lazily by the launcher's argument mangling, and it asserts that tl.standard's
        # helpers are JITFunctions unless TRITON_INTERPRET is set: import it before the swap.
        import triton.experimental.gluon  # noqa: F401

    core = tl.core
    owners = [tl, core, tl_math, tl_standard, core.tensor, core.dtype, core.condition]
    owners += [getattr(core, "tensor_descriptor_base")] if hasattr(core, "tensor_descriptor_base") else []
    with contextlib.suppress(ImportError):
        import triton.language.random as tl_random

        owners.append(tl_random)
    saved = [(o, dict(vars(o))) for o in owners]
    rewritten_before = set(InterpretedFunction.rewritten_fn)
    twins: dict = {}
    try:
        for o in owners:
            for name, v in list(vars(o).items()):
                if isinstance(v, JITFunction):
                    # one twin per helper: the interpreter recognises tl.sum's combine fn by identity
                    setattr(o, name, twins.setdefault(v, InterpretedFunction(v.fn)))
        yield
    finally:
        # Rewritten helpers are cached per function and rely on the names added to their module's
        # globals, which are removed below: drop them too, so a later entry rewrites afresh.
        for fn in set(InterpretedFunction.rewritten_fn) - rewritten_before:
            del InterpretedFunction.rewritten_fn[fn]
        for o, before in saved:
            now = dict(vars(o))
            for name in now.keys() - before.keys():
                delattr(o, name)
            for name, v in before.items():
                if now.get(name, _MISSING) is not v:
                    setattr(o, name, v)


def _load_interpreted_copy():
    name = "qkfuse.kernels._triton_interp"
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        spec = importlib.util.spec_from_file_location(name, tk.__file__)
        mod = importlib.util.module_from_spec(spec)
        mod.__package__ = "qkfuse.kernels"  # its relative import of ..ops.recipe
        sys.modules[name] = mod  # @dataclass looks its module up in sys.modules
        spec.loader.exec_module(mod)
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old
    return name, mod


@pytest.fixture(scope="module")
def interp():
    """The interpreted copy of the kernel module (its ``launch`` runs the kernel on CPU tensors)."""
    env_before = os.environ.get("TRITON_INTERPRET")
    with _interpreted_triton_language():
        name, mod = _load_interpreted_copy()
        try:
            assert type(mod.qk_norm_rope_kernel).__name__ == "InterpretedFunction"
            yield mod
        finally:
            sys.modules.pop(name, None)
    assert os.environ.get("TRITON_INTERPRET") == env_before
    if env_before != "1":  # the session's kernel and triton.language are compiled-mode again
        import triton.language as tl

        assert type(tk.qk_norm_rope_kernel).__name__ == "JITFunction"
        assert type(tl.zeros).__name__ == "JITFunction"
        assert tl.core.is_builtin(tl.core.full) and tl.core.is_builtin(tl.full)


# ---- cases ---------------------------------------------------------------------------------------

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
HEAD_DIMS = (16, 24, 32, 40, 48, 80)
LAYOUTS = ("bshd_transposed", "fused_qkv", "bhsd")


@dataclasses.dataclass(frozen=True)
class Case:
    dtype: torch.dtype
    head_dim: int
    recipe: Recipe
    has_weight: bool
    weight_dtype: torch.dtype
    cos_dtype: torch.dtype
    layout: str
    cos_per_batch: bool  # layout bshd_transposed: cos [B,1,S,rd] (else [1,1,S,rd])
    batch: int
    seq: int
    q_heads: int
    k_heads: int  # 0: k=None, single-tensor launch
    q_eps: float
    k_eps: float
    scale: float
    config: tk.Config | None
    seed: int
    across: bool = False  # the norm spans all heads (recipe.norm_heads_dim), weights [heads * head_dim]


HEADS_DIM = {"bshd_transposed": -3, "fused_qkv": -2, "bhsd": -3}  # where make_inputs puts the heads


@st.composite
def cases(draw) -> Case:
    dtype = draw(st.sampled_from(DTYPES))
    d = draw(st.sampled_from(HEAD_DIMS))
    rd = draw(st.sampled_from(sorted({0, d, d // 2, d // 4})))  # all even for these head dims
    norm = "rms" if rd == 0 else draw(st.sampled_from(("rms", "none")))
    has_weight = norm == "rms" and draw(st.booleans())
    # What the HF graphs produce: the norm ends in the input dtype or stays float32; RoPE runs in
    # the promotion of that with cos's dtype; the result is cast back to the input dtype or not.
    norm_dtype = draw(st.sampled_from((dtype, torch.float32))) if norm == "rms" else dtype
    cos_dtype = draw(st.sampled_from((dtype, torch.float32)))
    rope_dtype = torch.promote_types(norm_dtype, cos_dtype) if rd else norm_dtype
    out_dtype = draw(st.sampled_from((rope_dtype, dtype)))
    layout = draw(st.sampled_from(LAYOUTS))
    across = norm == "rms" and draw(st.sampled_from((False, False, True)))
    norm_sum = norm == "rms" and draw(st.sampled_from((False, False, False, True)))  # an L2 norm
    recipe = Recipe(
        norm=norm,
        weight_offset=draw(st.sampled_from((0.0, 1.0))) if has_weight else 0.0,
        cast_before_weight=draw(st.booleans()),
        norm_dtype=norm_dtype,
        rope_dtype=rope_dtype,
        out_dtype=out_dtype,
        rotary_dim=rd,
        interleaved=draw(st.booleans()) if rd else False,
        norm_heads_dim=HEADS_DIM[layout] if across else 0,
        norm_sum=norm_sum,
    )
    q_heads = draw(st.integers(1, 4))
    k_heads = draw(st.sampled_from([0] + [h for h in range(1, q_heads + 1) if q_heads % h == 0]))
    config = draw(st.one_of(st.none(), st.builds(tk.Config, st.sampled_from((1, 2, 4)),
                                                 st.sampled_from((1, 2, 4)), st.just(4))))
    return Case(
        dtype=dtype, head_dim=d, recipe=recipe, has_weight=has_weight,
        weight_dtype=draw(st.sampled_from((dtype, torch.float32))),
        cos_dtype=cos_dtype, layout=layout, cos_per_batch=draw(st.booleans()),
        batch=draw(st.integers(1, 2)), seq=draw(st.integers(1, 4)), q_heads=q_heads, k_heads=k_heads,
        # a large eps changes the result visibly, so q's and k's eps cannot be swapped unnoticed
        q_eps=draw(st.sampled_from((1e-6, 0.25))), k_eps=draw(st.sampled_from((1e-5, 0.5))),
        scale=draw(st.sampled_from((0.05, 1.0, 20.0))), config=config, seed=draw(st.integers(0, 2**31 - 1)),
        across=across,
    )


def make_inputs(c: Case):
    """q, k (or None), q_weight, k_weight, cos, sin for a case; fresh random values, never zeros."""
    g = torch.Generator().manual_seed(c.seed)
    B, S, Hq, Hk, D, rd = c.batch, c.seq, c.q_heads, c.k_heads, c.head_dim, c.recipe.rotary_dim

    def randn(*shape):
        return (torch.randn(*shape, generator=g) * c.scale).to(c.dtype)

    if c.layout == "bshd_transposed":  # HF: q_proj(x).view(B, S, H, D).transpose(1, 2)
        q = randn(B, S, Hq, D).transpose(1, 2)
        k = randn(B, S, Hk, D).transpose(1, 2) if Hk else None
        cos_shape = (B if c.cos_per_batch else 1, 1, S, rd)
    elif c.layout == "fused_qkv":  # views of one fused projection [B, S, (Hq + 2 Hk) * D]
        qkv = randn(B, S, (Hq + 2 * max(Hk, 1)) * D)
        q = qkv[..., : Hq * D].view(B, S, Hq, D)
        k = qkv[..., Hq * D: (Hq + Hk) * D].view(B, S, Hk, D) if Hk else None
        cos_shape = (S, 1, rd)
    else:  # contiguous [B, H, S, D]
        q = randn(B, Hq, S, D)
        k = randn(B, Hk, S, D) if Hk else None
        cos_shape = (S, rd)
    qw = kw = None
    if c.has_weight:
        # around 1 (Llama) or around 0 with offset 1 (Gemma's 1 + w)
        centre = 1.0 - c.recipe.weight_offset
        qw = (centre + 0.5 * torch.randn(D * (Hq if c.across else 1), generator=g)).to(c.weight_dtype)
        kw = (centre + 0.5 * torch.randn(D * (max(Hk, 1) if c.across else 1), generator=g)).to(c.weight_dtype)
    cos = sin = None
    if rd:
        # An independent angle per entry (not HF's duplicated frequencies): a kernel that read
        # the wrong half or the wrong parity of cos/sin would then give a different answer.
        theta = torch.rand(cos_shape, generator=g) * (2 * math.pi)
        cos, sin = theta.cos().to(c.cos_dtype), theta.sin().to(c.cos_dtype)
    return q, k, qw, kw, cos, sin


def error_units(out: torch.Tensor, ref: torch.Tensor, scale: float, dtype: torch.dtype) -> float:
    """max|out - ref| in units of dtype's spacing at the tensor's scale (eps * scale).

    Not elementwise relative error: RoPE's a*cos - b*sin cancels, so that is meaningless near 0."""
    eps = 2 * UNIT_ROUNDOFF[dtype]
    return ((out.double() - ref.double()).abs().max() / (eps * scale)).item()


def tensor_scale(ref: torch.Tensor, x, w, eps, recipe: Recipe) -> float:
    """The largest magnitude the computation rounds: of the output, and of the normed rows that
    RoPE multiplies (with an independent angle per entry, cos/sin is not a rotation and the output
    can be smaller than its products)."""
    y = norm_rope_reference(x, w, None, None, eps,
                            dataclasses.replace(recipe, rotary_dim=0, out_dtype=recipe.norm_dtype))
    return max(ref.double().abs().max().item(), y.double().abs().max().item())


# Tolerance of interpreted vs reference, in units of the coarsest rounding dtype's spacing at the
# tensor scale, as the sum of three derived terms:
# - RNE flips: kernel and reference round at the same points, to nearest even, but their float32
#   values can differ in the last bits (below), which flips a rounding of a near-tie value by one
#   unit; that happens to an element rarely, twice almost never, and RoPE's sum carries it at
#   gain |cos| + |sin| <= sqrt(2): 2 units.
# - the float32 divergence itself (fp32_divergence). Matters only when the coarsest is float32.
# - bfloat16 truncation: the interpreter converts float32 -> bfloat16 by truncation (numpy has no
#   bfloat16; the GPU rounds to nearest even), so every bf16 rounding can land a whole unit from
#   the reference's, not only at ties: propagated worst case in _bf16_truncation_units.
RNE_FLIP_UNITS = 2.0


def fp32_divergence(c: Case) -> float:
    """Bound on |kernel - reference| / scale of the float32 values before any coarse rounding.

    The only float32 steps done differently are the row's sum of squares (a sum of D terms in
    another order is within (D - 1) u32 of torch's), halved by rsqrt, plus ~2 u32 for rsqrt and the
    + eps; RoPE's two products then double it. Without the norm, both do the same float32 ops:
    allow two roundings."""
    u32 = UNIT_ROUNDOFF[torch.float32]
    if c.recipe.norm == "rms":
        row = c.head_dim * (max(c.q_heads, c.k_heads) if c.across else 1)  # the terms of the sum
        return 2 * ((row - 1) / 2 + 2) * u32
    return 2 * u32


def _bf16_truncation_units(c: Case) -> float:
    r, bf16 = c.recipe, torch.bfloat16
    e = 0.0  # worst-case error of the normed row y, in units at the tensor scale
    if r.norm == "rms":
        e += c.dtype == bf16 and c.has_weight and r.cast_before_weight  # round(n, x dtype)
        e += r.norm_dtype == bf16  # round(n * w, norm dtype)
    before_out = r.norm_dtype if r.norm == "rms" else c.dtype
    if r.rotary_dim:
        # products carry y's error at gain <= 1 (|cos|, |sin| <= 1); the sum adds both products'
        if r.rope_dtype == bf16:
            e = 2 * (e + 1) + 1  # round each product, then the sum
        else:
            e = 2 * e
        before_out = r.rope_dtype
    e += r.out_dtype == bf16 and before_out != bf16  # the final conversion
    return e


def tolerance_units(c: Case) -> float:
    coarse = coarsest_rounding(c.recipe, c.dtype, c.has_weight)
    tol = RNE_FLIP_UNITS + fp32_divergence(c) / (2 * UNIT_ROUNDOFF[coarse])
    if coarse == torch.bfloat16:
        tol += _bf16_truncation_units(c)
    return tol


def max_fp16_mismatches(c: Case, numel: int) -> int:
    """Where float16 is the coarsest dtype, kernel and reference round the same float32 values to
    nearest even at the same points, so they are bit-identical except where a value lies within
    fp32_divergence of a tie: a fraction <= fp32_divergence / u16 of values, per rounding.
    A misplaced or missing rounding changes a large fraction of the elements instead."""
    r, f16 = c.recipe, torch.float16
    n = 0  # float16 roundings an element passes
    if r.norm == "rms":
        n += (c.dtype == f16 and c.has_weight and r.cast_before_weight) + (r.norm_dtype == f16)
    if r.rotary_dim:
        n += 3 * (r.rope_dtype == f16)  # two products and their sum
    n += r.out_dtype == f16
    return math.ceil(numel * n * fp32_divergence(c) / UNIT_ROUNDOFF[f16])


def _check_against_reference(out, x, w, cos, sin, eps, c: Case):
    ref = norm_rope_reference(x, w, cos, sin, eps, c.recipe)
    assert out.shape == ref.shape and out.dtype == ref.dtype == c.recipe.out_dtype
    assert out.stride() == ref.stride()
    assert not torch.isnan(ref).any()
    assert not torch.isnan(out).any()
    coarse = coarsest_rounding(c.recipe, c.dtype, c.has_weight)
    err = error_units(out, ref, tensor_scale(ref, x, w, eps, c.recipe), coarse)
    assert err <= tolerance_units(c), f"{err:.2f} units of {coarse} (tolerance {tolerance_units(c):.2f})"
    if coarse == torch.float16:
        mismatches = (out != ref).sum().item()
        bound = max_fp16_mismatches(c, out.numel())
        assert mismatches <= bound, f"{mismatches} of {out.numel()} fp16 elements differ (bound {bound})"


# The interpreter is ~1000x slower than eager (~0.15 s an example here). Twice the profile's count
# (ci: 80 examples, ~12 s): at ci's 40, rarer combinations (e.g. fp16 + weight + cast_before, or
# per-batch cos with B = 2) were left out often enough that a seeded bug in them got through.
_EXAMPLES = min(2 * settings.default.max_examples, 200)


@settings(max_examples=_EXAMPLES)
@given(c=cases())
def test_interpreted_kernel_matches_reference(interp, c: Case):
    q, k, qw, kw, cos, sin = make_inputs(c)
    assert tk.supports(q, k, cos, c.recipe) is None
    inputs = [t.clone() for t in (q, k, qw, kw, cos, sin) if t is not None]
    q_out, k_out = interp.launch(q, k, qw, kw, cos, sin, c.q_eps, c.k_eps, c.recipe, config=c.config)
    _check_against_reference(q_out, q, qw, cos, sin, c.q_eps, c)
    if k is None:
        assert k_out is None
    else:
        _check_against_reference(k_out, k, kw, cos, sin, c.k_eps, c)
    # the kernel only writes its outputs
    after = [t for t in (q, k, qw, kw, cos, sin) if t is not None]
    assert all(torch.equal(a, b) for a, b in zip(inputs, after))


@pytest.mark.parametrize("across", [False, True])
@pytest.mark.parametrize("rope", ["neox", "partial"])
def test_l2_norm(interp, across, rope):
    """norm_sum: x * rsqrt(sum(x^2) + eps) (nGPT / Dory), per head and across heads."""
    rd = 32 if rope == "neox" else 16
    recipe = Recipe(norm="rms", rotary_dim=rd, norm_sum=True, norm_heads_dim=-3 if across else 0)
    c = Case(dtype=torch.float32, head_dim=32, recipe=recipe, has_weight=True, weight_dtype=torch.float32,
             cos_dtype=torch.float32, layout="bhsd", cos_per_batch=False, batch=2, seq=3, q_heads=3, k_heads=1,
             q_eps=1e-6, k_eps=0.5, scale=1.0, config=None, seed=9, across=across)
    q, k, qw, kw, cos, sin = make_inputs(c)
    q_out, k_out = interp.launch(q, k, qw, kw, cos, sin, c.q_eps, c.k_eps, recipe)
    _check_against_reference(q_out, q, qw, cos, sin, c.q_eps, c)
    _check_against_reference(k_out, k, kw, cos, sin, c.k_eps, c)
    mean = norm_rope_reference(q, qw, cos, sin, c.q_eps, dataclasses.replace(recipe, norm_sum=False))
    assert (mean - q_out).abs().max() > 0.1  # the RMS is another function (sqrt(head_dim) apart)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("rope", ["neox", "interleaved", "partial", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_across_heads(interp, layout, rope, dtype):
    """Every layout and rotation with a norm across heads: one mean over all heads of a token, each
    head scaled by its own slice of the [heads * head_dim] weight (the drawn cases above reach
    several heads with a weight and RoPE too rarely to be relied on for that)."""
    rd = {"neox": 32, "interleaved": 32, "partial": 16, "none": 0}[rope]
    recipe = Recipe(norm="rms", norm_dtype=dtype, rope_dtype=dtype, out_dtype=dtype, rotary_dim=rd,
                    interleaved=rope == "interleaved", norm_heads_dim=HEADS_DIM[layout])
    c = Case(dtype=dtype, head_dim=32, recipe=recipe, has_weight=True, weight_dtype=dtype, cos_dtype=dtype,
             layout=layout, cos_per_batch=True, batch=2, seq=3, q_heads=3, k_heads=1, q_eps=1e-6, k_eps=0.5,
             scale=1.0, config=None, seed=5, across=True)
    q, k, qw, kw, cos, sin = make_inputs(c)
    assert tk.supports(q, k, cos, recipe, sin, qw, kw) is None
    q_out, k_out = interp.launch(q, k, qw, kw, cos, sin, c.q_eps, c.k_eps, recipe)
    _check_against_reference(q_out, q, qw, cos, sin, c.q_eps, c)
    _check_against_reference(k_out, k, kw, cos, sin, c.k_eps, c)
    # the per-head norm of the same rows is another function (the test can tell them apart)
    per_head = norm_rope_reference(q, qw[:32], cos, sin, c.q_eps, dataclasses.replace(recipe, norm_heads_dim=0))
    assert (per_head.float() - q_out.float()).abs().max() > 0.1


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("with_k", [True, False])
def test_zero_tokens(interp, layout, with_k):
    """No tokens: empty outputs in the reference's layout, and no launch error."""
    recipe = Recipe(norm="rms", norm_dtype=torch.bfloat16, rope_dtype=torch.bfloat16,
                    out_dtype=torch.bfloat16, rotary_dim=16)
    c = Case(dtype=torch.bfloat16, head_dim=32, recipe=recipe, has_weight=True, weight_dtype=torch.bfloat16,
             cos_dtype=torch.bfloat16, layout=layout, cos_per_batch=False, batch=1, seq=0, q_heads=4,
             k_heads=2 if with_k else 0, q_eps=1e-6, k_eps=1e-6, scale=1.0, config=None, seed=0)
    q, k, qw, kw, cos, sin = make_inputs(c)
    assert q.numel() == 0
    q_out, k_out = interp.launch(q, k, qw, kw, cos, sin, 1e-6, 1e-6, recipe)
    for x, out in ((q, q_out), (k, k_out)):
        if x is None:
            assert out is None
            continue
        ref = norm_rope_reference(x, qw, cos, sin, 1e-6, recipe)
        assert out.shape == x.shape and out.numel() == 0
        assert out.dtype == torch.bfloat16 and out.stride() == ref.stride()


# ---- inputs supports() accepts: the kernel must compute them, or supports() must refuse them ------


def _refused_or_computed(interp, q, k, qw, kw, cos, sin, recipe):
    """supports() returns a reason, or the kernel agrees with the reference (per tensor)."""
    if tk.supports(q, k, cos, recipe, sin, qw, kw) is not None:
        return
    q_out, k_out = interp.launch(q, k, qw, kw, cos, sin, 1e-6, 1e-6, recipe)
    for out, x, w in ((q_out, q, qw), (k_out, k, kw)):
        if x is None:
            continue
        c = Case(dtype=x.dtype, head_dim=x.shape[-1], recipe=recipe, has_weight=w is not None,
                 weight_dtype=torch.float32, cos_dtype=torch.float32, layout="bhsd", cos_per_batch=False,
                 batch=1, seq=x.shape[-2], q_heads=x.shape[1], k_heads=0, q_eps=1e-6, k_eps=1e-6, scale=1.0,
                 config=None, seed=0)
        _check_against_reference(out, x, w, cos, sin, 1e-6, c)


# These three were silent wrong results once (found by this file); supports() now refuses them.
@pytest.mark.parametrize("which", ["cos_and_sin", "sin_only"])
def test_noncontiguous_cos_sin(interp, which):
    g = torch.Generator().manual_seed(11)
    q = torch.randn(2, 4, 3, 32, generator=g)
    theta = torch.rand(3, 32, generator=g) * (2 * math.pi)
    cos, sin = theta.cos()[:, ::2], theta.sin()[:, ::2]  # [3, 16] views with last-dim stride 2
    if which == "sin_only":
        cos = cos.contiguous()
    assert sin.stride(-1) == 2
    assert "last dim is not contiguous" in tk.supports(q, None, cos, Recipe(norm="rms", rotary_dim=16), sin)
    _refused_or_computed(interp, q, None, None, None, cos, sin, Recipe(norm="rms", rotary_dim=16))


def test_noncontiguous_weight(interp):
    g = torch.Generator().manual_seed(12)
    q = torch.randn(2, 4, 3, 32, generator=g)
    w = (1.0 + 0.5 * torch.randn(64, generator=g))[::2]  # [32], stride 2
    assert "weight last dim is not contiguous" in tk.supports(q, None, None, Recipe(norm="rms"), None, w)
    _refused_or_computed(interp, q, None, w, w, None, None, Recipe(norm="rms"))


def test_mixed_q_k_dtypes(interp):
    g = torch.Generator().manual_seed(13)
    q = torch.randn(2, 4, 3, 32, generator=g).to(torch.bfloat16)
    k = torch.randn(2, 2, 3, 32, generator=g).to(torch.float16)
    w = 1.0 + 0.5 * torch.randn(32, generator=g)
    recipe = Recipe(norm="rms", cast_before_weight=True, norm_dtype=torch.float32, rope_dtype=torch.float32,
                    out_dtype=torch.float32)
    assert "differ in dtype" in tk.supports(q, k, None, recipe)
    _refused_or_computed(interp, q, k, w, w, None, None, recipe)


# ---- host-side helpers (no kernel run) -----------------------------------------------------------


@pytest.mark.parametrize("use_table", [True, False])
def test_choose_config_is_valid(use_table):
    """Every shape gets a launchable tile: positive powers of two (tl.arange needs them)."""
    def pow2(n):
        return n >= 1 and n & (n - 1) == 0

    seen = set()
    for n_tokens in (0, 1, 7, 64, 65, 300, 1024, 5000, 20000, 10**6):
        for q_heads, k_heads in ((1, 0), (1, 1), (4, 0), (8, 2), (16, 16), (32, 8), (40, 40), (64, 8), (3, 1)):
            for d in (16, 24, 64, 80, 96, 128, 256, 512):
                cfg = tk.choose_config(n_tokens, q_heads, k_heads, d, use_table=use_table)
                assert isinstance(cfg, tk.Config)
                assert pow2(cfg.block_t) and pow2(cfg.block_h) and pow2(cfg.num_warps), cfg
                assert cfg.num_warps <= 32
                seen.add(cfg)
    # The table's tuned rows are used where it has them (with it), not only the heuristic.
    if use_table:
        table = tk._config_table()
        assert table, "the committed triton_configs.json has no table"
        key, row = next(iter(table.items()))
        d = int(key.split("_t")[0][1:])
        tokens = int(key.split("_t")[1].split("_h")[0])
        heads = int(key.split("_h")[1])
        assert tk.choose_config(tokens, heads // 2, heads // 2, d) == tk.Config(*row)


def test_supports_refuses_with_reason():
    recipe = Recipe(norm="rms", rotary_dim=16)
    q = torch.randn(2, 4, 8, 32)
    cos = torch.randn(8, 16)
    assert tk.supports(q, q, cos, recipe) is None

    reason = tk.supports(q.double(), None, cos, recipe)
    assert isinstance(reason, str) and "float64" in reason

    strided_last = torch.randn(2, 4, 8, 64)[..., ::2]  # last dim stride 2
    reason = tk.supports(strided_last, None, cos, recipe)
    assert isinstance(reason, str) and "contiguous" in reason

    reason = tk.supports(q, None, cos, Recipe(norm="rms", out_dtype=torch.float64))
    assert isinstance(reason, str) and "float64" in reason



# ---- vLLM-style cos/sin cache + positions --------------------------------------------------------


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rotary_dim", [32, 16])
@pytest.mark.parametrize("layout", ["tokens_heads", "batch_heads_seq"])
def test_cos_sin_cache_with_positions(interp, interleaved, rotary_dim, layout):
    """cos/sin gathered in the kernel from a [max_position, rd] float32 cache by each token's
    position equal the reference run on the HF-layout cos/sin built from the same cache."""
    from qkfuse.kernels.reference import cos_sin_from_cache

    g = torch.Generator().manual_seed(rotary_dim + interleaved)
    D, Hq, Hk = 32, 4, 2
    if layout == "tokens_heads":  # vLLM: q/k [T, H, D], positions [T, 1]
        T = 6
        q, k = torch.randn(T, Hq, D, generator=g).bfloat16(), torch.randn(T, Hk, D, generator=g).bfloat16()
        positions = torch.randperm(40, generator=g)[:T].view(T, 1)
    else:  # HF layout [B, H, S, D] (transposed view), positions [B, 1, S]
        B, S = 2, 3
        q = torch.randn(B, S, Hq, D, generator=g).bfloat16().transpose(1, 2)
        k = torch.randn(B, S, Hk, D, generator=g).bfloat16().transpose(1, 2)
        positions = torch.randperm(40, generator=g)[: B * S].view(B, 1, S)
    angle = torch.rand(40, rotary_dim // 2, generator=g) * 6.3
    cache = torch.cat((angle.cos(), angle.sin()), dim=-1)  # float32, as vLLM keeps it
    qw, kw = 1 + 0.3 * torch.randn(D, generator=g).bfloat16(), 1 + 0.3 * torch.randn(D, generator=g).bfloat16()
    recipe = Recipe(norm="rms", cast_before_weight=True, norm_dtype=torch.bfloat16, rope_dtype=torch.float32,
                    out_dtype=torch.bfloat16, rotary_dim=rotary_dim, interleaved=interleaved)
    assert tk.supports(q, k, cache, recipe, None, qw, kw, positions) is None
    q_out, k_out = interp.launch(q, k, qw, kw, cache, None, 1e-6, 1e-6, recipe, positions=positions)
    cos, sin = cos_sin_from_cache(cache, positions, interleaved)
    for out, x, w in ((q_out, q, qw), (k_out, k, kw)):
        ref = norm_rope_reference(x, w, cos, sin, 1e-6, recipe)
        assert out.stride() == ref.stride() and not torch.isnan(out.float()).any()
        # bf16 rounding of the norm and of the output; the interpreter truncates (see module doc)
        err = float((out.double() - ref.double()).abs().max() / ref.double().abs().max())
        assert err <= 4 * 2.0**-8, err
    # positions that vary along the heads cannot be served by one gather per token
    assert "head" in tk.supports(q, k, cache, recipe, None, qw, kw, torch.zeros(q.shape[:-1], dtype=torch.long))
    assert "int32/int64" in tk.supports(q, k, cache, recipe, None, qw, kw, positions.float())


# ---- KV-cache write in the same launch -----------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,seq", [(1, 1), (2, 1), (2, 3)])
@pytest.mark.parametrize("with_q", [True, False])
@pytest.mark.parametrize("across", [False, True])
def test_cache_write_matches_index_put(interp, dtype, batch, seq, with_q, across):
    """k's rotated rows and v's rows land in their caches at the positions (HF StaticCache's
    index_copy_), bit for bit what the launch without a cache returns (its accuracy against the
    reference is the test above); every other cache row is untouched; q is unchanged. With a norm
    across heads too (one program holds all heads of a token, v's copy tile as wide)."""
    g = torch.Generator().manual_seed(batch * 10 + seq)
    D, Hq, Hk, L = 32, 4, 2, 9
    r = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    q, k, v = r(batch, seq, Hq, D).transpose(1, 2), r(batch, seq, Hk, D).transpose(1, 2), \
        r(batch, seq, Hk, D).transpose(1, 2)
    qw, kw = 1 + 0.3 * r(D * (Hq if across else 1)), 1 + 0.3 * r(D * (Hk if across else 1))
    cos, sin = r(batch, 1, seq, D), r(batch, 1, seq, D)
    k_cache, v_cache = r(batch, Hk, L, D), r(batch, Hk, L, D)
    index = torch.tensor([5, 1, 7][:seq]) if seq > 1 else torch.tensor([-2])  # index_put wraps negatives
    recipe = Recipe(norm="rms", cast_before_weight=dtype != torch.float32, norm_dtype=dtype, rope_dtype=dtype,
                    out_dtype=dtype, rotary_dim=D, norm_heads_dim=-3 if across else 0)
    q_plain, k_plain = interp.launch(q, k, qw, kw, cos, sin, 1e-6, 1e-6, recipe)
    kc_ref, vc_ref = k_cache.clone(), v_cache.clone()
    kc_ref[:, :, index] = k_plain
    vc_ref[:, :, index] = v
    assert tk.cache_unsupported(k, k_cache, index, 2, (v, v_cache)) is None
    target = interp.CacheTarget(k_cache, index, 2, v, v_cache)
    if with_q:
        q_out, k_out = interp.launch(q, k, qw, kw, cos, sin, 1e-6, 1e-6, recipe, cache=target)
        assert k_out is None and torch.equal(q_out, q_plain)
    else:
        q_out, k_out = interp.launch(k, None, kw, None, cos, sin, 1e-6, 1e-6, recipe, cache=target)
        assert q_out is None and k_out is None
    assert torch.equal(k_cache, kc_ref) and torch.equal(v_cache, vc_ref)
    assert not torch.equal(k_cache, kc_ref.index_fill(2, index % L, 0))  # the rows were written


def test_cache_write_skips_positions_outside_the_cache(interp):
    """A position past the cache end is not written (index_put would raise; the kernel must never
    write out of bounds)."""
    D, L = 16, 4
    k, v = torch.randn(1, 2, 2, D), torch.randn(1, 2, 2, D)
    k_cache, v_cache = torch.randn(1, 2, L, D), torch.randn(1, 2, L, D)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    recipe = Recipe(norm="rms", rotary_dim=0)
    interp.launch(k, None, None, None, None, None, 1e-6, 1e-6, recipe,
                  cache=interp.CacheTarget(k_cache, torch.tensor([1, L + 3]), 2, v, v_cache))
    assert torch.equal(k_cache[:, :, [0, 2, 3]], before_k[:, :, [0, 2, 3]])
    assert torch.equal(v_cache[:, :, [0, 2, 3]], before_v[:, :, [0, 2, 3]])
    assert torch.equal(v_cache[:, :, 1], v[:, :, 0])


# ---- LayerNorm (recipe norm="layer"): the mean subtracted, a bias, a weight row per head ----------

# where make_inputs puts the heads, as a per-head weight's weight_heads_dim
WEIGHT_HEADS_DIM = HEADS_DIM


def _layer_case(dtype, layout, rope, across=False, weight_heads=False, head_dim=32, seed=21):
    rd = {"neox": head_dim, "interleaved": head_dim, "partial": head_dim // 4, "none": 0}[rope]
    recipe = Recipe(norm="layer", norm_dtype=dtype, rope_dtype=dtype, out_dtype=dtype, rotary_dim=rd,
                    interleaved=rope == "interleaved", norm_heads_dim=HEADS_DIM[layout] if across else 0,
                    weight_heads_dim=WEIGHT_HEADS_DIM[layout] if weight_heads else 0)
    return Case(dtype=dtype, head_dim=head_dim, recipe=recipe, has_weight=True, weight_dtype=dtype,
                cos_dtype=dtype, layout=layout, cos_per_batch=True, batch=2, seq=3, q_heads=3, k_heads=1,
                q_eps=1e-6, k_eps=0.5, scale=1.0, config=None, seed=seed, across=across)


def _layer_inputs(c: Case, weight_heads: bool, offset: float = 3.0):
    """make_inputs with rows far from zero mean (a kernel that skipped the centring would be far off),
    per-head weights [H, D] (weight_heads) and biases laid out as the weights."""
    q, k, qw, kw, cos, sin = make_inputs(c)
    q.add_(offset)  # in place: make_inputs' strided layouts stay
    k.add_(offset)
    g = torch.Generator().manual_seed(c.seed + 1)
    D = c.head_dim
    if weight_heads:
        qw = (1 + 0.5 * torch.randn(c.q_heads, D, generator=g)).to(c.weight_dtype)
        kw = (1 + 0.5 * torch.randn(c.k_heads, D, generator=g)).to(c.weight_dtype)
    qb = (0.5 * torch.randn(qw.shape, generator=g)).to(c.weight_dtype)
    kb = (0.5 * torch.randn(kw.shape, generator=g)).to(c.weight_dtype)
    return q, k, qw, kw, cos, sin, qb, kb


def _check_layer(out, x, w, b, cos, sin, eps, c: Case):
    ref = norm_rope_reference(x, w, cos, sin, eps, c.recipe, bias=b)
    assert out.shape == ref.shape and out.dtype == ref.dtype and out.stride() == ref.stride()
    assert not torch.isnan(out.float()).any()
    coarse = coarsest_rounding(c.recipe, c.dtype, c.has_weight)
    err = error_units(out, ref, max(ref.double().abs().max().item(), 1.0), coarse)
    assert err <= tolerance_units(c) + 1, f"{err:.2f} units of {coarse} (tolerance {tolerance_units(c) + 1:.2f})"
    return ref


def _run_layer(mod, c: Case, weight_heads: bool):
    q, k, qw, kw, cos, sin, qb, kb = _layer_inputs(c, weight_heads)
    check_qk(q, k, qw, kw, cos, sin, c.recipe, q_bias=qb, k_bias=kb)  # the ops' own argument checks
    assert tk.supports(q, k, cos, c.recipe, sin, qw, kw, None, qb, kb) is None
    q_out, k_out = mod.launch(q, k, qw, kw, cos, sin, c.q_eps, c.k_eps, c.recipe, q_bias=qb, k_bias=kb)
    _check_layer(q_out, q, qw, qb, cos, sin, c.q_eps, c)
    _check_layer(k_out, k, kw, kb, cos, sin, c.k_eps, c)
    return q, k, qw, kw, cos, sin, qb, kb, q_out, k_out


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("rope", ["neox", "interleaved", "partial", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_norm(interp, layout, rope, dtype):
    """LayerNorm + bias, a [D] weight (Persimmon, Phi) and a weight row per head (Cohere, StableLM):
    the reference's function, and distinguishable from the RMSNorm, from a missing bias and from
    one head's weight for all."""
    for weight_heads in (False, True):
        c = _layer_case(dtype, layout, rope, weight_heads=weight_heads)
        q, k, qw, kw, cos, sin, qb, kb, q_out, k_out = _run_layer(interp, c, weight_heads)
        others = {
            "rms": norm_rope_reference(q, qw, cos, sin, c.q_eps, dataclasses.replace(c.recipe, norm="rms"), bias=qb),
            "no bias": norm_rope_reference(q, qw, cos, sin, c.q_eps, c.recipe),
        }
        if weight_heads:
            others["head 0's weight"] = norm_rope_reference(
                q, qw[:1].expand_as(qw).contiguous(), cos, sin, c.q_eps, c.recipe, bias=qb)
        for what, other in others.items():
            assert (other.float() - q_out.float()).abs().max() > 0.1, what


@pytest.mark.parametrize("rope", ["neox", "partial"])
def test_layer_norm_across_heads(interp, rope):
    """LayerNorm over all heads of a token (ESMC's q_norm on the flat projection)."""
    c = _layer_case(torch.float32, "bhsd", rope, across=True)
    q, k, qw, kw, cos, sin, qb, kb, q_out, k_out = _run_layer(interp, c, False)
    per_head = norm_rope_reference(q, qw[:32], cos, sin, c.q_eps, dataclasses.replace(c.recipe, norm_heads_dim=0),
                                   bias=qb[:32])
    assert (per_head - q_out).abs().max() > 0.1


@pytest.mark.parametrize("head_dim,rope", [(80, "partial"), (48, "none"), (40, "neox")])
def test_layer_norm_tail_chunks(interp, head_dim, rope):
    """A pass-through tail wider than one chunk (read again for the centred sum of squares)."""
    c = _layer_case(torch.bfloat16, "bshd_transposed", rope, head_dim=head_dim, weight_heads=True)
    _run_layer(interp, c, True)


def test_layer_norm_without_weight_and_cast_before(interp):
    """Bias without a weight; and the normalised value rounded to the input dtype before the weight."""
    c = _layer_case(torch.bfloat16, "bhsd", "neox")
    q, k, qw, kw, cos, sin, qb, kb = _layer_inputs(c, False)
    out, _ = interp.launch(q, None, None, None, cos, sin, 1e-5, 1e-5, c.recipe, q_bias=qb)
    _check_layer(out, q, None, qb, cos, sin, 1e-5, dataclasses.replace(c, has_weight=False))
    c2 = dataclasses.replace(c, recipe=dataclasses.replace(c.recipe, cast_before_weight=True))
    out, _ = interp.launch(q, None, qw, None, cos, sin, 1e-5, 1e-5, c2.recipe, q_bias=qb)
    _check_layer(out, q, qw, qb, cos, sin, 1e-5, c2)


def test_supports_layer_norm_refusals():
    c = _layer_case(torch.float32, "bhsd", "neox", weight_heads=True)
    q, k, qw, kw, cos, sin, qb, kb = _layer_inputs(c, True)
    assert "bias" in tk.supports(q, k, cos, c.recipe, sin, qw, kw, None, qb, None)
    strided = torch.randn(qw.shape[0], 2 * qw.shape[1])[:, : qw.shape[1]]  # rows 2 * head_dim apart
    assert "rows are not contiguous" in tk.supports(q, k, cos, c.recipe, sin, strided, kw, None, qb, kb)


# Seeded bugs: each edit of the kernel source (run by the interpreter) is a plausible slip in the
# LayerNorm mode; the checks above must catch every one of them.
SEEDED_BUGS = {
    "no centring of the rotated part": ("a = tl.where(lane, a - mu, 0.0)", "a = tl.where(lane, a, 0.0)"),
    "no centring of a chunked tail": ("                pc = pc - mu\n", "                pc = pc\n"),
    "bias dropped": ("        n = n + bias\n", "        n = n\n"),
    "mean not over the heads (across)": ("mu = (s1 / (n_heads * HEAD_DIM))[:, :, None]",
                                         "mu = (s1 / HEAD_DIM)[:, :, None]"),
    "one weight row for every head": ("W_ROWS=across or bool(recipe.weight_heads_dim)", "W_ROWS=across"),
}


@contextlib.contextmanager
def _seeded_kernel(old: str, new: str):
    """An interpreted copy of the kernel module with `old` replaced by `new` in its source."""
    src = open(tk.__file__).read()
    assert src.count(old) == 1, f"the seeded bug's anchor is not in the kernel source: {old!r}"
    path = os.path.join(os.path.dirname(tk.__file__), f"_seeded_{abs(hash((old, new)))}.py")
    name = "qkfuse.kernels._triton_seeded"
    old_env = os.environ.get("TRITON_INTERPRET")
    with open(path, "w") as f:
        f.write(src.replace(old, new))
    try:
        with _interpreted_triton_language():
            os.environ["TRITON_INTERPRET"] = "1"
            try:
                spec = importlib.util.spec_from_file_location(name, path)
                mod = importlib.util.module_from_spec(spec)
                mod.__package__ = "qkfuse.kernels"
                sys.modules[name] = mod
                spec.loader.exec_module(mod)
            finally:
                if old_env is None:
                    os.environ.pop("TRITON_INTERPRET", None)
                else:
                    os.environ["TRITON_INTERPRET"] = old_env
            try:
                yield mod
            finally:
                sys.modules.pop(name, None)
    finally:
        os.remove(path)


@pytest.mark.parametrize("bug", list(SEEDED_BUGS))
def test_seeded_bugs_are_caught(bug):
    with _seeded_kernel(*SEEDED_BUGS[bug]) as mod:
        across = "across" in bug
        cases = [(_layer_case(torch.float32, "bhsd", "partial", across=across, head_dim=80,
                              weight_heads=not across), not across)]
        with pytest.raises(AssertionError):
            for c, weight_heads in cases:
                _run_layer(mod, c, weight_heads)


# ---- half tables (Recipe.half_table): one cos/sin entry per rotated pair (Wan) -------------------


def _half_case(dtype, layout, interleaved, across=False, head_dim=32, rd=None):
    rd = rd or head_dim
    # Wan: float32 tables, RoPE in float32, one rounding into the input dtype
    recipe = Recipe(norm="rms", norm_dtype=dtype, rope_dtype=torch.float32, out_dtype=dtype, rotary_dim=rd,
                    interleaved=interleaved, norm_heads_dim=HEADS_DIM[layout] if across else 0, half_table=True)
    return Case(dtype=dtype, head_dim=head_dim, recipe=recipe, has_weight=True, weight_dtype=dtype,
                cos_dtype=torch.float32, layout=layout, cos_per_batch=True, batch=2, seq=3, q_heads=3, k_heads=1,
                q_eps=1e-6, k_eps=0.5, scale=1.0, config=None, seed=33, across=across)


def _half_inputs(c: Case, strided: bool):
    """make_inputs with half tables: Wan's step-2 views freqs_cos[..., 0::2] / freqs_sin[..., 1::2] of
    full-width tables (independent angles, so a read of the wrong entries shows), or contiguous ones."""
    q, k, qw, kw, cos, sin = make_inputs(dataclasses.replace(c, recipe=dataclasses.replace(c.recipe, half_table=False)))
    if strided:
        return q, k, qw, kw, cos[..., 0::2], sin[..., 1::2]
    return q, k, qw, kw, cos[..., 0::2].contiguous(), sin[..., 1::2].contiguous()


def _run_half(mod, c: Case, strided: bool):
    q, k, qw, kw, cos, sin = _half_inputs(c, strided)
    check_qk(q, k, qw, kw, cos, sin, c.recipe)  # the ops' own argument checks
    assert tk.supports(q, k, cos, c.recipe, sin, qw, kw) is None
    q_out, k_out = mod.launch(q, k, qw, kw, cos, sin, c.q_eps, c.k_eps, c.recipe)
    _check_against_reference(q_out, q, qw, cos, sin, c.q_eps, c)
    _check_against_reference(k_out, k, kw, cos, sin, c.k_eps, c)
    return q, qw, cos, sin, q_out


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("rope", ["neox", "interleaved", "partial"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_half_table(interp, layout, rope, dtype):
    """Half tables at stride 2 (the views the pass hands over) and contiguous, per head and across
    heads: the reference's function, which a table read at stride 1 or at the full-width index is not."""
    for strided, across in ((True, False), (False, False), (True, True)):
        c = _half_case(dtype, layout, rope == "interleaved", across=across, rd=16 if rope == "partial" else None)
        q, qw, cos, sin, q_out = _run_half(interp, c, strided)
        dense = norm_rope_reference(q, qw, cos.contiguous(), sin.contiguous(), c.q_eps, c.recipe)
        assert torch.equal(dense, norm_rope_reference(q, qw, cos, sin, c.q_eps, c.recipe))
        if strided:  # the entries a stride-1 read of the same storage would give
            flat_c = cos.as_strided(cos.shape, (*cos.stride()[:-1], 1))
            wrong = norm_rope_reference(q, qw, flat_c, sin, c.q_eps, c.recipe)
            assert (wrong.float() - q_out.float()).abs().max() > 0.1


def test_supports_half_table():
    c = _half_case(torch.bfloat16, "bhsd", True)
    q, k, qw, kw, cos, sin = _half_inputs(c, True)
    assert tk.supports(q, k, cos, c.recipe, sin, qw, kw) is None  # strided tables are fine
    full = dataclasses.replace(c.recipe, half_table=False)
    assert "not contiguous" in tk.supports(q, k, cos, full, sin, qw, kw)
    cache = torch.randn(8, c.recipe.rotary_dim)
    assert "cache" in tk.supports(q, k, cache, c.recipe, None, qw, kw, torch.zeros(3, dtype=torch.long))


HALF_TABLE_BUGS = {
    "table read at stride 1": ("cos_ptr + c_row + dh * c_sd, mask=cm", "cos_ptr + c_row + dh, mask=cm"),
    "strides not passed": ("*((cos.stride(-1), sin.stride(-1)) if half_table else (1, 1)),", "*(1, 1),"),
}


@pytest.mark.parametrize("bug", list(HALF_TABLE_BUGS))
def test_half_table_seeded_bugs_are_caught(bug):
    with _seeded_kernel(*HALF_TABLE_BUGS[bug]) as mod, pytest.raises(AssertionError):
        _run_half(mod, _half_case(torch.float32, "bshd_transposed", True), True)


# ---- de-interleaved RoPE (Recipe.deinterleave_input): DeepSeek's apply_rotary_pos_emb_interleave ---


def _deint_case(dtype, layout, half_table, rd=None, head_dim=32, cos_dtype=None, k_heads=1):
    """RoPE alone (the rope family's recipe): the pairs (x[2i], x[2i+1]) rotated into neox halves, with
    full-width neox tables or half tables (transformers 5's cos[..., :d/2]); 3 q heads and 1 k head,
    as DeepSeek's MLA (k_pe has one head), or k alone (k_heads=0: a single-tensor launch)."""
    cos_dtype = cos_dtype or dtype
    rope_dtype = torch.promote_types(dtype, cos_dtype)
    recipe = Recipe(norm="none", norm_dtype=dtype, rope_dtype=rope_dtype, out_dtype=rope_dtype,
                    rotary_dim=rd or head_dim, half_table=half_table, deinterleave_input=True)
    return Case(dtype=dtype, head_dim=head_dim, recipe=recipe, has_weight=False, weight_dtype=dtype,
                cos_dtype=cos_dtype, layout=layout, cos_per_batch=True, batch=2, seq=3, q_heads=3, k_heads=k_heads,
                q_eps=1e-6, k_eps=1e-6, scale=1.0, config=None, seed=41)


def _deint_inputs(c: Case):
    """make_inputs; with half tables DeepSeek's first halves cos[..., :rd/2] of full-width tables of
    independent angles (views: a read of the other half or of the pairs' entries shows)."""
    q, k, _, _, cos, sin = make_inputs(dataclasses.replace(c, recipe=dataclasses.replace(c.recipe, half_table=False)))
    if c.recipe.half_table:
        cos, sin = cos[..., : c.recipe.rotary_dim // 2], sin[..., : c.recipe.rotary_dim // 2]
    return q, k, cos, sin


def _run_deint(mod, c: Case):
    q, k, cos, sin = _deint_inputs(c)
    if k is not None:
        check_qk(q, k, None, None, cos, sin, c.recipe)  # the ops' own argument checks
    assert tk.supports(q, k, cos, c.recipe, sin) is None
    q_out, k_out = mod.launch(q, k, None, None, cos, sin, c.q_eps, c.k_eps, c.recipe)
    _check_against_reference(q_out, q, None, cos, sin, c.q_eps, c)
    if k is None:
        assert k_out is None
    else:
        _check_against_reference(k_out, k, None, cos, sin, c.k_eps, c)
    return q, cos, sin, q_out


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("rope", ["full", "partial", "half_table", "partial_half_table"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deinterleaved_rope(interp, layout, rope, dtype):
    """The reference's function (de-interleave, then neox), which the neox RoPE of x itself is not,
    for q and k (one head) and for one tensor alone; 40 dims (20 pairs, padded to 32) too."""
    for head_dim, k_heads, cos_dtype in ((32, 1, None), (40, 0, None), (32, 1, torch.float32)):
        rd = head_dim // 2 if rope.startswith("partial") else None
        c = _deint_case(dtype, layout, "half_table" in rope, rd=rd, head_dim=head_dim, cos_dtype=cos_dtype,
                        k_heads=k_heads)
        q, cos, sin, q_out = _run_deint(interp, c)
        plain = norm_rope_reference(q, None, cos, sin, 0.0, dataclasses.replace(c.recipe, deinterleave_input=False))
        assert (plain.float() - q_out.float()).abs().max() > 0.1


def test_supports_deinterleave():
    c = _deint_case(torch.bfloat16, "bhsd", True)
    q, k, cos, sin = _deint_inputs(c)
    assert tk.supports(q, k, cos, c.recipe, sin) is None
    cache = torch.randn(8, c.recipe.rotary_dim)
    assert "cache" in tk.supports(q, k, cache, c.recipe, None, None, None, torch.zeros(3, dtype=torch.long))
    # (combinations the recipe refuses, in case one reaches the kernel unchecked)
    for other in ({"norm": "rms"}, {"interleaved": True}):
        assert "deinterleave_input" in tk.supports(q, k, cos, dataclasses.replace(c.recipe, **other), sin)


DEINTERLEAVE_BUGS = {
    "x read as halves": ("X_PAIRS=bool(recipe.interleaved or recipe.deinterleave_input)",
                         "X_PAIRS=bool(recipe.interleaved)"),
    "tables and output read as pairs": ("INTERLEAVED=bool(recipe.interleaved),",
                                        "INTERLEAVED=bool(recipe.interleaved or recipe.deinterleave_input),"),
    "pairs loaded under INTERLEAVED only": ("        if X_PAIRS:  # (a, b) = (x[2i], x[2i + 1])",
                                            "        if INTERLEAVED:  # (a, b) = (x[2i], x[2i + 1])"),
}


@pytest.mark.parametrize("half_table", [False, True])
@pytest.mark.parametrize("bug", list(DEINTERLEAVE_BUGS))
def test_deinterleave_seeded_bugs_are_caught(bug, half_table):
    with _seeded_kernel(*DEINTERLEAVE_BUGS[bug]) as mod, pytest.raises(AssertionError):
        _run_deint(mod, _deint_case(torch.float32, "bshd_transposed", half_table))


# ---- eager launch plans ------------------------------------------------------------------------------

def test_launch_plans_follow_each_call(interp):
    """An eager launch reuses the plan made for its inputs' layout (the host cost of planning is paid
    once) and still computes each call from its own tensors: fresh data, another eps, a weight that
    was q's in the planned call and is k's own now, and new outputs every time."""
    torch.manual_seed(3)
    D = 16
    recipe = Recipe("rms", 0.0, True, torch.float32, torch.float32, torch.float32, D, False)

    def fresh():
        q, k = torch.randn(2, 5, 4, D), torch.randn(2, 5, 2, D)
        ang = torch.rand(2, 5, 1, D // 2) * 6.3
        cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
        return q, k, 1 + 0.3 * torch.randn(D), 1 + 0.3 * torch.randn(D), cos, sin

    def check(q, k, qw, kw, cos, sin, eps, outs):
        for out, x, w in zip(outs, (q, k), (qw, kw)):
            ref = norm_rope_reference(x, w, cos, sin, eps, recipe)
            assert float((out - ref).abs().max()) <= 1e-5 * float(ref.abs().max()), (eps, tuple(x.shape))

    interp._PLANS.clear()
    q, k, qw, _, cos, sin = fresh()
    first = interp.launch(q, k, qw, qw, cos, sin, 1e-6, 1e-6, recipe)  # one tensor as both weights
    check(q, k, qw, qw, cos, sin, 1e-6, first)
    assert len(interp._PLANS) == 1
    q, k, qw, kw, cos, sin = fresh()
    second = interp.launch(q, k, qw, kw, cos, sin, 1e-6, 1e-6, recipe)  # same layout, k's own weight
    check(q, k, qw, kw, cos, sin, 1e-6, second)
    assert len(interp._PLANS) == 2  # the weights' aliasing is part of the plan's key
    third = interp.launch(q, k, qw, kw, cos, sin, 0.5, 0.5, recipe)  # eps is the call's, not the plan's
    check(q, k, qw, kw, cos, sin, 0.5, third)
    q2, k2, qw2, kw2, cos2, sin2 = fresh()
    fourth = interp.launch(q2, k2, qw2, kw2, cos2, sin2, 1e-6, 1e-6, recipe)  # fresh data, the same plan
    check(q2, k2, qw2, kw2, cos2, sin2, 1e-6, fourth)
    assert len(interp._PLANS) == 2
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(second, fourth))  # new outputs each call
    check(q, k, qw, kw, cos, sin, 1e-6, second)  # and earlier results are not overwritten
    qt = q2.transpose(1, 2).contiguous().transpose(1, 2)  # other strides: a plan of its own
    fifth = interp.launch(qt, k2, qw2, kw2, cos2, sin2, 1e-6, 1e-6, recipe)
    check(qt, k2, qw2, kw2, cos2, sin2, 1e-6, fifth)
    assert len(interp._PLANS) == 3


def test_functional_direct_path_reuses_its_plan_per_layout_and_aliasing(interp, monkeypatch):
    """The eager functional path keeps the launch plan with its per-layout checks: a call with one
    tensor as both weights and one with k's own weight (same layouts) get a plan each, and every
    call computes from its own tensors."""
    import qkfuse
    import qkfuse.kernels
    from qkfuse import functional

    monkeypatch.setattr(qkfuse.kernels, "triton_norm_rope", interp)
    monkeypatch.setattr(functional, "_direct_kernel", lambda q: True)
    monkeypatch.setattr(functional, "_CHECKED", {})
    torch.manual_seed(6)
    T, D = 5, 16
    recipe = Recipe("rms", 0.0, True, torch.float32, torch.float32, torch.float32, D, False)

    def fresh():
        ang = torch.rand(T, D // 2) * 6.3
        return (torch.randn(T, 4, D), torch.randn(T, 2, D), 1 + 0.3 * torch.randn(D), 1 + 0.3 * torch.randn(D),
                torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1))

    with torch.no_grad():
        for shared in (True, False, True, False):
            q, k, qw, kw, cos, sin = fresh()
            kw = qw if shared else kw
            outs = qkfuse.qk_norm_rope(q, k, qw, kw, cos, sin, eps=1e-5)
            for out, x, w in zip(outs, (q, k), (qw, kw)):
                ref = norm_rope_reference(x, w, cos.unsqueeze(-2), sin.unsqueeze(-2), 1e-5, recipe)
                assert float((out - ref).abs().max()) <= 1e-5 * float(ref.abs().max()), shared
    assert len(functional._CHECKED) == 2  # the aliasing is part of the key
    assert all(ok and plan is not None for ok, plan in functional._CHECKED.values())


def test_functional_direct_path_checks_once_per_layout_and_every_call_s_positions(interp, monkeypatch):
    """qkfuse.qk_norm_rope's eager kernel path (forced here onto CPU tensors and the interpreted
    kernel): a layout's input checks run once, a bad call is still refused after good ones with the
    same shapes, positions out of the cache are refused on every call, results equal the reference."""
    import qkfuse
    import qkfuse.kernels
    from qkfuse import functional

    monkeypatch.setattr(qkfuse.kernels, "triton_norm_rope", interp)
    monkeypatch.setattr(functional, "_direct_kernel", lambda q: True)
    monkeypatch.setattr(functional, "_CHECKED", {})
    torch.manual_seed(5)
    T, D = 6, 16
    q, k = torch.randn(T, 4, D), torch.randn(T, 2, D)
    qw, kw = 1 + 0.3 * torch.randn(D), 1 + 0.3 * torch.randn(D)
    ang = torch.rand(T, D // 2) * 6.3
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    with torch.no_grad():
        for _ in range(2):
            qo, ko = qkfuse.qk_norm_rope(q, k, qw, kw, cos, sin)
        assert len(functional._CHECKED) == 1
        recipe = Recipe("rms", 0.0, True, torch.float32, torch.float32, torch.float32, D, False)
        for out, x, w in ((qo, q, qw), (ko, k, kw)):
            ref = norm_rope_reference(x, w, cos.unsqueeze(-2), sin.unsqueeze(-2), 1e-6, recipe)
            assert float((out - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
        with pytest.raises(ValueError, match="weight"):
            qkfuse.qk_norm_rope(q, k, qw[:8], kw, cos, sin)  # head_dim mismatch: another layout, checked
        qb, kb = 0.2 * torch.randn(D), 0.2 * torch.randn(D)  # a LayerNorm with bias, by the kernel
        qo, ko = qkfuse.qk_norm_rope(q, k, qw, kw, cos, sin, eps=1e-5, norm="layer", q_bias=qb, k_bias=kb)
        kernel_ok, plan = list(functional._CHECKED.values())[-1]
        assert kernel_ok is True and plan is not None  # the kernel computed it (planned), not the reference
        layer = dataclasses.replace(recipe, norm="layer")
        for out, x, w, b in ((qo, q, qw, qb), (ko, k, kw, kb)):
            ref = norm_rope_reference(x, w, cos.unsqueeze(-2), sin.unsqueeze(-2), 1e-5, layer, bias=b)
            assert float((out - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
        cache = torch.cat([torch.rand(40, D // 2).cos(), torch.rand(40, D // 2).sin()], -1)
        good = torch.tensor([0, 3, 17, 5, 5, 30])
        qkfuse.qk_norm_rope(q, k, qw, kw, cos_sin_cache=cache, positions=good)
        with pytest.raises(ValueError, match="positions"):
            qkfuse.qk_norm_rope(q, k, qw, kw, cos_sin_cache=cache, positions=good + 20)  # same layout


@pytest.mark.parametrize("with_bias", [False, True])
def test_bases_are_read_as_the_views(interp, with_bias):
    """What the compiled path passes (launchers.py): q, k and cos/sin as the graph's buffers before
    their transpose / unsqueeze (same data pointer), the strides from the views, and q's buffer as
    the pointers the kernel does not read. Bit for bit the launch with the views themselves."""
    g = torch.Generator().manual_seed(21)
    D, recipe = 16, Recipe("rms", 0.0, True, torch.float32, torch.float32, torch.float32, 16, False)
    q_base, k_base = torch.randn(2, 5, 4, D, generator=g), torch.randn(2, 5, 2, D, generator=g)
    ang = torch.rand(2, 5, D // 2, generator=g) * 6.3
    cos_base, sin_base = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    q, k = q_base.transpose(1, 2), k_base.transpose(1, 2)  # [B, H, S, D] views, as HF's attention
    cos, sin = cos_base.unsqueeze(1), sin_base.unsqueeze(1)
    qw, kw = 1 + 0.3 * torch.randn(D, generator=g), 1 + 0.3 * torch.randn(D, generator=g)
    biases = dict(q_bias=0.1 * torch.randn(D, generator=g), k_bias=0.1 * torch.randn(D, generator=g)) if with_bias else {}
    if with_bias:
        recipe = dataclasses.replace(recipe, norm="layer")
    views = interp.launch(q, k, qw, kw, cos, sin, 1e-6, 1e-6, recipe, **biases)
    bases = {"q": q_base, "k": k_base, "cos": cos_base, "sin": sin_base}
    based = interp.launch(q, k, qw, kw, cos, sin, 1e-6, 1e-6, recipe, bases=bases, **biases)
    assert all(torch.equal(a, b) for a, b in zip(views, based))
    ref = norm_rope_reference(k, kw, cos, sin, 1e-6, recipe, bias=biases.get("k_bias"))
    assert float((based[1] - ref).abs().max()) <= 1e-5 * float(ref.abs().max())


@pytest.mark.parametrize("interleaved", [False, True])
def test_parts_write_their_rows_of_one_output(interp, interleaved):
    """What the compiled path does for norms concatenated before the RoPE (launchers.py): one launch
    per part, each given views of the whole outputs and of the whole cos/sin at its rows (out=, with
    the whole tensors as bases: pointer + element offset). The whole output is bit for bit the
    concatenation of the parts launched on their own (with their tables' rows copied out), and the
    rows of no other part are touched."""
    g = torch.Generator().manual_seed(22)
    D = 16
    recipe = Recipe("rms", 0.0, True, torch.float32, torch.float32, torch.bfloat16, 16, interleaved)
    lengths = (3, 5)
    qs = [torch.randn(2, n, 4, D, generator=g).bfloat16() for n in lengths]
    ks = [torch.randn(2, n, 2, D, generator=g).bfloat16() for n in lengths]
    ang = torch.rand(sum(lengths), D // 2, generator=g) * 6.3
    cos_base, sin_base = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    cos, sin = cos_base[None, :, None], sin_base[None, :, None]  # [1, S, 1, D]
    qws = [1 + 0.3 * torch.randn(D, generator=g) for _ in lengths]
    kws = [1 + 0.3 * torch.randn(D, generator=g) for _ in lengths]
    q_out = torch.full((2, sum(lengths), 4, D), float("nan"), dtype=torch.bfloat16)
    k_out = torch.full((2, sum(lengths), 2, D), float("nan"), dtype=torch.bfloat16)
    alone = []
    start = 0
    for q, k, qw, kw, n in zip(qs, ks, qws, kws, lengths):
        c, s = cos.narrow(1, start, n), sin.narrow(1, start, n)
        views = (q_out.narrow(1, start, n), k_out.narrow(1, start, n))
        written = interp.launch(q, k, qw, kw, c, s, 1e-6, 1e-5, recipe, out=views,
                                bases={"q_out": q_out, "k_out": k_out, "cos": cos_base, "sin": sin_base})
        assert all(w is v for w, v in zip(written, views))
        if start == 0:  # the later part's rows are not written yet
            assert bool(q_out[:, n:].isnan().all()) and bool(k_out[:, n:].isnan().all())
        alone.append(interp.launch(q, k, qw, kw, c.contiguous(), s.contiguous(), 1e-6, 1e-5, recipe))
        start += n
    assert torch.equal(q_out, torch.cat([a[0] for a in alone], 1))
    assert torch.equal(k_out, torch.cat([a[1] for a in alone], 1))  # (launches on their own: tested above)


def _rope_first_case(dtype, layout, rope, norm, weight, cast_before):
    rd = 16 if rope == "partial" else 32
    # HF: the RoPE in the input dtype (tables cast to it), then the norm; the result in that dtype
    recipe = Recipe(norm="layer" if norm == "layer" else "rms", norm_sum=norm == "l2", cast_before_weight=cast_before,
                    norm_dtype=dtype, rope_dtype=dtype, out_dtype=dtype, rotary_dim=rd,
                    interleaved=rope == "interleaved", half_table=rope == "half_table", rope_first=True,
                    negate_sin=rope == "negate_sin")
    return Case(dtype=dtype, head_dim=32, recipe=recipe, has_weight=weight, weight_dtype=dtype, cos_dtype=dtype,
                layout=layout, cos_per_batch=True, batch=2, seq=3, q_heads=3, k_heads=1, q_eps=1e-6, k_eps=0.5,
                scale=1.0, config=None, seed=41)


def _launch_rope_first(interp, c: Case, rope: str):
    """q and k of case c through the interpreted kernel, each checked against the reference; (q's
    output, q, its weight, cos, sin) for the caller's further checks."""
    q, k, qw, kw, cos, sin = _half_inputs(c, True) if rope == "half_table" else make_inputs(c)
    check_qk(q, k, qw, kw, cos, sin, c.recipe)
    assert tk.supports(q, k, cos, c.recipe, sin, qw, kw) is None
    q_out, k_out = interp.launch(q, k, qw, kw, cos, sin, c.q_eps, c.k_eps, c.recipe)
    _check_against_reference(q_out, q, qw, cos, sin, c.q_eps, c)
    _check_against_reference(k_out, k, kw, cos, sin, c.k_eps, c)
    return q_out, q, qw, cos, sin


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("rope", ["neox", "interleaved", "partial", "half_table", "negate_sin"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_first(interp, layout, rope, dtype):
    """Recipe.rope_first (Llama4, HunYuan: the norm of the rotated q/k): the reference's function, which
    the norm-first recipe on the same inputs is not (independent angles per entry: no rotation the
    norm is blind to), for q and k; RMSNorm with a weight cast before it, none, L2, LayerNorm."""
    for norm, weight, cast_before in (("rms", True, True), ("rms", False, False), ("l2", False, False),
                                      ("layer", True, False)):
        c = _rope_first_case(dtype, layout, rope, norm, weight, cast_before)
        q_out, q, qw, cos, sin = _launch_rope_first(interp, c, rope)
        norm_first = norm_rope_reference(q, qw, cos, sin, c.q_eps, dataclasses.replace(c.recipe, rope_first=False))
        # outside the tolerance the kernel is held to: the norm-first recipe would fail this test
        coarse = coarsest_rounding(c.recipe, c.dtype, c.has_weight)
        scale = tensor_scale(norm_first, q, qw, c.q_eps, c.recipe)
        assert error_units(q_out, norm_first, scale, coarse) > tolerance_units(c), (norm, weight)
        if c.recipe.negate_sin:  # and the rotation the usual way is not what it computes either
            usual = norm_rope_reference(q, qw, cos, sin, c.q_eps, dataclasses.replace(c.recipe, negate_sin=False))
            assert error_units(q_out, usual, scale, coarse) > tolerance_units(c), (norm, weight)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("rope", ["neox", "half_table"])
def test_rope_first_keeps_the_rope_dtype(interp, layout, rope):
    """Recipe.keep_rope_dtype (Llama4's graph on torch < 2.13): a bfloat16 x, the RoPE in float32, its
    output read by the norm unrounded; all in float32 from there, so the bfloat16 rounding that
    keep_rope_dtype=False adds is thousands of float32 units away and the kernel must not make it."""
    for norm, weight in (("l2", False), ("rms", True)):
        c = _rope_first_case(torch.bfloat16, layout, rope, norm, weight, False)
        c = dataclasses.replace(c, recipe=dataclasses.replace(
            c.recipe, rope_dtype=torch.float32, norm_dtype=torch.float32, out_dtype=torch.float32,
            keep_rope_dtype=True), weight_dtype=torch.float32, cos_dtype=torch.float32)
        q_out, q, qw, cos, sin = _launch_rope_first(interp, c, rope)
        rounded = norm_rope_reference(q, qw, cos, sin, c.q_eps, dataclasses.replace(c.recipe, keep_rope_dtype=False))
        scale = tensor_scale(rounded, q, qw, c.q_eps, c.recipe)
        assert error_units(q_out, rounded, scale, torch.float32) > 100 * tolerance_units(c), norm


def test_rope_first_recipe_checks():
    with pytest.raises(ValueError, match="rope_first needs a RoPE"):
        check_recipe(Recipe(rotary_dim=0, rope_first=True))
    with pytest.raises(ValueError, match="per-head norm"):
        check_recipe(Recipe(rotary_dim=8, rope_first=True, norm_heads_dim=-2))
    assert Recipe(rotary_dim=8, rope_first=True).describe() == "neox rope[8] then rms"
    with pytest.raises(ValueError, match="keep_rope_dtype is set but rope_first is not"):
        check_recipe(Recipe(rotary_dim=8, keep_rope_dtype=True))
    assert Recipe(rotary_dim=8, rope_first=True, keep_rope_dtype=True).describe() == \
        "neox rope[8] (float32 into the norm) then rms"
