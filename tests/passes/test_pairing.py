"""Pairing across layers and containment: one odd site never breaks the compile.

A 2-layer model whose layer-0 q norm has one more user: that q site is refused, and layer 0's k
must not pair with layer 1's q (layer 1's input is computed from layer 0's attention, which reads
layer 0's k: one call for both would be a cycle; it used to crash Inductor's topological sort).
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch._dynamo.utils import counters

import qkfuse
from qkfuse.options import Options
from qkfuse.passes import fuse
from tests.graph_harness import run_pass, scale_error
from tests.patterns.test_norm_rope_negative import llama_norm, rope

HIDDEN, HQ, HK, D = 32, 4, 2, 8


def attention(h, wq, wk, wv, wo, qw, kw, cos, sin, leak_q_norm: bool):
    B, S, _ = h.shape
    qn = llama_norm((h @ wq).view(B, S, HQ, D), qw)
    kn = llama_norm((h @ wk).view(B, S, HK, D), kw)
    v = (h @ wv).view(B, S, HK, D).transpose(1, 2)
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    q, k = rope(qn.transpose(1, 2), c, s), rope(kn.transpose(1, 2), c, s)
    o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    out = o.transpose(1, 2).reshape(B, S, -1) @ wo
    if leak_q_norm:  # the normalised q has another user: its site must be refused
        out = out + qn.sum(dim=(2, 3)).unsqueeze(-1)
    return h + out


def two_layers(h, cos, sin, *weights):
    """weights: (wq, wk, wv, wo, q_norm_w, k_norm_w) for each of the two layers."""
    for layer in range(2):
        h = attention(h, *weights[6 * layer:6 * layer + 6], cos, sin, leak_q_norm=layer == 0)
    return (h,)


def make_inputs(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: (torch.randn(*s, generator=g) * 0.3).to(dtype)  # noqa: E731
    B, S = 2, 5
    ang = torch.rand(B, S, D // 2, generator=g) * 6.3
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(dtype), torch.cat([ang.sin()] * 2, -1).to(dtype)
    weights = []
    for _ in range(2):
        weights += [r(HIDDEN, HQ * D), r(HIDDEN, HK * D), r(HIDDEN, HK * D), r(HQ * D, HIDDEN), 1 + r(D), 1 + r(D)]
    return (r(B, S, HIDDEN), cos, sin, *weights)


def test_refused_site_in_one_layer_does_not_pair_across_layers():
    args = make_inputs()
    run = run_pass(two_layers, *args)
    fused = [r for r in run.fused]
    refused = [r for r in run.refused]
    assert len(refused) == 1 and "has a user outside the chain" in refused[0].reason
    assert len(fused) == 3  # layer 0's k alone, layer 1's q and k together
    assert run.count("qkfuse.norm_rope") == 1 and run.count("qkfuse.qk_norm_rope") == 1
    single = next(r for r in fused if r.k_shape is None)
    assert single.shape[1] == HK  # the lone call is layer 0's k
    run.rewritten.graph.lint()  # topologically ordered (no cycle)
    assert scale_error(run.out[0], run.ref[0]) <= 1e-6


class Layer(torch.nn.Module):
    def __init__(self, leak: bool):
        super().__init__()
        self.wq, self.wk = torch.nn.Linear(HIDDEN, HQ * D, bias=False), torch.nn.Linear(HIDDEN, HK * D, bias=False)
        self.wv, self.wo = torch.nn.Linear(HIDDEN, HK * D, bias=False), torch.nn.Linear(HQ * D, HIDDEN, bias=False)
        self.qw = torch.nn.Parameter(1 + 0.2 * torch.randn(D))
        self.kw = torch.nn.Parameter(1 + 0.2 * torch.randn(D))
        self.leak = leak

    def forward(self, h, cos, sin):
        return attention(h, self.wq.weight.T, self.wk.weight.T, self.wv.weight.T, self.wo.weight.T,
                         self.qw, self.kw, cos, sin, self.leak)


class TwoLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([Layer(True), Layer(False)])

    def forward(self, h, cos, sin):
        for layer in self.layers:
            h = layer(h, cos, sin)
        return h


def test_multi_layer_model_with_a_refused_site_compiles_and_equals_eager():
    """The whole compile (Inductor codegen included) of the model that used to crash."""
    torch.manual_seed(0)
    model = TwoLayers().eval()
    h, cos, sin = make_inputs()[:3]
    with torch.no_grad():
        ref = model(h, cos, sin)
        out = torch.compile(model, backend=qkfuse.qkfuse_backend, fullgraph=True)(h, cos, sin)
    assert counters["qkfuse"]["norm_rope_calls"] == 2 and counters["qkfuse"]["norm_rope_refused"] == 1
    assert float((out - ref).abs().max()) <= 1e-5 * float(ref.abs().max())


def test_an_internal_error_leaves_the_site_unfused_and_logs_it(monkeypatch, caplog):
    """Containment: an exception while replacing a site is logged and the site stays with Inductor;
    strict mode (the tests' default, QKFUSE_STRICT=1) re-raises it."""
    from qkfuse.passes import replace

    def broken(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(fuse, "replace_group", broken)
    args = make_inputs()
    monkeypatch.setenv("QKFUSE_STRICT", "0")
    with caplog.at_level(logging.WARNING, logger="qkfuse"):
        run = run_pass(two_layers, *args)
    assert run.fused == [] and run.count("qkfuse") == 0
    assert sum("internal error while replacing (RuntimeError: boom)" in r.reason for r in run.refused) == 3
    assert any("internal error" in r.getMessage() and r.exc_info for r in caplog.records)
    assert scale_error(run.out[0], run.ref[0]) == 0.0
    monkeypatch.setenv("QKFUSE_STRICT", "1")
    with pytest.raises(Exception, match="boom"):
        run_pass(two_layers, *args)
    assert replace.replace_group is not broken  # only the pass's reference was patched


def test_an_error_while_matching_is_contained(monkeypatch):
    from qkfuse.patterns import norm_rope

    def broken(*a, **k):
        raise KeyError("odd node")

    monkeypatch.setattr(norm_rope, "match_site", broken)
    monkeypatch.setenv("QKFUSE_STRICT", "0")
    run = run_pass(two_layers, *make_inputs(),
                   options=Options())
    assert run.fused == [] and len(run.refused) == 4
    assert all("internal error while matching (KeyError" in r.reason for r in run.refused)


def test_users_before_the_latest_input_move_behind_the_call():
    """q is rotated and used before k is even projected (diffusers writes q's path first): one call
    still serves both, and q's users move behind it."""

    def fn(h, cos, sin, wq, wk, qw, kw):
        B, S, _ = h.shape
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        q = rope(llama_norm((h @ wq).view(B, S, HQ, D), qw).transpose(1, 2), c, s)
        q_scaled = (q * 0.5).transpose(1, 2).reshape(B, S, -1)  # a consumer of q before k exists
        k = rope(llama_norm((h @ wk).view(B, S, HK, D), kw).transpose(1, 2), c, s)
        return q_scaled @ wq.T, k

    h, cos, sin, wq, wk, _, _, qw, kw = make_inputs()[:9]
    run = run_pass(fn, h, cos, sin, wq, wk, qw, kw)
    order = {n: i for i, n in enumerate(run.original.graph.nodes)}
    q_anchor = next(n for n in run.original.graph.nodes if n.name == run.fused[0].node)
    k_proj = max((n for n in run.original.graph.nodes if n.target is torch.ops.aten.mm.default), key=order.get)
    assert min(order[u] for u in q_anchor.users) < order[k_proj]  # the case this test is about
    assert run.count("qkfuse.qk_norm_rope") == 1 and len(run.fused) == 2
    run.rewritten.graph.lint()
    for out, ref in zip(run.out, run.ref):
        assert scale_error(out, ref) <= 1e-6


def test_a_user_of_q_that_also_reads_later_nodes_stays_after_them():
    """HunyuanVideo's double-stream block, reduced: image q is rotated with its own unsqueezed
    cos/sin, the text q is normalised after it and concatenated with it, and k is rotated later with
    unsqueezes of its own of the same cos/sin (one call serves both; it reads q's). The concatenation
    reads the text q too: it must stay after it wherever the call goes (it used to be moved right
    behind the call, above the text q's norm: a graph out of order that Inductor cannot compile)."""

    def fn(h, t, cos, sin, wq, wk, qw, kw, tw):
        B, S, _ = h.shape
        k_lin = (h @ wk).view(B, S, HK, D)
        q = rope(llama_norm((h @ wq).view(B, S, HQ, D), qw).transpose(1, 2), cos.unsqueeze(1), sin.unsqueeze(1))
        # the text q comes after q's RoPE and after k's projection (the call's latest input)
        q_text = llama_norm((t @ wq).view(B, S, HQ, D) + k_lin.mean(), tw).transpose(1, 2)
        kn = llama_norm(k_lin, kw).transpose(1, 2)
        q_all = torch.cat([q, q_text], dim=2)  # a user of q that reads a later node too
        k = rope(kn, cos.unsqueeze(1), sin.unsqueeze(1))  # k's own unsqueezes of cos/sin, after the cat
        return q_all, k

    h, cos, sin, wq, wk, _, _, qw, kw = make_inputs()[:9]
    t = torch.randn_like(h)
    tw = 1 + 0.3 * torch.randn_like(qw)
    run = run_pass(fn, h, t, cos, sin, wq, wk, qw, kw, tw)
    assert len(run.fused) == 2 and run.count("qkfuse.qk_norm_rope") == 1, run.records
    run.rewritten.graph.lint()  # topologically ordered
    for out, ref in zip(run.out, run.ref):
        assert scale_error(out, ref) <= 1e-6


def test_an_out_of_order_graph_is_sorted_not_handed_on(caplog, monkeypatch):
    """The safety net behind the ordering above: outside strict mode an out-of-order graph is
    sorted (with a warning), in strict mode (the tests) it is an error."""
    g = torch.fx.Graph()
    x = g.placeholder("x")
    a = g.call_function(torch.ops.aten.neg.default, (x,))
    b = g.call_function(torch.ops.aten.abs.default, (a,))
    g.output(b)
    b.append(a)  # a moves behind its user b
    with pytest.raises(RuntimeError):
        g.lint()
    with pytest.raises(RuntimeError, match="before they are computed"):
        fuse._ensure_ordered(g, Options(strict=True))
    monkeypatch.setenv("QKFUSE_STRICT", "0")
    with caplog.at_level(logging.WARNING, logger="qkfuse"):
        fuse._ensure_ordered(g, Options(strict=False))
    g.lint()
    assert "sorting it" in caplog.text
