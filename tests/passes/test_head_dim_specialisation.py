"""A symbolic head_dim (``dynamic=True`` on raw ``[B, S, H, D]`` inputs) is specialised by the pass.

The pass guards head_dim to its value and fuses the site. The guard joins Dynamo's guards: a new
head size recompiles once (the second graph is specialised to it), and batch and sequence changes
reuse the compiled graph. A head_dim whose symbol also sizes a batch dim (Dynamo's duck sizing
gives equal sizes one symbol) or that the user marked dynamic is left symbolic, and the site is
refused with the hint.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import qkfuse
from tests import graph_harness
from tests.graph_harness import run_pass, scale_error
from tests.passes.test_fuse import qk

HQ, HK = 4, 2


def make_inputs(B, S, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    ang = torch.rand(B, S, D // 2, generator=g) * 6.3
    return (r(B, S, HQ, D), r(B, S, HK, D), 1 + 0.2 * r(D), 1 + 0.2 * r(D),
            torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1))


def test_pass_specialises_a_symbolic_head_dim_and_fuses():
    run = run_pass(qk, *make_inputs(3, 5, 64), dynamic=True)
    assert [r.fused for r in run.records] == [True, True], run.records
    assert run.count("qkfuse.qk_norm_rope") == 1
    assert run.records[0].shape[-1] == 64
    for out, ref in zip(run.out, run.ref):
        assert scale_error(out, ref) <= 1e-6


def test_head_dim_sharing_a_batch_symbol_is_refused_with_a_hint():
    run = run_pass(qk, *make_inputs(16, 5, 16), dynamic=True)  # B == D: one symbol for both
    assert len(run.refused) == 2 and not run.fused
    assert all("head_dim is symbolic" in r.reason and "mark_static" in r.reason for r in run.refused)
    for out, ref in zip(run.out, run.ref):
        assert scale_error(out, ref) == 0.0


def test_head_dim_marked_dynamic_by_the_user_is_refused_with_a_hint():
    """torch._dynamo.mark_dynamic says the size must stay symbolic: specialising it would fail the
    compile, so the pass leaves it (and the site) alone."""
    args = make_inputs(3, 5, 64)
    for t in args:
        torch._dynamo.mark_dynamic(t, t.dim() - 1)
    run = run_pass(qk, *args)
    assert len(run.refused) == 2 and all("head_dim is symbolic" in r.reason for r in run.refused)
    for out, ref in zip(run.out, run.ref):
        assert scale_error(out, ref) == 0.0


class CountingBackend:
    def __init__(self):
        self.compiles = 0

    def __call__(self, gm, example_inputs, **kw):
        self.compiles += 1
        return qkfuse.qkfuse_backend(gm, example_inputs, **kw)


def test_a_new_head_dim_recompiles_once_and_batch_or_length_changes_do_not():
    backend = CountingBackend()
    compiled = torch.compile(qk, backend=backend, dynamic=True)
    compiles = []
    with torch.no_grad():
        # sizes all distinct at each first trace: duck sizing would tie equal ones together
        for B, S, D in [(3, 5, 64), (6, 9, 64), (3, 5, 128), (7, 11, 128), (6, 9, 64)]:
            args = make_inputs(B, S, D, seed=B)
            for out, ref in zip(compiled(*args), qk(*args)):
                assert float((out - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
            compiles.append(backend.compiles)
    assert compiles == [1, 1, 2, 2, 2]
    c = counters["qkfuse"]
    assert c["norm_rope_calls"] == 2 and c["norm_rope_sites"] == 4 and c["norm_rope_refused"] == 0


def test_specialised_head_dim_is_a_constant_of_the_triton_kernel(monkeypatch):
    """On the CUDA splice path the specialised head_dim reaches the kernel as the constexpr it needs;
    the other sizes stay symbolic."""
    pytest.importorskip("triton")
    from torch._guards import detect_fake_mode
    from torch._subclasses.fake_tensor import FakeTensorMode

    def as_fake_cuda_keeping_symbols(gm):  # graph_harness._as_fake_cuda, in the graph's ShapeEnv
        vals = [n.meta["val"] for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)]
        mode = FakeTensorMode(shape_env=detect_fake_mode(vals).shape_env)
        for n in gm.graph.nodes:
            v = n.meta.get("val")
            if isinstance(v, torch.Tensor):
                with mode:
                    n.meta["val"] = torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device="cuda")
        return mode

    monkeypatch.setattr(graph_harness, "_as_fake_cuda", as_fake_cuda_keeping_symbols)
    args = make_inputs(3, 5, 64)
    for t in args:
        torch._dynamo.maybe_mark_dynamic(t, t.dim() - 1)  # head_dim
    run = graph_harness.run_pass_as_cuda(qk, *args)
    assert [r.reason for r in run.fused] == ["triton", "triton"]
    (call,) = run.kernel_calls()
    assert call.kwargs["kwargs"]["HEAD_DIM"] == 64 and call.kwargs["kwargs"]["ROT_DIM"] == 64


def test_automatic_dynamic_head_dim_is_specialised_too():
    """dynamic=None: the second head size makes head_dim dynamic (automatic dynamic shapes); the pass
    specialises it back, and both compiles fuse."""
    backend = CountingBackend()
    compiled = torch.compile(qk, backend=backend)
    with torch.no_grad():
        for D in (64, 128):
            args = make_inputs(3, 5, D)
            for out, ref in zip(compiled(*args), qk(*args)):
                assert float((out - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
    assert backend.compiles == 2
    assert counters["qkfuse"]["norm_rope_calls"] == 2 and counters["qkfuse"]["norm_rope_refused"] == 0
