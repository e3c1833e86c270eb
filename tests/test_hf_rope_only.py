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


def compiled_logits(cls, cfg, families: str | None):
    """(eager logits, compiled logits, records) of a tiny model with random weights (seeded), compiled
    with qkfuse under `families` (None: the default), counters cleared first."""
    torch.manual_seed(0)
    model = cls(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    counters.clear()
    options = {} if families is None else {"options": {"qkfuse.families": families}}
    with torch.no_grad(), collect() as records:
        ref = model(ids).logits
        out = torch.compile(model, backend="qkfuse", **options)(ids).logits
    return ref, out, records


@pytest.mark.parametrize("arch", ["Llama", "Mistral", "Qwen2"])
def test_rope_only_fuses_every_layer_with_equal_logits(arch):
    cfg = getattr(transformers, f"{arch}Config")(**COMMON)
    ref, out, records = compiled_logits(getattr(transformers, f"{arch}ForCausalLM"), cfg, "rope")
    assert counters["qkfuse"]["rope_calls"] == LAYERS, dict(counters["qkfuse"])  # q and k: one call per layer
    assert counters["qkfuse"]["rope_sites"] == 2 * LAYERS
    assert records and all(r.fused for r in records), [(r.fused, r.reason) for r in records]
    assert float((out - ref).abs().max()) <= 1e-5 * float(ref.abs().max())  # float32: the same ops, fused


def test_rope_only_is_opt_in():
    """Under the default families the same model is left alone, with the reason."""
    ref, out, records = compiled_logits(transformers.LlamaForCausalLM, transformers.LlamaConfig(**COMMON), None)
    assert "rope_calls" not in counters["qkfuse"] and "norm_rope_calls" not in counters["qkfuse"]
    assert records and not any(r.fused for r in records)
    assert all("RMSNorm" in r.reason for r in records), [r.reason for r in records]
    assert float((out - ref).abs().max()) <= 1e-5 * float(ref.abs().max())


COMPLEX_ROPE = {  # RoPE as a complex multiply (view_as_complex), complex64 freqs
    # Llama4: its L2 qk-norm comes after RoPE (a rope_norm site: test_llama4_fuses_as_rope_norm)
    "Llama4": lambda: (transformers.Llama4ForCausalLM, transformers.Llama4TextConfig(
        **COMMON, intermediate_size_mlp=128, head_dim=16, num_local_experts=2, use_qk_norm=True,
        no_rope_layers=[1] * LAYERS, attention_chunk_size=64, moe_layers=[])),
    # DeepSeek-V2: RoPE on the q_pe / k_pe parts of q and k
    "DeepseekV2": lambda: (transformers.DeepseekV2ForCausalLM, transformers.DeepseekV2Config(
        **COMMON, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
        n_routed_experts=2, num_experts_per_tok=1, first_k_dense_replace=LAYERS)),
}


def test_llama4_fuses_as_rope_norm():
    """Llama4's complex RoPE, then its weightless L2Norm: one rope_norm call per layer (q and k) under
    the default families, the recipe the RoPE first; with families="rope" the RoPE is not fused alone
    (it would cut the norm after it), the reason naming rope_norm. Logits equal to eager both ways."""
    cls, cfg = COMPLEX_ROPE["Llama4"]()
    ref, out, records = compiled_logits(cls, cfg, "norm_rope,rope_norm")
    assert counters["qkfuse"]["rope_norm_calls"] == LAYERS, dict(counters["qkfuse"])
    assert records and all(r.fused and r.recipe.startswith("interleaved rope[16] half-table then rms")
                           for r in records), records
    assert float((out - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
    ref, out, records = compiled_logits(cls, cfg, "rope")
    assert records and not any(r.fused for r in records), records
    assert all("a rope_norm site, and family 'rope_norm' is disabled" in r.reason for r in records), records
    assert float((out - ref).abs().max()) <= 1e-5 * float(ref.abs().max())


@pytest.mark.parametrize("arch", sorted(set(COMPLEX_ROPE) - {"Llama4"}))
def test_complex_rope_models_fuse_in_the_rope_family(arch):
    """Their complex RoPE reads as the interleaved half-table recipe: one call per layer with
    families="rope", logits equal to eager; under the default families it is left alone (no norm in
    front of it), still equal."""
    cls, cfg = COMPLEX_ROPE[arch]()
    for families in ("rope", "norm_rope"):
        ref, out, records = compiled_logits(cls, cfg, families)
        if families == "rope":
            assert counters["qkfuse"]["rope_calls"] == LAYERS, dict(counters["qkfuse"])
            assert counters["qkfuse"]["rope_sites"] == 2 * LAYERS
            assert records and all(r.fused and "interleaved" in r.recipe and "half-table" in r.recipe
                                   for r in records), records
        else:
            assert not any(r.fused for r in records) and "norm_rope_calls" not in counters["qkfuse"]
            assert all("RMSNorm" in r.reason for r in records), [r.reason for r in records]
        assert float((out - ref).abs().max()) <= 1e-5 * float(ref.abs().max())


def test_deepseek_v3_de_interleaved_rope_fuses_in_the_rope_family():
    """DeepSeek-V3 (rope_interleave=True: apply_rotary_pos_emb_interleave) reads as the de-interleaved
    recipe: q_rot (4 heads) and k_rot (MLA's one head) in one call per layer, logits equal to eager."""
    cfg = transformers.DeepseekV3Config(
        **COMMON, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
        n_routed_experts=2, num_experts_per_tok=1, first_k_dense_replace=LAYERS, rope_interleave=True)
    ref, out, records = compiled_logits(transformers.DeepseekV3ForCausalLM, cfg, "rope")
    assert counters["qkfuse"]["rope_calls"] == LAYERS, dict(counters["qkfuse"])
    assert counters["qkfuse"]["rope_sites"] == 2 * LAYERS
    assert records and all(r.fused and r.recipe == "neox rope[8] half-table de-interleaved" for r in records), records
    assert {(r.shape[1], r.k_shape[1]) for r in records} == {(cfg.num_attention_heads, 1), (1, cfg.num_attention_heads)}
    assert float((out - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
