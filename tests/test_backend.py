"""The "qkfuse" backend and the user entry points (fuse, pass_, options, composition)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from torch._dynamo.utils import counters

import qkfuse

HERE = os.path.dirname(__file__)
B, S, HQ, HK, D = 2, 7, 4, 2, 16


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class RMSNorm(torch.nn.Module):  # transformers' Qwen3RMSNorm
    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight = torch.nn.Parameter(1 + 0.2 * torch.randn(d))
        self.variance_epsilon = eps

    def forward(self, x):
        dt = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dt)


class Attention(torch.nn.Module):
    """Qwen3-style attention: projections, per-head q/k norm, transpose, RoPE, SDPA with GQA."""

    def __init__(self, hidden=64):
        super().__init__()
        self.q_proj = torch.nn.Linear(hidden, HQ * D, bias=False)
        self.k_proj = torch.nn.Linear(hidden, HK * D, bias=False)
        self.v_proj = torch.nn.Linear(hidden, HK * D, bias=False)
        self.o_proj = torch.nn.Linear(HQ * D, hidden, bias=False)
        self.q_norm, self.k_norm = RMSNorm(D), RMSNorm(D)

    def forward(self, h, cos, sin):
        shape = (*h.shape[:-1], -1, D)
        q = self.q_norm(self.q_proj(h).view(shape)).transpose(1, 2)
        k = self.k_norm(self.k_proj(h).view(shape)).transpose(1, 2)
        v = self.v_proj(h).view(shape).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o_proj(o.transpose(1, 2).reshape(*h.shape[:-1], -1))


def inputs(seq=S, seed=0):
    g = torch.Generator().manual_seed(seed)
    ang = torch.rand(B, seq, D // 2, generator=g) * 6.3
    return torch.randn(B, seq, 64, generator=g), torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)


def close(a, b, rel=1e-5):
    return float((a - b).abs().max()) <= rel * float(b.abs().max())


@pytest.mark.parametrize("dynamic", [False, True])
def test_backend_string_compiles_and_fuses(dynamic):
    torch.manual_seed(0)
    m = Attention().eval()
    with torch.no_grad():
        c = torch.compile(m, backend="qkfuse", dynamic=dynamic)
        for seq in (S, S + 3):  # a second sequence length: dynamic reuses, static recompiles
            x = inputs(seq)
            assert close(c(*x), m(*x))
    assert counters["qkfuse"]["norm_rope_calls"] >= 1
    assert counters["qkfuse"]["norm_rope_sites"] == 2 * counters["qkfuse"]["norm_rope_calls"]


def test_enable_false_and_unknown_options():
    m = Attention().eval()
    with torch.no_grad():
        torch.compile(m, backend="qkfuse", options={"qkfuse.enable": False})(*inputs())
    assert counters["qkfuse"]["norm_rope_sites"] == 0
    torch._dynamo.reset()
    with pytest.raises(Exception, match="unknown qkfuse option"), torch.no_grad():
        torch.compile(m, backend="qkfuse", options={"qkfuse.kernel": "triton"})(*inputs())
    torch._dynamo.reset()
    with pytest.raises(Exception, match="qkfuse.kernels must be one of"), torch.no_grad():
        torch.compile(m, backend="qkfuse", options={"qkfuse.kernels": "cuda"})(*inputs())


def test_inductor_options_and_mode_pass_through():
    m = Attention().eval()
    with torch.no_grad():
        out = torch.compile(m, backend="qkfuse", options={"max_autotune": False, "qkfuse.kernels": "reference"})(*inputs())
        assert close(out, m(*inputs()))
        torch._dynamo.reset()
        out = torch.compile(m, backend="qkfuse", mode="reduce-overhead")(*inputs())  # CPU: no CUDA graphs
        assert close(out, m(*inputs()))
    with pytest.raises(Exception, match="unknown Inductor option"), torch.no_grad():
        torch._dynamo.reset()
        torch.compile(m, backend="qkfuse", options={"not_an_inductor_option": 1})(*inputs())


def test_user_post_grad_pass_is_composed_not_dropped():
    from torch._inductor.custom_graph_pass import CustomGraphPass

    seen = []

    class UserPass(CustomGraphPass):
        def __call__(self, graph):
            seen.append(sum(1 for n in graph.nodes if "qkfuse" in str(n.target)))

        def uuid(self):
            return "user-pass-v1"

    m = Attention().eval()
    options = {"post_grad_custom_pre_pass": UserPass(), "qkfuse.kernels": "reference"}  # one qkfuse:: node
    with torch.no_grad():
        torch.compile(m, backend="qkfuse", options=options)(*inputs())
    assert seen == [1]  # the user's pass ran, after ours (it saw the fused call)
    assert counters["qkfuse"]["norm_rope_calls"] == 1
    composed = qkfuse.QKFusePass(user_pass=UserPass())
    assert composed.uuid() and composed.uuid() != qkfuse.QKFusePass().uuid()


def test_pass_on_stock_inductor():
    m = Attention().eval()
    with torch.no_grad():
        out = torch.compile(m, options={"post_grad_custom_pre_pass": qkfuse.pass_()})(*inputs())
        assert close(out, m(*inputs()))
    assert counters["qkfuse"]["norm_rope_calls"] == 1
    assert torch._inductor.config.post_grad_custom_pre_pass is None  # never set globally
    with pytest.raises(ValueError, match="unknown qkfuse option"):
        qkfuse.pass_(kernel="triton")


def test_fuse_on_class_instance_and_function():
    x = inputs()

    @qkfuse.fuse
    class FusedAttention(Attention):
        pass

    m = FusedAttention().eval()
    with torch.no_grad():
        assert close(m(*x), Attention.forward(m, *x))
    assert counters["qkfuse"]["norm_rope_calls"] == 1

    counters.clear()
    plain = Attention().eval()
    eager = copy.deepcopy(plain)
    inst = qkfuse.fuse(plain)
    assert inst is plain and qkfuse.fuse(inst) is inst  # in place, idempotent
    with torch.no_grad():
        assert close(inst(*x), eager(*x))
    assert counters["qkfuse"]["norm_rope_calls"] == 1

    counters.clear()
    a = Attention().eval()

    @qkfuse.fuse(dynamic=True, options={"qkfuse.kernels": "reference"})
    def qk(h, cos, sin):
        return a(h, cos, sin)

    with torch.no_grad():
        assert close(qk(*x), a(*x))
    assert counters["qkfuse"]["norm_rope_calls"] == 1
    with pytest.raises(TypeError, match="nn.Module subclass"):
        qkfuse.fuse(int)


def test_register_is_idempotent_and_reset_exists():
    qkfuse.register()
    qkfuse.register()
    from torch._dynamo.backends.registry import lookup_backend

    assert lookup_backend("qkfuse") is qkfuse.qkfuse_backend
    qkfuse.qkfuse_backend.reset()  # torch._dynamo.reset() calls it; must not fail without CUDA


@pytest.mark.slow
def test_backend_string_works_without_import_in_a_fresh_process(tmp_path):
    """Done means: no `import qkfuse`, tiny Qwen3ForCausalLM, logits equal eager, one qkfuse op per layer
    (the reference op: the CPU default, inline torch ops, leaves no op to count at run time)."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path)}  # a cold cache: the pass must run
    out = subprocess.run([sys.executable, os.path.join(HERE, "compile_probe.py"), "--layers", "2",
                          "--options", json.dumps({"qkfuse.kernels": "reference"})],
                         capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert not r["qkfuse_imported_before_compile"] and r["qkfuse_imported_after"]
    assert r["max_abs_diff"] <= 1e-5 * r["max_abs_ref"]
    assert r["qkfuse_op_calls_per_forward"] == 2  # one fused q+k call per layer
    assert r["qkfuse_counters"]["norm_rope_calls"] == 2 and r["qkfuse_counters"]["norm_rope_sites"] == 4
