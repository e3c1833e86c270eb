"""Run in a fresh interpreter by the tests: compile a tiny Qwen3ForCausalLM, print a JSON report.

    python tests/compile_probe.py [--backend qkfuse] [--options JSON] [--layers N]

It does NOT import qkfuse: the "qkfuse" backend string must resolve through the installed
torch_dynamo_backends entry point. The report has the max |logits - eager| (fp32), the qkfuse and
FX-graph-cache counters, how many times a qkfuse:: op ran during one forward (profiler), and
whether qkfuse was imported (by the entry point) at all.
"""

import os
import sys

# Run as a script, this file's folder (tests/) is sys.path[0], and its kernels/ package would then
# shadow the `kernels` library that transformers (5.25+) imports: take the folder off the path.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse  # noqa: E402
import json  # noqa: E402

import torch  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402
from transformers import Qwen3Config, Qwen3ForCausalLM  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="qkfuse")
    ap.add_argument("--options", default="{}")
    ap.add_argument("--layers", type=int, default=2)
    a = ap.parse_args()
    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=a.layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
    model = Qwen3ForCausalLM(cfg).eval()
    ids = torch.randint(0, 128, (2, 11))
    imported_before = "qkfuse" in sys.modules
    with torch.no_grad():
        ref = model(ids).logits
        compiled = torch.compile(model, backend=a.backend, options=json.loads(a.options) or None)
        out = compiled(ids).logits
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            compiled(ids)
    op_calls = sum(1 for e in prof.events() if e.name.startswith("qkfuse::"))
    print(json.dumps({
        "max_abs_diff": float((out - ref).abs().max()),
        "max_abs_ref": float(ref.abs().max()),
        "qkfuse_counters": dict(counters["qkfuse"]),
        "inductor_counters": {k: v for k, v in counters["inductor"].items() if "cache" in k},
        "qkfuse_op_calls_per_forward": op_calls,
        "qkfuse_imported_before_compile": imported_before,
        "qkfuse_imported_after": "qkfuse" in sys.modules,
    }))


if __name__ == "__main__":
    main()
