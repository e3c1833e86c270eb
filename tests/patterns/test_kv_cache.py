"""The KV-cache write after RoPE is absorbed into the k site's fused call (HF StaticCache).

The graph: ``k_cache.index_copy_(2, pos, rope(norm(k)))`` and ``v_cache.index_copy_(2, pos, v)``,
functionalized as index_put + a write-back into the cache inputs. After the pass, one fused call
per layer computes q, writes k (and v) into the caches, and the caches equal the unfused graph's
bit for bit.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.utils import counters

import qkfuse
from tests.graph_harness import run_pass, scale_error
from tests.patterns.test_norm_rope_negative import llama_norm, rope

HIDDEN, HQ, HK, D, L = 32, 4, 2, 16, 12


def qkv(h, cos, sin, wq, wk, wv, qw, kw):
    """q and k normalised and rotated, and v, as [B, H, S, D] (Qwen3 attention)."""
    B, S, _ = h.shape
    q = llama_norm((h @ wq).view(B, S, HQ, D), qw).transpose(1, 2)
    k = llama_norm((h @ wk).view(B, S, HK, D), kw).transpose(1, 2)
    v = (h @ wv).view(B, S, HK, D).transpose(1, 2)
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    return rope(q, c, s), rope(k, c, s), v


def step(h, k_cache, v_cache, pos, cos, sin, wq, wk, wv, qw, kw, *, spelling="index_copy", return_k=False):
    q, k, v = qkv(h, cos, sin, wq, wk, wv, qw, kw)
    if spelling == "index_copy":  # HF StaticLayer.update
        k_cache.index_copy_(2, pos, k)
        v_cache.index_copy_(2, pos, v)
    else:  # its fallback spelling
        k_cache[:, :, pos] = k
        v_cache[:, :, pos] = v
    o = torch.nn.functional.scaled_dot_product_attention(q, k_cache, v_cache, enable_gqa=True)
    return (o, k) if return_k else (o,)


def make_inputs(B, S, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: (torch.randn(*s, generator=g) * 0.5).to(dtype)  # noqa: E731
    ang = torch.rand(B, S, D // 2, generator=g) * 6.3
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(dtype), torch.cat([ang.sin()] * 2, -1).to(dtype)
    pos = torch.randperm(L, generator=g)[:S]
    return (r(B, S, HIDDEN), r(B, HK, L, D), r(B, HK, L, D), pos, cos, sin,
            r(HIDDEN, HQ * D), r(HIDDEN, HK * D), r(HIDDEN, HK * D), 1 + r(D), 1 + r(D))


def _caches(inputs):
    """The two [B, HK, L, D] cache inputs (in graph order)."""
    return [t for t in inputs if isinstance(t, torch.Tensor) and t.dim() == 4 and t.shape[2] == L]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,S", [(1, 1), (2, 1), (2, 3)])
@pytest.mark.parametrize("spelling", ["index_copy", "setitem"])
def test_cache_write_is_absorbed_and_caches_equal_the_unfused_graph(dtype, B, S, spelling):
    run = run_pass(lambda *a: step(*a, spelling=spelling), *make_inputs(B, S, dtype))
    assert len(run.fused) == 2 and run.refused == []
    k_site = next(r for r in run.fused if r.shape[1] == HK)
    assert "kv-cache write (k, v)" in k_site.recipe
    assert counters["qkfuse"]["kv_cache_writes"] == 1 and counters["qkfuse"]["norm_rope_calls"] == 1
    assert run.count("qkfuse.qk_norm_rope") == 1
    assert run.count("aten.index_put") == 0 and run.count("aten.index_copy") == 0  # both writes absorbed
    caches, ref_caches = _caches(run.inputs), _caches(run.ref_inputs)
    assert len(caches) == 2
    for c, ref in zip(caches, ref_caches):
        assert torch.equal(c, ref)
    assert scale_error(run.out[0], run.ref[0]) == 0.0


def test_k_with_another_user_keeps_its_write_with_inductor():
    """k is also returned: the fused call must produce k itself, so the cache write is not absorbed."""
    run = run_pass(lambda *a: step(*a, return_k=True), *make_inputs(2, 1, torch.float32))
    assert len(run.fused) == 2 and all("cache" not in r.recipe for r in run.fused)
    assert "kv_cache_writes" not in counters["qkfuse"]
    assert run.count("aten.index_put") + run.count("aten.index_copy") == 2
    for c, ref in zip(_caches(run.inputs), _caches(run.ref_inputs)):
        assert torch.equal(c, ref)


def test_a_full_sliding_window_keeps_its_write_with_inductor_and_explain_says_why():
    """HF's sliding-window layer once its window is full: the cache rolled by one position (a gather
    of the whole cache), the new row written into that copy, the copy written back. Not a row write:
    left to Inductor, the sites still fused, and the k site's record says why."""

    def rolled_step(h, k_cache, v_cache, pos, cos, sin, wq, wk, wv, qw, kw):
        q, k, v = qkv(h, cos, sin, wq, wk, wv, qw, kw)
        index = torch.tensor([-1])  # as StaticSlidingWindowLayer.update writes it
        for cache, new in ((k_cache, k), (v_cache, v)):
            rolled = cache.roll(-1, dims=-2)
            rolled[:, :, index] = new
            cache.copy_(rolled)
        return (torch.nn.functional.scaled_dot_product_attention(q, k_cache, v_cache, enable_gqa=True),)

    run = run_pass(rolled_step, *make_inputs(2, 1, torch.float32))
    assert len(run.fused) == 2 and "kv_cache_writes" not in counters["qkfuse"]
    k_site = next(r for r in run.fused if r.shape[1] == HK)
    assert "k-cache write left to Inductor: it writes into a rolled copy of the cache" in k_site.reason, k_site
    for c, ref in zip(_caches(run.inputs), _caches(run.ref_inputs)):
        assert torch.equal(c, ref)


def test_kv_cache_option_off():
    run = run_pass(step, *make_inputs(2, 1, torch.float32), options=qkfuse.Options(kv_cache=False))
    assert len(run.fused) == 2 and "kv_cache_writes" not in counters["qkfuse"]
    assert run.count("aten.index_put") + run.count("aten.index_copy") == 2


# ---- HF StaticCache decode, compiled end to end -----------------------------------------------

transformers = pytest.importorskip("transformers")


def _tiny_qwen3(layers=2):
    cfg = transformers.Qwen3Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.Qwen3ForCausalLM(cfg).eval(), cfg


def _tiny_olmo2(layers=2):  # q/k norms across heads ([H*D] weights), float32 cos/sin
    cfg = transformers.Olmo2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   eos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    return transformers.Olmo2ForCausalLM(cfg).eval(), cfg


def _decode_step(model, cfg, backend, prompt, next_ids):
    """Prefill eagerly into a fresh StaticCache, then one compiled decode step; (logits, caches)."""
    cache = transformers.StaticCache(config=cfg, max_cache_len=16)
    with torch.no_grad():
        model(prompt, past_key_values=cache, use_cache=True)
        step_fn = model if backend is None else torch.compile(model, backend=backend, fullgraph=True)
        logits = step_fn(next_ids, past_key_values=cache, use_cache=True).logits
    tensors = [t.clone() for layer in cache.layers for t in (layer.keys, layer.values)]
    return logits, tensors


@pytest.mark.parametrize("build", [_tiny_qwen3, _tiny_olmo2], ids=["qwen3", "olmo2"])
def test_hf_static_cache_decode_fuses_the_write_per_layer(build):
    model, cfg = build()
    prompt, next_ids = torch.randint(0, 128, (2, 5)), torch.randint(0, 128, (2, 1))
    ref_logits, ref_caches = _decode_step(copy.deepcopy(model), cfg, "inductor", prompt, next_ids)
    eager_logits, _ = _decode_step(copy.deepcopy(model), cfg, None, prompt, next_ids)
    counters.clear()
    logits, caches = _decode_step(model, cfg, qkfuse.qkfuse_backend, prompt, next_ids)
    layers = cfg.num_hidden_layers
    assert counters["qkfuse"]["norm_rope_calls"] == layers  # one q+k call per layer ...
    assert counters["qkfuse"]["kv_cache_writes"] == layers  # ... that writes k and v into the cache
    for c, ref in zip(caches, ref_caches):  # bit for bit what Inductor's unfused graph writes
        assert torch.equal(c, ref)
    assert float((logits - ref_logits).abs().max()) <= 1e-5 * float(ref_logits.abs().max())
    assert float((logits - eager_logits).abs().max()) <= 1e-5 * float(eager_logits.abs().max())
