"""Fallbacks and off switches: without triton, CUDA or flashinfer the pass still runs and serves a
correct kernel; qkfuse.enable=False and QKFUSE_DISABLE=1 switch it off entirely, and the FX graph
cache key (the pass's uuid) says so."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch._dynamo.utils import counters

import qkfuse
from qkfuse.kernels.policy import KERNEL_CHOICES
from tests.conftest import UNIT_ROUNDOFF
from tests.test_backend import Attention, inputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REL_TOL = 64 * UNIT_ROUNDOFF[torch.float32]  # Inductor reorders float32 sums; a wrong result is O(1) off

# A fresh interpreter in which `import triton` and `import flashinfer` fail (None in sys.modules),
# set before torch or qkfuse is imported. Prints one JSON line.
NO_TRITON = textwrap.dedent("""
    import sys
    sys.modules["triton"] = None
    sys.modules["flashinfer"] = None
    import json
    import torch
    from torch._dynamo.utils import counters
    from torch._subclasses.fake_tensor import FakeTensorMode
    import qkfuse
    from qkfuse.kernels import KernelUnavailable, policy
    from qkfuse.ops.recipe import Recipe
    from tests.test_backend import Attention, inputs

    out = {"triton_available": policy.triton_available(), "cpu": {}}
    torch.manual_seed(0)
    model = Attention().eval()
    with torch.no_grad():
        ref = model(*inputs())
        for kernels in policy.KERNEL_CHOICES:
            torch._dynamo.reset()
            counters.clear()
            got = torch.compile(model, backend="qkfuse", options={"qkfuse.kernels": kernels})(*inputs())
            calls = counters["qkfuse"]["norm_rope_calls"]
            report = qkfuse.explain(model, *inputs(), options={"qkfuse.kernels": kernels})
            out["cpu"][kernels] = {
                "calls": calls,
                "rel_err": float((got - ref).abs().max() / ref.abs().max()),
                "reasons": sorted({s.reason for s in report.sites}),
                "fused": len(report.fused),
            }

    # CUDA without triton, decided on fake CUDA tensors (this build may have no CUDA at all)
    bf16 = torch.bfloat16
    recipe = Recipe(norm="rms", cast_before_weight=True, norm_dtype=bf16, rope_dtype=bf16, out_dtype=bf16,
                    rotary_dim=64)
    with FakeTensorMode():
        q = torch.empty(2, 8, 5, 64, dtype=bf16, device="cuda")
        k = torch.empty(2, 2, 5, 64, dtype=bf16, device="cuda")
        cos = torch.empty(2, 1, 5, 64, dtype=bf16, device="cuda")
    out["cuda_auto"] = list(policy.choose("auto", q, k, cos, recipe))
    try:
        policy.choose("triton", q, k, cos, recipe)
        out["cuda_triton"] = "no error"
    except KernelUnavailable as e:
        out["cuda_triton"] = str(e)
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def no_triton(tmp_path_factory):
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path_factory.mktemp("cache"))}  # cold: the pass runs
    proc = subprocess.run([sys.executable, "-c", NO_TRITON], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kernels", KERNEL_CHOICES)
def test_without_triton_every_choice_fuses_with_a_cpu_kernel(no_triton, kernels):
    """policy.py: on CPU every choice but reference (the reference op) serves what auto serves
    there, a plain-torch kernel; a GPU choice (triton, flashinfer) does not fail for want of it."""
    assert no_triton["triton_available"] is False
    run = no_triton["cpu"][kernels]
    assert run["calls"] == 1 and run["fused"] == 2  # q and k, in one call
    expected = ["reference op (cpu)"] if kernels == "reference" else no_triton["cpu"]["auto"]["reasons"]
    assert run["reasons"] == expected and expected[0].endswith("(cpu)")
    assert run["rel_err"] <= REL_TOL


def test_without_triton_cuda_sites_are_left_to_inductor_or_refused_clearly(no_triton):
    kernel, note = no_triton["cuda_auto"]
    assert kernel is None and "triton is not installed" in note  # auto: Inductor's own code, correct
    assert "triton is not installed" in no_triton["cuda_triton"] and "pip install triton" in no_triton["cuda_triton"]


def test_without_cuda_the_pass_serves_a_cpu_kernel():
    """This machine's build: the default compile fuses with a CPU kernel and matches eager."""
    torch.manual_seed(0)
    model = Attention().eval()
    with torch.no_grad():
        report = qkfuse.explain(model, *inputs())
        out, ref = torch.compile(model, backend="qkfuse")(*inputs()), model(*inputs())
    assert len(report.fused) == 2 and all(s.reason.endswith("(cpu)") for s in report.fused)
    assert float((out - ref).abs().max()) <= REL_TOL * float(ref.abs().max())


def compile_off(caplog, options=None):
    torch.manual_seed(0)
    model = Attention().eval()
    with torch.no_grad(), caplog.at_level(logging.DEBUG, logger="qkfuse"):
        report = qkfuse.explain(model, *inputs(), options=options)
        out, ref = torch.compile(model, backend="qkfuse", options=options)(*inputs()), model(*inputs())
    assert report.sites == []  # the pass did not look at the graph
    assert not any(k.startswith("norm_rope") and v for k, v in counters["qkfuse"].items())
    assert not [r for r in caplog.records if r.name == "qkfuse"]  # not even its DEBUG graph dump
    assert float((out - ref).abs().max()) <= REL_TOL * float(ref.abs().max())


def test_enable_false_turns_the_pass_off(caplog):
    compile_off(caplog, {"qkfuse.enable": False})


def test_qkfuse_disable_env_turns_the_pass_off(caplog, monkeypatch):
    monkeypatch.setenv("QKFUSE_DISABLE", "1")
    compile_off(caplog)


def test_off_switches_change_the_cache_key(monkeypatch):
    """A graph cached with the pass on must not be served with it off, and the reverse."""
    on = qkfuse.pass_().uuid()
    off = qkfuse.pass_(enable=False).uuid()
    assert on and off and on != off
    monkeypatch.setenv("QKFUSE_DISABLE", "1")
    assert qkfuse.pass_().uuid() == off  # the same pass (none), the same key
    monkeypatch.setenv("QKFUSE_DISABLE", "0")
    assert qkfuse.pass_().uuid() == on
