"""The functional API on CUDA: the Triton kernel launched directly, against the eager code and the
reference; dispatch (direct launch, custom op under torch.compile, reference under autograd,
CUDA graph capture); and the bad-input fuzz of tests/ops/test_bad_input_fuzz.py on CUDA.

    python -m pytest -q -m gpu tests/gpu
"""

from __future__ import annotations

import contextlib
from unittest import mock

import pytest
import torch
from hypothesis import given, settings

import qkfuse
from qkfuse.kernels import triton_norm_rope as tk
from qkfuse.kernels.reference import norm_rope_reference
from tests.ops import test_bad_input_fuzz as fuzz
from tests.test_functional import SPECS, Spec, assert_close_to_eager, eager, fused_kwargs, make

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

@contextlib.contextmanager
def kernel_launches():
    """The grids of the Triton kernel's launches inside the block: planned (the eager path's launch
    plans) or not, every launch indexes the module's kernel by its grid."""
    kernel, grids = tk.qk_norm_rope_kernel, []

    class Counting:
        def __getitem__(self, grid):
            grids.append(grid)
            return kernel[grid]

    with mock.patch.object(tk, "qk_norm_rope_kernel", Counting()):
        yield grids


# The kernel sums squares in another order than torch (float32: a few ulps per term) and rounds
# the same values to nearest even (16-bit: a flipped tie is one unit, RoPE's sum carries two).
KERNEL_UNITS, KERNEL_F32_REL = 4.0, 1e-5


@pytest.mark.parametrize("name", sorted(SPECS))
def test_matches_eager_hf_code(name):
    spec = SPECS[name]
    q, k, qw, kw, cos, sin = make(spec, device="cuda")
    with kernel_launches() as launches:
        qo, ko = qkfuse.qk_norm_rope(q, k, qw, kw, cos, sin, **fused_kwargs(spec))
    assert len(launches) == 1
    rq, rk = eager(spec, q, k, qw, kw, cos, sin)
    assert_close_to_eager(qo.transpose(1, 2), rq, KERNEL_UNITS, KERNEL_F32_REL)
    assert_close_to_eager(ko.transpose(1, 2), rk, KERNEL_UNITS, KERNEL_F32_REL)
    # the transposed [B, H, S, D] view, and one tensor alone
    qt, kt = q.transpose(1, 2), k.transpose(1, 2)
    qo2, ko2 = qkfuse.qk_norm_rope(qt, kt, qw, kw, cos.unsqueeze(1), sin.unsqueeze(1), **fused_kwargs(spec))
    assert qo2.stride() == qt.stride()
    assert_close_to_eager(qo2, rq, KERNEL_UNITS, KERNEL_F32_REL)
    assert_close_to_eager(ko2, rk, KERNEL_UNITS, KERNEL_F32_REL)
    assert_close_to_eager(qkfuse.norm_rope(q, qw, cos, sin, **fused_kwargs(spec)).transpose(1, 2), rq,
                          KERNEL_UNITS, KERNEL_F32_REL)


def test_direct_launch_skips_the_dispatcher():
    q, k, qw, kw, cos, sin = make(SPECS["qwen3_bf16"], device="cuda")
    qkfuse.qk_norm_rope(q, k, qw, kw, cos, sin)  # compile the kernel outside the profile
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        qkfuse.qk_norm_rope(q, k, qw, kw, cos, sin)
    assert not any("qkfuse::" in e.name for e in prof.events())


def test_autograd_uses_the_reference_on_cuda():
    q, k, qw, kw, cos, sin = make(SPECS["qwen3_fp32"], device="cuda")
    q.requires_grad_()
    with kernel_launches() as launches:
        qo, _ = qkfuse.qk_norm_rope(q, k, qw, kw, cos, sin)
    assert launches == [] and qo.requires_grad
    qo.sum().backward()
    assert q.grad is not None and q.grad.isfinite().all()


def test_compile_fullgraph_on_cuda():
    spec = SPECS["qwen3_bf16"]
    q, k, qw, kw, cos, sin = make(spec, device="cuda")

    def fn(q, k):
        return qkfuse.qk_norm_rope(q, k, qw, kw, cos, sin)

    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    ref = fn(q, k)
    out = torch.compile(fn, backend=capture, fullgraph=True)(q, k)
    assert any(n.target is torch.ops.qkfuse.qk_norm_rope.default for n in graphs[0].graph.nodes)
    assert all(torch.equal(o, r) for o, r in zip(out, ref))  # the op's CUDA kernel is the same kernel
    torch._dynamo.reset()
    out = torch.compile(fn, fullgraph=True)(q, k)
    assert all(torch.equal(o, r) for o, r in zip(out, ref))


def test_cuda_graph_capture():
    """Capturable: no host sync in the direct path (positions are range-checked on the device while
    capturing), and replays follow new input values."""
    g = torch.Generator().manual_seed(0)
    T, D = 16, 128
    q = torch.randn(T, 8, D, generator=g).bfloat16().cuda()
    k = torch.randn(T, 2, D, generator=g).bfloat16().cuda()
    qw, kw = (1 + 0.3 * torch.randn(2, D, generator=g)).bfloat16().cuda()
    angle = torch.rand(64, D // 2, generator=g) * 6.3
    cache = torch.cat((angle.cos(), angle.sin()), -1).cuda()
    positions = torch.randint(0, 64, (T,), generator=g).cuda()

    def fn():
        return qkfuse.qk_norm_rope(q, k, qw, kw, cos_sin_cache=cache, positions=positions)

    ref = fn()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    graph.replay()
    torch.cuda.synchronize()
    assert all(torch.equal(o, r) for o, r in zip(out, ref))
    positions.copy_(torch.randint(0, 64, (T,), generator=g).cuda())
    graph.replay()
    assert all(torch.equal(o, r) for o, r in zip(out, fn()))


def test_positions_out_of_range_raise_before_any_launch():
    q, k = torch.randn(4, 2, 64, device="cuda"), torch.randn(4, 1, 64, device="cuda")
    cache = torch.randn(10, 64, device="cuda")
    for bad in (-1, 10):
        positions = torch.tensor([0, 3, bad, 9], device="cuda")
        with kernel_launches() as launches, pytest.raises(ValueError, match=r"positions must be in"):
            qkfuse.qk_norm_rope(q, k, None, None, cos_sin_cache=cache, positions=positions)
        assert launches == []
        with pytest.raises(ValueError, match=r"positions must be in"):
            torch.ops.qkfuse.qk_norm_rope_cached(q, k, None, None, cache, positions[:, None], 1e-6, 1e-6, "rms", 0.0,
                                                 True, torch.float32, torch.float32, torch.float32, 64, False)
    torch.cuda.synchronize()  # no device-side error either


@pytest.mark.parametrize("head_dim, rotary_dim", [(64, 64), (80, 80), (96, 48), (128, 32), (256, 64), (40, 40)])
def test_odd_head_dims_and_tails(head_dim, rotary_dim):
    spec = Spec(batch=1, seq=33, q_heads=5, k_heads=1, head_dim=head_dim, rotary_dim=rotary_dim)
    q, k, qw, kw, cos, sin = make(spec, seed=head_dim, device="cuda")
    qo, ko = qkfuse.qk_norm_rope(q, k, qw, kw, cos, sin)
    rq, rk = eager(spec, q, k, qw, kw, cos, sin)
    assert_close_to_eager(qo.transpose(1, 2), rq, KERNEL_UNITS)
    assert_close_to_eager(ko.transpose(1, 2), rk, KERNEL_UNITS)


@pytest.mark.parametrize("q_heads, k_heads, head_dim, rotary_dim", [(32, 8, 128, 128), (48, 8, 128, 128),
                                                                   (16, 16, 128, 64), (5, 1, 80, 80), (64, 8, 128, 128)])
@pytest.mark.parametrize("interleaved", [False, True])
def test_across_heads_kernel_matches_the_reference(q_heads, k_heads, head_dim, rotary_dim, interleaved):
    """The norm across heads (OLMo2 / OLMoE / MiniMax-M2 shapes, one program per token holding all
    heads, up to 64 x 128): the compiled kernel against the reference, bf16 with float32 cos/sin."""
    g = torch.Generator(device="cuda").manual_seed(q_heads + head_dim)
    B, S = 2, 37
    q, k = (torch.randn(B, S, h, head_dim, device="cuda", generator=g).bfloat16() for h in (q_heads, k_heads))
    qw, kw = (1 + 0.3 * torch.randn(h * head_dim, device="cuda", generator=g).bfloat16() for h in (q_heads, k_heads))
    ang = torch.rand(B, S, rotary_dim, device="cuda", generator=g) * 6.3
    cos, sin = ang.cos(), ang.sin()
    kw_ = dict(across_heads=True, cast_before_weight=False, interleaved=interleaved, rotary_dim=rotary_dim)
    with kernel_launches() as launches:
        qo, ko = qkfuse.qk_norm_rope(q, k, qw, kw, cos, sin, **kw_)
    assert len(launches) == 1
    recipe = qkfuse.functional._recipe(q, [cos, sin], rotary_dim, interleaved, "rms", 0.0, False, None, None, None,
                                       True)
    c, s_ = cos.unsqueeze(-2), sin.unsqueeze(-2)
    assert_close_to_eager(qo, norm_rope_reference(q, qw, c, s_, 1e-6, recipe), KERNEL_UNITS)
    assert_close_to_eager(ko, norm_rope_reference(k, kw, c, s_, 1e-6, recipe), KERNEL_UNITS)


# ---- the bad-input fuzz, on CUDA ----------------------------------------------------------------


def test_every_defect_on_every_entry_cuda():
    for c in fuzz.one_defect_cases(layouts=("thd", "bshd", "bhsd")):
        fuzz.check(c, device="cuda", exact=False)


# Each new (head_dim, rotary_dim, recipe, layout) compiles a kernel (~1 s): 150 cases, a few minutes.
@settings(max_examples=150, **fuzz._SETTINGS)
@given(c=fuzz.cases(head_dims=(16, 24, 40, 64, 128), max_seq=9))
def test_fuzz_error_or_reference_cuda(c):
    fuzz.check(c, device="cuda", exact=False)


def test_reference_agrees_across_devices():
    """The oracle itself: the reference on CUDA equals the reference on CPU for a valid case."""
    spec = SPECS["partial_interleaved_gemma_fp16"]
    args = make(spec, seed=12)
    a = fuzz.default_recipe(spec.dtype, [spec.dtype], 16, "rms", 1.0, True)
    q, _, qw, _, cos, sin = args
    cos4, sin4 = cos.unsqueeze(2), sin.unsqueeze(2)
    cpu = norm_rope_reference(q, qw, cos4, sin4, 1e-6, a)
    gpu = norm_rope_reference(q.cuda(), qw.cuda(), cos4.cuda(), sin4.cuda(), 1e-6, a)
    assert_close_to_eager(gpu.cpu(), cpu, 1.0)
