"""Families anchored on a RoPE output: ``norm_rope`` (per-head norm, then RoPE) and ``rope``.

``norm_rope``: the RoPE (rope.py), up through views that keep rows intact (transpose, same-shape
view), to the RMSNorm or LayerNorm (rms_norm.py): per head, or across heads when a head view
(``view(..., H, D)``) of the norm output comes first (OLMo2/3, OLMoE, MiniMax-M2, ESMC: the
recipe's ``norm_heads_dim``); a weight with a row per head (Cohere, StableLM) is the recipe's
``weight_heads_dim``, in the op input's layout. ``rope`` (off by default): the same RoPE with no norm in
front (DeepSeek's de-interleaved RoPE, the recipe's ``deinterleave_input``, only here: after a norm it
is refused); a RoPE that a norm feeds belongs to ``norm_rope`` (fusing the RoPE alone would cut the
norm+RoPE kernel Inductor generates in two).

Conditions. Every intermediate of the chain is used only inside it; head_dim is static; the
matchers' own conditions (rounding steps the recipe reproduces, cos/sin that broadcast to the
rotated input and do not depend on it). Otherwise the site is refused with the reason.

The pass (qkfuse/passes) pairs sites sharing cos/sin with the same recipe into one
``qk_norm_rope`` call (q and k), else one ``norm_rope`` call per site; a k site whose output is
written into a KV cache absorbs the write (patterns/kv_cache.py).
"""

from __future__ import annotations

import torch
from torch.fx import Node

from ..ops.recipe import Recipe
from . import canon, rms_norm, rope
from .canon import dtype_of, is_op, static_int, tensor_val
from .family import (ConcatSite, MatchContext, PartRows, Refused, Site, check_interior, require_static_head_dim,
                     table_value)

aten = torch.ops.aten

__all__ = ["CONCAT_FAMILY", "FAMILY", "ROPE_ONLY_FAMILY", "NormCatRope", "NormRope", "Refused", "RopeOnly", "Site",
           "match_concat_site", "match_site"]

FAMILY = "norm_rope"
CONCAT_FAMILY = "norm_cat_rope"
ROPE_ONLY_FAMILY = "rope"


def _rows_of(src: Node) -> canon.RowViews:
    rv = canon.row_view_source(src)
    if rv is None:
        raise Refused("a view between the norm and the RoPE moves data across rows")
    return rv


def _rotated_part_of_a_norm(y: Node) -> str | None:
    """Why a RoPE on a slice of a norm output is not partial rotary as the recipe computes it."""
    sl = canon.last_dim_slice(y)
    if sl is None:
        return None
    try:
        rms_norm.match_norm(_rows_of(sl.src).src)
    except Refused:
        return None
    if sl.start == 0:
        return (f"partial rotary: the pass-through part of head_dim[{sl.stop}:] is not concatenated right after "
                "the rotated part")
    return (f"RoPE on head_dim[{sl.start}:{sl.stop}] (pass-through first, e.g. DeepSeek-V4): the recipe rotates "
            "the leading rotary_dim dims (the kernels would need a rotary offset)")


def _norm_of(rows: canon.RowViews):
    """(norm, its views to the RoPE's rows, head view) of the RMSNorm whose output the RoPE's rows are:
    per head (head view None), or across heads when those rows are a head view ``view(..., H, D)`` of
    one norm over the flat projection (OLMo2's q_norm; head view = (H, D)). Raises Refused."""
    split = canon.last_dim_split_source(rows.src)
    if split is not None:
        flat, heads, head_dim = split
        try:
            norm = rms_norm.match_norm(flat)
            if norm.heads_dim:  # (a [H, D] weight of a flat [.., H*D] norm: not a norm across heads)
                raise Refused("an [H, D] weight on a norm across heads")
            return norm, [*rows.nodes, rows.src], (heads, head_dim)
        except Refused:
            pass
    return rms_norm.match_norm(rows.src), rows.nodes, None


def _refuse_deinterleaved_after_norm(r) -> None:
    if r.deinterleave_input:
        raise Refused("DeepSeek's de-interleaved RoPE (apply_rotary_pos_emb_interleave) after a q/k norm: the "
                      "recipe has it for RoPE alone (the norm's weight would be read in the permuted order)")


def _norm_site(family: str, r, anchor: Node, perm: list[int], norm, views: list[Node], head_view) -> Site:
    """The site of `norm` rotated by RoPE `r`; `perm` takes the norm input (after `head_view`) to the
    RoPE's layout; `anchor` and the interior: the RoPE output's (norm_rope) or the part's (a
    concatenation's input: the RoPE's nodes belong to the ConcatSite)."""
    require_static_head_dim(norm.x)
    n = len(perm)  # across heads: the heads are dim n - 2 of the head view; perm moves them
    heads_dim = perm.index(n - 2) - n if head_view is not None else 0
    # a weight with a row per head of the norm input's dim norm.heads_dim: that dim's place in the op input
    weight_heads_dim = perm.index(n + norm.heads_dim) - n if norm.heads_dim else 0
    recipe = Recipe(**norm.recipe_part(), **r.recipe_part(), norm_heads_dim=heads_dim,
                    weight_heads_dim=weight_heads_dim)
    interior = [*(r.interior if anchor is r.anchor else ()), *views, *norm.interior]
    check_interior(interior, anchor)
    return Site(family, anchor, norm.x, perm, norm.weight, norm.eps, r.cos, r.sin, recipe, interior,
                norm.leaves, split=head_view, bias=norm.bias)


def match_site(add: Node) -> Site:
    """Read one RoPE output as a norm_rope site; raises Refused."""
    r = rope.match_rope(add)
    rows = _rows_of(r.src)
    try:
        norm, views, head_view = _norm_of(rows)
    except Refused as e:
        try:
            _sequence_concat(r, rows)
        except Refused:
            pass
        else:
            raise Refused(f"RoPE input is a concatenation (e.g. text and image tokens): a {CONCAT_FAMILY} site",
                          wrong_kind=True, site_of=CONCAT_FAMILY) from None
        from .norm_slice_rope import FAMILY as SLICE_FAMILY, rotated_row_slice

        if rotated_row_slice(r) is not None:
            raise Refused(f"RoPE on a slice of a norm output's rows (e.g. image tokens before text ones): a "
                          f"{SLICE_FAMILY} site", wrong_kind=True, site_of=SLICE_FAMILY) from None
        raise Refused(_rotated_part_of_a_norm(rows.src) or str(e), wrong_kind=True) from None
    _refuse_deinterleaved_after_norm(r)
    return _norm_site(FAMILY, r, r.anchor, rows.perm, norm, views, head_view)


def _sequence_concat(r, rows: canon.RowViews) -> tuple[int, int, int]:
    """(dim, its place in the RoPE's layout, the cos/sin dim it is) of the concatenation the RoPE's rows
    are (``rows.src``), when it joins positions: a dim the tables vary along (Flux's text and image
    tokens). Else Refused, wrong_kind: a concatenation of heads (StableLM's per-head norms) is no
    such site (one launch per head would not pay)."""
    cat, op_rank = rows.src, len(rows.perm)
    if not is_op(cat, aten.cat):
        raise Refused("the RoPE input is not a concatenation", wrong_kind=True)
    dim = canon.norm_dim(cat.args[1] if len(cat.args) > 1 else 0, op_rank)
    if dim == op_rank - 1:
        raise Refused("a concatenation along head_dim, not of positions", wrong_kind=True)
    op_dim = rows.perm.index(dim)
    for v in (table_value(r.cos), table_value(r.sin)):
        td = None if v is None else op_dim - (op_rank - v.dim())
        if td is not None and td >= 0 and static_int(v.shape[td]) != 1:
            return dim, op_dim, td
    raise Refused("a concatenation along a dim the cos/sin tables broadcast over (not of positions)",
                  wrong_kind=True)


def _concat_of_norms(r, rows: canon.RowViews):
    """([(cat input, its RowViews, (norm, views, head view))], dim, op dim, table dim) of a concatenation
    of positions (_sequence_concat) whose every part is a norm output; raises Refused."""
    dim, op_dim, table_dim = _sequence_concat(r, rows)
    parts = []
    for i, part in enumerate(rows.src.args[0]):
        try:
            part_rows = _rows_of(part)
            parts.append((part, part_rows, _norm_of(part_rows)))
        except Refused as e:
            raise Refused(f"part {i} of the concatenation before the RoPE: {e}") from None
    return parts, dim, op_dim, table_dim


def match_concat_site(add: Node) -> ConcatSite:
    """Read one RoPE output whose input is a concatenation of norm outputs as a norm_cat_rope site."""
    r = rope.match_rope(add)
    rows = _rows_of(r.src)
    parts, dim, op_dim, table_dim = _concat_of_norms(r, rows)
    _refuse_deinterleaved_after_norm(r)
    sites, start = [], 0
    for part, part_rows, (norm, views, head_view) in parts:
        # the part in the RoPE's layout: part == norm_out.permute(part_rows.perm), r.src == cat.permute(rows.perm)
        perm = [part_rows.perm[j] for j in rows.perm]
        site = _norm_site(FAMILY, r, part, perm, norm, views, head_view)
        length = tensor_val(part).shape[dim]
        site.rows = PartRows(op_dim, start, length, table_dim)
        start = start + length
        sites.append(site)
    first = sites[0]
    interior = [*r.interior, *rows.nodes, rows.src, *(n for s in sites for n in s.interior)]
    interior += check_interior(interior, r.anchor)
    return ConcatSite(CONCAT_FAMILY, r.anchor, first.x, first.perm, first.weight, first.eps, r.cos, r.sin,
                      first.recipe, interior, [], parts=tuple(sites))


class NormRope(rope.AtRopes):
    name = FAMILY

    def match(self, candidate: Node, ctx: MatchContext) -> Site:
        return match_site(candidate)


class NormCatRope(NormRope):
    name = CONCAT_FAMILY

    def match(self, candidate: Node, ctx: MatchContext) -> Site:
        return match_concat_site(candidate)


class RopeOnly(NormRope):
    name = ROPE_ONLY_FAMILY

    def match(self, candidate: Node, ctx: MatchContext) -> Site:
        r = rope.match_rope(candidate)
        rows = _rows_of(r.src)
        y = rows.src
        from .norm_slice_rope import FAMILY as SLICE_FAMILY, rotated_row_slice

        def slice_of_a_norm(rv):
            if rotated_row_slice(r) is None:
                raise Refused("not a slice of a norm output")

        from .rope_norm import FAMILY as ROPE_NORM_FAMILY, norm_after

        def norm_after_it(rv):
            if norm_after(r) is None:
                raise Refused("no norm after it")

        for family, reader in ((FAMILY, _norm_of), (CONCAT_FAMILY, lambda rv: _concat_of_norms(r, rv)),
                               (SLICE_FAMILY, slice_of_a_norm), (ROPE_NORM_FAMILY, norm_after_it)):
            try:
                reader(rows)  # a norm per head or across heads; a concatenation of norm outputs; a slice
            except Refused:
                continue
            disabled = "" if family in ctx.families else f", and family {family!r} is disabled"
            raise Refused(f"a q/k norm feeds this RoPE: a {family} site{disabled}", wrong_kind=True,
                          site_of=family)
        require_static_head_dim(y)
        recipe = Recipe(norm="none", norm_dtype=dtype_of(y), **r.recipe_part())
        interior = [n for n in (*r.interior, *rows.nodes) if n is not y]
        check_interior(interior, r.anchor)
        return Site(ROPE_ONLY_FAMILY, r.anchor, y, rows.perm, None, 0.0, r.cos, r.sin, recipe, interior, [])
