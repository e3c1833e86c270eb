"""qkfuse.optimize on unmodified transformers models built from configs (random weights)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.utils import counters

import qkfuse

transformers = pytest.importorskip("transformers")

LAYERS = 2
SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64)


def qwen3():
    return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**SMALL))


def gemma3():
    cfg = transformers.Gemma3TextConfig(**SMALL, sliding_window=4,
                                        layer_types=["sliding_attention", "full_attention"])
    return transformers.Gemma3ForCausalLM(cfg)


def olmo2():  # q_norm / k_norm across all heads ([H*D] weights), RoPE with float32 cos/sin
    return transformers.Olmo2ForCausalLM(transformers.Olmo2Config(**SMALL, eos_token_id=None, pad_token_id=None))


# The opaque reference op shows each fused call in the profiler at run time; the default on CPU
# (inline torch ops, compiled by Inductor with the rest) is checked through the pass's counters.
REFERENCE = {"qkfuse.kernels": "reference"}


def fused_calls_per_forward(model, ids):
    """qkfuse::qk_norm_rope calls run by one inference forward of a model optimized with REFERENCE
    (with grad enabled the graph differs: training graphs save the chain's intermediates for
    backward, and the pass leaves such chains alone)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof, torch.no_grad():
        model(ids)
    return sum(1 for e in prof.events() if e.name == "qkfuse::qk_norm_rope")


@pytest.mark.slow
@pytest.mark.parametrize("build", [qwen3, gemma3, olmo2], ids=["qwen3", "gemma3", "olmo2"])
def test_optimize_matches_eager_and_fuses_every_layer(build):
    torch.manual_seed(0)
    model = build().eval()
    eager = copy.deepcopy(model)
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        assert qkfuse.optimize(model, options=REFERENCE) is model
        logits = model(ids).logits
        ref = eager(ids).logits
        assert float((logits - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
        # regional compilation: one compile per distinct block graph serves every layer
        assert counters["qkfuse"]["norm_rope_calls"] >= 1
        assert counters["qkfuse"]["norm_rope_sites"] == 2 * counters["qkfuse"]["norm_rope_calls"]
        assert fused_calls_per_forward(model, ids) == LAYERS  # one fused q+k call per layer
        # idempotent: no second wrapping, no recompilation
        compiled = counters["qkfuse"]["norm_rope_calls"]
        assert qkfuse.optimize(model) is model
        model(ids)
        assert counters["qkfuse"]["norm_rope_calls"] == compiled


@pytest.mark.slow
def test_optimize_bf16_within_dtype_rounding():
    torch.manual_seed(0)
    model = qwen3().eval()
    ref64 = copy.deepcopy(model).double()
    model = model.to(torch.bfloat16)
    eager = copy.deepcopy(model)
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        qkfuse.optimize(model)
        out, ref, r64 = model(ids).logits, eager(ids).logits, ref64(ids).logits
    err_fused = float((out.double() - r64).abs().max())
    err_eager = float((ref.double() - r64).abs().max())
    # Inductor fuses the rest of the block too, so not bit-equal; no worse than eager bf16 (x2)
    assert err_fused <= 2 * err_eager, (err_fused, err_eager)
    # every compiled layer graph: q and k in one call
    assert counters["qkfuse"]["norm_rope_calls"] >= 1
    assert counters["qkfuse"]["norm_rope_sites"] == 2 * counters["qkfuse"]["norm_rope_calls"]
    assert counters["qkfuse"]["norm_rope_refused"] == 0


def test_compile_regions_picks_decoder_layers():
    model = qwen3()
    regions = qkfuse.backend.compile_regions(model)
    assert [type(r).__name__ for r in regions] == ["Qwen3DecoderLayer"] * LAYERS


def test_optimize_rejects_non_modules():
    with pytest.raises(TypeError, match="nn.Module"):
        qkfuse.optimize(lambda x: x)


@pytest.mark.slow
def test_optimize_diffusers_flux():
    """Unmodified diffusers Flux: single-stream blocks fuse (torch rms_norm + interleaved RoPE with
    float32 cos/sin, norm_rope); double-stream blocks concatenate text and image q between norm and
    RoPE and fuse as norm_cat_rope (one call per part: text, image)."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6)).eval()
    eager = copy.deepcopy(model)
    kw = dict(hidden_states=torch.randn(1, 16, 16), encoder_hidden_states=torch.randn(1, 8, 32),
              pooled_projections=torch.randn(1, 32), timestep=torch.tensor([0.5]),
              img_ids=torch.randn(16, 3), txt_ids=torch.zeros(8, 3))
    with torch.no_grad():
        report = qkfuse.explain(model, **kw)
    assert sorted(r.family for r in report.fused) == ["norm_cat_rope"] * 2 + ["norm_rope"] * 4, report.fused
    assert report.refused == []
    with torch.no_grad():
        qkfuse.optimize(model, options=REFERENCE)
        out, ref = model(**kw).sample, eager(**kw).sample
        assert float((out - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            model(**kw)
    # one per single-stream block, one per part (text, image) of the double-stream block
    assert sum(1 for e in prof.events() if e.name == "qkfuse::qk_norm_rope") == 2 + 2


@pytest.mark.slow
@pytest.mark.parametrize("cls", ["WanTransformer3DModel", "SkyReelsV2Transformer3DModel"])
def test_diffusers_wan_fuses_its_pair_rotation(cls):
    """Unmodified diffusers Wan and SkyReels-V2: torch.nn.RMSNorm across heads, then RoPE written
    per pair into an empty_like (float32 freqs, their step-2 views as half tables): q and k of every
    block's self-attention fuse into one call, equal to eager."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    layers = 2
    model = getattr(diffusers, cls)(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=32, ffn_dim=32, num_layers=layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32).eval()
    kw = dict(hidden_states=torch.randn(1, 4, 2, 16, 16), encoder_hidden_states=torch.randn(1, 12, 16),
              timestep=torch.tensor([500.0]))
    with torch.no_grad():
        ref = model(**kw).sample
        out = torch.compile(model, backend="qkfuse")(**kw).sample
    assert counters["qkfuse"]["norm_rope_calls"] == layers and counters["qkfuse"]["norm_rope_sites"] == 2 * layers
    assert counters["qkfuse"]["norm_rope_refused"] == 0
    assert float((out - ref).abs().max()) <= 1e-5 * float(ref.abs().max())


@pytest.mark.slow
def test_diffusers_qwenimage_fuses_its_complex_rope():
    """Unmodified diffusers QwenImage: per-head RMSNorm, then RoPE as a complex multiply
    (``apply_rotary_emb_qwen(..., use_real=False)``, complex64 freqs, read as the interleaved
    half-table recipe): the image q+k and the text q+k of every block become one call each, equal
    to eager."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    layers = 2
    model = diffusers.QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=layers, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4)).eval()
    kw = dict(hidden_states=torch.randn(1, 16, 16), encoder_hidden_states=torch.randn(1, 8, 16),
              encoder_hidden_states_mask=torch.ones(1, 8, dtype=torch.long), timestep=torch.tensor([1.0]),
              img_shapes=[(1, 4, 4)])
    with torch.no_grad():
        ref = model(**kw).sample
        out = torch.compile(model, backend="qkfuse")(**kw).sample
    assert counters["qkfuse"]["norm_rope_calls"] == 2 * layers  # image and text stream
    assert counters["qkfuse"]["norm_rope_sites"] == 4 * layers and counters["qkfuse"]["norm_rope_refused"] == 0
    assert float((out - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
    with torch.no_grad():
        report = qkfuse.explain(model, **kw)
    assert len(report.fused) == 4 * layers and not report.refused
    assert all(r.recipe == "rms + interleaved rope[16] half-table" for r in report.fused)
