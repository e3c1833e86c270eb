"""``mode="reduce-overhead"`` (CUDA graphs) and ``mode="max-autotune"`` with qkfuse (CUDA).

- The fused kernel is captured: no cudagraph skip (``cudagraph_or_error`` makes any skip raise, and
  the skip counter stays 0), one recording that later steps replay (no re-recording while the
  shapes stay), and every replayed step equals the unfused eager code (q and the k cache within the
  kernel's rounding, the v cache bit for bit).
- ``mode="max-autotune"`` compiles and runs the fused kernel with the same results.
- HF ``generate`` with a static cache and ``CompileConfig(backend="qkfuse")`` (CUDA graphs) records
  the same graphs as ``CompileConfig(backend="inductor")``, on the first call and on a second one.

    python -m pytest -q -m gpu tests/gpu
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import qkfuse
from tests.gpu.test_decode_codegen_gpu import HK, L, D, inputs, site, site_with_cache

# The device runs a source checkout, without the installed entry point that registers the
# "qkfuse" name HF's CompileConfig(backend="qkfuse") looks up.
qkfuse.register()

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

BF16 = 2.0**-8  # unit roundoff of bfloat16


@pytest.fixture
def recordings(monkeypatch):
    """Calls of the CUDA-graph tree manager's record_function (a recording per new graph), with any
    cudagraph skip turned into an error."""
    from torch._inductor import cudagraph_trees

    calls = []
    manager = cudagraph_trees.CUDAGraphTreeManager
    original = manager.record_function

    def record(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(manager, "record_function", record)
    monkeypatch.setattr(torch._inductor.config.triton, "cudagraph_or_error", True)
    monkeypatch.setattr(torch._inductor.config, "fx_graph_cache", False)
    torch._dynamo.reset()
    counters.clear()
    yield calls
    torch._dynamo.reset()


def close(out, ref, units=4):
    """Within a few bf16 roundings at the tensor's scale (the kernel rounds where the graph does)."""
    return float((out.float() - ref.float()).abs().max()) <= units * BF16 * float(ref.float().abs().max())


def caches(batch):
    k_cache = torch.randn(batch, HK, L, D, device="cuda").bfloat16()
    v_cache = torch.randn(batch, HK, L, D, device="cuda").bfloat16()
    for c in (k_cache, v_cache):  # as HF's StaticCache does: the buffers are static inputs
        torch._dynamo.mark_static_address(c)
    return k_cache, v_cache


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune"])
def test_decode_step_with_cache_write_is_captured_and_replayed(recordings, mode):
    batch = 4
    k_cache, v_cache = caches(batch)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    step = torch.compile(site_with_cache, backend="qkfuse", mode=mode, fullgraph=True)
    for t in range(6):
        q, k, v, qw, kw, cos, sin = inputs(batch, seed=t)
        pos = torch.tensor([t], device="cuda")
        out = step(q, k, v, qw, kw, cos, sin, k_cache, v_cache, pos)
        ref = site_with_cache(q, k, v, qw, kw, cos, sin, ref_k, ref_v, pos)
        torch.cuda.synchronize()
        assert close(out, ref), t
        assert close(k_cache, ref_k), t
        assert torch.equal(v_cache, ref_v), t
    assert counters["qkfuse"]["norm_rope_calls"] == 1 and counters["qkfuse"]["kv_cache_writes"] == 1
    assert counters["inductor"]["cudagraph_skips"] == 0
    assert len(recordings) == 1, f"{len(recordings)} recordings for one shape (re-recorded)"


def test_reduce_overhead_matches_inductor_recordings(recordings):
    """Inductor alone records the same number of graphs for the same steps: qkfuse adds none."""
    counts = {}
    for backend in ("inductor", "qkfuse"):
        torch._dynamo.reset()
        before = len(recordings)
        fn = torch.compile(site, backend=backend, mode="reduce-overhead", fullgraph=True)
        for t in range(4):
            q, k, _, qw, kw, cos, sin = inputs(8, seed=t)
            args = (q, k, qw, kw, cos, sin)
            out = fn(*args)
            assert all(close(o, r) for o, r in zip(out, site(*args)))
        counts[backend] = len(recordings) - before
    assert counts["qkfuse"] == counts["inductor"] == 1, counts
    assert counters["inductor"]["cudagraph_skips"] == 0


def test_hf_generate_static_cache_records_no_more_than_inductor(recordings):
    """HF generate with a static cache and CompileConfig (CUDA graphs), called twice: qkfuse records
    exactly the graphs Inductor records, on each call (a second call may re-record for HF's own
    reasons, a new cache object; qkfuse must add none), with no cudagraph skip and the same tokens."""
    transformers = pytest.importorskip("transformers")
    from transformers import CompileConfig

    cfg = transformers.Qwen3Config(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                   max_position_embeddings=128)
    ids = torch.randint(0, 256, (2, 8), device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    counts, tokens = {}, {}
    for backend in ("inductor", "qkfuse"):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = transformers.Qwen3ForCausalLM(cfg).cuda().bfloat16().eval()
        kw = dict(max_new_tokens=12, do_sample=False, cache_implementation="static",
                  compile_config=CompileConfig(backend=backend))
        before = len(recordings)
        with torch.no_grad():
            first = model.generate(ids, **kw)
            after_first = len(recordings)
            second = model.generate(ids, **kw)
        counts[backend] = (after_first - before, len(recordings) - after_first)
        tokens[backend] = first
        # replayed graphs compute what the recorded ones did
        assert torch.equal(first, second), (backend, (first != second).sum().item(), first, second)
    assert counters["qkfuse"]["norm_rope_calls"] >= 1, dict(counters["qkfuse"])
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    assert counts["qkfuse"] == counts["inductor"] and counts["qkfuse"][0] >= 1, counts
