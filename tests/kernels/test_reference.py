"""The plain-torch reference implements the recipe: it equals the HF modules' own code.

Each norm body and RoPE variant below is written as HF writes it (the modeling files' forward
bodies, literally), and the recipe that the pattern matcher derives for that graph is given next
to it. In bf16/fp16 the reference and the HF code do the same ops with the same rounding points,
so they must agree bit for bit (torch.equal), not merely closely.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qkfuse.kernels.reference import norm_rope_reference
from qkfuse.ops.recipe import Recipe, dense_strides
from tests.conftest import UNIT_ROUNDOFF

# ---- HF code, literally --------------------------------------------------------------------------


def llama_rmsnorm(hidden_states, weight, eps):
    """LlamaRMSNorm / Qwen3RMSNorm.forward: normalise in float32, cast, then multiply."""
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + eps)
    return weight * hidden_states.to(input_dtype)


def olmo2_rmsnorm(hidden_states, weight, eps):
    """Olmo2RMSNorm.forward: multiply in float32, then cast."""
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + eps)
    return (weight * hidden_states).to(input_dtype)


def gemma_rmsnorm(x, weight, eps):
    """GemmaRMSNorm.forward: x * (1 + w) in float32, then type_as(x)."""
    def _norm(x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    output = _norm(x.float())
    output = output * (1.0 + weight.float())
    return output.type_as(x)


def rmsnorm_no_weight(x, weight, eps):
    """An RMSNorm without elementwise affine (e.g. a parameter-free QK norm)."""
    assert weight is None
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rotate_half(x):
    """transformers' rotate_half (neox)."""
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def rotate_every_two(x):
    """GPT-J / GLM style interleaved rotation."""
    x1 = x[..., ::2]
    x2 = x[..., 1::2]
    x = torch.stack((-x2, x1), dim=-1)
    return x.flatten(-2)


def apply_rope(x, cos, sin, rotary_dim, interleaved, compute_dtype):
    """apply_rotary_pos_emb, with the partial-rotary split (Phi, GLM, Persimmon) and the float32
    variant (Qwen2-VL style: x.float() * cos, then cast back) when compute_dtype is float32."""
    orig_dtype = x.dtype
    rot = rotate_every_two if interleaved else rotate_half
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    if compute_dtype == torch.float32:
        x_rot, cos, sin = x_rot.float(), cos.float(), sin.float()
    x_embed = (x_rot * cos) + (rot(x_rot) * sin)
    if compute_dtype == torch.float32:
        x_embed = x_embed.to(orig_dtype)
    if rotary_dim < x.shape[-1]:
        x_embed = torch.cat([x_embed, x_pass], dim=-1)
    return x_embed


# (HF norm body, recipe fields the matcher reads from it)
NORMS = {
    "llama_qwen3": (llama_rmsnorm, dict(norm="rms", cast_before_weight=True)),
    "olmo2": (olmo2_rmsnorm, dict(norm="rms")),
    "gemma": (gemma_rmsnorm, dict(norm="rms", weight_offset=1.0)),
    "no_weight": (rmsnorm_no_weight, dict(norm="rms")),
    "none": (None, dict(norm="none")),
}
ROPES = {  # name -> (rotary_dim as a fraction of head_dim, interleaved)
    "neox": (1, False),
    "interleaved": (1, True),
    "neox_partial": (2, False),
    "interleaved_partial": (2, True),
    "none": (None, False),
}


def hf_cos_sin(positions, rotary_dim, interleaved, dtype, base=10000.0):
    """LlamaRotaryEmbedding.forward (cat(freqs, freqs)); interleaved repeats each frequency."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))
    freqs = positions.float()[..., None] * inv_freq
    emb = freqs.repeat_interleave(2, dim=-1) if interleaved else torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("norm_name, rope_name", [
    (n, r) for n in NORMS for r in ROPES if (n, r) != ("none", "none")  # the ops refuse that one
])
@settings(max_examples=max(5, settings.default.max_examples // 4))
@given(seed=st.integers(0, 2**31 - 1), head_dim=st.sampled_from([16, 64, 80, 128]),
       batch=st.integers(1, 2), seq=st.integers(1, 5), heads=st.integers(1, 4),
       float32_rope=st.booleans(), scale=st.sampled_from([0.1, 1.0, 30.0]))
def test_reference_equals_hf_code(norm_name, rope_name, dtype, seed, head_dim, batch, seq, heads, float32_rope,
                                  scale):
    norm_fn, norm_fields = NORMS[norm_name]
    frac, interleaved = ROPES[rope_name]
    rd = 0 if frac is None else head_dim // frac
    g = torch.Generator().manual_seed(seed)
    eps = 1e-6

    # Qwen3Attention: q_norm(q_proj(x).view(B, S, H, D)).transpose(1, 2), then RoPE with cos
    # [B, S, rd] unsqueezed at dim 1. The fused op sees the transposed view.
    x = (torch.randn(batch, seq, heads, head_dim, generator=g) * scale).to(dtype)
    weight = None
    if norm_name in ("llama_qwen3", "olmo2"):
        weight = (1.0 + 0.3 * torch.randn(head_dim, generator=g)).to(dtype)
    elif norm_name == "gemma":
        weight = (0.3 * torch.randn(head_dim, generator=g)).to(dtype)  # the model uses 1 + w
    positions = torch.randint(0, 4096, (batch, 1), generator=g) + torch.arange(seq)
    rope_dtype = torch.float32 if float32_rope else dtype

    y = x if norm_fn is None else norm_fn(x, weight, eps)
    y = y.transpose(1, 2)
    cos = sin = None
    if rd:
        cos, sin = hf_cos_sin(positions, rd, interleaved, dtype)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        expected = apply_rope(y, cos, sin, rd, interleaved, rope_dtype)
    else:
        expected = y
    assert expected.dtype == dtype

    recipe = Recipe(**norm_fields, norm_dtype=dtype, rope_dtype=rope_dtype if rd else dtype, out_dtype=dtype,
                    rotary_dim=rd, interleaved=interleaved)
    xt = x.transpose(1, 2)
    out = norm_rope_reference(xt, weight, cos, sin, eps, recipe)
    assert out.dtype == dtype and out.shape == expected.shape
    assert out.stride() == tuple(dense_strides(xt))
    assert torch.equal(out, expected), (out.float() - expected.float()).abs().max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reference_float32_norm_output(dtype):
    """OLMo2-like norm kept in float32 (no final cast): norm_dtype float32, and a tensor eps."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 4, 64, generator=g).to(dtype)
    w = torch.randn(64, generator=g).to(dtype)
    eps = torch.tensor(1e-5)
    xf = x.to(torch.float32)
    expected = w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps))
    recipe = Recipe(norm="rms", norm_dtype=torch.float32, rope_dtype=torch.float32, out_dtype=torch.float32)
    assert torch.equal(norm_rope_reference(x, w, None, None, eps, recipe), expected)


# ---- float64 sanity: the recipe's math, written differently ------------------------------------

U64 = 2.0**-53  # float64 unit roundoff (UNIT_ROUNDOFF lists the dtypes the kernels round to)


def _rope_complex(x, theta, rotary_dim, interleaved):
    """RoPE as a complex multiplication of the rotated pairs by exp(i * theta)."""
    xr, xp = x[..., :rotary_dim], x[..., rotary_dim:]
    if interleaved:
        pairs = torch.complex(xr[..., 0::2], xr[..., 1::2])
    else:
        pairs = torch.complex(xr[..., : rotary_dim // 2], xr[..., rotary_dim // 2:])
    z = pairs * torch.polar(torch.ones_like(theta), theta)
    if interleaved:
        rot = torch.stack((z.real, z.imag), dim=-1).flatten(-2)
    else:
        rot = torch.cat((z.real, z.imag), dim=-1)
    return torch.cat((rot, xp), dim=-1)


@pytest.mark.parametrize("half_table", [False, True])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("norm", ["rms", "none"])
@pytest.mark.parametrize("rotary_frac", [1, 2])
def test_reference_float64_matches_formula(norm, interleaved, rotary_frac, half_table):
    g = torch.Generator().manual_seed(7)
    d = 64
    rd = d // rotary_frac
    x = torch.randn(2, 4, 5, d, generator=g, dtype=torch.float64)
    w = 1.0 + 0.3 * torch.randn(d, generator=g, dtype=torch.float64)
    theta = torch.rand(5, rd // 2, generator=g, dtype=torch.float64) * 2 * math.pi  # per position, per pair
    emb = theta.repeat_interleave(2, -1) if interleaved else torch.cat((theta, theta), -1)
    cos, sin = emb.cos(), emb.sin()
    if half_table:  # one entry per pair, as strided views (Wan's freqs[..., 0::2] / [..., 1::2])
        cos, sin = torch.stack((theta.cos(), 2 + theta), -1).flatten(-2)[..., 0::2], theta.sin()
    f64 = torch.float64
    recipe = Recipe(norm=norm, norm_dtype=f64, rope_dtype=f64, out_dtype=f64, rotary_dim=rd,
                    interleaved=interleaved, half_table=half_table)
    out = norm_rope_reference(x, w if norm == "rms" else None, cos, sin, 1e-6, recipe)

    y = x
    if norm == "rms":
        y = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * w
    expected = _rope_complex(y, theta, rd, interleaved)
    assert out.dtype == f64
    err = (out - expected).abs().max().item()
    scale = y.abs().max().item()
    if norm == "rms":
        # By the recipe (and HF) the norm is computed in float32 even for float64 inputs, and the
        # weight is applied as float32: x, the sum of D squares (within (D - 1) u32), rsqrt and the
        # two products round to float32; RoPE's two products double the relative error.
        u32 = UNIT_ROUNDOFF[torch.float32]
        tol = 2 * ((d - 1) / 2 + 6) * u32 * scale
    else:
        # float64 throughout: each side rounds the two products and their sum (<= 3 u64 each of
        # |a c| + |b s| <= 2 * scale)
        tol = 2 * 3 * U64 * 2 * scale
    assert err <= tol, (err, tol)


def test_reference_does_not_modify_inputs_and_is_dense():
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(2, 3, 6 * 32, generator=g).to(torch.bfloat16)
    x = qkv[..., : 4 * 32].view(2, 3, 4, 32)  # a strided slice of a fused projection
    w = torch.randn(32, generator=g).to(torch.bfloat16)
    cos, sin = hf_cos_sin(torch.arange(3), 16, False, torch.bfloat16)
    cos, sin = cos[:, None, :], sin[:, None, :]
    before = qkv.clone()
    recipe = dataclasses.replace(Recipe(norm="rms", cast_before_weight=True), norm_dtype=torch.bfloat16,
                                 rope_dtype=torch.bfloat16, out_dtype=torch.bfloat16, rotary_dim=16)
    out = norm_rope_reference(x, w, cos, sin, 1e-6, recipe)
    assert torch.equal(qkv, before)
    assert out.is_contiguous()  # dense in x's stride order, which for this view is row-major
    expected = apply_rope(llama_rmsnorm(x, w, 1e-6), cos, sin, 16, False, torch.bfloat16)
    assert torch.equal(out, expected)


def wan_apply_rotary_emb(hidden_states, freqs_cos, freqs_sin):
    """diffusers WanAttnProcessor's apply_rotary_emb (also SkyReels-V2, Wan-Animate), literally."""
    x1, x2 = hidden_states.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(hidden_states)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(hidden_states)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_reference_half_table_equals_wan_code(dtype):
    """Wan's q path (torch.nn.RMSNorm over all heads, unflatten, its RoPE with float32 freqs
    [1, S, 1, D] of independent angles) and the half-table recipe the pass derives for it, given the
    step-2 views of the freqs: bit for bit."""
    g = torch.Generator().manual_seed(11)
    B, S, H, D = 2, 5, 3, 32
    x = torch.randn(B, S, H * D, generator=g).to(dtype)
    w = (1 + 0.3 * torch.randn(H * D, generator=g)).to(dtype)
    angle = torch.rand(1, S, 1, D, generator=g) * 2 * math.pi
    freqs_cos, freqs_sin = angle.cos(), angle.sin()
    expected = wan_apply_rotary_emb(
        torch.nn.functional.rms_norm(x, (H * D,), w, 1e-6).unflatten(2, (H, -1)), freqs_cos, freqs_sin)
    recipe = Recipe(norm="rms", norm_dtype=dtype, rope_dtype=torch.float32, out_dtype=dtype, rotary_dim=D,
                    interleaved=True, norm_heads_dim=-2, half_table=True)
    out = norm_rope_reference(x.unflatten(2, (H, -1)), w, freqs_cos[..., 0::2], freqs_sin[..., 1::2], 1e-6,
                              recipe)
    assert torch.equal(out, expected)


# ---- DeepSeek's de-interleaved RoPE (Recipe.deinterleave_input) ----------------------------------


def deepseek_v3_rope_interleave(q, cos, sin):
    """transformers 5's apply_rotary_pos_emb_interleave (modeling_deepseek_v3), literally, for one
    tensor: the even/odd slices rotated with the first halves of HF's cat(freqs, freqs) tables."""
    cos = cos[..., : cos.shape[-1] // 2].unsqueeze(1)
    sin = sin[..., : sin.shape[-1] // 2].unsqueeze(1)
    q1, q2 = q[..., 0::2], q[..., 1::2]
    return torch.cat([q1 * cos - q2 * sin, q2 * cos + q1 * sin], dim=-1)


def deepseek_v2_rope_interleave(q, cos, sin):
    """Its earlier spelling (transformers 4's DeepSeek-V2/V3): de-interleave by a copy, then neox."""
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    b, h, s, d = q.shape
    q = q.view(b, h, s, d // 2, 2).transpose(4, 3).reshape(b, h, s, d)
    return (q * cos) + (rotate_half(q) * sin)


def _deepseek_inputs(dtype, d=16, heads=3, seed=21):
    """q [B, H, S, d] as DeepSeek's q_rot (a strided slice of the transposed projection) and cos/sin
    [B, S, d] of independent angles (not cat(freqs, freqs): a read of the wrong entry shows)."""
    g = torch.Generator().manual_seed(seed)
    B, S = 2, 5
    q = torch.randn(B, S, heads, 8 + d, generator=g).to(dtype).transpose(1, 2)[..., 8:]
    angle = torch.rand(B, S, d, generator=g, dtype=torch.float64) * 2 * math.pi
    return q, angle.cos().to(dtype), angle.sin().to(dtype), angle


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_reference_deinterleave_equals_deepseek_code(dtype):
    """Both spellings and the recipes the pass derives for them (half tables, cos[..., :d/2], for
    transformers 5's; full-width neox tables for the copy): bit for bit."""
    q, cos, sin, _ = _deepseek_inputs(dtype)
    d = q.shape[-1]
    base = Recipe(norm="none", norm_dtype=dtype, rope_dtype=dtype, out_dtype=dtype, rotary_dim=d,
                  deinterleave_input=True)
    half = dataclasses.replace(base, half_table=True)
    out = norm_rope_reference(q, None, cos[..., : d // 2].unsqueeze(1), sin[..., : d // 2].unsqueeze(1), 0.0, half)
    assert torch.equal(out, deepseek_v3_rope_interleave(q, cos, sin))
    out = norm_rope_reference(q, None, cos.unsqueeze(1), sin.unsqueeze(1), 0.0, base)
    assert torch.equal(out, deepseek_v2_rope_interleave(q, cos, sin))
    # (the two spellings agree where the tables are HF's cat(freqs, freqs))
    hf_cos, hf_sin = (torch.cat((t[..., : d // 2],) * 2, -1) for t in (cos, sin))
    assert torch.equal(deepseek_v3_rope_interleave(q, hf_cos, hf_sin), deepseek_v2_rope_interleave(q, hf_cos, hf_sin))


@pytest.mark.parametrize("half_table", [False, True])
@pytest.mark.parametrize("rotary_frac", [1, 2])
def test_reference_deinterleave_float64_matches_deepseek_and_the_formula(half_table, rotary_frac):
    """In float64: the reference is DeepSeek's code on x[..., :rd] (the rest passed through), and
    each pair (x[2i], x[2i+1]) times exp(i theta_i) with the real parts in the first half."""
    f64 = torch.float64
    q, _, _, angle = _deepseek_inputs(f64, d=32, seed=22)
    rd = q.shape[-1] // rotary_frac
    theta = angle[..., : rd // 2]  # the angle of pair i (HF's tables are cat(freqs, freqs))
    full_cos, full_sin = torch.cat((theta, theta), -1).cos(), torch.cat((theta, theta), -1).sin()
    recipe = Recipe(norm="none", norm_dtype=f64, rope_dtype=f64, out_dtype=f64, rotary_dim=rd, half_table=half_table,
                    deinterleave_input=True)
    cos, sin = (theta.cos(), theta.sin()) if half_table else (full_cos, full_sin)
    out = norm_rope_reference(q, None, cos.unsqueeze(1), sin.unsqueeze(1), 0.0, recipe)

    code = deepseek_v3_rope_interleave if half_table else deepseek_v2_rope_interleave
    expected = torch.cat((code(q[..., :rd].contiguous(), full_cos, full_sin), q[..., rd:]), -1)
    assert torch.equal(out, expected)
    z = torch.complex(q[..., 0:rd:2], q[..., 1:rd:2]) * torch.polar(torch.ones_like(theta), theta).unsqueeze(1)
    formula = torch.cat((z.real, z.imag, q[..., rd:]), -1)
    scale = q.abs().max().item()
    assert (out - formula).abs().max().item() <= 2 * 3 * U64 * 2 * scale  # as the float64 test above
