"""qkfuse adds no graph break: on the CLI's tiny HF models, Dynamo splits the model into as many
graphs, with as many breaks, under the qkfuse backend as without it (torch._dynamo.explain), and
fullgraph=True works with qkfuse wherever it works with Inductor."""

from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.utils import counters

import qkfuse
from tests.conftest import UNIT_ROUNDOFF

pytest.importorskip("transformers")
from qkfuse.cli import MODELS, build  # noqa: E402

REL_TOL = 64 * UNIT_ROUNDOFF[torch.float32]  # Inductor reorders float32 sums; a wrong result is O(1) off


def model_and_ids(name):
    model = build(name, torch.float32, "cpu")
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    return model, ids


def counting(backend):
    """backend, and the list of graphs Dynamo handed it."""
    graphs = []

    def compile_graph(gm, example_inputs, **kw):
        graphs.append(gm)
        return backend(gm, example_inputs, **kw)

    return compile_graph, graphs


def assert_logits_close(logits, ref):
    assert float((logits - ref).abs().max()) <= REL_TOL * float(ref.abs().max())


@pytest.mark.parametrize("name", list(MODELS))
def test_same_graphs_and_breaks_as_without_qkfuse(name):
    model, ids = model_and_ids(name)
    with torch.no_grad():
        without = torch._dynamo.explain(model)(ids)
        breaks_without = dict(counters["graph_break"])
        torch._dynamo.reset()
        counters.clear()
        backend, graphs = counting(qkfuse.qkfuse_backend)
        logits = torch.compile(copy.deepcopy(model), backend=backend)(ids).logits
        ref = model(ids).logits
    assert len(graphs) == without.graph_count
    assert dict(counters["graph_break"]) == breaks_without  # the same breaks, for the same reasons
    assert sum(breaks_without.values()) == without.graph_break_count
    assert counters["qkfuse"]["norm_rope_sites"] == 2 * model.config.num_hidden_layers  # the pass fused
    assert_logits_close(logits, ref)


@pytest.mark.parametrize("name", list(MODELS))
def test_fullgraph_works_where_it_works_for_inductor(name):
    model, ids = model_and_ids(name)
    with torch.no_grad():
        ref = model(ids).logits
        try:
            assert_logits_close(torch.compile(copy.deepcopy(model), backend="inductor", fullgraph=True)(ids).logits, ref)
        except torch._dynamo.exc.Unsupported:
            pytest.skip(f"{name} does not compile with fullgraph=True under Inductor either")
        torch._dynamo.reset()
        counters.clear()
        logits = torch.compile(copy.deepcopy(model), backend="qkfuse", fullgraph=True)(ids).logits
    assert_logits_close(logits, ref)
    assert counters["qkfuse"]["norm_rope_sites"] == 2 * model.config.num_hidden_layers
