"""``norm_rope`` with a LayerNorm q/k norm (recipe ``norm="layer"``): the mean subtracted before the
variance, an optional bias, a weight per head.

Drawn: the norm as written by the models that use it (``nn.LayerNorm(head_dim)`` with or without
bias or affine: Persimmon, Phi, ESM-style; Cohere's by-hand float32 body with an ``[H, D]`` weight;
StableLM's one LayerNorm per head, split and concatenated), layout (norm before or after the
transpose, Persimmon's strided slices of a fused qkv), GQA, head_dim, partial rotary (the cat at
the call site, as Persimmon/Phi/StableLM write it), rotate_half spelling, dtype, eps, static or
dynamic shapes.
Asserted: the pass fired (both sites fused, one q+k call, no variance, rsqrt or RoPE cat left),
equal to the unfused graph and no further from float64 than it. And the negative cases: a norm
output with another user, an unbiased variance, a bias added after a 16-bit weight product, and
CUDA: fused by the Triton kernel under ``kernels="auto"`` and ``"triton"`` (measured on the H200:
benchmarks/results/2026-12-02-h200-layer.md), refused by flashinfer (no LayerNorm).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from qkfuse.options import Options
from tests.conftest import UNIT_ROUNDOFF
from tests.graph_harness import assert_no_worse_than_graph_in_float64, run_pass, run_pass_as_cuda, scale_error

BODIES = ["layernorm", "layernorm_nobias", "layernorm_noaffine", "cohere", "stablelm"]
LAYOUTS = ["norm_then_transpose", "transpose_then_norm", "fused_qkv"]


@dataclasses.dataclass(frozen=True)
class LSpec:
    B: int
    S: int
    Hq: int
    Hk: int
    D: int
    rd: int
    dtype: torch.dtype
    eps: float
    body: str
    layout: str
    rotate: str  # "slice" | "chunk" | "split"
    dynamic: bool


def rotate_half(x, how):
    h = x.shape[-1] // 2
    if how == "slice":
        x1, x2 = x[..., :h], x[..., h:]
    elif how == "chunk":
        x1, x2 = x.chunk(2, dim=-1)
    else:
        x1, x2 = torch.split(x, h, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class LayerNormQK(torch.nn.Module):
    """q/k of an attention layer: a LayerNorm per head, then (partial) RoPE with the cat at the call
    site, spelled as `spec` says."""

    def __init__(self, spec: LSpec, dtype=None):
        super().__init__()
        self.spec = spec
        dtype = dtype or spec.dtype
        g = torch.Generator().manual_seed(0)
        heads_w = spec.body in ("cohere", "stablelm")  # a weight row per head

        def param(h, centre):
            shape = (h, spec.D) if heads_w else (spec.D,)
            return torch.nn.Parameter((centre + 0.3 * torch.randn(*shape, generator=g)).to(dtype))

        self.q_weight, self.k_weight = param(spec.Hq, 1.0), param(spec.Hk, 1.0)
        self.q_bias, self.k_bias = param(spec.Hq, 0.0), param(spec.Hk, 0.0)

    def norm(self, x, w, b, heads_dim):
        s = self.spec
        if s.body == "layernorm":
            return F.layer_norm(x, (s.D,), w, b, s.eps)
        if s.body == "layernorm_nobias":
            return F.layer_norm(x, (s.D,), w, None, s.eps)
        if s.body == "layernorm_noaffine":
            return F.layer_norm(x, (s.D,), None, None, s.eps)
        if s.body == "stablelm":  # StableLmLayerNormPerHead: one LayerNorm per head, bias=False
            parts = torch.split(x, 1, dim=heads_dim)
            return torch.cat([F.layer_norm(p, (s.D,), w[i], None, s.eps) for i, p in enumerate(parts)],
                             dim=heads_dim)
        # CohereLayerNorm: by hand in float32 (float64 for the oracle), weight [H, D], no bias
        dt = x.dtype
        up = torch.float64 if dt == torch.float64 else torch.float32
        x = x.to(up)
        mean = x.mean(-1, keepdim=True)
        var = (x - mean).pow(2).mean(-1, keepdim=True)
        x = (x - mean) * torch.rsqrt(var + s.eps)
        wv = w.to(up) if heads_dim == -2 else w.to(up).unsqueeze(1)  # [H, D] against [.., H, D] or [H, S, D]
        return (wv * x).to(dt)

    def rope(self, x, cos, sin):
        s = self.spec
        xr, xp = x[..., : s.rd], x[..., s.rd:]
        out = xr * cos + rotate_half(xr, s.rotate) * sin
        return torch.cat([out, xp], dim=-1) if s.rd < s.D else out

    def forward(self, q, k, cos, sin):
        s = self.spec
        if s.layout == "fused_qkv":  # Persimmon: view(B, S, H, 3, D), q/k/v = [..., i, :]
            qkv = q.view(s.B, s.S, s.Hq, 3, s.D)
            q, k = qkv[..., 0, :], qkv[..., 1, :]
        else:
            q, k = q.view(*q.shape[:-1], -1, s.D), k.view(*k.shape[:-1], -1, s.D)
        if s.layout == "transpose_then_norm":  # Phi, StableLM: the norm on [B, H, S, D]
            q = self.norm(q.transpose(1, 2), self.q_weight, self.q_bias, 1)
            k = self.norm(k.transpose(1, 2), self.k_weight, self.k_bias, 1)
        else:  # Persimmon, Cohere: the norm on [B, S, H, D]
            q = self.norm(q, self.q_weight, self.q_bias, -2).transpose(1, 2)
            k = self.norm(k, self.k_weight, self.k_bias, -2).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return self.rope(q, cos, sin), self.rope(k, cos, sin)


@st.composite
def specs(draw):
    layout = draw(st.sampled_from(LAYOUTS))
    body = draw(st.sampled_from(BODIES))
    # (StableLM with one kv head has no per-head split on k: k's norm is a plain LayerNorm with a
    # [D] weight, and q and k get a call each)
    hk = 2 if body == "stablelm" else draw(st.sampled_from([1, 2]))
    ratio = 1 if layout == "fused_qkv" else draw(st.sampled_from([1, 2]))
    D = draw(st.sampled_from([16, 32, 64, 80]))
    rd = draw(st.sampled_from([D, D // 2, D // 4]))
    return LSpec(B=draw(st.integers(1, 2)), S=draw(st.integers(1, 4)), Hq=hk * ratio, Hk=hk, D=D, rd=rd,
                 dtype=draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16])),
                 eps=draw(st.sampled_from([1e-5, 1e-6, 0.1])), body=body, layout=layout,
                 rotate=draw(st.sampled_from(["slice", "chunk", "split"])),
                 dynamic=draw(st.sampled_from([False, False, True])))


def make_inputs(spec: LSpec, seed: int, offset: float = 2.0):
    """Projections with a mean far from 0 (a norm that skipped the centring would be far off)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: (torch.randn(*shape, generator=g) + offset).to(spec.dtype)  # noqa: E731
    if spec.layout == "fused_qkv":
        q = r(spec.B, spec.S, 3 * spec.Hq * spec.D)
        k = torch.zeros(1, dtype=spec.dtype)  # (unused: k is a slice of q's fused projection)
    else:
        q, k = r(spec.B, spec.S, spec.Hq * spec.D), r(spec.B, spec.S, spec.Hk * spec.D)
    angle = torch.rand(spec.B, spec.S, spec.rd // 2, generator=g) * 6.3
    cos = torch.cat([angle.cos()] * 2, -1).to(spec.dtype)
    sin = torch.cat([angle.sin()] * 2, -1).to(spec.dtype)
    return q, k, cos, sin


def _tol(dtype):
    return 1e-6 if dtype == torch.float32 else 2 * UNIT_ROUNDOFF[dtype]


@settings(max_examples=max(20, settings.default.max_examples // 2))
@given(spec=specs(), seed=st.integers(0, 2**16))
def test_layer_norm_site_is_one_call_equal_to_the_graph(spec, seed):
    block = LayerNormQK(spec)
    args = make_inputs(spec, seed)
    if spec.dynamic:  # widths come from Linear weights / configs: static; batch and sequence symbolic
        for t in args:
            torch._dynamo.mark_static(t, t.dim() - 1)
    run = run_pass(block, *args, dynamic=spec.dynamic)

    assert [(r.family, r.fused) for r in run.records] == [("norm_rope", True)] * 2, run.records
    assert all(r.recipe.startswith("layernorm") for r in run.records), run.records
    assert run.count("qkfuse.qk_norm_rope") == 1
    for op in ("aten.rsqrt", "aten.var_mean", "aten.cat", "aten.mean"):
        assert run.count(op) == 0, op

    tol = _tol(spec.dtype)
    for out, ref in zip(run.out, run.ref):
        assert out.shape == ref.shape and out.dtype == ref.dtype
        assert scale_error(out, ref) <= tol, (spec, scale_error(out, ref))
    with torch.no_grad():
        ref64 = LayerNormQK(spec, torch.float64)(*[t.double() for t in args])
    assert_no_worse_than_graph_in_float64(run, ref64, spec.dtype, tol)


def _spec(body="layernorm", layout="norm_then_transpose", dtype=torch.float32, D=32, rd=16) -> LSpec:
    return LSpec(B=2, S=3, Hq=4, Hk=2, D=D, rd=rd, dtype=dtype, eps=1e-5, body=body, layout=layout,
                 rotate="slice", dynamic=False)


def _refused(run, n_refused, reason):
    assert len(run.refused) == n_refused and all(reason in r.reason for r in run.refused), run.records
    for out, ref in zip(run.out, run.ref):
        assert scale_error(out, ref) <= _tol(out.dtype)


def test_a_norm_output_with_another_user_is_refused():
    """q's LayerNorm output is also returned: the chain must stay (k alone still fuses)."""
    spec = _spec()
    block = LayerNormQK(spec)

    def fn(q, k, cos, sin):
        qn = F.layer_norm(q.view(2, 3, 4, 32), (32,), block.q_weight, block.q_bias, 1e-5)
        kn = F.layer_norm(k.view(2, 3, 2, 32), (32,), block.k_weight, block.k_bias, 1e-5)
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        return block.rope(qn.transpose(1, 2), c, s), block.rope(kn.transpose(1, 2), c, s), qn * 2

    run = run_pass(fn, *make_inputs(spec, 0))
    _refused(run, 1, "has a user outside the chain")
    assert len(run.fused) == 1 and run.count("qkfuse.norm_rope") == 1


def test_an_unbiased_variance_is_refused():
    """torch.var_mean's default (correction=1) is not nn.LayerNorm's variance."""
    spec = _spec()
    block = LayerNormQK(spec)

    def norm(x):
        var, mean = torch.var_mean(x, -1, keepdim=True)  # unbiased
        return (x - mean) * torch.rsqrt(var + 1e-5)

    def fn(q, k, cos, sin):
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        return tuple(block.rope(norm(t.view(2, 3, -1, 32)).transpose(1, 2), c, s) for t in (q, k))

    _refused(run_pass(fn, *make_inputs(spec, 1)), 2, "correction=1")


def test_a_bias_after_a_16_bit_weight_product_is_refused():
    """Chameleon-style ``F.layer_norm(x) * w + b`` in bf16: rounded after the norm, the product and the
    sum; the recipe rounds once after the bias."""
    spec = _spec(dtype=torch.bfloat16)
    block = LayerNormQK(spec)

    def fn(q, k, cos, sin):
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        outs = []
        for t, w, b in ((q, block.q_weight, block.q_bias), (k, block.k_weight, block.k_bias)):
            n = F.layer_norm(t.view(2, 3, -1, 32), (32,), None, None, 1e-5) * w + b
            outs.append(block.rope(n.transpose(1, 2), c, s))
        return tuple(outs)

    run = run_pass(fn, *make_inputs(spec, 2))
    _refused(run, 2, "norm bias added in torch.bfloat16, not float32")


def test_per_head_norms_that_differ_are_refused():
    """StableLM-style split/cat whose per-head norms have different eps: not one norm."""
    spec = _spec(body="stablelm", layout="transpose_then_norm")
    block = LayerNormQK(spec)

    def norm(x, w):
        parts = torch.split(x, 1, dim=1)
        return torch.cat([F.layer_norm(p, (32,), w[i], None, 1e-5 * (i + 1)) for i, p in enumerate(parts)], dim=1)

    def fn(q, k, cos, sin):
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        return (block.rope(norm(q.view(2, 3, 4, 32).transpose(1, 2), block.q_weight), c, s),
                block.rope(norm(k.view(2, 3, 2, 32).transpose(1, 2), block.k_weight), c, s))

    _refused(run_pass(fn, *make_inputs(spec, 3)), 2, "per-head norms of this concatenation differ")


@pytest.mark.parametrize("kernels", ["auto", "triton", "flashinfer"])
@pytest.mark.parametrize("body", ["layernorm", "cohere", "stablelm"])
def test_cuda_triton_serves_it_and_flashinfer_refuses(kernels, body):
    """On CUDA the Triton kernel's LayerNorm mode serves these sites under 'auto' (it beat Inductor
    at every measured shape) and 'triton', one launch for q and k; flashinfer has no LayerNorm and
    refuses them, with the reason in explain's records."""
    pytest.importorskip("triton")
    if kernels == "flashinfer":
        from qkfuse.kernels import flashinfer as fi

        if not fi.available():
            pytest.skip("flashinfer is not installed")
    layout = "transpose_then_norm" if body == "stablelm" else "norm_then_transpose"
    spec = _spec(body=body, layout=layout, dtype=torch.bfloat16)
    run = run_pass_as_cuda(LayerNormQK(spec), *make_inputs(spec, 0), options=Options(kernels=kernels))
    if kernels in ("auto", "triton"):
        assert len(run.fused) == 2 and len(run.kernel_calls()) == 1
        assert all(r.reason.startswith("triton") for r in run.records), run.records
        assert not [n for n in run.rewritten.graph.nodes if n.target is torch.ops.aten.rsqrt.default]
    else:
        assert not run.fused and len(run.records) == 2
        assert all("LayerNorm" in r.reason for r in run.records), run.records
        assert run.kernel_calls() == []
