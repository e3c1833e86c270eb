"""flashinfer is optional: qkfuse works without it and says clearly when it is asked for.

Its absence is enforced (sys.modules["flashinfer"] = None makes ``import flashinfer`` fail), so
these tests mean the same on a machine that has it installed.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import qkfuse  # noqa: F401
from qkfuse.kernels import flashinfer as fi
from qkfuse.kernels import policy
from qkfuse.ops.recipe import Recipe

BF16 = torch.bfloat16
RECIPE = Recipe(norm="rms", cast_before_weight=True, norm_dtype=BF16, rope_dtype=BF16, out_dtype=BF16, rotary_dim=64)


@pytest.fixture
def no_flashinfer(monkeypatch):
    monkeypatch.setitem(sys.modules, "flashinfer", None)
    fi.available.cache_clear()
    yield
    fi.available.cache_clear()  # recomputed for the real environment by the next caller


def _fake_cuda_inputs(mode):
    """q [B, H, S, D], k, cos on a fake CUDA device (works on a CPU-only build)."""
    with mode:
        q = torch.empty(2, 8, 5, 64, dtype=BF16, device="cuda")
        k = torch.empty(2, 2, 5, 64, dtype=BF16, device="cuda")
        cos = torch.empty(2, 1, 5, 64, dtype=BF16, device="cuda")
    return q, k, cos


def test_import_qkfuse_without_flashinfer():
    """A fresh interpreter in which flashinfer cannot be imported: qkfuse imports, and does not
    try to import flashinfer until a flashinfer kernel runs."""
    code = textwrap.dedent("""
        import sys
        sys.modules["flashinfer"] = None  # import flashinfer -> ImportError
        import qkfuse
        from qkfuse.kernels import flashinfer as fi
        assert fi.available() is False
        assert hasattr(qkfuse, "optimize") and hasattr(qkfuse, "explain")
        print("ok")
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().endswith("ok")


def test_available_is_false(no_flashinfer):
    assert fi.available() is False


def test_unsupported_says_not_installed(no_flashinfer):
    q = torch.randn(2, 8, 5, 64, dtype=BF16)
    reason = fi.unsupported(q, q, torch.randn(5, 64, dtype=BF16), RECIPE)
    assert isinstance(reason, str) and "not installed" in reason and "pip install" in reason


def test_explicit_flashinfer_request_fails_in_one_clear_line(no_flashinfer):
    q, k, cos = _fake_cuda_inputs(FakeTensorMode())
    assert q.device.type == "cuda"
    with pytest.raises(RuntimeError) as info:
        policy.choose("flashinfer", q, k, cos, RECIPE)
    msg = str(info.value)
    assert "flashinfer" in msg and "pip install" in msg
    assert "\n" not in msg


def test_unknown_kernel_choice_is_valueerror():
    q, k, cos = _fake_cuda_inputs(FakeTensorMode())
    with pytest.raises(ValueError, match=r"qkfuse.kernels must be one of .*'bogus'"):
        policy.choose("bogus", q, k, cos, RECIPE)
    qc = torch.randn(2, 8, 5, 64, dtype=BF16)
    with pytest.raises(ValueError, match="bogus"):
        policy.choose("bogus", qc, qc, None, RECIPE)


@pytest.mark.parametrize("preference", ["auto", "reference", "flashinfer", "triton", "inline"])
def test_cpu_tensors_get_a_cpu_kernel(no_flashinfer, preference):
    """On CPU every choice is served, even an explicit flashinfer (not installed): by the opaque
    reference op when asked for, else by inline torch ops (Inductor compiles them with the graph)."""
    q = torch.randn(2, 8, 5, 64, dtype=BF16)
    cos = torch.randn(2, 1, 5, 64, dtype=BF16)
    kernel, note = policy.choose(preference, q, q, cos, RECIPE)
    assert kernel == ("reference" if preference == "reference" else "inline")
    assert "cpu" in note


def test_auto_on_cuda_does_not_need_flashinfer(no_flashinfer):
    """auto never fails for want of flashinfer: it serves Triton (installed here) or leaves the
    site unfused with a reason."""
    q, k, cos = _fake_cuda_inputs(FakeTensorMode())
    kernel, note = policy.choose("auto", q, k, cos, RECIPE)
    assert kernel in ("triton", None)
    assert kernel is not None or note


# ---- the qkfuse::fi_* ops: registered, with fake impls ----------------------------------------------


def test_fi_ops_are_registered():
    for name in ("fi_rmsnorm", "fi_rope_cos_sin_cache_", "fi_rope_pos_ids_", "fi_norm_rope"):
        assert hasattr(torch.ops.qkfuse, name), name
        assert isinstance(getattr(torch.ops.qkfuse, name).default, torch._ops.OpOverload)
    # the in-place ones declare what they mutate (so functionalization copies correctly)
    schema = torch.ops.qkfuse.fi_rope_pos_ids_.default._schema
    assert [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write] == ["q", "k"]
    schema = torch.ops.qkfuse.fi_rope_cos_sin_cache_.default._schema
    assert [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write] == \
        ["query", "key"]


def test_fi_fake_impls_on_fake_cuda(no_flashinfer):
    """Under FakeTensorMode on fake CUDA tensors the fake impls run (an import of flashinfer
    would raise here) and return outputs laid out like their inputs."""
    mode = FakeTensorMode()
    with mode:
        x = torch.empty(6, 4, 64, dtype=BF16, device="cuda")
        xt = torch.empty(4, 6, 64, dtype=BF16, device="cuda").transpose(0, 1)  # heads outermost
        kx = torch.empty(6, 2, 64, dtype=BF16, device="cuda")
        w = torch.empty(64, dtype=BF16, device="cuda")
        cache = torch.empty(6, 64, dtype=torch.float32, device="cuda")
        pos = torch.arange(6, device="cuda")

        for inp in (x, xt):
            y = torch.ops.qkfuse.fi_rmsnorm(inp, w, 1e-6, False)
            assert y.shape == inp.shape and y.stride() == inp.stride()
            assert y.dtype == BF16 and y.device.type == "cuda"
        yg = torch.ops.qkfuse.fi_rmsnorm(x, w, 1e-6, True)
        assert yg.shape == x.shape and yg.dtype == BF16

        outs = torch.ops.qkfuse.fi_norm_rope(x, kx, w, w, cache, pos, 1e-6, 1e-6, True, False, True)
        assert [tuple(o.shape) for o in outs] == [(6, 4, 64), (6, 2, 64)]
        assert all(o.dtype == BF16 and o.device.type == "cuda" for o in outs)
        outs = torch.ops.qkfuse.fi_norm_rope(x, None, None, None, None, None, 1e-6, 1e-6, False, False, True)
        assert [tuple(o.shape) for o in outs] == [(6, 4, 64)]

        assert torch.ops.qkfuse.fi_rope_pos_ids_(x, kx, pos, 64, False, 1.0, 1e4) is None
        assert torch.ops.qkfuse.fi_rope_cos_sin_cache_(pos, x.view(6, -1), kx.view(6, -1), 64, cache, True) is None
