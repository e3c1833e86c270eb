"""Fuzz: random good and bad arguments to every entry point give a clear error or the reference.

Entry points: ``qkfuse.qk_norm_rope`` (cos/sin and cos_sin_cache forms), ``qkfuse.norm_rope`` and
the ops ``torch.ops.qkfuse.{qk_norm_rope, norm_rope, qk_norm_rope_cached}``. A case is a valid
call (layout, dtype, GQA, partial rotary, ...) with up to two defects from BADS applied. Each
defect either must be refused (its exception type, with a message naming the argument) or must
give what the plain-torch reference computes on the same inputs (float64, strided, NaN/Inf,
empty). Any other exception, or a result that differs, fails.

On CPU the ops' kernel is the reference, so results must be bit-identical. The Triton kernel is
fuzzed through Triton's interpreter on tiny shapes (the functional API's CUDA path, pointed at an
interpreted copy of the kernel module), and on CUDA by tests/gpu/test_functional_gpu.py, which
reuses this module's cases and checker; kernel results are compared within a few units of the
coarsest dtype the recipe rounds to.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import re
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

import qkfuse
from qkfuse import functional
from qkfuse.kernels.reference import cos_sin_from_cache, norm_rope_reference
from qkfuse.ops.norm_rope import run_kernel
from qkfuse.ops.recipe import Recipe
from tests.conftest import UNIT_ROUNDOFF, coarsest_rounding

FN = frozenset({"fn_qk", "fn_single", "fn_cached"})
OPS = frozenset({"op_qk", "op_single", "op_cached"})
ALL = FN | OPS
CACHED = frozenset({"fn_cached", "op_cached"})
TABLES = ALL - CACHED  # cos/sin given as tensors
QK = ALL - {"fn_single", "op_single"}


@dataclasses.dataclass(frozen=True)
class Bad:
    name: str
    entries: frozenset
    group: str  # at most one defect per group in a case
    error: tuple | None  # (exception type, regex the message must match), or None: the reference result
    needs: str = ""  # "weight", "rope": the valid call must have one for the defect to apply


BADS = {b.name: b for b in [
    Bad("int_q", ALL, "q_dtype", (TypeError, r"\b[qx] dtype")),
    Bad("float64_q", ALL, "q_dtype", None),
    Bad("mixed_qk", QK, "q_dtype", (TypeError, r"q and k must have the same dtype")),
    Bad("noncontig_q", ALL, "q_layout", None),
    Bad("zero_head_dim", ALL, "q_layout", (ValueError, r"\b[qx] has head_dim 0")),
    Bad("empty", ALL, "values", None),
    Bad("nan", ALL, "values", None),
    Bad("inf", ALL, "values", None),
    Bad("weight_device", ALL, "weight", (ValueError, r"weight is on"), "weight"),
    Bad("weight_len", ALL, "weight", (ValueError, r"weight must have shape"), "weight"),
    Bad("weight_2d", ALL, "weight", (ValueError, r"weight must have shape"), "weight"),
    Bad("weight_int", ALL, "weight", (TypeError, r"weight dtype"), "weight"),
    Bad("weight_f32", ALL, "weight", None, "weight"),
    Bad("rope_narrower_than_cos", ALL, "rd", None, "rope"),
    Bad("k_head_dim", QK, "k_shape", (ValueError, r"\bk\b")),
    Bad("k_rank", QK, "k_shape", (ValueError, r"\bk\b")),
    Bad("cos_device", TABLES, "table", (ValueError, r"\b(cos|sin) is on"), "rope"),
    Bad("cos_int", TABLES, "table", (TypeError, r"\b(cos|sin) dtype"), "rope"),
    Bad("cos_short", TABLES, "table", (ValueError, r"\b(cos|sin)\b.*(broadcast|larger)"), "rope"),
    Bad("sin_missing", TABLES, "table", (ValueError, r"needs cos and sin"), "rope"),
    Bad("cos_rd0", TABLES, "rd", (ValueError, r"rotary_dim=0"), "rope"),
    Bad("rd_odd", ALL, "rd", (ValueError, r"rotary_dim"), "rope"),
    Bad("rd_large", ALL, "rd", (ValueError, r"rotary_dim"), "rope"),
    Bad("cache_device", CACHED, "table", (ValueError, r"cos_sin_cache is on")),
    Bad("cache_int", CACHED, "table", (TypeError, r"cos_sin_cache dtype")),
    Bad("cache_width", CACHED, "table", (ValueError, r"cos_sin_cache must be")),
    Bad("pos_device", CACHED, "positions", (ValueError, r"positions is on")),
    Bad("pos_float", CACHED, "positions", (TypeError, r"positions dtype")),
    Bad("pos_negative", CACHED, "positions", (ValueError, r"positions must be in \[0, ")),
    Bad("pos_too_large", CACHED, "positions", (ValueError, r"positions must be in \[0, ")),
    Bad("pos_short", CACHED, "positions", (ValueError, r"positions")),
    Bad("recipe_int", ALL, "recipe", (TypeError, r"(norm|rope|out)_dtype must be")),
    Bad("eps_str", FN, "recipe", (TypeError, r"\beps must be a float")),
]}
# Defects that need tokens to act on (with 0 tokens there is no position, no NaN to place, and a
# 1-token cos broadcasts legitimately).
NEEDS_TOKENS = {"nan", "inf", "cos_short", "pos_negative", "pos_too_large", "pos_short"}


@dataclasses.dataclass(frozen=True)
class Case:
    entry: str
    dtype: torch.dtype
    layout: str  # "thd" [T, H, D] (vLLM), "bshd" [B, S, H, D] (HF view), "bhsd" (its transpose)
    head_dim: int
    rotary_dim: int
    interleaved: bool
    norm: str
    weight: bool
    weight_offset: float
    cos_dtype: torch.dtype
    drop_heads_axis: bool  # functional entries: pass cos/sin (positions) without the heads axis
    batch: int
    seq: int
    q_heads: int
    k_heads: int
    bad: tuple[str, ...]
    seed: int


DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@st.composite
def cases(draw, entries=ALL, head_dims=(16, 24, 32, 40), max_seq=4) -> Case:
    entry = draw(st.sampled_from(sorted(entries)))
    bad: list[str] = []
    for _ in range(draw(st.integers(0, 2))):
        options = sorted(n for n, b in BADS.items() if entry in b.entries
                         and b.group not in {BADS[o].group for o in bad}
                         and not ("empty" in bad and n in NEEDS_TOKENS)
                         and not (n == "empty" and NEEDS_TOKENS.intersection(bad)))
        bad.append(draw(st.sampled_from(options)))
    needs = {BADS[n].needs for n in bad}
    d = draw(st.sampled_from(head_dims))
    cached = entry in CACHED
    rd_choices = sorted({d, d // 2} | (set() if cached or "rope" in needs else {0}))
    rd = draw(st.sampled_from(rd_choices))
    weight = "weight" in needs or draw(st.booleans())
    norm = "rms" if weight or rd == 0 else draw(st.sampled_from(("rms", "none")))
    dtype = draw(st.sampled_from(DTYPES))
    layout = draw(st.sampled_from(("thd", "bshd", "bhsd")))
    min_seq = 3 if NEEDS_TOKENS.intersection(bad) else 1
    seq = 0 if "empty" in bad else draw(st.integers(min_seq, max(min_seq, max_seq)))
    q_heads = draw(st.integers(1, 4))
    return Case(
        entry=entry, dtype=dtype, layout=layout, head_dim=d, rotary_dim=rd,
        interleaved=rd > 0 and draw(st.booleans()), norm=norm, weight=weight,
        weight_offset=draw(st.sampled_from((0.0, 1.0))) if weight else 0.0,
        cos_dtype=draw(st.sampled_from((dtype, torch.float32))),
        drop_heads_axis=layout != "bhsd" and draw(st.booleans()),
        batch=1 if layout == "thd" else draw(st.integers(1, 2)), seq=seq,
        q_heads=q_heads, k_heads=draw(st.sampled_from([h for h in range(1, q_heads + 1) if q_heads % h == 0])),
        bad=tuple(bad), seed=draw(st.integers(0, 2**31 - 1)),
    )


def default_recipe(dtype, table_dtypes, rd, norm, weight_offset, interleaved) -> Recipe:
    """The recipe qkfuse.qk_norm_rope documents as its default, derived here independently."""
    rope = dtype
    for t in table_dtypes:
        rope = torch.promote_types(rope, t)
    return Recipe(norm, weight_offset, weight_offset == 0.0, dtype, rope, dtype, rd, interleaved)


@dataclasses.dataclass
class Call:
    """A case's arguments, in the op form (cos/sin/positions broadcastable to q's rows)."""
    entry: str
    q: object
    k: object
    qw: object
    kw: object
    cos: object
    sin: object
    cache: object
    positions: object
    recipe: Recipe  # of the op entries
    fn_kwargs: dict  # of the functional entries, beyond eps and the recipe fields they pass
    drop_heads_axis: bool
    q_eps: float = 1e-6
    k_eps: float = 0.25  # visibly different from q's: swapping them is caught


def other_device(device: str) -> str:
    return "meta" if device == "cpu" else "cpu"


def build(c: Case, device: str = "cpu") -> Call:
    g = torch.Generator().manual_seed(c.seed)
    D, rd, B, S, Hq, Hk = c.head_dim, c.rotary_dim, c.batch, c.seq, c.q_heads, c.k_heads

    def randn(*shape, dtype=c.dtype, scale=1.0):
        return (scale * torch.randn(*shape, generator=g)).to(dtype).to(device)

    def qk_like(heads, d=D):
        if c.layout == "thd":
            return randn(S, heads, d)
        x = randn(B, S, heads, d)
        return x.transpose(1, 2) if c.layout == "bhsd" else x

    rows = {"thd": (S, 1), "bshd": (B, S, 1), "bhsd": (B, 1, S)}[c.layout]  # cos rows, heads axis of size 1
    q, k = qk_like(Hq), qk_like(Hk)
    centre = 1.0 - c.weight_offset
    qw = (centre + randn(D, dtype=torch.float32, scale=0.3)).to(c.dtype) if c.weight else None
    kw = (centre + randn(D, dtype=torch.float32, scale=0.3)).to(c.dtype) if c.weight else None
    cos = sin = cache = positions = None
    n_pos = 2 * max(S, 1) + 3
    if rd and c.entry in CACHED:
        angle = torch.rand(n_pos, rd // 2, generator=g) * (2 * math.pi)
        cache = torch.cat((angle.cos(), angle.sin()), dim=-1).to(c.cos_dtype).to(device)
        positions = torch.randint(0, n_pos, rows, generator=g).to(device)
    elif rd:
        theta = torch.rand((*rows, rd), generator=g) * (2 * math.pi)  # independent angles: a mixed-up
        cos, sin = theta.cos().to(c.cos_dtype).to(device), theta.sin().to(c.cos_dtype).to(device)  # half shows
    table_dtypes = [t.dtype for t in (cos, sin, cache) if t is not None]
    recipe = default_recipe(c.dtype, table_dtypes, rd, c.norm, c.weight_offset, c.interleaved)
    a = Call(c.entry, q, k, qw, kw, cos, sin, cache, positions, recipe,
             dict(weight_offset=c.weight_offset, interleaved=c.interleaved, norm=c.norm), c.drop_heads_axis)
    for name in c.bad:
        _apply(a, name, c, device)
    return a


def _last(t: torch.Tensor, col: int) -> tuple:
    return (*(s - 1 for s in t.shape[:-1]), col)


def _apply(a: Call, name: str, c: Case, device: str) -> None:
    """Give the call one defect. The tensors are the case's own: they are changed in place."""
    D, rd = c.head_dim, c.rotary_dim
    seq_dim = {"thd": 0, "bshd": 1, "bhsd": 2}[c.layout]
    if name == "int_q":
        a.q = (a.q * 4).to(torch.int32)
    elif name == "float64_q":
        a.q, a.k = a.q.double(), a.k.double()
    elif name == "mixed_qk":
        a.k = a.k.to(torch.float16 if a.q.dtype != torch.float16 else torch.bfloat16)
    elif name == "empty":
        assert a.q.numel() == 0  # built with 0 tokens
    elif name == "noncontig_q":  # last-dim stride 2: the kernel refuses it, the reference computes it
        a.q = torch.stack((a.q, torch.full_like(a.q, 1e4)), dim=-1)[..., 0]
    elif name in ("nan", "inf"):
        v = math.nan if name == "nan" else -math.inf
        a.q[_last(a.q, 2)] = v  # one row of q
        if a.cos is not None:
            a.cos[_last(a.cos, 0)] = v  # and the last token's cos
    elif name == "zero_head_dim":
        a.q, a.k = a.q[..., :0], a.k[..., :0]
    elif name == "weight_device":
        a.qw = a.qw.to(other_device(device))
    elif name == "weight_len":
        a.qw = torch.ones(D + 2, dtype=a.qw.dtype, device=device)
    elif name == "weight_2d":
        a.qw = a.qw[None]
    elif name == "weight_int":
        a.qw = a.qw.round().to(torch.int64)
    elif name == "weight_f32":
        a.qw = a.qw.float() + 1e-3
    elif name == "rope_narrower_than_cos":  # float32 tables, RoPE in the input dtype (vLLM's forward_native)
        for attr in ("cos", "sin", "cache"):
            if getattr(a, attr) is not None:
                setattr(a, attr, getattr(a, attr).float())
        a.recipe = dataclasses.replace(a.recipe, rope_dtype=a.q.dtype)
        a.fn_kwargs["rope_dtype"] = a.q.dtype
    elif name == "k_head_dim":
        a.k = torch.cat((a.k, a.k[..., :2]), dim=-1)
    elif name == "k_rank":
        a.k = a.k[None]
    elif name == "cos_device":
        a.cos = a.cos.to(other_device(device))
    elif name == "cos_int":
        a.sin = (a.sin * 8).to(torch.int32)
    elif name == "cos_short":  # one token fewer than q (and more than 1: no broadcast)
        a.cos = a.cos.narrow(seq_dim, 0, a.cos.shape[seq_dim] - 1)
        a.sin = a.sin.narrow(seq_dim, 0, a.sin.shape[seq_dim] - 1)
    elif name == "sin_missing":
        a.sin = None
    elif name == "cos_rd0":
        _set_rd(a, 0)
    elif name == "rd_odd":
        _set_rd(a, rd - 1)
    elif name == "rd_large":
        wide = D + 2
        _set_rd(a, wide)
        if a.cache is not None:
            a.cache = torch.ones(a.cache.shape[0], wide, dtype=a.cache.dtype, device=device)
        else:
            a.cos = torch.ones(*a.cos.shape[:-1], wide, dtype=a.cos.dtype, device=device)
            a.sin = torch.zeros_like(a.cos)
    elif name == "cache_device":
        a.cache = a.cache.to(other_device(device))
    elif name == "cache_int":
        a.cache = a.cache.to(torch.int32)
    elif name == "cache_width":
        a.cache = torch.cat((a.cache, a.cache[:, :2]), dim=-1)
        _set_rd(a, rd)  # explicit: the functional default would follow the cache's width
    elif name == "pos_device":
        a.positions = a.positions.to(other_device(device))
    elif name == "pos_float":
        a.positions = a.positions.float()
    elif name in ("pos_negative", "pos_too_large"):
        a.positions[_last(a.positions, 0)[:-1]] = -1 if name == "pos_negative" else a.cache.shape[0]
    elif name == "pos_short":
        a.positions = a.positions.narrow(seq_dim, 0, a.positions.shape[seq_dim] - 1)
    elif name == "recipe_int":
        a.recipe = dataclasses.replace(a.recipe, norm_dtype=torch.int32)
        a.fn_kwargs["out_dtype"] = torch.int64
    elif name == "eps_str":
        a.q_eps = "1e-6"
    else:
        raise AssertionError(name)


def _set_rd(a: Call, rd: int) -> None:
    a.recipe = dataclasses.replace(a.recipe, rotary_dim=rd)
    a.fn_kwargs["rotary_dim"] = rd


def _without_heads_axis(t, a: Call, axis: int):
    return t.squeeze(axis) if t is not None and a.drop_heads_axis and t.dim() > 1 and t.shape[axis] == 1 else t


def call(a: Call) -> tuple:
    """Run the entry point; always a tuple of outputs."""
    r = a.recipe
    if a.entry in FN:
        kw = dict(eps=a.q_eps, **a.fn_kwargs)
        cos, sin = _without_heads_axis(a.cos, a, -2), _without_heads_axis(a.sin, a, -2)
        if a.entry == "fn_single":
            return (qkfuse.norm_rope(a.q, a.qw, cos, sin, **kw),)
        kw["k_eps"] = a.k_eps
        if a.entry == "fn_cached":
            return qkfuse.qk_norm_rope(a.q, a.k, a.qw, a.kw, cos_sin_cache=a.cache,
                                       positions=_without_heads_axis(a.positions, a, -1), **kw)
        return qkfuse.qk_norm_rope(a.q, a.k, a.qw, a.kw, cos, sin, **kw)
    if a.entry == "op_single":
        return (torch.ops.qkfuse.norm_rope(a.q, a.qw, a.cos, a.sin, a.q_eps, None, *r.op_args()),)
    if a.entry == "op_cached":
        return torch.ops.qkfuse.qk_norm_rope_cached(a.q, a.k, a.qw, a.kw, a.cache, a.positions, a.q_eps,
                                                    a.k_eps, *r.op_args())
    return torch.ops.qkfuse.qk_norm_rope(a.q, a.k, a.qw, a.kw, a.cos, a.sin, a.q_eps, a.k_eps, None, None,
                                         *r.op_args())


def expected(a: Call) -> tuple:
    """The plain-torch reference on the same inputs (for cases that must compute)."""
    cos, sin = a.cos, a.sin
    if a.cache is not None:
        cos, sin = cos_sin_from_cache(a.cache, a.positions, a.recipe.interleaved)
    recipe = a.recipe
    if a.entry in FN:  # the documented defaults, from the (possibly changed) input dtypes
        tables = [t.dtype for t in (cos, sin) if t is not None] if a.cache is None else [a.cache.dtype]
        recipe = default_recipe(a.q.dtype, tables, recipe.rotary_dim, recipe.norm, recipe.weight_offset,
                                recipe.interleaved)
        if "rope_dtype" in a.fn_kwargs:
            recipe = dataclasses.replace(recipe, rope_dtype=a.fn_kwargs["rope_dtype"])
    outs = [norm_rope_reference(a.q, a.qw, cos, sin, a.q_eps, recipe)]
    if a.entry not in ("fn_single", "op_single"):
        outs.append(norm_rope_reference(a.k, a.kw, cos, sin, a.k_eps, recipe))
    return tuple(outs), recipe


def assert_matches(out: tuple, ref: tuple, recipe: Recipe, a: Call, exact: bool, interpreted: bool = False):
    """Same shapes, dtypes, strides, NaN/Inf positions; values bit-equal (exact) or within a few units
    of the coarsest rounding (a kernel; Triton's interpreter truncates to bf16, hence more units)."""
    assert len(out) == len(ref)
    for o, r, x, w in zip(out, ref, (a.q, a.k), (a.qw, a.kw)):
        assert o.shape == r.shape and o.dtype == r.dtype and o.device == r.device
        assert o.stride() == r.stride()
        o64, r64 = o.double().cpu(), r.double().cpu()
        assert torch.equal(o64.isnan(), r64.isnan()) and torch.equal(o64.isinf(), r64.isinf())
        finite = r64.isfinite()
        if exact:
            assert torch.equal(o64[finite], r64[finite])
            continue
        if not finite.any():
            continue
        assert torch.equal(o64[r64.isinf()], r64[r64.isinf()])
        coarse = coarsest_rounding(recipe, x.dtype, w is not None)
        if coarse in (torch.float32, torch.float64):
            units = x.shape[-1] + 8  # the sum of squares in another order, doubled by RoPE
        else:
            units = 12 if interpreted and coarse == torch.bfloat16 else 4
        scale = max(r64[finite].abs().max().item(), 1.0)
        err = (o64[finite] - r64[finite]).abs().max().item()
        assert err <= units * UNIT_ROUNDOFF[coarse] * scale, (err, units, coarse, scale)


def check(c: Case, device: str = "cpu", exact: bool = True, interpreted: bool = False) -> None:
    """One fuzz case: the refusal its defects call for, else the reference's result."""
    a = build(c, device)
    errors = [BADS[n].error for n in c.bad if BADS[n].error is not None]
    if errors:
        types = tuple({e[0] for e in errors})
        with pytest.raises(types) as info:
            call(a)
        msg = str(info.value)
        assert msg.startswith("qkfuse: "), msg
        assert any(isinstance(info.value, t) and re.search(p, msg) for t, p in errors), (c.bad, msg)
        return
    out = call(a)
    ref, recipe = expected(a)
    assert_matches(out, ref, recipe, a, exact, interpreted)


DATA_DEPENDENT = {"pos_negative", "pos_too_large"}  # found by looking at values: not by fake impls


def check_fake(c: Case) -> None:
    """The same case traced with fake tensors (what torch.compile's fake impls see): the same
    refusals, except those that need the data, and the reference's output metadata."""
    a = build(c)
    errors = [BADS[n].error for n in c.bad if BADS[n].error is not None and n not in DATA_DEPENDENT]
    mode = FakeTensorMode()
    fake = dataclasses.replace(a, **{f: mode.from_tensor(getattr(a, f)) for f in
                                     ("q", "k", "qw", "kw", "cos", "sin", "cache", "positions")
                                     if isinstance(getattr(a, f), torch.Tensor)})
    if errors:
        with pytest.raises(tuple({e[0] for e in errors})) as info, mode:
            call(fake)
        assert any(isinstance(info.value, t) and re.search(p, str(info.value)) for t, p in errors), str(info.value)
        return
    with mode:
        out = call(fake)
    if c.bad and set(c.bad) <= DATA_DEPENDENT:
        return  # no reference for out-of-range positions
    ref, _ = expected(a)
    for o, r in zip(out, ref):
        assert isinstance(o, FakeTensor)
        assert (o.shape, o.dtype, o.stride(), o.device) == (r.shape, r.dtype, r.stride(), r.device)


_SETTINGS = dict(derandomize=True, database=None, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@settings(max_examples=max(400, settings.default.max_examples), **_SETTINGS)
@given(c=cases())
def test_fuzz_error_or_reference(c: Case):
    check(c)


@settings(max_examples=max(200, settings.default.max_examples), **_SETTINGS)
@given(c=cases())
def test_fuzz_fake_impls_check_the_same(c: Case):
    check_fake(c)


def one_defect_cases(layouts=("bshd", "bhsd")) -> list[Case]:
    """Every defect on every entry it applies to, in fixed valid calls (GQA, partial rotary), with
    and without weights."""
    return [Case(entry=entry, dtype=torch.bfloat16, layout=layout, head_dim=32, rotary_dim=16,
                 interleaved=False, norm="rms", weight=weight, weight_offset=0.0, cos_dtype=torch.bfloat16,
                 drop_heads_axis=layout == "bshd", batch=2, seq=0 if name == "empty" else 3, q_heads=4,
                 k_heads=2, bad=(name,), seed=1)
            for name, b in BADS.items() for entry in sorted(b.entries) for layout in layouts
            for weight in ((True,) if b.needs == "weight" else (True, False))]


def test_every_defect_on_every_entry():
    for c in one_defect_cases():
        check(c)
        check_fake(c)


# ---- the Triton kernel, interpreted ----------------------------------------------------------------


@pytest.fixture(scope="module")
def interp():
    """An interpreted copy of the kernel module (tests/kernels/test_triton_interpret.py's loader:
    TRITON_INTERPRET is set only while the copy is decorated, and triton.language is restored)."""
    pytest.importorskip("triton")
    import sys

    import triton.language as tl

    from qkfuse.kernels import triton_norm_rope as tk
    from tests.kernels import test_triton_interpret as ti

    with ti._interpreted_triton_language():
        name, mod = ti._load_interpreted_copy()
        try:
            yield mod
        finally:
            sys.modules.pop(name, None)
    if os.environ.get("TRITON_INTERPRET") != "1":  # later tests in this process compile real kernels
        assert type(tk.qk_norm_rope_kernel).__name__ == "JITFunction" and type(tl.zeros).__name__ == "JITFunction"


# ~20 ms a kernel launch in the interpreter at these sizes; about half the cases launch it.
@settings(max_examples=100, **_SETTINGS)
@given(c=cases(entries=FN, head_dims=(16, 24), max_seq=3))
def test_fuzz_interpreted_kernel(interp, c: Case):
    """The functional API's CUDA path (checks, then the kernel or the reference) on CPU tensors, with
    the kernel run by Triton's interpreter."""
    with _interpreted_cuda_path(interp):
        check(c, exact=False, interpreted=True)


def _interpreted_cuda_path(interp):
    import qkfuse.kernels

    # the direct path plans its launches with qkfuse.kernels.triton_norm_rope: the interpreted copy,
    # and a memo of its own (plans made with the compiled module would launch it)
    patches = (mock.patch.object(functional, "_direct_kernel", lambda q: True),
               mock.patch.object(functional, "run_kernel", functools.partial(run_kernel, kernels=interp)),
               mock.patch.object(qkfuse.kernels, "triton_norm_rope", interp),
               mock.patch.object(functional, "_CHECKED", {}))
    stack = contextlib.ExitStack()
    for p in patches:
        stack.enter_context(p)
    return stack


def test_interpreted_tables_wider_than_rope_dtype_are_exact(interp):
    """float32 cos/sin with RoPE in float16: the recipe rounds cos/sin to float16 first, which the
    kernel does not, so these calls take the reference (bit-equal; the kernel differed in ~25% of
    the elements by one unit)."""
    c = Case(entry="fn_qk", dtype=torch.float16, layout="thd", head_dim=32, rotary_dim=32, interleaved=False,
             norm="rms", weight=False, weight_offset=0.0, cos_dtype=torch.float32, drop_heads_axis=True,
             batch=1, seq=8, q_heads=4, k_heads=2, bad=("rope_narrower_than_cos",), seed=5)
    with _interpreted_cuda_path(interp):
        check(c, exact=True)


@pytest.mark.parametrize("entry", sorted(FN))
@pytest.mark.parametrize("layout", ["thd", "bshd", "bhsd"])
def test_interpreted_kernel_serves_valid_calls(interp, entry, layout):
    """Valid calls on the CUDA path launch the kernel (not the reference fallback), once."""
    c = Case(entry=entry, dtype=torch.bfloat16, layout=layout, head_dim=24, rotary_dim=12, interleaved=False,
             norm="rms", weight=True, weight_offset=0.0, cos_dtype=torch.float32, drop_heads_axis=layout != "bhsd",
             batch=2, seq=3, q_heads=2, k_heads=1, bad=(), seed=3)
    kernel, grids = interp.qk_norm_rope_kernel, []

    class Counting:  # every launch, planned (the direct path's plan) or not, indexes the kernel by its grid
        def __getitem__(self, grid):
            grids.append(grid)
            return kernel[grid]

    with _interpreted_cuda_path(interp), mock.patch.object(interp, "qk_norm_rope_kernel", Counting()):
        check(c, exact=False, interpreted=True)
    assert len(grids) == 1, grids
