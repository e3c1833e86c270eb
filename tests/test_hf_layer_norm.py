"""LayerNorm q/k norms in unmodified transformers models (tiny configs, random weights, no downloads):
Persimmon and Phi (``nn.LayerNorm(head_dim)`` with a bias, partial rotary), StableLM (one LayerNorm
per head, split and concatenated), Cohere (its float32 LayerNorm by hand, an ``[H, D]`` weight,
interleaved RoPE). Each model's q/k sites are fused (one call per layer) and the compiled model
equals eager."""

from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.utils import counters

import qkfuse

transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
             num_attention_heads=4, max_position_embeddings=64)


def persimmon():
    return transformers.PersimmonForCausalLM(transformers.PersimmonConfig(**SMALL, qk_layernorm=True))


def phi():
    return transformers.PhiForCausalLM(transformers.PhiConfig(**SMALL, num_key_value_heads=2, qk_layernorm=True))


def stablelm():
    return transformers.StableLmForCausalLM(transformers.StableLmConfig(**SMALL, num_key_value_heads=2,
                                                                         qk_layernorm=True))


def cohere():
    return transformers.CohereForCausalLM(transformers.CohereConfig(**SMALL, num_key_value_heads=2, use_qk_norm=True,
                                                                    pad_token_id=0))


def _perturb_norms(model):
    """Weights and biases away from their init (ones, zeros), so that a fused call that dropped them
    or used one head's weight for all would differ from eager."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "q_layernorm" in name or "k_layernorm" in name or "q_norm" in name or "k_norm" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g))


# StableLM's split/cat and Cohere's by-hand body with its [H, D] weight in CI; Persimmon's and Phi's
# nn.LayerNorm (its decomposition, as in tests/patterns/test_layer_norm.py) with the slow tests
@pytest.mark.parametrize("build", [pytest.param(persimmon, marks=pytest.mark.slow), pytest.param(phi, marks=pytest.mark.slow),
                                   stablelm, cohere], ids=["persimmon", "phi", "stablelm", "cohere"])
def test_layer_norm_models_fuse_and_match_eager(build):
    torch.manual_seed(0)
    model = build().eval()
    _perturb_norms(model)
    eager = copy.deepcopy(model)
    ids = torch.randint(1, 128, (2, 9))
    with torch.no_grad():
        report = qkfuse.explain(model, ids)
        assert [r.fused for r in report.sites] == [True, True], report.table()
        assert all(r.recipe.startswith("layernorm") for r in report.sites), report.table()
        counters.clear()
        qkfuse.optimize(model)
        logits, ref = model(ids).logits, eager(ids).logits
    assert counters["qkfuse"]["norm_rope_calls"] == 1 and counters["qkfuse"]["norm_rope_sites"] == 2
    assert float((logits - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
