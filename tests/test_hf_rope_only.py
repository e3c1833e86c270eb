"""The RoPE-only family on the RoPE models without a q/k norm (issue 7: Llama, Mistral, Qwen2):
opt-in (``qkfuse.families="rope"``, see qkfuse/options.py), q and k rotated in one call per layer,
logits equal to eager."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from qkfuse.passes.records import collect

transformers = pytest.importorskip("transformers")

LAYERS = 2
COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


@pytest.mark.parametrize("arch", ["Llama", "Mistral", "Qwen2"])
def test_rope_only_fuses_every_layer_with_equal_logits(arch):
    cfg = getattr(transformers, f"{arch}Config")(**COMMON)
    torch.manual_seed(0)
    model = getattr(transformers, f"{arch}ForCausalLM")(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad(), collect() as records:
        ref = model(ids).logits
        out = torch.compile(model, backend="qkfuse", options={"qkfuse.families": "rope"})(ids).logits
    assert counters["qkfuse"]["rope_calls"] == LAYERS, dict(counters["qkfuse"])  # q and k: one call per layer
    assert counters["qkfuse"]["rope_sites"] == 2 * LAYERS
    assert records and all(r.fused for r in records), [(r.fused, r.reason) for r in records]
    assert float((out - ref).abs().max()) <= 1e-5 * float(ref.abs().max())  # float32: the same ops, fused


def test_rope_only_is_opt_in():
    """Under the default families the same model is left alone, with the reason."""
    cfg = transformers.LlamaConfig(**COMMON)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad(), collect() as records:
        ref = model(ids).logits
        out = torch.compile(model, backend="qkfuse")(ids).logits
    assert "rope_calls" not in counters["qkfuse"] and "norm_rope_calls" not in counters["qkfuse"]
    assert records and not any(r.fused for r in records)
    assert all("RMSNorm" in r.reason for r in records), [r.reason for r in records]
    assert float((out - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
