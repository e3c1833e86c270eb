"""How qkfuse composes with torch.compile's arguments and state: mode= together with options=,
optimize twice, torch._dynamo.reset()."""

from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.utils import counters
from torch._inductor import list_mode_options

import qkfuse
from qkfuse.backend import _compile_kwargs
from qkfuse.passes.manager import QKFusePass
from tests.conftest import UNIT_ROUNDOFF
from tests.test_backend import Attention, inputs
from tests.test_training import Stack

MODE = "max-autotune-no-cudagraphs"
REL_TOL = 64 * UNIT_ROUNDOFF[torch.float32]  # Inductor reorders float32 sums; a wrong result is O(1) off


def assert_close(actual, expected):
    assert float((actual - expected).abs().max()) <= REL_TOL * float(expected.abs().max())


@pytest.fixture
def inductor_patches(monkeypatch):
    """The config patches each compile_fx call of the qkfuse backend gets."""
    from torch._inductor import compile_fx as compile_fx_module

    seen = []
    real = compile_fx_module.compile_fx

    def spy(gm, example_inputs, config_patches=None, **kw):
        if config_patches:  # compile_fx calls itself again, without patches, once they are applied
            seen.append(dict(config_patches))
        return real(gm, example_inputs, config_patches=config_patches, **kw)

    monkeypatch.setattr(compile_fx_module, "compile_fx", spy)
    return seen


def test_mode_and_options_become_one_options_dict():
    """torch.compile raises on mode= with options=; qkfuse passes the merge as options alone."""
    kw = _compile_kwargs(None, MODE, {"qkfuse.kernels": "reference", "max_autotune": False})
    assert "mode" not in kw
    assert kw["options"] == {**list_mode_options(MODE), "qkfuse.kernels": "reference", "max_autotune": False}
    assert _compile_kwargs(None, "reduce-overhead", None)["mode"] == "reduce-overhead"
    assert "options" not in _compile_kwargs(None, "reduce-overhead", None)
    assert _compile_kwargs(None, None, {"qkfuse.enable": False})["options"] == {"qkfuse.enable": False}
    with pytest.raises(RuntimeError, match="Unrecognized mode"):
        qkfuse.optimize(Stack(), mode="fastest", options={"qkfuse.kernels": "reference"})


def test_optimize_with_mode_and_options_compiles_and_fuses(inductor_patches):
    torch.manual_seed(0)
    model = Stack().eval()
    eager = copy.deepcopy(model)
    qkfuse.optimize(model, mode=MODE, options={"qkfuse.kernels": "reference"})
    with torch.no_grad():
        assert_close(model(*inputs()), eager(*inputs()))
    assert counters["qkfuse"]["norm_rope_calls"] >= 1
    assert inductor_patches, "the qkfuse backend did not compile"
    for patches in inductor_patches:
        assert all(patches[k] == v for k, v in list_mode_options(MODE).items())  # the mode reached Inductor
        assert isinstance(patches["post_grad_custom_pre_pass"], QKFusePass)
        assert patches["post_grad_custom_pre_pass"].options.kernels == "reference"


def test_fuse_with_mode_and_options(inductor_patches):
    torch.manual_seed(0)
    attention = Attention().eval()
    fused = qkfuse.fuse(mode="reduce-overhead", options={"qkfuse.kernels": "reference"})(copy.deepcopy(attention))
    with torch.no_grad():
        assert_close(fused(*inputs()), attention(*inputs()))
    assert counters["qkfuse"]["norm_rope_calls"] == 1
    assert inductor_patches[0]["triton.cudagraphs"] is True  # reduce-overhead's option (CPU: no graphs)


def test_optimize_twice_is_a_no_op():
    model = Stack().eval()
    assert qkfuse.optimize(model) is model
    compiled = [layer._compiled_call_impl for layer in model.layers]
    assert all(c is not None for c in compiled)
    with torch.no_grad():
        out = model(*inputs())
    graphs, calls = counters["stats"]["unique_graphs"], counters["qkfuse"]["norm_rope_calls"]
    assert calls >= 1

    assert qkfuse.optimize(model, options={"qkfuse.enable": False}) is model
    assert [layer._compiled_call_impl for layer in model.layers] == compiled  # not wrapped again
    with torch.no_grad():
        assert torch.equal(model(*inputs()), out)
    assert counters["stats"]["unique_graphs"] == graphs  # nothing recompiled
    assert counters["qkfuse"]["norm_rope_calls"] == calls


def test_dynamo_reset_resets_the_backend_and_a_recompile_runs_the_pass_again(monkeypatch):
    resets = []
    real_reset = qkfuse.qkfuse_backend.reset
    monkeypatch.setattr(qkfuse.qkfuse_backend, "reset", lambda: (resets.append(1), real_reset()))
    model = Attention().eval()
    compiled = torch.compile(model, backend="qkfuse")
    with torch.no_grad():
        compiled(*inputs())
        assert counters["qkfuse"]["norm_rope_calls"] == 1
        counters.clear()
        compiled(*inputs())
        assert counters["qkfuse"]["norm_rope_calls"] == 0  # served by Dynamo's cache: no compile

        torch._dynamo.reset()
        assert resets == [1]
        assert_close(compiled(*inputs()), model(*inputs()))
    assert counters["qkfuse"]["norm_rope_calls"] == 1  # compiled again, and the pass ran again
