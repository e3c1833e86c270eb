"""Dynamic shapes: batch and sequence symbolic (``dynamic=True`` or ``torch._dynamo.mark_dynamic``).

One compile serves every length (no recompiles, counted by a backend wrapper around
``qkfuse.qkfuse_backend``), the compiled graph is symbolic in those dims, the sites are still fused
(``counters["qkfuse"]``) and the outputs equal eager. head_dim stays static here (the projections
are viewed with a Python int); a symbolic head_dim is another matter (refused with a hint).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.utils import counters

import qkfuse
from tests.test_backend import D, Attention

HIDDEN = 64


class CountingBackend:
    """qkfuse's backend, counting the graphs it compiles and whether their inputs are symbolic."""

    def __init__(self, **options):
        self.options = options or None
        self.compiles = 0  # backend calls (a Dynamo restart of the same frame calls it again)
        self.symbolic = []

    def __call__(self, gm, example_inputs, **kw):
        self.compiles += 1
        self.symbolic.append(any(isinstance(n.meta.get("example_value"), torch.SymInt)
                                 for n in gm.graph.nodes if n.op == "placeholder"))
        return qkfuse.qkfuse_backend(gm, example_inputs, options=self.options, **kw)


def attn_inputs(batch, seq, seed=0):
    g = torch.Generator().manual_seed(seed)
    ang = torch.rand(batch, seq, D // 2, generator=g) * 6.3
    return (torch.randn(batch, seq, HIDDEN, generator=g), torch.cat([ang.cos()] * 2, -1),
            torch.cat([ang.sin()] * 2, -1))


def assert_close(out, ref, rel=1e-5):
    err, scale = float((out - ref).abs().max()), float(ref.abs().max())
    assert err <= rel * scale, (err, scale)


# (batch, seq): the first shape compiles, the others must reuse it (sizes >= 2: 0 and 1 specialize)
SHAPES = [(2, 7), (2, 12), (3, 5), (4, 16)]


def mark(*tensors):
    for t in tensors:
        torch._dynamo.mark_dynamic(t, 0)
        torch._dynamo.mark_dynamic(t, 1)
    return tensors


@pytest.mark.parametrize("how", ["dynamic=True", "mark_dynamic"])
def test_attention_one_compile_for_every_batch_and_length(how):
    torch.manual_seed(0)
    m = Attention().eval()
    backend = CountingBackend()
    c = torch.compile(m, backend=backend, dynamic=True if how == "dynamic=True" else None)
    with torch.no_grad():
        for i, (b, s) in enumerate(SHAPES):
            x = attn_inputs(b, s, seed=i)
            if how == "mark_dynamic":
                mark(*x)
            assert_close(c(*x), m(*x))
            if i == 0:
                assert counters["qkfuse"]["norm_rope_calls"] == 1  # q and k fused in one call
    assert backend.compiles == 1, backend.compiles  # no recompile across batch sizes and lengths
    assert backend.symbolic == [True] and counters["stats"]["unique_graphs"] == 1
    assert counters["qkfuse"]["norm_rope_calls"] == 1 and counters["qkfuse"]["norm_rope_sites"] == 2
    assert counters["qkfuse"]["norm_rope_refused"] == 0


def test_attention_automatic_dynamic_recompiles_once_then_fuses_the_dynamic_graph():
    """The default (dynamic=None): the second length recompiles once with a symbolic length (Dynamo's
    automatic dynamic, per dim: a new batch size would mark that dim too), fused as well; later
    lengths reuse it."""
    torch.manual_seed(0)
    m = Attention().eval()
    backend = CountingBackend()
    c = torch.compile(m, backend=backend)
    with torch.no_grad():
        for i, (b, s) in enumerate([(2, 7), (2, 12), (2, 5), (2, 16)]):
            x = attn_inputs(b, s, seed=i)
            assert_close(c(*x), m(*x))
    assert backend.compiles == 2 and backend.symbolic == [False, True], (backend.compiles, backend.symbolic)
    assert counters["qkfuse"]["norm_rope_calls"] == 2 and counters["qkfuse"]["norm_rope_refused"] == 0


def test_explain_dynamic_reports_symbolic_sizes_fused():
    m = Attention().eval()
    with torch.no_grad():
        report = qkfuse.explain(m, *attn_inputs(2, 9), dynamic=True)
    assert len(report.fused) == 2 and not report.refused, report.table()
    assert any(not isinstance(d, int) for d in report.fused[0].shape), report.table()  # symbolic batch / seq
    assert report.fused[0].shape[-1] == D  # head_dim static


LAYERS = 2


def qwen3():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.Qwen3Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=128, use_cache=False)
    return transformers.Qwen3ForCausalLM(cfg).eval()


def ids(batch, seq, seed=0):
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.slow
@pytest.mark.parametrize("how", ["dynamic=True", "mark_dynamic"])
def test_hf_qwen3_whole_model_one_compile_for_every_batch_and_length(how):
    model = qwen3()
    backend = CountingBackend()
    c = torch.compile(model, backend=backend, dynamic=True if how == "dynamic=True" else None)
    with torch.no_grad():
        for i, (b, s) in enumerate(SHAPES):
            x = ids(b, s, seed=i)
            if how == "mark_dynamic":
                mark(x)
            assert_close(c(x).logits, model(x).logits)
            if i == 0:
                first = backend.compiles
    # With dynamic=True the first compile is tried twice: Dynamo lifts the module's float scalars
    # (e.g. the embedding's norm_type) to tensors, specializes them in AOT and restarts the frame.
    # That is one compile; what counts is that no later shape calls the backend again.
    assert backend.compiles == first and all(backend.symbolic), (first, backend.compiles, backend.symbolic)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    # every layer's q and k fused, in the one symbolic graph
    assert counters["qkfuse"]["norm_rope_calls"] == LAYERS
    assert counters["qkfuse"]["norm_rope_sites"] == 2 * LAYERS and counters["qkfuse"]["norm_rope_refused"] == 0


@pytest.mark.slow
def test_hf_qwen3_optimize_dynamic_regions():
    """qkfuse.optimize(dynamic=True): regional compile, one graph serves both layers and every length."""
    model = qwen3()
    eager = copy.deepcopy(model)
    qkfuse.optimize(model, dynamic=True)
    with torch.no_grad():
        for i, (b, s) in enumerate(SHAPES):
            x = ids(b, s, seed=i)
            assert_close(model(x).logits, eager(x).logits)
    assert counters["qkfuse"]["norm_rope_calls"] == 1  # one compile of the decoder layer, reused
    assert counters["qkfuse"]["norm_rope_sites"] == 2 and counters["qkfuse"]["norm_rope_refused"] == 0
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
