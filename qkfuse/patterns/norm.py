"""Family ``norm`` (opt-in): per-head RMSNorms of q and k with no RoPE after them, one call for both.

For models whose RoPE is elsewhere or absent. The site is the norm (rms_norm.py) alone, the recipe
``rotary_dim=0``; only q+k pairs are fused (``pairs_only``): the gain is two norms in one launch,
and a lone norm in a call of its own saves nothing over the kernel Inductor generates for it.

Candidates: RMSNorm outputs over the head dim of a per-head layout (the norm input is a projection
viewed as ``[..., H, D]``, through transposes and strided slices, or has 4 dims), which feed no
RoPE (those belong to ``norm_rope``, fused or refused there). A hidden-state norm (``[B, S,
hidden]``) is not a candidate.

Opt-in because a pair can still lose: on CUDA the fused call is an opaque boundary to Inductor's
fusion, so a norm that Inductor would have merged into its neighbours (a scale, a layout copy
before attention) costs a pass over the tensor of its own; on CPU the call is inline torch ops and
changes little. Not measured on a GPU yet.
"""

from __future__ import annotations

import torch
from torch.fx import Node

from ..ops.recipe import Recipe
from . import canon, rms_norm, rope
from .canon import aten, is_op, tensor_val
from .family import MatchContext, Refused, Site, check_interior, require_static_head_dim

FAMILY = "norm"
_CHAIN_LIMIT = 6  # nodes from rsqrt to the norm output: mul, converts, weight mul


def _norm_output(r: Node) -> Node | None:
    """The output of the RMSNorm around rsqrt node `r`: the farthest node of the single-user chain
    of products and copies below it that reads as a norm output."""
    chain, n = [], r
    while len(n.users) == 1 and len(chain) < _CHAIN_LIMIT:
        (n,) = n.users
        if not (is_op(n, aten.mul) or canon.is_copy(n)):
            break
        chain.append(n)
    for y in reversed(chain):
        try:
            rms_norm.match_rms_norm(y)
        except Refused:
            continue
        return y
    return None


def _per_head(x: Node) -> bool:
    """x is laid out per head: [..., H, D] split from a projection's last dim (behind row views and
    a strided slice such as a fused qkv's), or 4-D ([B, S, H, D] / [B, H, S, D])."""
    src = canon.row_view_source(x)
    src = src.src if src is not None else x
    sl = canon.last_dim_slice(src)
    if sl is not None:
        src = sl.src
    return canon.last_dim_split_source(src) is not None or tensor_val(x).dim() == 4


class NormOnly:
    name = FAMILY
    pairs_only = True

    def candidates(self, graph: torch.fx.Graph):
        rotated = rope.rotated_tensors(graph)
        for r in graph.nodes:
            if canon.rsqrt_operand(r) is None:
                continue
            y = _norm_output(r)
            if y is not None and y not in rotated and _per_head(rms_norm.match_rms_norm(y).x):
                yield y

    def match(self, candidate: Node, ctx: MatchContext) -> Site:
        norm = rms_norm.match_rms_norm(candidate)
        require_static_head_dim(norm.x)
        recipe = Recipe(**norm.recipe_part(), out_dtype=canon.dtype_of(candidate), weight_heads_dim=norm.heads_dim)
        check_interior(norm.interior, candidate)
        x_dims = list(range(tensor_val(norm.x).dim()))
        return Site(FAMILY, candidate, norm.x, x_dims, norm.weight, norm.eps, None, None, recipe, norm.interior,
                    norm.leaves)
