"""qkfuse.qk_norm_rope / qkfuse.norm_rope against the unfused eager code they replace.

The eager code is written here as HF writes it (Qwen3RMSNorm, GemmaRMSNorm, rotate_half,
apply_rotary_pos_emb, partial rotary, GPT-J interleaving), so the functional API's documented
defaults are checked against the models' own numerics, not against qkfuse's reference. Tolerances:
float32 within 1e-6 of the tensor's max, 16-bit within two units of the dtype's rounding at that
scale (on CPU the results are bit-identical in practice; the GPU tests reuse these cases).
"""

from __future__ import annotations

import dataclasses
import math
from unittest import mock

import pytest
import torch

import qkfuse
from qkfuse import functional
from tests.conftest import UNIT_ROUNDOFF

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


# ---- the eager code, as HF writes it ------------------------------------------------------------


def qwen3_rmsnorm(hidden_states, weight, eps):
    """Qwen3RMSNorm.forward (= LlamaRMSNorm): normalise in float32, cast back, then multiply."""
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + eps)
    return weight * hidden_states.to(input_dtype)


def gemma_rmsnorm(x, weight, eps):
    """GemmaRMSNorm.forward: x * (1 + w) in float32, then cast."""
    output = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    return (output * (1.0 + weight.float())).type_as(x)


def rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def rotate_every_two(x):
    return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1, interleaved=False):
    """HF's apply_rotary_pos_emb, with the partial-rotary split of Phi/GLM (rotary_dim = cos width)."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    rot = rotate_every_two if interleaved else rotate_half
    rd = cos.shape[-1]

    def one(x):
        x_rot, x_pass = x[..., :rd], x[..., rd:]
        return torch.cat(((x_rot * cos) + (rot(x_rot) * sin), x_pass), dim=-1)

    return one(q), one(k)


def hf_cos_sin(batch, seq, rd, dtype, interleaved=False, base=10000.0, positions=None):
    """Qwen3RotaryEmbedding.forward: [B, S, rd] cos/sin in the input dtype (duplicated frequencies)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rd, 2, dtype=torch.float32) / rd))
    if positions is None:
        positions = torch.arange(seq, dtype=torch.float32).expand(batch, seq)
    freqs = positions.float()[..., None] * inv_freq
    emb = freqs.repeat_interleave(2, dim=-1) if interleaved else torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


# ---- cases --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Spec:
    dtype: torch.dtype = BF16
    batch: int = 2
    seq: int = 5
    q_heads: int = 4
    k_heads: int = 2  # GQA
    head_dim: int = 64
    rotary_dim: int | None = None  # None: head_dim
    interleaved: bool = False
    gemma: bool = False  # (1 + w) weights


SPECS = {
    "qwen3_bf16": Spec(),
    "qwen3_fp16": Spec(dtype=F16),
    "qwen3_fp32": Spec(dtype=F32),
    "mha": Spec(k_heads=4),
    "partial_rotary": Spec(rotary_dim=32),
    "interleaved": Spec(interleaved=True),
    "gemma_1_plus_w": Spec(gemma=True, head_dim=32),
    "partial_interleaved_gemma_fp16": Spec(dtype=F16, rotary_dim=16, interleaved=True, gemma=True),
    "odd_sizes": Spec(batch=1, seq=7, q_heads=3, k_heads=1, head_dim=40),
}


def make(spec: Spec, seed: int = 0, device: str = "cpu"):
    """HF-shaped q/k [B, S, H, D] (the projections' view), weights, cos/sin [B, S, rd]."""
    g = torch.Generator().manual_seed(seed)
    B, S, D = spec.batch, spec.seq, spec.head_dim
    rd = spec.rotary_dim or D

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g)).to(spec.dtype).to(device)

    q, k = randn(B, S, spec.q_heads, D, scale=3.0), randn(B, S, spec.k_heads, D, scale=3.0)
    centre = 0.0 if spec.gemma else 1.0
    qw, kw = centre + randn(D, scale=0.3), centre + randn(D, scale=0.3)
    cos, sin = hf_cos_sin(B, S, rd, spec.dtype, spec.interleaved)
    return q, k, qw, kw, cos.to(device), sin.to(device)


def eager(spec: Spec, q, k, qw, kw, cos, sin, q_eps=1e-6, k_eps=1e-6):
    """The HF attention's q/k path: norm on [B, S, H, D], transpose, RoPE. Returns [B, H, S, D]."""
    norm = gemma_rmsnorm if spec.gemma else qwen3_rmsnorm
    qn, kn = norm(q, qw, q_eps).transpose(1, 2), norm(k, kw, k_eps).transpose(1, 2)
    return apply_rotary_pos_emb(qn, kn, cos, sin, interleaved=spec.interleaved)


def assert_close_to_eager(out, ref, units=2.0, f32_rel=1e-6):
    """float32: f32_rel of the tensor's max; 16-bit: `units` of the dtype's rounding at that scale."""
    assert out.shape == ref.shape and out.dtype == ref.dtype
    scale = ref.double().abs().max().item()
    tol = f32_rel * scale if ref.dtype == F32 else units * 2 * UNIT_ROUNDOFF[ref.dtype] * scale
    err = (out.double() - ref.double()).abs().max().item()
    assert err <= tol, f"{err:.3g} > {tol:.3g}"


def fused_kwargs(spec: Spec) -> dict:
    return dict(weight_offset=1.0 if spec.gemma else 0.0, interleaved=spec.interleaved)


# ---- layouts ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SPECS))
def test_hf_bshd(name):
    """q/k as the projections' view [B, S, H, D] with HF's cos [B, S, rd]: the result, transposed,
    is the eager attention's q/k [B, H, S, D]."""
    spec = SPECS[name]
    q, k, qw, kw, cos, sin = make(spec)
    qo, ko = qkfuse.qk_norm_rope(q, k, qw, kw, cos, sin, eps=1e-6, **fused_kwargs(spec))
    assert qo.shape == q.shape and ko.shape == k.shape and qo.is_contiguous()
    rq, rk = eager(spec, q, k, qw, kw, cos, sin)
    assert_close_to_eager(qo.transpose(1, 2), rq)
    assert_close_to_eager(ko.transpose(1, 2), rk)


@pytest.mark.parametrize("name", ["qwen3_bf16", "partial_rotary", "interleaved", "gemma_1_plus_w", "qwen3_fp32"])
def test_hf_bhsd_transposed_view(name):
    """The transposed view [B, H, S, D] (norm after the transpose, as Gemma3 does) with
    cos.unsqueeze(1): the result keeps the view's layout."""
    spec = SPECS[name]
    q, k, qw, kw, cos, sin = make(spec, seed=1)
    qt, kt = q.transpose(1, 2), k.transpose(1, 2)
    qo, ko = qkfuse.qk_norm_rope(qt, kt, qw, kw, cos.unsqueeze(1), sin.unsqueeze(1), **fused_kwargs(spec))
    assert qo.stride() == qt.stride() and ko.stride() == kt.stride()
    rq, rk = eager(spec, q, k, qw, kw, cos, sin)
    assert_close_to_eager(qo, rq)
    assert_close_to_eager(ko, rk)


def test_vllm_tokens_layout_and_cos_sin_cache():
    """vLLM/sglang: q [T, H, D] from a fused qkv projection (strided slices), a float32 cos|sin cache
    and positions [T]: equal to the cos/sin [T, D] form and to the eager code."""
    g = torch.Generator().manual_seed(2)
    T, Hq, Hk, D = 6, 4, 2, 64
    qkv = (2 * torch.randn(T, (Hq + 2 * Hk) * D, generator=g)).to(BF16)
    q, k = qkv[:, : Hq * D].view(T, Hq, D), qkv[:, Hq * D: (Hq + Hk) * D].view(T, Hk, D)
    qw, kw = (1 + 0.3 * torch.randn(2, D, generator=g)).to(BF16)
    positions = torch.tensor([0, 3, 17, 5, 5, 30])
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    freqs = torch.arange(32, dtype=torch.float32)[:, None] * inv_freq
    cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1)  # [max_position, D], float32 as vLLM keeps it
    qo, ko = qkfuse.qk_norm_rope(q, k, qw, kw, cos_sin_cache=cache, positions=positions)
    # the same as HF-layout float32 cos/sin [T, D] of those positions
    cos = torch.cat((freqs.cos(), freqs.cos()), dim=-1)[positions]
    sin = torch.cat((freqs.sin(), freqs.sin()), dim=-1)[positions]
    qo2, ko2 = qkfuse.qk_norm_rope(q, k, qw, kw, cos, sin)
    assert torch.equal(qo, qo2) and torch.equal(ko, ko2)
    # eager: float32 cos promotes RoPE to float32 (the documented default), then the input dtype
    for out, x, w in ((qo, q, qw), (ko, k, kw)):
        y = qwen3_rmsnorm(x, w, 1e-6)
        ref = (y * cos[:, None] + rotate_half(y) * sin[:, None]).to(BF16)
        assert_close_to_eager(out, ref)


def test_norm_rope_single_tensor_and_separate_eps():
    spec = SPECS["partial_rotary"]
    q, k, qw, kw, cos, sin = make(spec, seed=3)
    qo, ko = qkfuse.qk_norm_rope(q, k, qw, kw, cos, sin, eps=1e-6, k_eps=0.5)
    rq, rk = eager(spec, q, k, qw, kw, cos, sin, 1e-6, 0.5)
    assert_close_to_eager(qo.transpose(1, 2), rq)
    assert_close_to_eager(ko.transpose(1, 2), rk)
    assert torch.equal(qkfuse.norm_rope(k, kw, cos, sin, eps=0.5), ko)
    assert not torch.equal(qkfuse.norm_rope(k, kw, cos, sin), ko)  # eps=1e-6 by default


def test_norm_only_and_rope_only():
    spec = Spec(dtype=BF16, rotary_dim=None)
    q, k, qw, kw, cos, sin = make(spec, seed=4)
    assert_close_to_eager(qkfuse.norm_rope(q, qw), qwen3_rmsnorm(q, qw, 1e-6))
    qo = qkfuse.norm_rope(q, None, cos, sin, norm="none")
    ref, _ = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    assert_close_to_eager(qo.transpose(1, 2), ref)


def test_overrides_reach_the_recipe():
    """cast_before_weight=False is OLMo2 / torch.rms_norm (multiply in float32, then cast);
    norm_dtype=float32 keeps the normed value in float32 (float32 weights on bf16 activations)."""
    q, k, qw, kw, cos, sin = make(SPECS["qwen3_bf16"], seed=5)
    w32 = qw.float()
    out = qkfuse.norm_rope(q, w32, eps=1e-6, cast_before_weight=False)
    assert_close_to_eager(out, torch.nn.functional.rms_norm(q, (q.shape[-1],), w32, 1e-6))
    out32 = qkfuse.norm_rope(q, w32, norm_dtype=F32, out_dtype=F32)
    assert out32.dtype == F32
    assert_close_to_eager(out32, qwen3_rmsnorm(q, w32, 1e-6))  # bf16 * fp32 weight promotes to fp32


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_across_heads_is_olmo2(dtype):
    """across_heads=True: OLMo2's q_norm/k_norm over the flat projection ([H*D] weights, multiplied
    in float32), then the head view and RoPE with float32 cos/sin, cast back (Olmo2Attention)."""
    g = torch.Generator().manual_seed(7)
    B, S, Hq, Hk, D = 2, 5, 4, 2, 32
    q, k = ((2 * torch.randn(B, S, h * D, generator=g)).to(dtype) for h in (Hq, Hk))
    qw, kw = ((1 + 0.3 * torch.randn(h * D, generator=g)).to(dtype) for h in (Hq, Hk))
    ang = torch.rand(B, S, D // 2, generator=g) * 6.3
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)  # float32, as OLMo2 keeps them

    def olmo2(x, w):
        xf = x.to(torch.float32)
        y = (w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6))).to(dtype)
        y = y.view(B, S, -1, D).transpose(1, 2)
        return (y * cos.unsqueeze(1) + rotate_half(y) * sin.unsqueeze(1)).to(dtype)

    qo, ko = qkfuse.qk_norm_rope(q.view(B, S, Hq, D), k.view(B, S, Hk, D), qw, kw, cos, sin, across_heads=True,
                                 cast_before_weight=False, out_dtype=dtype)
    assert_close_to_eager(qo.transpose(1, 2), olmo2(q, qw))
    assert_close_to_eager(ko.transpose(1, 2), olmo2(k, kw))
    with pytest.raises(ValueError, match=r"weight must have shape \[128\] \(heads \* head_dim"):
        qkfuse.qk_norm_rope(q.view(B, S, Hq, D), k.view(B, S, Hk, D), qw[:D], kw, cos, sin, across_heads=True)
    with pytest.raises(TypeError, match="across_heads must be a bool"):
        qkfuse.norm_rope(q.view(B, S, Hq, D), qw, cos, sin, across_heads=-2)


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_layer_norm_with_bias_is_nn_layer_norm(dtype):
    """norm="layer" with q_bias/k_bias: Persimmon/Phi's per-head nn.LayerNorm(head_dim) then RoPE, in
    eager (the op), with grad required (the differentiable reference) and for one tensor (bias=)."""
    g = torch.Generator().manual_seed(11)
    B, S, Hq, Hk, D = 2, 5, 4, 2, 32
    q, k = ((2 * torch.randn(B, S, h, D, generator=g) + 0.5).to(dtype) for h in (Hq, Hk))
    norms = [torch.nn.LayerNorm(D, eps=1e-5).to(dtype) for _ in range(2)]
    with torch.no_grad():
        for n in norms:
            n.weight.copy_(1 + 0.3 * torch.randn(D, generator=g))
            n.bias.copy_(0.2 * torch.randn(D, generator=g))
    ang = torch.rand(B, S, D // 2, generator=g) * 6.3
    cos, sin = (torch.cat([f] * 2, -1).to(dtype) for f in (ang.cos(), ang.sin()))

    def persimmon(x, n):
        y = n(x)
        return y * cos.unsqueeze(2) + rotate_half(y) * sin.unsqueeze(2)

    (qn, kn), kw = norms, dict(eps=1e-5, norm="layer", q_bias=norms[0].bias, k_bias=norms[1].bias)
    with torch.no_grad():
        qo, ko = qkfuse.qk_norm_rope(q, k, qn.weight, kn.weight, cos, sin, **kw)
        assert_close_to_eager(qo, persimmon(q, qn))
        assert_close_to_eager(ko, persimmon(k, kn))
        one = qkfuse.norm_rope(q, qn.weight, cos, sin, eps=1e-5, norm="layer", bias=qn.bias)
        assert torch.equal(one, qo)
    qo_grad, _ = qkfuse.qk_norm_rope(q, k, qn.weight, kn.weight, cos, sin, **kw)  # weights require grad
    assert qo_grad.requires_grad
    assert torch.equal(qo_grad.detach(), qo)
    with pytest.raises(ValueError, match="q_bias and k_bias together"):
        qkfuse.qk_norm_rope(q, k, qn.weight, kn.weight, cos, sin, eps=1e-5, norm="layer", q_bias=qn.bias)


def test_special_values_and_empty():
    q, k, qw, kw, cos, sin = make(SPECS["qwen3_bf16"], seed=6)
    q[0, 1, 2, 3] = math.nan
    k[1, 0, 1, 5] = math.inf
    qo, ko = qkfuse.qk_norm_rope(q, k, qw, kw, cos, sin)
    rq, rk = eager(SPECS["qwen3_bf16"], q, k, qw, kw, cos, sin)
    for out, ref in ((qo.transpose(1, 2), rq), (ko.transpose(1, 2), rk)):
        assert out.isnan().any() and torch.equal(out.isnan(), ref.isnan())
        assert torch.equal(out.nan_to_num(0, 0, 0), ref.nan_to_num(0, 0, 0))
    e = q[:, :0]
    qo, ko = qkfuse.qk_norm_rope(e, k[:, :0], qw, kw, cos[:, :0], sin[:, :0])
    assert qo.shape == e.shape and ko.shape == (2, 0, 2, 64)


# ---- half tables (one cos/sin entry per rotated pair) ---------------------------------------------


def full_table(t, interleaved):
    """The HF-layout table a half table stands for: each pair's entry repeated for both its elements."""
    return t.repeat_interleave(2, dim=-1) if interleaved else torch.cat((t, t), dim=-1)


def norm_half_rope_f64(x, w, cos, sin, eps, interleaved):
    """Qwen3RMSNorm then RoPE from half tables [B, S, rd // 2], all in float64 (no rounding)."""
    xd = x.double()
    y = w.double() * (xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps))
    c, s = (full_table(t.double(), interleaved).unsqueeze(2) for t in (cos, sin))
    rot = rotate_every_two if interleaved else rotate_half
    rd = c.shape[-1]
    return torch.cat((y[..., :rd] * c + rot(y[..., :rd]) * s, y[..., rd:]), dim=-1)


def half_inputs(dtype, rd, strided, seed):
    """q/k [B, S, H, D], weights, and half tables [B, S, rd // 2] of random angles (``strided``: the
    every-other-entry views of wider tables, as Wan's freqs_cos[..., 0::2] / freqs_sin[..., 1::2])."""
    g = torch.Generator().manual_seed(seed)
    B, S, Hq, Hk, D = 2, 5, 4, 2, 64
    q, k = ((3 * torch.randn(B, S, h, D, generator=g)).to(dtype) for h in (Hq, Hk))
    qw, kw = (1 + 0.3 * torch.randn(2, D, generator=g)).to(dtype)
    ang = torch.rand(B, S, rd if strided else rd // 2, generator=g) * 6.3
    cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)
    if strided:
        cos, sin = cos[..., 0::2], sin[..., 1::2]
        assert cos.stride(-1) == 2
    return q, k, qw, kw, cos, sin


@pytest.mark.parametrize("strided", [False, True], ids=["dense", "strided"])
@pytest.mark.parametrize("rd", [64, 32], ids=["full_rotary", "partial_rotary"])
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "interleaved"])
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_half_table_is_the_float64_rope(dtype, interleaved, rd, strided):
    """half_table=True: cos/sin [B, S, rotary_dim // 2] give the float64 transcription (the table
    expanded per pair, then the standard RoPE) within the dtype, and exactly what the expanded
    full table gives (rotary_dim defaults to twice the table's width)."""
    q, k, qw, kw, cos, sin = half_inputs(dtype, rd, strided, seed=12 + rd + strided)
    outs = qkfuse.qk_norm_rope(q, k, qw, kw, cos, sin, interleaved=interleaved, half_table=True)
    for out, x, w in zip(outs, (q, k), (qw, kw)):
        assert out.shape == x.shape and out.dtype == dtype
        # 16-bit: the recipe rounds the norm, the weight's product, RoPE's two products and their sum
        assert_close_to_eager(out, norm_half_rope_f64(x, w, cos, sin, 1e-6, interleaved).to(dtype), units=4)
    full = qkfuse.qk_norm_rope(q, k, qw, kw, full_table(cos, interleaved), full_table(sin, interleaved),
                               interleaved=interleaved)
    assert all(torch.equal(o, f) for o, f in zip(outs, full))
    explicit = qkfuse.qk_norm_rope(q, k, qw, kw, cos, sin, rotary_dim=rd, interleaved=interleaved, half_table=True)
    assert all(torch.equal(o, e) for o, e in zip(outs, explicit))
    one = qkfuse.norm_rope(k, kw, cos, sin, interleaved=interleaved, half_table=True)
    assert torch.equal(one, outs[1])


def test_half_table_under_compile():
    """The fake impl accepts half tables (fullgraph, through AOT autograd), with the eager result."""
    q, k, qw, kw, cos, sin = half_inputs(BF16, 32, True, seed=13)

    def fn(q, k, cos, sin):
        return qkfuse.qk_norm_rope(q, k, qw, kw, cos, sin, interleaved=True, half_table=True)

    out = torch.compile(fn, backend="aot_eager", fullgraph=True)(q, k, cos, sin)
    assert all(torch.equal(o, r) for o, r in zip(out, fn(q, k, cos, sin)))


def test_half_table_errors():
    q, k, qw, kw, cos, sin = half_inputs(F32, 32, False, seed=14)  # cos/sin [B, S, 16]
    wide = full_table(cos, False)  # [B, S, 32]
    with pytest.raises(ValueError, match=r"cos last dim must equal rotary_dim // 2=16 \(half_table\)"):
        qkfuse.qk_norm_rope(q, k, qw, kw, wide, wide, rotary_dim=32, half_table=True)
    with pytest.raises(ValueError, match=r"sin last dim must equal rotary_dim // 2=16 \(half_table\)"):
        qkfuse.qk_norm_rope(q, k, qw, kw, cos, sin[..., :8], half_table=True)
    with pytest.raises(ValueError, match=r"cos last dim must equal rotary_dim=32,"):
        qkfuse.qk_norm_rope(q, k, qw, kw, cos, sin, rotary_dim=32)  # a half table without half_table
    big = torch.rand(2, 5, 64)  # a full-width table passed as a half one: 2 * 64 rotated > head_dim
    with pytest.raises(ValueError, match=r"half_table=True, cos/sin last dim must be rotary_dim // 2"):
        qkfuse.qk_norm_rope(q, k, qw, kw, big, big, half_table=True)
    with pytest.raises(ValueError, match=r"half_table=True needs cos and sin"):
        qkfuse.norm_rope(q, qw, half_table=True)
    cache, positions = torch.rand(8, 32), torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match=r"half_table=True is for cos/sin tables; cos_sin_cache"):
        qkfuse.qk_norm_rope(q, k, qw, kw, cos_sin_cache=cache, positions=positions, half_table=True)
    with pytest.raises(TypeError, match="half_table must be a bool"):
        qkfuse.qk_norm_rope(q, k, qw, kw, cos, sin, half_table=1)


# ---- dispatch -----------------------------------------------------------------------------------


def test_cpu_eager_calls_the_op():
    q, k, qw, kw, cos, sin = make(SPECS["qwen3_bf16"], seed=7)
    with mock.patch.object(functional, "run_kernel") as direct, \
            torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        qkfuse.qk_norm_rope(q, k, qw, kw, cos, sin)
        qkfuse.norm_rope(q, qw, cos, sin)
    assert not direct.called
    names = {e.name for e in prof.events()}
    assert "qkfuse::qk_norm_rope" in names and "qkfuse::norm_rope" in names


def test_autograd_falls_back_to_the_differentiable_reference():
    """With grad required, the result is the reference in torch ops, with the eager code's grads."""
    spec = SPECS["partial_rotary"]
    q, k, qw, kw, cos, sin = make(spec, seed=8)
    q, qw = q.float().requires_grad_(), qw.float().requires_grad_()
    k, kw, cos, sin = k.float(), kw.float(), cos.float(), sin.float()
    qo, ko = qkfuse.qk_norm_rope(q, k, qw, kw, cos, sin)
    assert qo.requires_grad and not ko.requires_grad
    rq, rk = eager(dataclasses.replace(spec, dtype=F32), q, k, qw, kw, cos, sin)
    assert_close_to_eager(qo.transpose(1, 2).detach(), rq.detach())
    upstream = torch.randn(rq.shape, generator=torch.Generator().manual_seed(0))
    gq, gw = torch.autograd.grad(qo.transpose(1, 2), (q, qw), upstream)
    rgq, rgw = torch.autograd.grad(rq, (q, qw), upstream)
    assert torch.allclose(gq, rgq, rtol=1e-5, atol=1e-5) and torch.allclose(gw, rgw, rtol=1e-5, atol=1e-4)
    with torch.no_grad():  # no grad mode: the op, and no graph
        qo, _ = qkfuse.qk_norm_rope(q, k, qw, kw, cos, sin)
    assert not qo.requires_grad


def test_direct_path_memo_keys_on_half_table(monkeypatch):
    """The eager kernel path (forced onto CPU, the reference computing) memoises its checks per
    recipe and layout: the same tensors with and without half_table are separate entries, so a
    call whose tables do not fit is refused after one that fit, and each result is its own."""
    pytest.importorskip("triton")  # the direct path reads aliasing with the Triton module's helper
    q, k, qw, kw, cos, sin = half_inputs(F32, 32, True, seed=15)
    half = qkfuse.qk_norm_rope(q, k, qw, kw, cos, sin, half_table=True)  # the op, for comparison
    partial = qkfuse.qk_norm_rope(q, k, qw, kw, cos, sin)  # the same tables as full ones, rotary_dim 16
    monkeypatch.setattr(functional, "_direct_kernel", lambda q: True)
    monkeypatch.setattr(functional, "kernel_computes", lambda *a, **kw: False)
    monkeypatch.setattr(functional, "_CHECKED", {})
    with torch.no_grad():
        for _ in range(2):
            out = qkfuse.qk_norm_rope(q, k, qw, kw, cos, sin, rotary_dim=32, half_table=True)
            assert all(torch.equal(o, r) for o, r in zip(out, half))
        assert len(functional._CHECKED) == 1
        with pytest.raises(ValueError, match=r"cos last dim must equal rotary_dim=32"):
            qkfuse.qk_norm_rope(q, k, qw, kw, cos, sin, rotary_dim=32)
        out = qkfuse.qk_norm_rope(q, k, qw, kw, cos, sin)
        assert all(torch.equal(o, r) for o, r in zip(out, partial))
        assert not torch.equal(out[0], half[0])
    assert len(functional._CHECKED) == 2


# ---- torch.compile ------------------------------------------------------------------------------


class _Capture:
    """A Dynamo backend that records the graphs it is given and runs them eagerly."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward

    def targets(self):
        return [n.target for gm in self.graphs for n in gm.graph.nodes if n.op == "call_function"]


def _attention_qk(q_proj, k_proj, qw, kw, cos, sin, B, S):
    """A hand-written attention's q/k path, as a model author would write it."""
    q = q_proj.view(B, S, -1, 64)
    k = k_proj.view(B, S, -1, 64)
    q, k = qkfuse.qk_norm_rope(q, k, qw, kw, cos, sin, eps=1e-6)
    return q.transpose(1, 2), k.transpose(1, 2)


def test_compile_fullgraph_traces_the_op():
    spec = SPECS["qwen3_bf16"]
    q, k, qw, kw, cos, sin = make(spec, seed=9)
    B, S = spec.batch, spec.seq
    args = (q.reshape(B, S, -1), k.reshape(B, S, -1), qw, kw, cos, sin, B, S)
    capture = _Capture()
    compiled = torch.compile(_attention_qk, backend=capture, fullgraph=True)
    out = compiled(*args)
    assert len(capture.graphs) == 1
    assert capture.targets().count(torch.ops.qkfuse.qk_norm_rope.default) == 1
    ref = _attention_qk(*args)
    assert all(torch.equal(o, r) for o, r in zip(out, ref))
    # through AOT autograd (the fake impl, functionalization) and Inductor on CPU
    for backend in ("aot_eager", "inductor"):
        torch._dynamo.reset()
        out = torch.compile(_attention_qk, backend=backend, fullgraph=True)(*args)
        assert all(torch.equal(o, r) for o, r in zip(out, ref)), backend


def test_compile_fullgraph_cached_and_grad_forms():
    """The cos_sin_cache form traces the cached op; with grad required, the reference's torch ops
    are traced (no graph break, differentiable)."""
    g = torch.Generator().manual_seed(10)
    T, D = 5, 32
    q, k = torch.randn(T, 4, D, generator=g), torch.randn(T, 2, D, generator=g)
    qw, kw = 1 + 0.3 * torch.randn(2, D, generator=g)
    angle = torch.rand(16, D // 2, generator=g) * 6.28
    cache, positions = torch.cat((angle.cos(), angle.sin()), -1), torch.tensor([3, 0, 15, 7, 7])

    def fn(q, k, qw, kw):
        return qkfuse.qk_norm_rope(q, k, qw, kw, cos_sin_cache=cache, positions=positions)

    capture = _Capture()
    out = torch.compile(fn, backend=capture, fullgraph=True)(q, k, qw, kw)
    assert torch.ops.qkfuse.qk_norm_rope_cached.default in capture.targets()
    ref = fn(q, k, qw, kw)
    assert all(torch.equal(o, r) for o, r in zip(out, ref))

    torch._dynamo.reset()
    capture = _Capture()
    qg = q.clone().requires_grad_()
    out = torch.compile(fn, backend=capture, fullgraph=True)(qg, k, qw, kw)
    assert not any("qkfuse" in str(t) for t in capture.targets())
    assert out[0].requires_grad
    assert torch.allclose(out[0], ref[0], rtol=1e-6, atol=1e-6)
    out[0].sum().backward()
    assert qg.grad is not None and qg.grad.isfinite().all()
    # the traced reference asserts the positions' range (no wrapped-around -1, no overrun)
    for bad in (-1, 16):
        positions[2] = bad
        with pytest.raises(RuntimeError, match="positions out of range"):
            torch.compile(fn, backend="aot_eager", fullgraph=True)(qg, k, qw, kw)


def test_compile_dynamic_shapes():
    """dynamic=True: symbolic tokens, heads, head_dim and rotary_dim; one graph serves new sizes."""
    def fn(q, k, qw, kw, cos, sin):
        return qkfuse.qk_norm_rope(q, k, qw, kw, cos, sin)

    capture = _Capture()
    compiled = torch.compile(fn, backend=capture, dynamic=True, fullgraph=True)
    for seed, spec in enumerate((SPECS["qwen3_bf16"], Spec(batch=3, seq=7, q_heads=6, k_heads=3, head_dim=40))):
        args = make(spec, seed=seed)
        assert all(torch.equal(o, r) for o, r in zip(compiled(*args), fn(*args)))
    assert len(capture.graphs) == 1


def test_bad_input_under_compile_is_the_same_error():
    """The fake impl runs the same checks while Dynamo traces (Dynamo wraps the error)."""
    q, k, qw, kw, cos, sin = make(SPECS["qwen3_bf16"], seed=11)

    def fn(q, k):
        return qkfuse.qk_norm_rope(q, k, qw, kw[:-1], cos, sin)

    with pytest.raises(ValueError, match=r"k weight must have shape \[64\]"):
        fn(q, k)
    with pytest.raises(Exception, match=r"k weight must have shape \[64\]"):
        torch.compile(fn, backend="aot_eager", fullgraph=True)(q, k)


# ---- DeepSeek's de-interleaved RoPE (deinterleave_input) -------------------------------------------


def deepseek_rope_f64(x, cos, sin):
    """DeepSeek-V3's apply_rotary_pos_emb_interleave (its view/transpose/reshape spelling) on
    [B, S, H, D] with HF tables [B, S, D], in float64."""
    xd = x.double()
    *lead, d = xd.shape
    xd = xd.view(*lead, d // 2, 2).transpose(-1, -2).reshape(*lead, d)
    c, s = cos.double().unsqueeze(2), sin.double().unsqueeze(2)
    return xd * c + rotate_half(xd) * s


@pytest.mark.parametrize("half", [False, True], ids=["full_table", "half_table"])
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_deinterleave_input_is_deepseeks_rope(dtype, half):
    """deinterleave_input=True (norm="none"): DeepSeek's RoPE of q and of MLA's one-head k, within
    the dtype of the float64 transcription; a half table (cos[..., :D/2]) gives the same result."""
    g = torch.Generator().manual_seed(31)
    B, S, D = 2, 5, 16
    q, k = (3 * torch.randn(B, S, 4, D, generator=g)).to(dtype), (3 * torch.randn(B, S, 1, D, generator=g)).to(dtype)
    ang = torch.rand(B, S, D // 2, generator=g) * 6.3
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(dtype), torch.cat([ang.sin()] * 2, -1).to(dtype)
    tables = (cos[..., : D // 2], sin[..., : D // 2]) if half else (cos, sin)
    outs = qkfuse.qk_norm_rope(q, k, None, None, *tables, norm="none", deinterleave_input=True, half_table=half)
    for out, x in zip(outs, (q, k)):
        assert out.shape == x.shape and out.dtype == dtype
        assert_close_to_eager(out, deepseek_rope_f64(x, cos, sin).to(dtype), units=2)
    one = qkfuse.norm_rope(k, None, *tables, norm="none", deinterleave_input=True, half_table=half)
    assert torch.equal(one, outs[1])


def test_deinterleave_input_errors():
    g = torch.Generator().manual_seed(32)
    q, k = torch.randn(2, 5, 4, 16, generator=g), torch.randn(2, 5, 1, 16, generator=g)
    cos, sin = torch.rand(2, 5, 16, generator=g), torch.rand(2, 5, 16, generator=g)
    with pytest.raises(ValueError, match="deinterleave_input.*norm='none'"):  # a norm in front: not implemented
        qkfuse.qk_norm_rope(q, k, torch.ones(16), torch.ones(16), cos, sin, deinterleave_input=True)
    with pytest.raises(ValueError, match="interleaved"):
        qkfuse.qk_norm_rope(q, k, None, None, cos, sin, norm="none", interleaved=True, deinterleave_input=True)
    with pytest.raises(ValueError, match="cos_sin_cache"):
        qkfuse.qk_norm_rope(q, k, None, None, cos_sin_cache=torch.rand(8, 16), positions=torch.arange(5),
                            norm="none", deinterleave_input=True)
    with pytest.raises(TypeError, match="deinterleave_input must be a bool"):
        qkfuse.qk_norm_rope(q, k, None, None, cos, sin, norm="none", deinterleave_input=1)
