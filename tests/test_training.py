"""Training: a model compiled with the qkfuse backend trains like eager (the pass leaves training
graphs alone: their norm/RoPE intermediates are saved for backward); optimize and fuse warn once
about a training-mode model; explain reports what the caller's grad mode gets."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch._dynamo.utils import counters

import qkfuse
from tests.conftest import UNIT_ROUNDOFF
from tests.test_backend import Attention, inputs

# Inductor reorders float32 sums (measured: up to 15 units of roundoff relative to the largest
# value, over the losses and gradients below); a wrong gradient is off by O(1).
REL_TOL = 64 * UNIT_ROUNDOFF[torch.float32]


def assert_close(actual, expected, what):
    err = float((actual - expected).abs().max())
    tol = REL_TOL * float(expected.abs().max())
    assert err <= tol, f"{what}: max |compiled - eager| = {err:.3g} > {tol:.3g}"


def assert_same_training_step(eager, compiled_model, run):
    """run(model) -> loss; compares the loss and every parameter's gradient."""
    loss_eager, loss_compiled = run(eager), run(compiled_model)
    loss_eager.backward()
    loss_compiled.backward()
    assert_close(loss_compiled.detach(), loss_eager.detach(), "loss")
    for (name, p_eager), (_, p_compiled) in zip(eager.named_parameters(), compiled_model.named_parameters()):
        assert p_eager.grad is not None and p_compiled.grad is not None, name
        assert_close(p_compiled.grad, p_eager.grad, f"grad of {name}")


def assert_refused_not_fused():
    assert counters["qkfuse"]["norm_rope_calls"] == 0
    assert counters["qkfuse"]["norm_rope_refused"] >= 2  # q and k of the attention saw the pass


def test_attention_training_step_matches_eager():
    torch.manual_seed(0)
    eager = Attention().train()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend="qkfuse")
    h, cos, sin = inputs()
    h_eager, h_compiled = h.clone().requires_grad_(), h.clone().requires_grad_()
    target = torch.randn(h.shape, generator=torch.Generator().manual_seed(1))

    def run(model):
        forward, x = (compiled, h_compiled) if model is compiled_model else (eager, h_eager)
        return torch.nn.functional.mse_loss(forward(x, cos, sin), target)

    assert_same_training_step(eager, compiled_model, run)
    assert_close(h_compiled.grad, h_eager.grad, "grad of the input")
    assert_refused_not_fused()


def test_hf_qwen3_training_step_matches_eager():
    pytest.importorskip("transformers")
    from qkfuse.cli import build

    eager = build("qwen3", torch.float32, "cpu").train()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend="qkfuse")
    ids = torch.randint(0, eager.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))

    def run(model):
        return (compiled if model is compiled_model else eager)(ids, labels=ids).loss

    assert_same_training_step(eager, compiled_model, run)
    assert_refused_not_fused()
    assert counters["qkfuse"]["norm_rope_refused"] == 2 * eager.config.num_hidden_layers


class Stack(torch.nn.Module):
    """Two attention blocks in a ModuleList: optimize() compiles each as a region."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([Attention(), Attention()])

    def forward(self, h, cos, sin):
        for layer in self.layers:
            h = h + layer(h, cos, sin)
        return h


def training_warnings(call):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    return [w for w in caught if "training mode" in str(w.message)]


@pytest.mark.parametrize("entry", ["optimize", "fuse"])
def test_training_mode_warns_once(entry):
    call = getattr(qkfuse, entry)
    caught = training_warnings(lambda: call(Stack().train()))
    assert len(caught) == 1  # one warning for the call, not one per compiled region
    msg = str(caught[0].message)
    assert f"qkfuse.{entry}" in msg and "grad enabled" in msg
    assert "model.eval()" in msg and "torch.no_grad()" in msg and "torch.inference_mode()" in msg
    assert caught[0].filename == __file__  # points at the caller's line


def test_eval_mode_functions_and_classes_do_not_warn():
    assert training_warnings(lambda: qkfuse.optimize(Stack().eval())) == []
    assert training_warnings(lambda: qkfuse.fuse(Stack().eval())) == []
    trained = Stack().train()
    assert training_warnings(lambda: qkfuse.fuse(lambda h, cos, sin: trained(h, cos, sin))) == []
    assert training_warnings(lambda: qkfuse.fuse(type("FusedAttention", (Attention,), {}))) == []
    optimized = qkfuse.optimize(Stack().eval())
    optimized.train()
    assert training_warnings(lambda: qkfuse.optimize(optimized)) == []  # a no-op compiles nothing


def test_explain_honours_the_callers_grad_mode():
    torch.manual_seed(0)
    model = Attention().eval()  # parameters require grad
    assert all(p.requires_grad for p in model.parameters())
    with torch.enable_grad():
        training = qkfuse.explain(model, *inputs())
    assert len(training.sites) == 2 and training.fused == []  # saved for backward: refused
    assert all(s.reason for s in training.refused)
    with torch.no_grad():
        inference = qkfuse.explain(model, *inputs())
    assert len(inference.fused) == 2 and inference.refused == []
    with torch.inference_mode():
        assert len(qkfuse.explain(model, *inputs()).fused) == 2
