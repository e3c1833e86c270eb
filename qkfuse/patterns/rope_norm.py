"""Family ``rope_norm``: RoPE first, then a per-head norm of its output (``q = norm(rope(q))``).

Llama4 (a weightless RMS "L2Norm" after its complex RoPE), nanochat (``F.rms_norm`` after the
RoPE), HunYuan dense and MoE (``query_layernorm``, an RMSNorm with weight, after the RoPE). The
site is the norm output; the recipe is the RoPE's and the norm's with ``rope_first``: the fused op
rotates x, rounds to x's dtype as the graph does, and normalises that (qkfuse/ops/recipe.py).

Conditions: the RoPE's output reaches the norm only through views that keep its layout (a
same-shape reshape, a clone) and has no other user; the norm is per head (over head_dim: the
RoPE's rows), an RMSNorm, L2 or LayerNorm (rms_norm.py); the RoPE returns its input's dtype (the
norm then reads what the recipe rounds to); not DeepSeek's de-interleaved RoPE; the RoPE's own
conditions (rope.py).
"""

from __future__ import annotations

from torch.fx import Node

from ..ops.recipe import Recipe
from . import canon, rms_norm, rope
from .canon import aten, dtype_of, is_op, tensor_val
from .family import MatchContext, Refused, Site, check_interior, require_static_head_dim

FAMILY = "rope_norm"

__all__ = ["FAMILY", "RopeNorm", "match_site", "norm_after"]

_SEARCH_DEPTH = 5  # nodes from the norm input to its rsqrt (convert, pow, mean, add, rsqrt)
_CHAIN_LIMIT = 6  # nodes from the rsqrt to the norm output (mul, converts, weight mul, bias add)


def _same_layout_views(n: Node) -> tuple[Node, list[Node]]:
    """The end of n's single-user chain of views that keep its shape and layout, and the chain."""
    views = []
    while len(n.users) == 1:
        (u,) = n.users
        if not ((is_op(u, aten.reshape, aten.view) and tensor_val(u) is not None
                 and tuple(tensor_val(u).shape) == tuple(tensor_val(n).shape)) or is_op(u, aten.clone)):
            break
        views.append(u)
        n = u
    return n, views


def _rsqrts_below(x: Node) -> list[Node]:
    """rsqrt nodes within _SEARCH_DEPTH uses of x (the norm of x, if any)."""
    found, frontier, seen = [], [x], {x}
    for _ in range(_SEARCH_DEPTH):
        nxt = []
        for n in frontier:
            for u in n.users:
                if u in seen:
                    continue
                seen.add(u)
                (found if canon.rsqrt_operand(u) is not None else nxt).append(u)
        frontier = nxt
    return found


def _norm_output(r: Node, inputs: frozenset):
    """(output, NormMatch) of the norm around rsqrt `r`: the farthest node of the single-user chain
    below r that reads as a norm of one of `inputs` (the RoPE's output and the views and clones after
    it, which the norm reader may see through, as it does F.layer_norm's clone)."""
    chain, n = [], r
    while len(n.users) == 1 and len(chain) < _CHAIN_LIMIT:
        (n,) = n.users
        if not (is_op(n, aten.mul, aten.add) or canon.is_copy(n)):
            break
        chain.append(n)
    for y in reversed(chain):
        try:
            norm = rms_norm.match_norm(y)
        except Refused:
            continue
        if norm.x in inputs:
            return y, norm
    return None


def norm_after(r) -> tuple[Node, object, list[Node], Node] | None:
    """(norm output, NormMatch, the views from the RoPE's output to the norm input, that output) of
    the per-head norm that RoPE `r`'s output feeds, else None. The RoPE's output is r's anchor or,
    when the anchor is a widening convert (the norm's own ``x.float()``, read by rope.py as the
    RoPE's), what it converts."""
    outputs = [r.anchor]
    source = canon.upcast_source(r.anchor)
    if source is not r.anchor:
        outputs.append(source)
    for out in outputs:
        x, views = _same_layout_views(out)
        for rs in _rsqrts_below(x):
            found = _norm_output(rs, frozenset((out, *views)))
            if found is not None:
                return (*found, views, out)
    return None


def match_site(add: Node) -> Site:
    """Read one RoPE output whose norm follows as a rope_norm site; raises Refused."""
    r = rope.match_rope(add)
    found = norm_after(r)
    if found is None:
        raise Refused("no per-head norm reads this RoPE's output", wrong_kind=True)
    y, norm, views, rope_out = found
    if r.deinterleave_input:
        raise Refused("DeepSeek's de-interleaved RoPE before a norm: the recipe has it for RoPE alone")
    rows = canon.row_view_source(r.src)
    if rows is None:
        raise Refused("a view before the RoPE moves data across rows")
    x = rows.src
    rope_part = r.recipe_part()
    # The norm reads the RoPE's output rounded to x's dtype, or (torch < 2.13's joint graph drops the
    # bf16 -> float32 round trip of a type_as before x.float()) unrounded, as the RoPE computed it.
    keep = dtype_of(rope_out) != dtype_of(x)
    if keep and dtype_of(rope_out) != rope_part["rope_dtype"]:
        raise Refused(f"the RoPE computes in {rope_part['rope_dtype']} and returns {dtype_of(rope_out)} for a "
                      f"{dtype_of(x)} input: the recipe rounds its output to the input's dtype or keeps it")
    require_static_head_dim(x)
    # (the RoPE's out_dtype is the rounding after the RoPE: x's; the result is the norm's)
    recipe = Recipe(**norm.recipe_part(), **{**rope_part, "out_dtype": dtype_of(y)}, rope_first=True,
                    weight_heads_dim=norm.heads_dim, keep_rope_dtype=keep)
    interior = [n for n in (*r.interior, *rows.nodes, *views, *norm.interior) if n is not x]
    interior = list(dict.fromkeys(interior))
    check_interior(interior, y)
    return Site(FAMILY, y, x, rows.perm, norm.weight, norm.eps, r.cos, r.sin, recipe, interior, list(norm.leaves),
                bias=norm.bias)


class RopeNorm(rope.AtRopes):
    name = FAMILY

    def match(self, candidate: Node, ctx: MatchContext) -> Site:
        return match_site(candidate)
