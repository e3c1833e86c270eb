"""Contracts of the ``qkfuse::norm_rope`` / ``qkfuse::qk_norm_rope`` custom ops (CPU)."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import qkfuse  # noqa: F401  (registers the ops)
from qkfuse.kernels.reference import norm_rope_reference
from qkfuse.ops.recipe import Recipe

norm_rope = torch.ops.qkfuse.norm_rope.default
qk_norm_rope = torch.ops.qkfuse.qk_norm_rope.default

BF16, F32 = torch.bfloat16, torch.float32


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(g, *shape, dtype=F32):
    return torch.randn(*shape, generator=g).to(dtype)


def _cos_sin(g, shape, dtype):
    theta = torch.rand(shape, generator=g) * 6.283
    return theta.cos().to(dtype), theta.sin().to(dtype)


# Layouts the pass hands the op: (q, k) in the RoPE layout, and a cos shape that broadcasts to them.
def _layout(g, name, dtype, hq=4, hk=2, b=2, s=3, d=32):
    if name == "dense":  # [B, H, S, D] contiguous
        return _randn(g, b, hq, s, d, dtype=dtype), _randn(g, b, hk, s, d, dtype=dtype), (s, None)
    if name == "transposed":  # HF: proj(x).view(B, S, H, D).transpose(1, 2)
        return (_randn(g, b, s, hq, d, dtype=dtype).transpose(1, 2),
                _randn(g, b, s, hk, d, dtype=dtype).transpose(1, 2), (b, 1, s, None))
    if name == "qkv_slices":  # strided views of one fused projection [B, S, (Hq + 2 Hk) * D]
        qkv = _randn(g, b, s, (hq + 2 * hk) * d, dtype=dtype)
        return (qkv[..., : hq * d].view(b, s, hq, d), qkv[..., hq * d: (hq + hk) * d].view(b, s, hk, d),
                (s, 1, None))
    if name == "empty":  # zero tokens
        return _randn(g, b, hq, 0, d, dtype=dtype), _randn(g, b, hk, 0, d, dtype=dtype), (0, None)
    raise ValueError(name)


def _cos_shape(template, rd):
    return tuple(rd if v is None else v for v in template)


# ---- opcheck -------------------------------------------------------------------------------------

# (name, dtype, layout, recipe fields, weight, eps as a 0-d tensor, cos dtype)
OPCHECK_CASES = [
    ("fp32_llama_full", F32, "dense", dict(norm="rms", cast_before_weight=True, rotary_dim=32), True, False, F32),
    ("bf16_qwen3_transposed", BF16, "transposed",
     dict(norm="rms", cast_before_weight=True, norm_dtype=BF16, rope_dtype=BF16, out_dtype=BF16, rotary_dim=32),
     True, False, BF16),
    ("bf16_noweight_partial_interleaved_f32rope", BF16, "transposed",
     dict(norm="rms", norm_dtype=BF16, rope_dtype=F32, out_dtype=BF16, rotary_dim=16, interleaved=True),
     False, False, F32),
    ("bf16_gemma_qkv_eps_tensor", BF16, "qkv_slices",
     dict(norm="rms", weight_offset=1.0, norm_dtype=BF16, rope_dtype=BF16, out_dtype=BF16, rotary_dim=16),
     True, True, BF16),
    ("fp32_rope_only", F32, "dense", dict(norm="none", rotary_dim=32), False, False, F32),
    ("bf16_norm_only_f32_out", BF16, "qkv_slices", dict(norm="rms", norm_dtype=F32, out_dtype=F32), True, True,
     BF16),
]


def _op_inputs(case, seed=0):
    name, dtype, layout, fields, with_weight, eps_tensor, cos_dtype = case
    g = _gen(seed)
    recipe = Recipe(**fields)
    q, k, cos_t = _layout(g, layout, dtype)
    d = q.shape[-1]
    qw = _randn(g, d, dtype=dtype) if with_weight else None
    kw = _randn(g, d, dtype=dtype) if with_weight else None
    cos = sin = None
    if recipe.rotary_dim:
        cos, sin = _cos_sin(g, _cos_shape(cos_t, recipe.rotary_dim), cos_dtype)
    q_eps_t = torch.tensor(1e-6) if eps_tensor else None
    k_eps_t = torch.tensor(1e-5) if eps_tensor else None
    return recipe, q, k, qw, kw, cos, sin, q_eps_t, k_eps_t


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=[c[0] for c in OPCHECK_CASES])
def test_opcheck_norm_rope(case):
    recipe, q, _, qw, _, cos, sin, q_eps_t, _ = _op_inputs(case)
    # All of opcheck's default test_utils apply (schema, autograd registration, fake tensor,
    # AOT dispatch with dynamic shapes): str/dtype/bool/float args are all schema-legal.
    result = torch.library.opcheck(norm_rope, (q, qw, cos, sin, 1e-6, q_eps_t, *recipe.op_args()))
    assert result and all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=[c[0] for c in OPCHECK_CASES])
def test_opcheck_qk_norm_rope(case):
    recipe, q, k, qw, kw, cos, sin, q_eps_t, k_eps_t = _op_inputs(case)
    result = torch.library.opcheck(qk_norm_rope, (q, k, qw, kw, cos, sin, 1e-6, 1e-5, q_eps_t, k_eps_t,
                                                  *recipe.op_args()))
    assert result and all(v == "SUCCESS" for v in result.values()), result


# ---- values and eps ------------------------------------------------------------------------------


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=[c[0] for c in OPCHECK_CASES])
def test_op_values_are_the_reference(case):
    """The CPU kernel is the reference, per tensor, with each tensor's own weight and eps."""
    recipe, q, k, qw, kw, cos, sin, q_eps_t, k_eps_t = _op_inputs(case, seed=1)
    q_eps = q_eps_t if q_eps_t is not None else 1e-6
    k_eps = k_eps_t if k_eps_t is not None else 1e-5
    qo, ko = qk_norm_rope(q, k, qw, kw, cos, sin, 1e-6, 1e-5, q_eps_t, k_eps_t, *recipe.op_args())
    assert torch.equal(qo, norm_rope_reference(q, qw, cos, sin, q_eps, recipe))
    assert torch.equal(ko, norm_rope_reference(k, kw, cos, sin, k_eps, recipe))
    o = norm_rope(k, kw, cos, sin, 1e-5, k_eps_t, *recipe.op_args())
    assert torch.equal(o, ko)


def test_eps_tensor_takes_precedence_over_float():
    """With eps_tensor given, the float eps is not used (the pass passes a placeholder)."""
    g = _gen(2)
    x = _randn(g, 2, 3, 4, 32)
    recipe = Recipe(norm="rms")
    # a large eps is visible in the result (inputs have mean square ~1)
    by_tensor = norm_rope(x, None, None, None, 1e-6, torch.tensor(0.5), *recipe.op_args())
    by_float = norm_rope(x, None, None, None, 0.5, None, *recipe.op_args())
    small = norm_rope(x, None, None, None, 1e-6, None, *recipe.op_args())
    assert torch.equal(by_tensor, by_float)
    assert not torch.allclose(by_tensor, small)
    qo, ko = qk_norm_rope(x, x, None, None, None, None, 1e-6, 1e-6, torch.tensor(0.5), None, *recipe.op_args())
    assert torch.equal(qo, by_float) and torch.equal(ko, small)


# ---- fake impl vs real ---------------------------------------------------------------------------

FAKE_LAYOUTS = ["dense", "transposed", "qkv_slices", "empty"]


def _permuted(g, dtype):
    """A layout no model has: [S, B, H, D] storage viewed as [B, H, S, D]."""
    return (_randn(g, 3, 2, 4, 32, dtype=dtype).permute(1, 2, 0, 3),
            _randn(g, 3, 2, 2, 32, dtype=dtype).permute(1, 2, 0, 3), (3, None))


@pytest.mark.parametrize("out_dtype", [BF16, F32])
@pytest.mark.parametrize("layout", FAKE_LAYOUTS + ["permuted"])
def test_fake_impl_matches_real_metadata(layout, out_dtype):
    g = _gen(3)
    q, k, cos_t = _permuted(g, BF16) if layout == "permuted" else _layout(g, layout, BF16)
    d = q.shape[-1]
    w = _randn(g, d, dtype=BF16)
    cos, sin = _cos_sin(g, _cos_shape(cos_t, 16), BF16)
    recipe = Recipe(norm="rms", cast_before_weight=True, norm_dtype=BF16, rope_dtype=BF16, out_dtype=out_dtype,
                    rotary_dim=16)
    args = (q, k, w, w, cos, sin, 1e-6, 1e-6, None, torch.tensor(1e-6), *recipe.op_args())
    real = qk_norm_rope(*args)
    real_single = norm_rope(q, w, cos, sin, 1e-6, None, *recipe.op_args())

    mode = FakeTensorMode()
    fake_args = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
    with mode:
        fake = qk_norm_rope(*fake_args)
        fake_single = norm_rope(fake_args[0], fake_args[2], fake_args[4], fake_args[5], 1e-6, None,
                                *recipe.op_args())
    for r, f in [*zip(real, fake), (real_single, fake_single)]:
        assert type(f).__name__ == "FakeTensor"
        assert f.shape == r.shape
        assert f.stride() == r.stride()
        assert f.dtype == r.dtype == out_dtype
        assert f.device == r.device


# ---- input validation ----------------------------------------------------------------------------


def _valid(**over):
    """Valid single-tensor arguments, as a dict so tests can swap one out."""
    g = _gen(4)
    x = _randn(g, 2, 4, 3, 32)
    cos, sin = _cos_sin(g, (3, 16), F32)
    a = dict(x=x, weight=_randn(g, 32), cos=cos, sin=sin, recipe=Recipe(norm="rms", rotary_dim=16))
    a.update(over)
    return a


def _call(a):
    return norm_rope(a["x"], a["weight"], a["cos"], a["sin"], 1e-6, None, *a["recipe"].op_args())


def test_valid_baseline_runs():
    assert _call(_valid()).shape == (2, 4, 3, 32)


@pytest.mark.parametrize("what, over, match", [
    ("weight of wrong shape", dict(weight=torch.randn(16)), r"weight must have shape \[32\].*\(16,\)"),
    ("2-d weight", dict(weight=torch.randn(1, 32)), r"weight must have shape \[32\]"),
    ("odd rotary_dim", dict(recipe=Recipe(norm="rms", rotary_dim=15)), r"rotary_dim must be even.*got 15"),
    ("rotary_dim > head_dim", dict(recipe=Recipe(norm="rms", rotary_dim=34), cos=torch.randn(3, 34),
                                   sin=torch.randn(3, 34)), r"rotary_dim must be even and in \[0, 32\], got 34"),
    ("cos last dim != rotary_dim", dict(cos=torch.randn(3, 32), sin=torch.randn(3, 32)),
     r"cos last dim must equal rotary_dim=16"),
    ("sin last dim != rotary_dim", dict(sin=torch.randn(3, 8)), r"sin last dim must equal rotary_dim=16"),
    ("cos not broadcastable", dict(cos=torch.randn(5, 16), sin=torch.randn(5, 16)), r"cos .*does not broadcast"),
    ("cos larger than x", dict(cos=torch.randn(7, 2, 4, 3, 16), sin=torch.randn(7, 2, 4, 3, 16)),
     r"cos .*larger than"),
    ("missing sin", dict(sin=None), r"needs cos and sin"),
    ("nothing to do", dict(weight=None, cos=None, sin=None, recipe=Recipe(norm="none")), r"nothing to do"),
    ("weight with norm='none'", dict(recipe=Recipe(norm="none", rotary_dim=16)), r"weight was given but norm='none'"),
    ("unknown norm", dict(recipe=Recipe(norm="group", rotary_dim=16)), r"norm must be one of"),
    ("positive weight_heads_dim", dict(recipe=Recipe(norm="layer", rotary_dim=16, weight_heads_dim=1)),
     r"weight_heads_dim must be 0"),
    ("weight_heads_dim and across heads", dict(recipe=Recipe(norm="layer", rotary_dim=16, weight_heads_dim=-2,
                                                             norm_heads_dim=-3)), r"are both set"),
    ("[D] weight with weight_heads_dim", dict(recipe=Recipe(norm="layer", rotary_dim=16, weight_heads_dim=-3)),
     r"weight must have shape \[4, 32\]"),
    ("L2 layer norm", dict(recipe=Recipe(norm="layer", rotary_dim=16, norm_sum=True)), r"norm_sum"),
    ("1-d input", dict(x=torch.randn(32), weight=None, cos=None, sin=None, recipe=Recipe(norm="rms")),
     r"at least 2 dims"),
])
def test_bad_input_raises_clear_valueerror(what, over, match):
    with pytest.raises(ValueError, match=match):
        _call(_valid(**over))


def test_bad_k_input_names_k():
    a = _valid()
    x, r = a["x"], a["recipe"]
    with pytest.raises(ValueError, match=r"k weight must have shape \[32\]"):
        qk_norm_rope(x, x, a["weight"], torch.randn(8), a["cos"], a["sin"], 1e-6, 1e-6, None, None, *r.op_args())
    with pytest.raises(ValueError, match=r"does not broadcast to k"):
        # cos fits q's 3 positions; k has 5
        qk_norm_rope(x, torch.randn(2, 1, 5, 32), None, None, a["cos"], a["sin"], 1e-6, 1e-6, None, None,
                     *r.op_args())


# ---- profiler ------------------------------------------------------------------------------------


def test_ops_are_named_in_profiler_trace():
    a = _valid()
    r = a["recipe"]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        torch.ops.qkfuse.qk_norm_rope(a["x"], a["x"], a["weight"], a["weight"], a["cos"], a["sin"], 1e-6, 1e-6,
                                      None, None, *r.op_args())
        torch.ops.qkfuse.norm_rope(a["x"], a["weight"], a["cos"], a["sin"], 1e-6, None, *r.op_args())
    names = {e.name for e in prof.events()}
    assert any("qkfuse::qk_norm_rope" in n for n in names), sorted(names)[:20]
    assert any("qkfuse::norm_rope" in n for n in names), sorted(names)[:20]


# ---- the vLLM-style cached variant ---------------------------------------------------------------


def _cached_inputs(seed=0, dtype=torch.bfloat16, rd=16, interleaved=False):
    g = torch.Generator().manual_seed(seed)
    T, D = 5, 32
    q, k = torch.randn(T, 4, D, generator=g).to(dtype), torch.randn(T, 2, D, generator=g).to(dtype)
    qw, kw = torch.randn(D, generator=g).to(dtype), torch.randn(D, generator=g).to(dtype)
    angle = torch.rand(17, rd // 2, generator=g) * 6.3
    cache = torch.cat((angle.cos(), angle.sin()), dim=-1)
    positions = torch.randint(0, 17, (T, 1), generator=g)
    recipe = Recipe(norm="rms", cast_before_weight=True, norm_dtype=dtype, rope_dtype=torch.float32,
                    out_dtype=dtype, rotary_dim=rd, interleaved=interleaved)
    return q, k, qw, kw, cache, positions, recipe


@pytest.mark.parametrize("interleaved", [False, True])
def test_qk_norm_rope_cached_contract(interleaved):
    from qkfuse.kernels.reference import cos_sin_from_cache, norm_rope_reference
    from qkfuse.ops.norm_rope import qk_norm_rope_cached

    q, k, qw, kw, cache, positions, recipe = _cached_inputs(interleaved=interleaved)
    args = (q, k, qw, kw, cache, positions, 1e-6, 1e-5, *recipe.op_args())
    result = torch.library.opcheck(qk_norm_rope_cached, args)
    assert result and all(v == "SUCCESS" for v in result.values()), result
    qo, ko = torch.ops.qkfuse.qk_norm_rope_cached(*args)
    cos, sin = cos_sin_from_cache(cache, positions, interleaved)
    assert torch.equal(qo, norm_rope_reference(q, qw, cos, sin, 1e-6, recipe))
    assert torch.equal(ko, norm_rope_reference(k, kw, cos, sin, 1e-5, recipe))
    if not interleaved:  # neox: cache row i of frequency j serves elements j and j + rd/2
        assert torch.equal(cos[..., :8], cos[..., 8:]) and torch.equal(cos[0, 0, :8], cache[positions[0, 0], :8])


def test_qk_norm_rope_cached_rejects_bad_inputs():
    q, k, qw, kw, cache, positions, recipe = _cached_inputs()
    with pytest.raises(ValueError, match="cos_sin_cache must be"):
        torch.ops.qkfuse.qk_norm_rope_cached(q, k, qw, kw, cache[:, :8], positions, 1e-6, 1e-6, *recipe.op_args())
    with pytest.raises(TypeError, match=r"positions dtype must be one of \['int32', 'int64'\]"):
        torch.ops.qkfuse.qk_norm_rope_cached(q, k, qw, kw, cache, positions.float(), 1e-6, 1e-6, *recipe.op_args())


@pytest.mark.parametrize("bad", [-1, 17, 1000])
def test_qk_norm_rope_cached_positions_out_of_range(bad):
    """Eager: a clear error (never a wrapped-around or out-of-bounds read). The fake impl sees no
    data and checks metadata only, so tracing with the same inputs succeeds."""
    q, k, qw, kw, cache, positions, recipe = _cached_inputs()
    positions[2, 0] = bad
    args = (q, k, qw, kw, cache, positions, 1e-6, 1e-6, *recipe.op_args())
    lo, hi = positions.min().item(), positions.max().item()
    with pytest.raises(ValueError, match=rf"positions must be in \[0, 17\).*got values in \[{lo}, {hi}\]"):
        torch.ops.qkfuse.qk_norm_rope_cached(*args)
    mode = FakeTensorMode()
    fake_args = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
    with mode:
        qo, ko = torch.ops.qkfuse.qk_norm_rope_cached(*fake_args)
    assert qo.shape == q.shape and ko.shape == k.shape


@pytest.mark.parametrize("op", ["norm_rope", "qk_norm_rope", "qk_norm_rope_cached"])
def test_op_schemas_end_with_the_recipe_fields(op):
    """The ops' recipe arguments are generated from the Recipe dataclass (ops/recipe.py::recipe_schema):
    its fields, in order, required up to `interleaved`, the later ones with their defaults; after
    them only the norms' optional biases (Tensor?, default None)."""
    import dataclasses

    from qkfuse.ops.recipe import Recipe

    fields = dataclasses.fields(Recipe)
    biases = ["bias"] if op == "norm_rope" else ["q_bias", "k_bias"]
    schema_args = getattr(torch.ops.qkfuse, op).default._schema.arguments
    args, tail = schema_args[-len(fields) - len(biases):-len(biases)], schema_args[-len(biases):]
    assert [a.name for a in args] == [f.name for f in fields]
    assert [a.has_default_value() for a in args] == [i >= 8 for i in range(len(fields))]
    assert [a.name for a in tail] == biases and all(a.has_default_value() and a.default_value is None for a in tail)
    # a call that leaves out the defaulted fields is the per-head recipe
    x = torch.randn(2, 4, 3, 8)  # [B, H, S, D]
    cos, sin = torch.randn(3, 8), torch.randn(3, 8)
    legacy = Recipe(norm="rms", rotary_dim=8).op_args()[:8]
    if op == "norm_rope":
        out = torch.ops.qkfuse.norm_rope(x, None, cos, sin, 1e-6, None, *legacy)
        full = torch.ops.qkfuse.norm_rope(x, None, cos, sin, 1e-6, None, *Recipe(norm="rms", rotary_dim=8).op_args())
        assert torch.equal(out, full)


# ---- LayerNorm: bias (an optional tensor after the recipe's fields) and a weight row per head -----


def test_layer_norm_op_with_bias_and_per_head_weight():
    """norm="layer" with a bias and an [H, D] weight equals F.layer_norm then the per-head affine; the
    bias goes after the recipe's fields (positional calls written before it keep working), and the
    ops pass torch.library.opcheck with it."""
    g = _gen(7)
    x = _randn(g, 2, 4, 3, 32) + 2.0  # [B, H, S, D], the heads at dim -3
    w, b = _randn(g, 4, 32), _randn(g, 4, 32)
    recipe = Recipe(norm="layer", weight_heads_dim=-3)
    out = norm_rope(x, w, None, None, 1e-5, None, *recipe.op_args(), b)
    expect = torch.nn.functional.layer_norm(x, (32,), None, None, 1e-5) * w[:, None] + b[:, None]
    assert float((out - expect).abs().max() / expect.abs().max()) < 1e-6
    qo, ko = qk_norm_rope(x, x[:, :2], w, w[:2], None, None, 1e-5, 1e-5, None, None, *recipe.op_args(), b, b[:2])
    assert torch.equal(qo, out) and torch.equal(ko, out[:, :2])
    for args in ((x, w, None, None, 1e-5, None, *recipe.op_args(), b),
                 (x, w, None, None, 1e-5, None, *recipe.op_args())):
        result = torch.library.opcheck(norm_rope, args)
        assert all(v == "SUCCESS" for v in result.values()), result
    with pytest.raises(ValueError, match=r"x bias must have shape \[4, 32\]"):
        norm_rope(x, w, None, None, 1e-5, None, *recipe.op_args(), b[0])
    with pytest.raises(ValueError, match=r"bias was given but norm='none'"):
        norm_rope(x, None, None, None, 1e-5, None, *Recipe(norm="none", rotary_dim=0).op_args(), b)
