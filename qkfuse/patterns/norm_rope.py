"""Pattern family ``norm_rope``: per-head RMSNorm of q and k, then RoPE.

Match. Anchored on the RoPE output ``x*cos + rotate(x)*sin`` (any operand order, optional
``.float()`` on x and ``.to(dtype)`` on the result; rotate = neox ``cat(-x2, x1)`` from slices,
``chunk``/``split``, or the interleaved ``stack(-x_odd, x_even).flatten`` / ``unbind`` forms;
partial rotary ``cat([rope(x[..., :rd]), x[..., rd:]])``), the walker goes up through views that
keep rows intact (transpose, same-shape view) to the RMSNorm::

    [convert] ∘ weight-mul ∘ [convert] ∘ (x * rsqrt(mean(x^2, -1) + eps))   with x upcast to f32

accepting the Llama/Qwen3 body (cast before the weight), the OLMo2/``torch.rms_norm`` body (cast
after), Gemma's ``(1 + w)``, no weight, ``pow(v, -0.5)``, eps as a float or a 0-d tensor.

Conditions. Every intermediate of the chain is used only inside it; the norm reduces over the
last dim in float32; the rounding steps are ones the recipe can reproduce; cos/sin broadcast to
the rotated input and do not depend on it. Otherwise the site is refused with the reason.

Replacement (qkfuse/passes/replace.py). Chains sharing cos/sin with the same recipe are paired
(q and k, qkfuse/passes/pairing.py): one ``qk_norm_rope`` call, else one ``norm_rope`` call per
chain. A k chain whose output is written into a KV cache absorbs the write (patterns/kv_cache.py).
"""

from __future__ import annotations

import dataclasses
import operator

import torch
from torch.fx import Node

from ..ops.recipe import Recipe
from . import canon
from .canon import aten, dtype_of, is_op, tensor_val
from .kv_cache import CacheWrite

FAMILY = "norm_rope"
ROPE_ONLY_FAMILY = "rope"


class Refused(Exception):
    """A candidate that does not match; str() is the reason shown by qkfuse.explain."""


# ---- RoPE ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class RopeMatch:
    anchor: Node  # the node whose uses the fused op replaces
    src: Node  # the tensor RoPE is applied to (norm output, maybe behind views)
    cos: Node | None
    sin: Node | None
    rotary_dim: int
    interleaved: bool
    rope_dtype: torch.dtype
    out_dtype: torch.dtype
    interior: list[Node]


def _slice_nodes(n: Node) -> list[Node]:
    """n and the split/unbind (+ pair reshape) it is a getitem of."""
    out = [n]
    if n.target is operator.getitem:
        parent = n.args[0]
        out.append(parent)
        if is_op(parent, aten.unbind):
            out.append(parent.args[0])
    return out


def _rotation(n: Node):
    """(src, interleaved, nodes) for ``rotate_half(src)`` spelled any known way, else None."""
    n_src, n_convs = canon.strip_converts(n)
    if is_op(n_src, aten.cat) and canon.is_last_dim(n_src.args[1] if len(n_src.args) > 1 else 0, n_src):
        parts = n_src.args[0]
        if len(parts) == 2 and is_op(parts[0], aten.neg):
            lo = canon.last_dim_slice(parts[1])
            hi = canon.last_dim_slice(parts[0].args[0])
            if lo and hi and lo.src is hi.src and lo.step == hi.step == 1:
                d = canon.static_int(tensor_val(lo.src).shape[-1])
                h = d // 2 if d else None
                if d and d % 2 == 0 and (lo.start, lo.stop, hi.start, hi.stop) == (0, h, h, d):
                    return lo.src, False, [*n_convs, n_src, parts[0], *_slice_nodes(parts[0].args[0]),
                                           *_slice_nodes(parts[1])]
    # interleaved: reshape(cat([unsqueeze(-x_odd, -1), unsqueeze(x_even, -1)], -1), [..., D])
    if is_op(n_src, aten.reshape, aten.view):
        inner = n_src.args[0]
        if is_op(inner, aten.cat) and len(inner.args[0]) == 2:
            u_neg, u_pos = inner.args[0]
            if is_op(u_neg, aten.unsqueeze) and is_op(u_pos, aten.unsqueeze) and is_op(u_neg.args[0], aten.neg):
                odd = canon.last_dim_slice(u_neg.args[0].args[0])
                even = canon.last_dim_slice(u_pos.args[0])
                if odd and even and odd.src is even.src and odd.step == even.step == 2:
                    d = canon.static_int(tensor_val(odd.src).shape[-1])
                    if d and (odd.start, even.start) == (1, 0) and odd.stop == even.stop == d:
                        nodes = [*n_convs, n_src, inner, u_neg, u_pos, u_neg.args[0],
                                 *_slice_nodes(u_neg.args[0].args[0]), *_slice_nodes(u_pos.args[0])]
                        return odd.src, True, nodes
    return None


def _symbolic_rotation(n: Node) -> bool:
    """cat(-x[..., h:], x[..., :h]) whose slice bounds are symbolic (head_dim dynamic)."""
    n_src = canon.strip_converts(n)[0]
    if not is_op(n_src, aten.cat) or len(n_src.args[0]) != 2 or not is_op(n_src.args[0][0], aten.neg):
        return False
    hi, lo = n_src.args[0][0].args[0], n_src.args[0][1]
    return is_op(hi, aten.slice) and is_op(lo, aten.slice) and hi.args[0] is lo.args[0]


def match_rope(add: Node) -> RopeMatch:
    """Read ``add`` as the RoPE output; raises Refused."""
    pair = canon.binary(add, aten.add)
    if pair is None:
        raise Refused("not an add")
    for cos_term, sin_term in canon.both_orders(pair):
        sin_pair = canon.binary(sin_term, aten.mul)
        cos_pair = canon.binary(cos_term, aten.mul)
        if sin_pair is None or cos_pair is None:
            continue
        for rot, sin in canon.both_orders(sin_pair):
            r = _rotation(rot) if isinstance(rot, Node) else None
            if r is None:
                continue
            src, interleaved, rot_nodes = r
            for x_in, cos in canon.both_orders(cos_pair):
                if not isinstance(x_in, Node) or canon.upcast_source(x_in) is not canon.upcast_source(src):
                    continue
                return _finish_rope(add, src, x_in, cos, sin, interleaved, [cos_term, sin_term, *rot_nodes])
    operands = [o for t in (pair[0], pair[1]) if is_op(t, aten.mul) for o in t.args[:2] if isinstance(o, Node)]
    if any(_symbolic_rotation(o) for o in operands):
        raise Refused("head_dim is symbolic (dynamic shapes on the projection's last dim); "
                      "mark it static, e.g. torch._dynamo.mark_static(x, -1)")
    raise Refused("add is not x*cos + rotate_half(x)*sin")


def _finish_rope(add, src, x_in, cos, sin, interleaved, nodes) -> RopeMatch:
    y = canon.upcast_source(src)
    interior = [add, *nodes]
    if x_in is not y:
        interior.append(x_in)
    if src is not y:
        interior.append(src)
    rope_dtype = dtype_of(add)
    for t, name in ((cos, "cos"), (sin, "sin")):
        if not isinstance(t, Node) or tensor_val(t) is None:
            raise Refused(f"{name} is not a tensor")
        if canon.depends_on(t, y):
            raise Refused(f"{name} depends on the rotated tensor")
    rot_v, cos_v, sin_v = tensor_val(y), tensor_val(cos), tensor_val(sin)
    rd = canon.static_int(rot_v.shape[-1])
    for v, name in ((cos_v, "cos"), (sin_v, "sin")):
        if canon.static_int(v.shape[-1]) != rd:
            raise Refused(f"{name} last dim {v.shape[-1]} != rotated dim {rd}")
        try:
            b = torch.broadcast_shapes(v.shape[:-1], rot_v.shape[:-1])
        except RuntimeError:
            raise Refused(f"{name} {tuple(v.shape)} does not broadcast to x {tuple(rot_v.shape)}") from None
        if len(b) != len(rot_v.shape[:-1]) or not all(canon.same_int(p, q) for p, q in zip(b, rot_v.shape[:-1])):
            raise Refused(f"{name} {tuple(v.shape)} is larger than x {tuple(rot_v.shape)}")
    # The op's output: optional converts after the add.
    anchor, out_dtype = add, rope_dtype
    # At most one convert joins the site; any further one stays in the graph, after the op.
    if len(anchor.users) == 1 and canon.is_convert(next(iter(anchor.users))):
        anchor = next(iter(anchor.users))
        interior.append(anchor)
        out_dtype = dtype_of(anchor)
    # Partial rotary: y = x[..., :rd] rotated, then cat with x[..., rd:].
    full_src = y
    sl = canon.last_dim_slice(y)
    if sl is not None and sl.start == 0 and sl.step == 1 and len(anchor.users) == 1:
        cat = next(iter(anchor.users))
        if is_op(cat, aten.cat) and canon.is_last_dim(cat.args[1] if len(cat.args) > 1 else 0, cat):
            parts = cat.args[0]
            tail = canon.last_dim_slice(parts[1]) if len(parts) == 2 and parts[0] is anchor else None
            full_d = canon.static_int(tensor_val(sl.src).shape[-1])
            if tail and tail.src is sl.src and tail.start == sl.stop and tail.stop == full_d and tail.step == 1:
                if dtype_of(parts[1]) != out_dtype:
                    raise Refused("partial rotary: pass-through part has another dtype than the rotated part")
                interior += [y, parts[1], cat]
                anchor, full_src = cat, sl.src
    return RopeMatch(anchor, full_src, cos, sin, rd, interleaved, rope_dtype, out_dtype, interior)


# ---- RMSNorm ----------------------------------------------------------------------------------


@dataclasses.dataclass
class NormMatch:
    x: Node
    weight: Node | None
    weight_offset: float
    cast_before_weight: bool
    eps: float | Node
    norm_dtype: torch.dtype
    interior: list[Node]
    leaves: list[Node]  # weight-side nodes that become dead with the chain (converts, 1+w)


def _normalized(n: Node):
    """(x, eps, nodes, eps_expr) for ``xf * rsqrt(mean(xf^2, -1, keepdim) + eps)``, xf = float(x).

    eps is a float or the 0-d tensor node it comes from; eps_expr is the add's operand (a convert
    of that tensor, which joins the leaves)."""
    pair = canon.binary(n, aten.mul)
    if pair is None or dtype_of(n) != torch.float32:
        return None
    for xf, r in canon.both_orders(pair):
        if not isinstance(r, Node):
            continue
        nodes = [n, r]
        if is_op(r, aten.rsqrt):
            v = r.args[0]
        elif is_op(r, aten.pow) and len(r.args) > 1 and r.args[1] == -0.5:
            v = r.args[0]
        else:
            continue
        add = canon.binary(v, aten.add)
        for m, e in canon.both_orders(add):
            eps = canon.scalar_or_tensor(e)
            if eps is None or not is_op(m, aten.mean):
                continue
            if len(m.args) < 2 or not canon.is_last_dim(m.args[1], m.args[0]):
                raise Refused("mean is not over the last dim")
            keep = m.args[2] if len(m.args) > 2 else m.kwargs.get("keepdim", False)
            if not keep:
                continue
            sq = m.args[0]
            if is_op(sq, aten.pow) and sq.args[1] == 2:
                xf2 = sq.args[0]
            elif is_op(sq, aten.mul) and sq.args[0] is sq.args[1]:
                xf2 = sq.args[0]
            else:
                continue
            if dtype_of(sq) != torch.float32:
                raise Refused(f"variance computed in {dtype_of(sq)}, not float32")
            x = canon.upcast_source(xf2)
            if canon.upcast_source(xf) is not x:
                continue
            nodes += [v, m, sq]
            nodes += [c for c in (xf, xf2) if c is not x]
            for c in (xf, xf2):  # chains of widening converts between x and xf
                c = c.args[0] if canon.is_copy(c) else None
                while c is not None and c is not x:
                    nodes.append(c)
                    c = c.args[0] if canon.is_copy(c) else None
            return x, eps, nodes, e
    return None


def _weight(w_expr):
    """(weight, offset, leaves) for w, float(w), w + 1.0, float(w) + 1.0 (offset added in f32)."""
    leaves = []
    pair = canon.binary(w_expr, aten.add)
    offset = 0.0
    if pair is not None:
        for a, b in canon.both_orders(pair):
            if isinstance(b, (int, float)) and isinstance(a, Node):
                if dtype_of(w_expr) != torch.float32:
                    raise Refused(f"(offset + w) computed in {dtype_of(w_expr)}, not float32")
                leaves.append(w_expr)
                offset, w_expr = float(b), a
                break
        else:
            return None
    base = canon.upcast_source(w_expr)
    c = w_expr
    while c is not base:
        leaves.append(c)
        c = c.args[0]
    v = tensor_val(base)
    if v is None or v.dim() != 1:
        return None
    return base, offset, leaves


def _rounding(start: torch.dtype, convs: list[Node]) -> torch.dtype:
    """The one dtype a value produced in `start` and passed through `convs` is rounded to.

    `convs` run from the value outwards. Widening converts are exact; a second narrowing step
    would round twice, which the recipe does not model (refused).
    """
    narrowed = start if start in (torch.float16, torch.bfloat16) else None
    cur = start
    for c in reversed(convs):
        dt = dtype_of(c)
        if canon.is_widening(cur, dt):
            cur = dt
            continue
        if narrowed is not None or dt not in (torch.float16, torch.bfloat16, torch.float32):
            raise Refused(f"value rounded twice ({cur} -> {dt})")
        narrowed = cur = dt
    return narrowed or torch.float32


def match_rms_norm(y: Node) -> NormMatch:
    """Read y as a per-head RMSNorm output; raises Refused."""
    node, final_convs = canon.strip_converts(y)
    r = _normalized(node)
    if r is not None:
        x, eps, nodes, e = r
        return _finish_norm(x, None, 0.0, False, eps, e, _rounding(torch.float32, final_convs),
                            [*final_convs, *nodes], [])
    pair = canon.binary(node, aten.mul)
    for n_expr, w_expr in canon.both_orders(pair):
        if not isinstance(n_expr, Node) or not isinstance(w_expr, Node):
            continue
        n_src, n_convs = canon.strip_converts(n_expr)
        r = _normalized(n_src)
        if r is None:
            continue
        x, eps, nodes, e = r
        w = _weight(w_expr)
        if w is None:
            raise Refused("weight is not a 1-D tensor (per-head norm weight)")
        weight, offset, leaves = w
        if canon.depends_on(weight, x):
            raise Refused("weight depends on the normalised tensor")
        x_dtype = dtype_of(x)
        cast_before = False
        casts = [c for c in n_convs if canon.is_convert(c)]  # (clones only copy)
        if casts:
            if len(casts) != 1 or dtype_of(casts[0]) != x_dtype:
                raise Refused("normalised value is cast to a dtype other than the input's")
            cast_before = x_dtype != torch.float32
        prod = dtype_of(node)
        if prod not in (torch.float32, torch.float16, torch.bfloat16):
            raise Refused(f"weight product in {prod}")
        return _finish_norm(x, weight, offset, cast_before, eps, e, _rounding(prod, final_convs),
                            [*final_convs, node, *n_convs, *nodes], leaves)
    if is_op(y, aten.cat):
        raise Refused("RoPE input is a concatenation (e.g. text and image tokens), not one norm output")
    raise Refused("no RMSNorm (x * rsqrt(mean(x^2) + eps) [* w]) feeds this RoPE")


def _finish_norm(x, weight, offset, cast_before, eps, eps_expr, norm_dtype, interior, leaves) -> NormMatch:
    if tensor_val(x) is None:
        raise Refused("norm input has no tensor metadata")
    if weight is not None and not canon.same_int(tensor_val(weight).shape[0], tensor_val(x).shape[-1]):
        raise Refused(f"weight shape {tuple(tensor_val(weight).shape)} != [head_dim]")
    if isinstance(eps_expr, Node) and eps_expr is not eps:
        leaves = [*leaves, eps_expr]
    return NormMatch(x, weight, offset, cast_before, eps, norm_dtype, interior, leaves)


# ---- sites ------------------------------------------------------------------------------------


@dataclasses.dataclass
class Site:
    family: str
    anchor: Node
    x: Node  # input of the fused op before `perm`
    perm: list[int]  # x.permute(perm) is the op input (RoPE layout)
    weight: Node | None
    eps: float | Node
    cos: Node | None
    sin: Node | None
    recipe: Recipe
    interior: list[Node]
    leaves: list[Node]
    cache: CacheWrite | None = None  # the KV-cache write this (k) site absorbs

    @property
    def shape(self):
        v = tensor_val(self.anchor)
        return tuple(v.shape) if v is not None else None

    def anchor_value(self) -> Node:
        """The node holding the fused op's (RoPE) output value, before any cache write."""
        return self.anchor

    def targets(self) -> list[Node]:
        """Nodes whose uses the fused call's outputs take over, in output order."""
        return self.cache.targets() if self.cache is not None else [self.anchor]

    def input_nodes(self) -> list[Node]:
        nodes = [n for n in (self.x, self.weight, self.cos, self.sin, self.eps) if isinstance(n, Node)]
        return nodes + (self.cache.input_nodes() if self.cache is not None else [])

    def output_users(self) -> list[Node]:
        return [u for t in self.targets() for u in t.users]

    def dead_after_replacement(self) -> list[Node]:
        nodes = [*self.interior, *self.leaves]
        if self.cache is not None:
            nodes += self.cache.targets() + self.cache.views
            nodes += self.cache.v.interior if self.cache.v is not None else []
        return nodes

    def pair_key(self):
        """Sites with equal keys can share one launch."""
        w = tensor_val(self.weight)
        return (
            self.recipe,
            canon.data_identity(self.cos),
            canon.data_identity(self.sin),
            None if w is None else w.dtype,
            isinstance(self.eps, Node),
            dtype_of(self.x),
        )


def _check_interior(site_nodes: list[Node], anchor: Node) -> None:
    inside = set(site_nodes)
    for n in site_nodes:
        if n is anchor:
            continue
        for u in n.users:
            if u.op == "output":  # a training forward graph returns what backward needs
                raise Refused(f"intermediate {n.name} has a user outside the chain: it is a graph output "
                              "(returned, or saved for backward with grad enabled: the fused op has no "
                              "backward; infer under torch.no_grad())")
            if u not in inside:
                raise Refused(f"intermediate {n.name} has a user outside the chain ({u.name})")


def match_site(add: Node, families: frozenset) -> Site:
    """Read one candidate RoPE output as a fusable site; raises Refused."""
    rope = match_rope(add)
    rv = canon.row_view_source(rope.src)
    if rv is None:
        raise Refused("a view between the norm and the RoPE moves data across rows")
    y, perm = rv
    view_nodes = []
    n = rope.src
    while n is not y:
        view_nodes.append(n)
        n = n.args[0]
    try:
        norm = match_rms_norm(y)
    except Refused:
        if ROPE_ONLY_FAMILY not in families:
            raise
        norm = None
    if norm is None:
        family, x, weight, eps = ROPE_ONLY_FAMILY, y, None, 0.0
        norm_interior, leaves = [], []
        recipe_norm = dict(norm="none", norm_dtype=dtype_of(y))
    else:
        if FAMILY not in families:
            raise Refused(f"family {FAMILY!r} is disabled")
        family, x, weight, eps = FAMILY, norm.x, norm.weight, norm.eps
        norm_interior, leaves = norm.interior, norm.leaves
        recipe_norm = dict(norm="rms", weight_offset=norm.weight_offset,
                           cast_before_weight=norm.cast_before_weight, norm_dtype=norm.norm_dtype)
    if canon.static_int(tensor_val(x).shape[-1]) is None:
        raise Refused("head_dim is symbolic")
    recipe = Recipe(**recipe_norm, rope_dtype=rope.rope_dtype, out_dtype=rope.out_dtype,
                    rotary_dim=rope.rotary_dim, interleaved=rope.interleaved)
    interior = [*rope.interior, *view_nodes, *norm_interior]
    if norm is None:
        interior = [n for n in interior if n is not y]
    _check_interior(interior, rope.anchor)
    return Site(family, rope.anchor, x, perm, weight, eps, rope.cos, rope.sin, recipe, interior, leaves)


def candidates(graph: torch.fx.Graph):
    """RoPE-output candidates: adds of two products, one of them with a rotate_half-like operand."""
    for n in graph.nodes:
        if canon.binary(n, aten.add) is None:
            continue
        a, b = n.args[:2]
        if is_op(a, aten.mul) and is_op(b, aten.mul):
            ops = [o for o in (*a.args[:2], *b.args[:2]) if isinstance(o, Node)]
            if any(_rotation(o) is not None or _symbolic_rotation(o) for o in ops):
                yield n
