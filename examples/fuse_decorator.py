"""@qkfuse.fuse: compile an attention class (every instance) or a plain function with the qkfuse backend."""

import torch
from torch._dynamo.utils import counters

import qkfuse
from _attention import Attention, inputs, rope_tables, rotate_half


@qkfuse.fuse
class FusedAttention(Attention):
    """Attention whose forward is compiled with the qkfuse backend, for every instance."""


def qk_norm_rope(q, k, q_weight, k_weight, cos, sin, eps=1e-6):
    """Per-head RMSNorm then RoPE of q and k: [B, S, H, D] in, [B, H, S, D] out."""

    def norm_rope(x, weight):
        xf = x.float()
        x = weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
        x = x.transpose(1, 2)
        return x * cos + rotate_half(x) * sin

    return norm_rope(q, q_weight), norm_rope(k, k_weight)


fused_qk_norm_rope = qkfuse.fuse(dynamic=True)(qk_norm_rope)  # one compile for every sequence length


def check_fused(what: str) -> None:
    stats = dict(counters["qkfuse"])
    if stats.get("norm_rope_sites") != 2 or stats.get("norm_rope_calls") != 1:
        raise SystemExit(f"FAILED: {what}: expected one compile fusing q and k into one call, counters: {stats}")


torch.manual_seed(0)
# The pass (and so its counters) runs when Inductor compiles, not on an FX graph cache hit.
torch._inductor.config.fx_graph_cache = False

with torch.no_grad():
    # The class: an instance with the same weights as a plain Attention, the eager reference.
    eager = Attention().eval()
    fused = FusedAttention().eval()
    fused.load_state_dict(eager.state_dict())
    x, cos, sin = inputs()
    counters.clear()
    torch.testing.assert_close(fused(x, cos, sin), eager(x, cos, sin), rtol=1e-5, atol=1e-5)
    check_fused("@qkfuse.fuse class")

    # The function, compiled once with dynamic shapes, called at three sequence lengths. The norm
    # weights are nn.Parameters, whose shapes Dynamo keeps static: that keeps head_dim static, which
    # the fused op needs (with plain-tensor weights every dim is symbolic and nothing is fused).
    counters.clear()
    q_weight, k_weight = eager.q_norm.weight, eager.k_norm.weight
    for seq_len in (12, 20, 36):
        cos, sin = rope_tables(seq_len, 16)
        q, k = torch.randn(3, seq_len, 4, 16), torch.randn(3, seq_len, 2, 16)
        torch.testing.assert_close(fused_qk_norm_rope(q, k, q_weight, k_weight, cos, sin),
                                   qk_norm_rope(q, k, q_weight, k_weight, cos, sin), rtol=1e-5, atol=1e-5)
    check_fused("qkfuse.fuse(dynamic=True)(fn)")

print("ok fuse_decorator: class and dynamic-shape function fused (q + k in one call), results match eager")
