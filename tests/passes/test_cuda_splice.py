"""The CUDA splice path on CPU: the pass rewrites a post-grad graph whose values are fake CUDA
tensors, tracing the Triton kernel through ``wrap_triton`` (what Inductor then launches directly),
and Inductor's reinplace pass decides what it clones. GPU runs of the same code are in tests/gpu/."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from tests.graph_harness import run_pass_as_cuda  # noqa: E402
from tests.passes.test_pairing import two_layers  # noqa: E402
from tests.passes.test_pairing import make_inputs as layer_inputs  # noqa: E402
from tests.patterns.test_kv_cache import make_inputs as decode_inputs  # noqa: E402
from tests.patterns.test_kv_cache import step  # noqa: E402


def _cloned(call) -> list[str]:
    return list(call.kwargs["tensors_to_clone"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_q_k_site_is_one_kernel_call_that_clones_nothing(dtype):
    run = run_pass_as_cuda(two_layers, *layer_inputs(dtype))
    calls = run.kernel_calls()
    assert len(run.fused) == 3 and all(r.reason == "triton" for r in run.fused)
    assert len(calls) == 2  # layer 0's k alone, layer 1's q and k
    # outputs are fresh buffers: reinplacing leaves nothing to clone
    assert all(_cloned(c) == [] for c in calls), [_cloned(c) for c in calls]
    # only the refused site (layer 0's q) keeps its norm
    assert sum(n.target is torch.ops.aten.rsqrt.default for n in run.rewritten.graph.nodes) == 1


@pytest.mark.parametrize("B,S", [(1, 1), (4, 1), (2, 3)])
def test_cache_write_is_in_place_in_the_graph_inputs(B, S):
    """k and v are stored by the kernel into the cache inputs: the kernel's cache arguments are the
    placeholders themselves, they are not cloned, and Inductor's reinplace pass drops the graph's
    write-backs (copy_ of the kernel's outputs into the inputs): nothing is copied."""
    run = run_pass_as_cuda(step, *decode_inputs(B, S, torch.bfloat16))
    (call,) = run.kernel_calls()
    kw = call.kwargs["kwargs"]
    assert kw["ko_ptr"].op == "placeholder" and kw["vo_ptr"].op == "placeholder"
    assert kw["HAS_V"] and kw["K_POS_AXIS"] >= 0
    assert _cloned(call) == []  # not the caches, not the positions
    assert not any(n.target is torch.ops.aten.copy_.default for n in run.rewritten.graph.nodes)
    assert not any(n.target in (torch.ops.aten.index_put.default, torch.ops.aten.index_copy.default)
                   for n in run.rewritten.graph.nodes)


def test_kernel_takes_the_graph_buffers_not_views_of_them():
    """HF's cos.unsqueeze(1) and q's transpose are same-pointer views: the kernel gets the graph's
    own buffers (placeholders) as its pointers, and the pointers it never reads (no bias here) are q's
    buffer too, so Inductor's wrapper builds no view (reinterpret_tensor) per call for them."""
    from tests.patterns.test_norm_rope_negative import llama_norm, rope

    def site(q, k, qw, kw, cos, sin):
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        return rope(llama_norm(q, qw).transpose(1, 2), c, s), rope(llama_norm(k, kw).transpose(1, 2), c, s)

    g = torch.Generator().manual_seed(5)
    ang = torch.rand(2, 7, 8, generator=g) * 6.3
    args = (torch.randn(2, 7, 4, 16, generator=g).bfloat16(), torch.randn(2, 7, 2, 16, generator=g).bfloat16(),
            (1 + 0.2 * torch.randn(16, generator=g)).bfloat16(), (1 + 0.2 * torch.randn(16, generator=g)).bfloat16(),
            torch.cat([ang.cos()] * 2, -1).bfloat16(), torch.cat([ang.sin()] * 2, -1).bfloat16())
    run = run_pass_as_cuda(site, *args)
    (call,) = run.kernel_calls()
    kw = call.kwargs["kwargs"]
    pointers = ("q_ptr", "k_ptr", "qw_ptr", "kw_ptr", "cos_ptr", "sin_ptr", "qb_ptr", "kb_ptr")
    assert all(kw[name].op == "placeholder" for name in pointers), {n: kw[n].format_node() for n in pointers}
    assert kw["qb_ptr"] is kw["q_ptr"] and kw["kb_ptr"] is kw["q_ptr"]
    assert not kw["HAS_BIAS"]
    # the strides are the views': cos is read per token, shared by the heads
    assert kw["c_sh"] == 0 and kw["s_sh"] == 0
