"""torch.compile(model, backend="qkfuse") on a hand-written attention block.

The "qkfuse" backend is Inductor plus the qkfuse pass; the name is found through the installed
entry point, so the script never imports qkfuse.
"""

import torch
from torch._dynamo.utils import counters

from _attention import Attention, inputs

torch.manual_seed(0)
model = Attention().eval()
x, cos, sin = inputs()

with torch.no_grad():
    expected = model(x, cos, sin)
    counters.clear()
    compiled = torch.compile(model, backend="qkfuse")
    # The pass (and so its counters) runs when Inductor compiles, not on an FX graph cache hit.
    with torch._inductor.config.patch(fx_graph_cache=False):
        out = compiled(x, cos, sin)

torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
stats = dict(counters["qkfuse"])
if stats.get("norm_rope_sites") != 2 or stats.get("norm_rope_calls") != 1:
    raise SystemExit(f"FAILED: expected q and k fused into one call, counters: {stats}")
print(f"ok compile_backend: q and k fused into 1 call, max |out - eager| = {(out - expected).abs().max():.2g}")
