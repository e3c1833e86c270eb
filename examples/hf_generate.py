"""HF generate with qkfuse: the decode step compiled by transformers itself, with a static KV cache.

    model.generate(ids, cache_implementation="static", compile_config=CompileConfig(backend="qkfuse"))

transformers compiles the decode step (mode="reduce-overhead": CUDA graphs on a GPU); qkfuse fuses
each layer's q/k norm + RoPE and absorbs the KV-cache write of k and v into the same call. On CUDA
that is one Triton launch per layer writing the cache in place. transformers compiles on accelerators
only; `_compile_all_devices=True` makes it compile on CPU too, so that this script runs anywhere.

A tiny Qwen3ForCausalLM with random weights (built from a config, nothing is downloaded).
"""

import torch
from torch._dynamo.utils import counters
from transformers import CompileConfig, Qwen3Config, Qwen3ForCausalLM

import qkfuse

qkfuse.register()  # the "qkfuse" backend name, also when this checkout is not pip-installed

torch.manual_seed(0)
config = Qwen3Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128)
model = Qwen3ForCausalLM(config).eval()
input_ids = torch.randint(0, config.vocab_size, (2, 8))
greedy = dict(max_new_tokens=6, do_sample=False, cache_implementation="static")

expected = model.generate(input_ids, **greedy, disable_compile=True)
compile_config = CompileConfig(backend="qkfuse")
compile_config._compile_all_devices = model.device.type == "cpu"  # (a class attribute, not an argument)
with torch._inductor.config.patch(fx_graph_cache=False):  # so that the pass runs (and counts) here
    tokens = model.generate(input_ids, **greedy, compile_config=compile_config)

stats = counters["qkfuse"]
if not torch.equal(tokens, expected):
    raise SystemExit(f"FAILED: generated tokens differ from eager:\n{tokens}\n{expected}")
if stats["norm_rope_calls"] < config.num_hidden_layers or stats["kv_cache_writes"] < config.num_hidden_layers:
    raise SystemExit(f"FAILED: expected a fused q+k call with its KV-cache write per layer, got {dict(stats)}")
print(f"ok hf_generate: tokens equal eager greedy decoding; decode step: {stats['norm_rope_calls']} fused "
      f"calls, {stats['kv_cache_writes']} of them writing the KV cache ({config.num_hidden_layers} layers)")
