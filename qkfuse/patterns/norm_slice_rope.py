"""Family ``norm_slice_rope``: one q/k norm, RoPE on a slice of its rows, the rows put back together.

Video and image DiTs that append text tokens rotate only the image rows of the normed q and k:

    HunyuanVideo, HunyuanImage:  q = cat([apply_rotary_emb(q[:, :-T], freqs), q[:, -T:]], dim=1)
    CogView4, CogVideoX:         q[:, :, T:] = apply_rotary_emb(q[:, :, T:], freqs)

(the slice assignment reaches post-grad as ``slice_scatter``; canon.assembled_rows reads both as
a concatenation of parts). The site is the assembled tensor: each part is the rows of the one norm
output, rotated (the RoPE's part) or not; the replacement computes each part straight into its
rows of one output (as ``norm_cat_rope`` does), so the norm, the slices, the RoPE and the
concatenation (or the scatter) all go.

Conditions: the parts are, in order, consecutive rows of one norm output (per head: a norm across
heads is refused) along one dim, through the same views; exactly one part is rotated; slice bounds
are static ints; every intermediate is used only inside the site; the RoPE's own conditions
(rope.py) and the norm's (rms_norm.py).
"""

from __future__ import annotations

import torch
from torch.fx import Node

from ..ops.recipe import Recipe
from . import canon, rope
from .canon import dtype_of, static_int, tensor_val
from .family import ConcatSite, MatchContext, PartRows, Refused, Site, check_interior, require_static_head_dim
from .norm_rope import _norm_of

FAMILY = "norm_slice_rope"

__all__ = ["FAMILY", "NormSliceRope", "match_slice_site", "rotated_row_slice"]


def rotated_row_slice(r) -> tuple[canon.RowViews, canon.RowSlice, canon.RowViews] | None:
    """(the RoPE input's views to the slice, the slice, the slice source's views to the norm output)
    when RoPE `r` rotates a slice of a norm output's rows (no Refused: None if it does not)."""
    rows = canon.row_view_source(r.src)
    sl = None if rows is None else canon.row_slice(rows.src)
    src = None if sl is None else canon.row_view_source(sl.src)
    if src is None:
        return None
    try:
        _norm_of(src)
    except Refused:
        return None
    return rows, sl, src


def _assembly_of(rotated: Node):
    """The node that puts the rotated rows back with the others, and its reading (assembled_rows)."""
    users = list(rotated.users)
    if len(users) != 1:
        raise Refused(f"the RoPE output of a slice has {len(users)} users, not one concatenation or slice "
                      "assignment")
    (u,) = users
    if canon.is_op(u, torch.ops.aten.copy) and len(u.users) == 1 and u.args[1] is rotated:
        u = next(iter(u.users))
    assembly = canon.assembled_rows(u)
    if assembly is None:
        raise Refused("the RoPE of a slice of a norm output is not concatenated back or assigned into it "
                      f"({u.name})")
    return u, assembly


def _tile(ranges: list[tuple[int, int | None]], size) -> bool:
    """Whether the (start, end) slices, in order, cover [0, size) once each, by Python's slice rule."""
    n = static_int(size)
    if n is not None:  # bounds as offsets (negative ones from the end, clamped)
        ranges = [tuple(None if v is None else max(0, min(v + n if v < 0 else v, n)) for v in r) for r in ranges]
        ranges = [(a, n if b is None else b) for a, b in ranges]
        return ranges[0][0] == 0 and ranges[-1][1] == n and all(
            b == c for (_, b), (c, _) in zip(ranges, ranges[1:]))
    # a symbolic size: the bounds must meet as written (q[:, :-T] then q[:, -T:])
    return ranges[0][0] == 0 and ranges[-1][1] is None and all(
        b is not None and b == c for (_, b), (c, _) in zip(ranges, ranges[1:]))


def _slice_length(size, start: int, end: int | None):
    """len(range(size)[start:end]) for a static or symbolic size (Python's rule for static bounds)."""
    n = static_int(size)
    if n is not None:
        return len(range(n)[start:end])
    # a symbolic size: bounds as written (_tile checked they meet); clamping would leave min/max
    # expressions that do not compare equal to the graph's own sizes
    def offset(v):
        return size if v is None else v + size if v < 0 else v

    return offset(end) - offset(start)


def match_slice_site(add: Node) -> ConcatSite:
    """Read RoPE output `add`, of a slice of a norm output's rows, with the concatenation or slice
    assignment that puts it back, as one norm_slice_rope site; raises Refused."""
    r = rope.match_rope(add)
    found = rotated_row_slice(r)
    if found is None:
        raise Refused("the RoPE input is not a slice of a norm output's rows", wrong_kind=True)
    rows, sl, src = found
    norm, views, head_view = _norm_of(src)
    if head_view is not None:
        raise Refused("RoPE on a slice of a norm across heads (not fused yet)")
    if r.deinterleave_input:
        raise Refused("DeepSeek's de-interleaved RoPE after a q/k norm: the recipe has it for RoPE alone")
    require_static_head_dim(norm.x)
    whole, (dim, pieces, assembly_nodes) = _assembly_of(r.anchor)
    norm_out = src.src
    perm = [src.perm[j] for j in rows.perm]  # norm output -> the RoPE's (and the whole's) layout
    x_dim = src.perm[sl.dim]  # the sliced dim, in the norm output's (and x's) layout
    if rows.perm.index(sl.dim) != dim:
        raise Refused("the RoPE's rows are put back along another dim than they were sliced")
    if tuple(tensor_val(norm.x).shape) != tuple(tensor_val(norm_out).shape):
        raise Refused("the norm's input and output differ in shape")

    interior = [*r.interior, *rows.nodes, *views, *norm.interior, *assembly_nodes]
    if sl.src is not norm_out:
        interior += src.nodes
    ranges, part_specs = [], []
    for i, piece in enumerate(pieces):
        if piece.value is r.anchor:
            ranges.append((sl.start, sl.end))
            part_specs.append((True, piece.value))
            interior.append(rows.src)
            continue
        if piece.value is not None:  # a concatenation's input: rows of the norm output, not rotated
            prow = canon.row_view_source(piece.value)
            psl = None if prow is None else canon.row_slice(prow.src)
            base = None if psl is None else canon.row_view_source(psl.src)
            if base is None or base.src is not norm_out or [base.perm[j] for j in prow.perm] != perm \
                    or base.perm[psl.dim] != x_dim:
                raise Refused(f"part {i} of the concatenation is not rows of the same norm output "
                              "(a RoPE on each part, or another tensor)")
            ranges.append((psl.start, psl.end))
            interior += [*prow.nodes, prow.src, *(base.nodes if psl.src is not norm_out else ())]
        else:  # rows a slice assignment leaves of its target
            base = canon.row_view_source(piece.rows_of)
            if base is None or base.src is not norm_out or base.perm != perm or base.perm[dim] != x_dim:
                raise Refused("the slice assignment's target is not the norm output the RoPE's rows come from")
            ranges.append((piece.start, piece.end))
            interior += base.nodes
        part_specs.append((False, piece.value))
    if sum(rotated for rotated, _ in part_specs) != 1:
        raise Refused("more than one rotated part (not fused yet)")
    if not _tile(ranges, tensor_val(norm_out).shape[x_dim]):
        raise Refused("the parts do not cover the norm output's rows once each, in order")

    n = len(perm)
    weight_heads_dim = perm.index(n + norm.heads_dim) - n if norm.heads_dim else 0
    out_dtype = dtype_of(whole)  # (a concatenation promotes; a slice assignment casts to its target)
    whole_val = tensor_val(whole)
    parts, start = [], 0
    for (rotated, value), bounds in zip(part_specs, ranges):
        rope_part = r.recipe_part() if rotated else {}
        recipe = Recipe(**norm.recipe_part(), **{**rope_part, "out_dtype": out_dtype},
                        weight_heads_dim=weight_heads_dim)
        x_rows = (x_dim, slice(*bounds))
        length = _slice_length(tensor_val(norm_out).shape[x_dim], *bounds)
        part = Site(FAMILY, whole, norm.x, perm, norm.weight, norm.eps, r.cos if rotated else None,
                    r.sin if rotated else None, recipe, [], [], bias=norm.bias, x_rows=x_rows)
        # (the RoPE's tables are its rows' own: table_dim None reads them as the RoPE did)
        part.rows = PartRows(dim, start, length, None)
        start = start + length
        parts.append(part)
    if not canon.same_int(start, whole_val.shape[dim]):
        raise Refused("the parts' rows do not add up to the assembled tensor's")
    parts[0].leaves = list(norm.leaves)
    interior = list(dict.fromkeys(interior))
    interior += check_interior(interior, whole)
    first = parts[0]
    return ConcatSite(FAMILY, whole, first.x, first.perm, first.weight, first.eps, r.cos, r.sin, first.recipe,
                      interior, [], bias=norm.bias, parts=tuple(parts))


class NormSliceRope(rope.AtRopes):
    name = FAMILY

    def match(self, candidate: Node, ctx: MatchContext) -> Site:
        return match_slice_site(candidate)
