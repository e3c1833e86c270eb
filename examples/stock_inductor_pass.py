"""The qkfuse pass in stock Inductor: torch.compile's default backend, with qkfuse.pass_() as
Inductor's post_grad_custom_pre_pass (for setups that must keep backend="inductor")."""

import torch
from torch._dynamo.utils import counters

import qkfuse
from _attention import Attention, inputs

torch.manual_seed(0)
model = Attention().eval()
x, cos, sin = inputs()

with torch.no_grad():
    expected = model(x, cos, sin)
    counters.clear()
    compiled = torch.compile(model, options={"post_grad_custom_pre_pass": qkfuse.pass_()})
    # The pass (and so its counters) runs when Inductor compiles, not on an FX graph cache hit.
    with torch._inductor.config.patch(fx_graph_cache=False):
        out = compiled(x, cos, sin)

torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
stats = dict(counters["qkfuse"])
if stats.get("norm_rope_sites") != 2 or stats.get("norm_rope_calls") != 1:
    raise SystemExit(f"FAILED: expected q and k fused into one call, counters: {stats}")
print(f"ok stock_inductor_pass: q and k fused into 1 call, max |out - eager| = {(out - expected).abs().max():.2g}")
