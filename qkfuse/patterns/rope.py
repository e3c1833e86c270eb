"""The RoPE matcher: ``x*cos + rotate(x)*sin`` read from any of its spellings, as plain data.

Anchored on the output add (any operand order, optional ``.float()`` on x and one ``.to(dtype)``
on the result). rotate is

- neox ``cat(-x2, x1)``, the halves as slices, ``chunk``/``split``, or diffusers'
  ``reshape(..., 2, D/2).unbind(-2)``;
- interleaved ``stack(-x_odd, x_even, dim=-1).flatten(-2)``, the pairs as step-2 slices (GPT-J's
  ``rotate_every_two``, cohere, glm) or diffusers' ``reshape(..., D/2, 2).unbind(-1)``. GPT-J's
  ``repeat_interleave``'d cos/sin are full-width tables like any other: nothing to match there;

or the explicit pair rotation (Wan, SkyReels-V2, Wan-Animate): each pair (a, b) of x, its even/odd
elements or its two halves, becomes (a*c - b*s, a*s + b*c) with one c, s per pair (half-width
tables, the recipe's ``half_table``: Wan's ``freqs_cos[..., 0::2]`` / ``freqs_sin[..., 1::2]``),
written back by ``out = empty_like(x); out[..., 0::2] = ...; out[..., 1::2] = ...`` (post-grad:
``slice_scatter`` into an ``empty``) or ``cat`` / ``stack(..).flatten(-2)``. Pairs taken as the
even/odd elements and written back as halves, ``cat([x0*c - x1*s, x1*c + x0*s], -1)`` with x0/x1 =
x[..., 0::2]/[..., 1::2], are DeepSeek's ``apply_rotary_pos_emb_interleave`` (transformers 5; its
``cos[..., :d/2]`` is a half table): the recipe's ``deinterleave_input``;

or the complex multiply (QwenImage, Lumina2, Z-Image, Llama4, DeepSeek-V2):
``view_as_real(view_as_complex(x.float().reshape(..., D/2, 2)) * F).flatten(-2)``, F complex64:
(a + ib)(c + id) = (ac - bd) + i(ad + bc) is the interleaved pair rotation with c, s = real(F),
imag(F) (half-width tables, as data: ``ComplexPart``, since those views are no graph nodes);

or neox RoPE of DeepSeek's de-interleaving copy ``x.view(..., d/2, 2).transpose(-1, -2).reshape(..., d)``
(its earlier spelling of ``apply_rotary_pos_emb_interleave``; post-grad: reshape, permute, clone,
reshape), read as RoPE of x with ``deinterleave_input`` (the copy joins the site);

partial rotary ``cat([rope(x[..., :rd]), x[..., rd:]])``, wherever the cat is written (inside
the RoPE function or at the call site: the graphs are the same), the split as slices,
``split``/``chunk``.
"""

from __future__ import annotations

import dataclasses
import operator

import torch
from torch.fx import Node

from . import canon
from .canon import aten, dtype_of, is_op, tensor_val
from .family import ComplexPart, Refused, Table, table_node, table_value


@dataclasses.dataclass
class Rotation:
    src: Node  # the rotated tensor
    interleaved: bool
    nodes: list[Node]
    # cat(x2, -x1): rotate_half's negation (nanochat's rotation the other way: the recipe's negate_sin)
    flipped: bool = False


@dataclasses.dataclass
class RopeMatch:
    anchor: Node  # the node whose uses the fused op replaces
    src: Node  # the tensor RoPE is applied to (norm output, maybe behind views)
    cos: Table | None
    sin: Table | None
    rotary_dim: int
    interleaved: bool
    rope_dtype: torch.dtype
    out_dtype: torch.dtype
    interior: list[Node]
    half_table: bool = False  # cos/sin hold one value per rotated pair (rotary_dim // 2 wide)
    # src's pairs (x[2i], x[2i+1]) are rotated as neox halves (DeepSeek's de-interleaved RoPE)
    deinterleave_input: bool = False
    # the rotation the other way, cat(x2, -x1) * sin (nanochat): the recipe's negate_sin
    negate_sin: bool = False

    def recipe_part(self) -> dict:
        """The RoPE fields of the Recipe."""
        return dict(rope_dtype=self.rope_dtype, out_dtype=self.out_dtype, rotary_dim=self.rotary_dim,
                    interleaved=self.interleaved, half_table=self.half_table,
                    deinterleave_input=self.deinterleave_input, negate_sin=self.negate_sin)


def _slice_nodes(n: Node) -> list[Node]:
    """n and the split/unbind (+ its reshape) it is a getitem of."""
    out = [n]
    if n.target is operator.getitem:
        parent = n.args[0]
        out.append(parent)
        if is_op(parent, aten.unbind):
            out.append(parent.args[0])
    return out


def _cat_on_last_dim(n) -> list | None:
    """The parts of ``cat(parts, -1)``."""
    if is_op(n, aten.cat) and canon.is_last_dim(n.args[1] if len(n.args) > 1 else 0, n):
        return list(n.args[0])
    return None


def rotation(n: Node) -> Rotation | None:
    """``rotate_half(src)`` (neox or interleaved) spelled any known way, else None."""
    n_src, n_convs = canon.strip_converts(n)
    parts = _cat_on_last_dim(n_src)
    if parts is not None and len(parts) == 2:
        # cat(-x2, x1), or flipped: cat(x2, -x1)
        flipped = not is_op(parts[0], aten.neg) and is_op(parts[1], aten.neg)
        neg, plain = (parts[1], parts[0]) if flipped else (parts[0], parts[1])
        if is_op(neg, aten.neg):
            lo = canon.last_dim_slice(neg.args[0] if flipped else plain)
            hi = canon.last_dim_slice(plain if flipped else neg.args[0])
            if lo and hi and lo.src is hi.src and lo.step == hi.step == 1:
                d = canon.static_int(tensor_val(lo.src).shape[-1])
                h = d // 2 if d else None
                if d and d % 2 == 0 and (lo.start, lo.stop, hi.start, hi.stop) == (0, h, h, d):
                    return Rotation(lo.src, False, [*n_convs, n_src, neg, *_slice_nodes(neg.args[0]),
                                                    *_slice_nodes(plain)], flipped)
    # interleaved: reshape(cat([unsqueeze(-x_odd, -1), unsqueeze(x_even, -1)], -1), [..., D])
    if canon.merges_last_two_dims(n_src):
        pairs = _cat_on_last_dim(n_src.args[0])
        if pairs is not None and len(pairs) == 2 and all(
                is_op(u, aten.unsqueeze) and canon.is_last_dim(u.args[1], u) for u in pairs):
            u_neg, u_pos = pairs
            if is_op(u_neg.args[0], aten.neg):
                odd = canon.last_dim_slice(u_neg.args[0].args[0])
                even = canon.last_dim_slice(u_pos.args[0])
                if odd and even and odd.src is even.src and odd.step == even.step == 2:
                    d = canon.static_int(tensor_val(odd.src).shape[-1])
                    if d and (odd.start, even.start) == (1, 0) and odd.stop == even.stop == d:
                        nodes = [*n_convs, n_src, n_src.args[0], u_neg, u_pos, u_neg.args[0],
                                 *_slice_nodes(u_neg.args[0].args[0]), *_slice_nodes(u_pos.args[0])]
                        return Rotation(odd.src, True, nodes)
    return None


def symbolic_rotation_source(n: Node) -> Node | None:
    """x of ``cat(-x[..., h:], x[..., :h])`` whose slice bounds are symbolic (head_dim dynamic)."""
    parts = _cat_on_last_dim(canon.strip_converts(n)[0])
    if parts is None or len(parts) != 2 or not is_op(parts[0], aten.neg):
        return None
    hi, lo = parts[0].args[0], parts[1]
    if not (is_op(hi, aten.slice) and is_op(lo, aten.slice) and hi.args[0] is lo.args[0]):
        return None
    return hi.args[0] if canon.last_dim_slice(hi) is None and canon.last_dim_slice(lo) is None else None


def deinterleave_copy(n) -> tuple[Node, list[Node]] | None:
    """(x, the nodes from n down) of n = ``x.view(..., d/2, 2).transpose(-1, -2).reshape(..., d)``:
    DeepSeek's de-interleaving copy (evens first, then odds; post-grad a reshape, a permute of the
    last two dims, a clone and a reshape), else None."""
    if not canon.merges_last_two_dims(n):
        return None
    nodes = [n]
    inner = n.args[0]
    if is_op(inner, aten.clone):
        nodes.append(inner)
        inner = inner.args[0]
    if not is_op(inner, aten.permute):
        return None
    nd = canon.ndim_of(inner)
    if nd is None or nd < 2 or [canon.norm_dim(p, nd) for p in inner.args[1]] != [*range(nd - 2), nd - 1, nd - 2]:
        return None
    split = canon.last_dim_split_source(inner.args[0])
    if split is None or split[2] != 2:
        return None
    return split[0], [*nodes, inner, inner.args[0]]


@dataclasses.dataclass
class PairRotation:
    """``(a*c - b*s, a*s + b*c)`` for the pairs (a, b) of src, assembled at `anchor`."""
    anchor: Node
    src: Node
    cos: Node
    sin: Node
    interleaved: bool
    rope_dtype: torch.dtype
    out_dtype: torch.dtype
    exact_out: bool  # the assembly rounds nothing (out_dtype == rope_dtype): one convert after may join
    nodes: list[Node]
    # the pairs are x's even/odd elements and the outputs are written as halves (DeepSeek); then
    # `interleaved` (the output layout) is False
    deinterleave: bool = False


def _widened_part(op) -> tuple[canon.LastDimSlice, list[Node]] | None:
    """(the slice, its nodes from op down) of ``op`` = a last-dim slice behind widening converts."""
    if not isinstance(op, Node):
        return None
    src, nodes = canon.upcast_chain(op)
    sl = canon.last_dim_slice(src)
    if sl is None:
        return None
    return sl, nodes + _slice_nodes(src)


def _pair_split(lo: tuple, hi: tuple, d: int | None) -> bool | None:
    """interleaved (True) when the (start, stop, step) bounds lo, hi are [0::2], [1::2] of a last dim
    of d; neox (False) when they are its two halves; else None."""
    if not d or d % 2:
        return None
    if lo == (0, d, 2) and hi == (1, d, 2):
        return True
    if lo == (0, d // 2, 1) and hi == (d // 2, d, 1):
        return False
    return None


def _pair_layout(a: canon.LastDimSlice, b: canon.LastDimSlice) -> bool | None:
    """_pair_split of the slices a, b of one tensor."""
    if a.src is not b.src:
        return None
    return _pair_split((a.start, a.stop, a.step), (b.start, b.stop, b.step),
                       canon.static_int(tensor_val(a.src).shape[-1]))


def _product_of(p, part: Node, table: Node) -> list[Node] | None:
    """The nodes of ``p`` = part' * table' (either order), part' the same slice as `part` (maybe
    widened again) and table' the same data as `table`; else None."""
    for x, t in canon.both_orders(canon.binary(p, aten.mul)):
        if isinstance(x, Node) and isinstance(t, Node) and canon.upcast_source(x) is canon.upcast_source(part) \
                and canon.data_identity(t) == canon.data_identity(table):
            return [p, *canon.upcast_chain(x)[1]]
    return None


def _pair_terms(first: Node, second: Node):
    """Readings (x, cos, sin, interleaved, nodes) of first = a*c - b*s and second = a*s + b*c, (a, b)
    the pairs of x (any operand order of the products and of the sum)."""
    sub, add = canon.binary(first, aten.sub), canon.binary(second, aten.add)
    if sub is None or add is None:
        return
    for a, c in canon.both_orders(canon.binary(sub[0], aten.mul)):
        pa = _widened_part(a)
        if pa is None or not isinstance(c, Node):
            continue
        for b, s in canon.both_orders(canon.binary(sub[1], aten.mul)):
            pb = _widened_part(b)
            interleaved = None if pb is None or not isinstance(s, Node) else _pair_layout(pa[0], pb[0])
            if interleaved is None:
                continue
            for p3, p4 in canon.both_orders(add):
                n3, n4 = _product_of(p3, a, s), _product_of(p4, b, c)
                if n3 is not None and n4 is not None:
                    yield pa[0].src, c, s, interleaved, [first, second, sub[0], sub[1], *pa[1], *pb[1], *n3, *n4]


def _assembled_pairs(n: Node):
    """(first, second, interleaved, out dtype or None, nodes) of the ways RoPE's two outputs per pair
    are put back in x's layout: ``slice_scatter`` of both into an ``empty`` (setitem; out dtype: the
    empty's), ``cat`` of the halves, or ``stack(.., -1).flatten(-2)`` of the pairs (out dtype None:
    the parts')."""
    setitems = canon.last_dim_setitems(n)
    if setitems is not None:
        empty, parts = setitems
        if len(parts) != 2:
            return None
        lo, hi = sorted(parts, key=lambda p: p.start)
        interleaved = _pair_split((lo.start, lo.stop, lo.step), (hi.start, hi.stop, hi.step),
                                  canon.static_int(tensor_val(empty).shape[-1]))
        if interleaved is None:  # (an element no part writes would be the empty's garbage)
            return None
        return lo.value, hi.value, interleaved, dtype_of(empty), [*parts[1].nodes, *parts[0].nodes, empty]
    parts = _cat_on_last_dim(n)
    if parts is not None and len(parts) == 2:
        return parts[0], parts[1], False, None, [n]
    if canon.merges_last_two_dims(n):
        pairs = _cat_on_last_dim(n.args[0])
        if pairs is not None and len(pairs) == 2 and all(
                is_op(u, aten.unsqueeze) and canon.is_last_dim(u.args[1], u) for u in pairs):
            return pairs[0].args[0], pairs[1].args[0], True, None, [n, n.args[0], *pairs]
    return None


def pair_rotation(n: Node) -> PairRotation | None:
    """The explicit pair rotation assembled at n (see the module docstring), else None."""
    if not is_op(n, aten.slice_scatter, aten.cat, aten.reshape, aten.view):
        return None
    assembled = _assembled_pairs(n)
    if assembled is None:
        return None
    first, second, interleaved, out_dtype, nodes = assembled
    # each output may be converted once (to the empty's dtype, or to the cat's)
    values = [canon.strip_converts(v) for v in (first, second)]
    if any(len(convs) > 1 for _, convs in values):
        return None
    (f, f_convs), (s, s_convs) = values
    converted = {dtype_of(v) for v in (first, second)}
    if len(converted) != 1 or out_dtype is not None and f_convs + s_convs and converted != {out_dtype}:
        return None  # (a convert then another rounding write: two roundings)
    rope_dtype = dtype_of(f)
    if dtype_of(s) != rope_dtype:
        return None
    out_dtype = out_dtype or converted.pop()
    for x, cos, sin, il, terms in _pair_terms(f, s):
        products = terms[2:4] + [t for t in terms[4:] if is_op(t, aten.mul)]
        # pairs read as halves but written as pairs (the inverse permutation): no recipe for it
        deinterleave = il and not interleaved
        if (il != interleaved and not deinterleave) or any(dtype_of(p) != rope_dtype for p in products):
            continue
        xv, nv = tensor_val(x), tensor_val(n)
        if xv.dim() != nv.dim() or not all(canon.same_int(a, b) for a, b in zip(xv.shape, nv.shape)):
            continue  # (a write that broadcasts the rotated pairs into a larger empty)
        return PairRotation(n, x, cos, sin, interleaved, rope_dtype, out_dtype,
                            out_dtype == rope_dtype and not f_convs, [*nodes, *f_convs, *s_convs, *terms],
                            deinterleave)
    return None


@dataclasses.dataclass
class ComplexRotation:
    """``view_as_real(view_as_complex(src.reshape(..., D/2, 2)) * freqs).flatten(-2)`` at `anchor`."""
    anchor: Node
    src: Node  # the real tensor whose pairs are the complex numbers
    xc: Node  # view_as_complex(src ...)
    freqs: Node
    product: Node
    nodes: list[Node]


def complex_rotation(n: Node) -> ComplexRotation | None:
    """The complex multiply read at its flatten n (any dtypes: match_rope checks them), else None."""
    if not canon.merges_last_two_dims(n) or not is_op(n.args[0], aten.view_as_real):
        return None
    as_real = n.args[0]
    product = as_real.args[0]
    for xc, freqs in canon.both_orders(canon.binary(product, aten.mul)):
        if is_op(xc, aten.view_as_complex) and isinstance(freqs, Node):
            split = canon.last_dim_split_source(xc.args[0])
            if split is not None and split[2] == 2:
                return ComplexRotation(n, split[0], xc, freqs, product, [n, as_real, product, xc, xc.args[0]])
    return None


def _complex_rope(cr: ComplexRotation) -> RopeMatch:
    """The RopeMatch of a complex rotation: interleaved, one (cos, sin) = (real, imag) of freqs per
    pair, float32 products and sums (complex64), one rounding after; raises Refused."""
    c64 = torch.complex64
    for node, what in ((cr.xc, "x's pairs are"), (cr.freqs, "the frequencies are"), (cr.product, "the product is")):
        if dtype_of(node) != c64:  # (complex128: float64 arithmetic, which the kernels do not do)
            raise Refused(f"complex RoPE: {what} {str(dtype_of(node)).replace('torch.', '')}, not complex64 "
                          "(the recipe reproduces float32 pairs times complex64 frequencies)")
    xv, pv = tensor_val(cr.xc), tensor_val(cr.product)
    if tensor_val(cr.freqs).dim() == 0:
        raise Refused("complex RoPE: one frequency for every pair (a 0-d tensor), not a table per pair")
    if pv.dim() != xv.dim() or not all(canon.same_int(a, b) for a, b in zip(xv.shape, pv.shape)):
        raise Refused(f"complex RoPE: the multiply broadcasts x {tuple(xv.shape)} into {tuple(pv.shape)}")
    y, widened = canon.upcast_chain(cr.src)  # (x.float() before the pairs are taken)
    return _finish(cr.anchor, y, ComplexPart(cr.freqs, 0), ComplexPart(cr.freqs, 1), True, torch.float32,
                   torch.float32, [*cr.nodes, *widened], half_table=True)


class AtRopes:
    """Base of the families whose candidates are the graph's RoPE outputs (norm_rope, norm_cat_rope,
    rope, norm_slice_rope, rope_norm); a family adds its name and match()."""
    pairs_only = False

    def candidates(self, graph):
        return (n for n in graph.nodes if is_candidate(n))


def is_candidate(n: Node) -> bool:
    """An add of two products, one with a rotate_half-like operand, an explicit pair rotation (DeepSeek's
    de-interleaved RoPE among them), or a complex multiply."""
    if canon.binary(n, aten.add) is not None:
        a, b = n.args[:2]
        if is_op(a, aten.mul) and is_op(b, aten.mul):
            ops = [o for o in (*a.args[:2], *b.args[:2]) if isinstance(o, Node)]
            return any(rotation(o) is not None or symbolic_rotation_source(o) is not None for o in ops)
    return pair_rotation(n) is not None or complex_rotation(n) is not None


def rotated_tensors(graph: torch.fx.Graph) -> set[Node]:
    """What every RoPE in the graph rotates, before widening converts, a partial-rotary slice and
    row views: the norm outputs that feed a RoPE (whether or not that RoPE is fused)."""
    out = set()
    for n in graph.nodes:
        r = rotation(n) or pair_rotation(n) or complex_rotation(n)
        src = r.src if r is not None else symbolic_rotation_source(n)
        if src is None:
            continue
        src = canon.upcast_source(src)
        copy = deinterleave_copy(src)  # (DeepSeek's de-interleaving copy of what it rotates)
        src = canon.upcast_source(copy[0]) if copy is not None else src
        sl = canon.last_dim_slice(src)
        src = sl.src if sl is not None and sl.start == 0 else src
        rv = canon.row_view_source(src)
        out.add(rv.src if rv is not None else src)
    return out


def match_rope(add: Node) -> RopeMatch:
    """Read ``add`` as the RoPE output; raises Refused."""
    cr = complex_rotation(add)
    if cr is not None:
        return _complex_rope(cr)
    pr = pair_rotation(add)
    if pr is not None:
        y, widened = canon.upcast_chain(pr.src)  # (x.float() before the pairs are taken)
        interior = [*dict.fromkeys([*pr.nodes, *widened])]
        return _finish(pr.anchor, y, pr.cos, pr.sin, pr.interleaved, pr.rope_dtype, pr.out_dtype, interior,
                       half_table=True, convert_joins=pr.exact_out, deinterleave=pr.deinterleave)
    pair = canon.binary(add, aten.add)
    if pair is None:
        raise Refused("not an add")
    for cos_term, sin_term in canon.both_orders(pair):
        sin_pair = canon.binary(sin_term, aten.mul)
        cos_pair = canon.binary(cos_term, aten.mul)
        if sin_pair is None or cos_pair is None:
            continue
        for rot, sin in canon.both_orders(sin_pair):
            r = rotation(rot) if isinstance(rot, Node) else None
            if r is None:
                continue
            for x_in, cos in canon.both_orders(cos_pair):
                if not isinstance(x_in, Node) or canon.upcast_source(x_in) is not canon.upcast_source(r.src):
                    continue
                return _finish_rope(add, r, x_in, cos, sin, [cos_term, sin_term, *r.nodes])
    operands = [o for t in (pair[0], pair[1]) if is_op(t, aten.mul) for o in t.args[:2] if isinstance(o, Node)]
    if any(symbolic_rotation_source(o) is not None for o in operands):
        raise Refused("head_dim is symbolic (dynamic shapes on the projection's last dim); "
                      "mark it static, e.g. torch._dynamo.mark_static(x, -1)")
    raise Refused("add is not x*cos + rotate_half(x)*sin")


def _finish_rope(add: Node, r: Rotation, x_in: Node, cos, sin, nodes: list[Node]) -> RopeMatch:
    src = r.src
    y = canon.upcast_source(src)
    interior = [add, *nodes]
    if x_in is not y:
        interior.append(x_in)
    if src is not y:
        interior.append(src)
    # neox RoPE of DeepSeek's de-interleaving copy of x: RoPE of x read as pairs (the copy joins the site)
    copy = None if r.interleaved else deinterleave_copy(y)
    if copy is not None:
        y = copy[0]
        interior += copy[1]
    if r.flipped and copy is not None:
        raise Refused("the rotation the other way (cat(x2, -x1)) of DeepSeek's de-interleaved copy")
    m = _finish(add, y, cos, sin, r.interleaved, dtype_of(add), dtype_of(add), interior,
                deinterleave=copy is not None)
    m.negate_sin = r.flipped
    return m


def _finish(anchor: Node, y: Node, cos, sin, interleaved: bool, rope_dtype, out_dtype, interior: list[Node],
            half_table: bool = False, convert_joins: bool = True, deinterleave: bool = False) -> RopeMatch:
    """The RopeMatch of RoPE on y computed up to `anchor` (interior: its nodes, anchor included):
    tables checked, one convert after it joined when that is the only rounding to the output dtype,
    a partial-rotary cat after it joined."""
    for t, name in ((cos, "cos"), (sin, "sin")):
        if table_node(t) is None or table_value(t) is None:
            raise Refused(f"{name} is not a tensor")
        if canon.depends_on(table_node(t), y):
            raise Refused(f"{name} depends on the rotated tensor")
    rot_v, cos_v, sin_v = tensor_val(y), table_value(cos), table_value(sin)
    rd = canon.static_int(rot_v.shape[-1])
    width = rd // 2 if half_table and rd else rd  # (a half table: one entry per pair)
    for v, name in ((cos_v, "cos"), (sin_v, "sin")):
        if canon.static_int(v.shape[-1]) != width:
            raise Refused(f"{name} last dim {v.shape[-1]} != " + (f"the rotated pairs {width}" if half_table else
                                                                  f"rotated dim {rd}"))
        try:
            b = torch.broadcast_shapes(v.shape[:-1], rot_v.shape[:-1])
        except RuntimeError:
            raise Refused(f"{name} {tuple(v.shape)} does not broadcast to x {tuple(rot_v.shape)}") from None
        if len(b) != len(rot_v.shape[:-1]) or not all(canon.same_int(p, q) for p, q in zip(b, rot_v.shape[:-1])):
            raise Refused(f"{name} {tuple(v.shape)} is larger than x {tuple(rot_v.shape)}")
    # The op's output: at most one convert after the RoPE joins the site (where it is the only rounding
    # to the output dtype); any further one stays in the graph, after the op.
    if convert_joins and len(anchor.users) == 1 and canon.is_convert(next(iter(anchor.users))):
        anchor = next(iter(anchor.users))
        interior.append(anchor)
        out_dtype = dtype_of(anchor)
    # Partial rotary: y = x[..., :rd] rotated, then cat with x[..., rd:].
    full_src = y
    sl = canon.last_dim_slice(y)
    if sl is not None and sl.start == 0 and sl.step == 1 and len(anchor.users) == 1:
        parts = _cat_on_last_dim(next(iter(anchor.users)))
        is_pair = parts is not None and len(parts) == 2 and parts[0] is anchor
        tail = canon.last_dim_slice(parts[1]) if is_pair else None
        full_d = canon.static_int(tensor_val(sl.src).shape[-1])
        if tail and tail.src is sl.src and tail.start == sl.stop and tail.stop == full_d and tail.step == 1:
            if dtype_of(parts[1]) != out_dtype:
                raise Refused("partial rotary: pass-through part has another dtype than the rotated part")
            cat = next(iter(anchor.users))
            interior += dict.fromkeys([*_slice_nodes(y), *_slice_nodes(parts[1]), cat])
            anchor, full_src = cat, sl.src
    return RopeMatch(anchor, full_src, cos, sin, rd, interleaved, rope_dtype, out_dtype, interior, half_table,
                     deinterleave)
