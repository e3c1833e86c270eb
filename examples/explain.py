"""qkfuse.explain: compile once and list every candidate site, fused or not, and why.

Here k's chain is fused, but q's is refused on purpose: the block also returns the normalised
queries (before RoPE), so an intermediate of q's chain has a user outside it and the fused op,
which only produces the final rotated q, cannot replace the chain.
"""

import torch
import torch.nn.functional as F

import qkfuse
from _attention import Attention, inputs, rotate_half


class AttentionReturningQ(Attention):
    def forward(self, x, cos, sin):
        b, s, _ = x.shape
        q_normed = self.q_norm(self.q_proj(x).view(b, s, -1, self.head_dim))
        q = q_normed.transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(b, s, -1, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1)), q_normed


torch.manual_seed(0)
with torch.no_grad():  # inference graphs: with grad enabled the chains are saved for backward, left alone
    report = qkfuse.explain(AttentionReturningQ().eval(), *inputs())
print(report.table())

if len(report.fused) != 1 or len(report.refused) != 1:
    raise SystemExit(f"FAILED: expected 1 fused and 1 refused site, got {len(report.fused)} and {len(report.refused)}")
reason = report.refused[0].reason
if "user outside the chain" not in reason:
    raise SystemExit(f"FAILED: unexpected reason for the refused site: {reason!r}")
print(f"ok explain: 1 fused, 1 refused ({reason})")
