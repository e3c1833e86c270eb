"""The RMSNorm matcher: a norm output read from any of its spellings, as plain data.

::

    [convert] ∘ weight-mul ∘ [convert] ∘ (x * rsqrt(mean(x^2, -1) + eps))   with x upcast to f32

accepting the Llama/Qwen3 body (cast before the weight), the OLMo2/``torch.rms_norm`` body (cast
after), Gemma's ``(1 + w)``, no weight, ``pow(v, -0.5)``, ``x*x``, eps as a float or a 0-d tensor,
and ``sum`` for the mean (an L2 norm onto the unit sphere: nGPT, Dory).
Refused with the reason: a norm over another dim, a variance not in float32, ``(1 + w)`` rounded to
16 bits, a weight that is not ``[D]``, a value rounded twice.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.fx import Node

from . import canon
from .canon import aten, dtype_of, is_op, tensor_val
from .family import Refused


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
    norm_sum: bool = False  # rsqrt(sum(x^2) + eps): an L2 norm (nGPT / Dory)

    def recipe_part(self) -> dict:
        """The norm fields of the Recipe."""
        return dict(norm="rms", weight_offset=self.weight_offset, cast_before_weight=self.cast_before_weight,
                    norm_dtype=self.norm_dtype, norm_sum=self.norm_sum)


def _normalized(n: Node):
    """(x, eps, nodes, eps_expr, is_sum) for ``xf * rsqrt(mean(xf^2, -1, keepdim) + eps)``, xf = float(x),
    or with ``sum`` for the mean (an L2 norm: is_sum).

    eps is a float or the 0-d tensor node it comes from; eps_expr is the add's operand (a convert
    of that tensor, which joins the leaves)."""
    pair = canon.binary(n, aten.mul)
    if pair is None or dtype_of(n) != torch.float32:
        return None
    for xf, r in canon.both_orders(pair):
        v = canon.rsqrt_operand(r)
        if v is None:
            continue
        nodes = [n, r]
        add = canon.binary(v, aten.add)
        for m, e in canon.both_orders(add):
            eps = canon.scalar_or_tensor(e)
            if eps is None or not is_op(m, aten.mean, aten.sum):
                continue
            if len(m.args) < 2 or not canon.is_last_dim(m.args[1], m.args[0]):
                raise Refused(f"{'sum' if is_op(m, aten.sum) else 'mean'} is not over the last dim")
            keep = m.args[2] if len(m.args) > 2 else m.kwargs.get("keepdim", False)
            if not keep:
                continue
            sq = m.args[0]
            xf2 = canon.square_operand(sq)
            if xf2 is None:
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
            return x, eps, nodes, e, is_op(m, aten.sum)
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
        x, eps, nodes, e, is_sum = r
        return _finish_norm(x, None, 0.0, False, eps, e, _rounding(torch.float32, final_convs),
                            [*final_convs, *nodes], [], is_sum)
    pair = canon.binary(node, aten.mul)
    for n_expr, w_expr in canon.both_orders(pair):
        if not isinstance(n_expr, Node) or not isinstance(w_expr, Node):
            continue
        n_src, n_convs = canon.strip_converts(n_expr)
        r = _normalized(n_src)
        if r is None:
            continue
        x, eps, nodes, e, is_sum = r
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
                            [*final_convs, node, *n_convs, *nodes], leaves, is_sum)
    if is_op(y, aten.cat):
        raise Refused("RoPE input is a concatenation (e.g. text and image tokens), not one norm output")
    other = other_norm_kind(y)
    if other is not None:
        raise Refused(f"{other} feeds this RoPE, not an RMSNorm (not fused yet)")
    raise Refused("no RMSNorm (x * rsqrt(mean(x^2) + eps) [* w]) feeds this RoPE")


def other_norm_kind(y: Node, depth: int = 8) -> str | None:
    """What normalisation, other than an RMSNorm, produces y (for the refusal message), or None:
    a LayerNorm (``var_mean``, or x - mean(x) scaled by rsqrt of a variance) or an L2 norm
    (rsqrt of a sum of squares, or ``linalg_vector_norm``), found among y's nearest inputs."""
    frontier, seen = [y], set()
    for _ in range(depth):
        nxt = []
        for n in frontier:
            if not isinstance(n, Node) or n in seen:
                continue
            seen.add(n)
            if is_op(n, aten.var_mean) or is_op(n, aten.native_layer_norm):
                return "a LayerNorm"
            if is_op(n, aten.sub) and any(is_op(a, aten.mean) for a in n.args):
                return "a LayerNorm (x - mean(x))"
            if is_op(n, aten.linalg_vector_norm):
                return "an L2 norm (x scaled by 1 / ||x||)"
            if is_op(n, aten.sum) and isinstance(n.args[0], Node) and canon.square_operand(n.args[0]) is not None:
                return "an L2 norm (x scaled by 1 / ||x||)"
            if is_op(n, aten.mm, aten.addmm, aten.bmm, aten.baddbmm, aten.convolution):
                continue  # past the q/k projection: a norm there (the layer's input norm) is not a q/k norm
            nxt.extend(n.all_input_nodes)
        frontier = nxt
    return None


def _finish_norm(x, weight, offset, cast_before, eps, eps_expr, norm_dtype, interior, leaves,
                 norm_sum=False) -> NormMatch:
    if tensor_val(x) is None:
        raise Refused("norm input has no tensor metadata")
    if weight is not None and not canon.same_int(tensor_val(weight).shape[0], tensor_val(x).shape[-1]):
        raise Refused(f"weight shape {tuple(tensor_val(weight).shape)} != [head_dim]")
    if isinstance(eps_expr, Node) and eps_expr is not eps:
        leaves = [*leaves, eps_expr]
    return NormMatch(x, weight, offset, cast_before, eps, norm_dtype, interior, leaves, norm_sum)
