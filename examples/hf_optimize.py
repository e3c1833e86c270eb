"""qkfuse.optimize on an unmodified Hugging Face model: each decoder layer is compiled with the
qkfuse backend (regional compilation: one compile serves every layer), in place.

A tiny Qwen3ForCausalLM with random weights (built from a config, nothing is downloaded).
"""

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

import qkfuse

torch.manual_seed(0)
config = Qwen3Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128)
model = Qwen3ForCausalLM(config).eval()
input_ids = torch.randint(0, config.vocab_size, (1, 16))

with torch.no_grad():
    expected = model(input_ids).logits
    qkfuse.optimize(model)
    logits = model(input_ids).logits  # compiles
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)

# What the pass does (explain compiles the model once more, bypassing the caches, and lists every
# site; it runs in the caller's grad mode, and training graphs are left unfused).
with torch.no_grad():
    report = qkfuse.explain(model, input_ids)
print(report.table())
if not report.fused or report.refused:
    raise SystemExit("FAILED: expected every q and k site fused")
print(f"ok hf_optimize: logits match eager; {len(report.fused)} q/k sites of {config.num_hidden_layers} layers fused")
