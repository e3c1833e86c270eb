"""The norm matcher: an RMSNorm or LayerNorm output read from any of its spellings, as plain data.

::

    [convert] ∘ [+ bias] ∘ weight-mul ∘ [convert] ∘ normalised(x)           with x upcast to f32
    normalised(x) = x * rsqrt(mean(x^2, -1) + eps)                                  (RMSNorm)
                  | (x - mean(x, -1)) * rsqrt(var(x, -1) + eps)                     (LayerNorm)

accepting the Llama/Qwen3 body (cast before the weight), the OLMo2/``torch.rms_norm`` body (cast
after), Gemma's ``(1 + w)``, no weight, ``pow(v, -0.5)``, ``x*x``, eps as a float or a 0-d tensor,
``sum`` for the mean (an L2 norm onto the unit sphere: nGPT, Dory); for LayerNorm the variance as
``var_mean(x, correction=0)`` (``nn.LayerNorm``'s decomposition) or ``mean((x - mean)^2)``
(Cohere's, by hand), a bias added after the weight in float32 (``nn.LayerNorm``), and a weight
(and bias) ``[H, D]`` with a row per head (Cohere's q_norm); and ``cat`` of one LayerNorm per
head of the same tensor (StableLM's ``StableLmLayerNormPerHead``: the weights become the rows of an
``[H, D]`` weight).
Refused with the reason: a norm over another dim, a variance not in float32 or not the biased one,
``(1 + w)`` rounded to 16 bits, a weight that is not ``[D]`` or ``[H, D]``, a value rounded twice
(a 16-bit weight product before the bias).
"""

from __future__ import annotations

import dataclasses
import operator

import torch
from torch.fx import Node

from . import canon
from .canon import aten, dtype_of, is_op, tensor_val
from .family import Refused


@dataclasses.dataclass
class NormMatch:
    x: Node
    # the weight: one node ([D], or [H, D] with a row per head of x's dim -2), or one [D] node per
    # head (StableLM's LayerNorm per head: the rows of an [H, D] weight, stacked by the launcher)
    weight: Node | tuple[Node, ...] | None
    weight_offset: float
    cast_before_weight: bool
    eps: float | Node
    norm_dtype: torch.dtype
    interior: list[Node]
    leaves: list[Node]  # weight-side nodes that become dead with the chain (converts, 1+w)
    norm_sum: bool = False  # rsqrt(sum(x^2) + eps): an L2 norm (nGPT / Dory)
    kind: str = "rms"  # "rms" | "layer" (the mean subtracted first: LayerNorm)
    bias: Node | tuple[Node, ...] | None = None  # added after the weight product, laid out as the weight
    heads_dim: int = 0  # < 0: weight and bias have a row per head of x's dim heads_dim

    def recipe_part(self) -> dict:
        """The norm fields of the Recipe (weight_heads_dim is the caller's: it depends on the layout
        of the fused op's input)."""
        return dict(norm=self.kind, weight_offset=self.weight_offset, cast_before_weight=self.cast_before_weight,
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


def _var_mean_parts(n) -> tuple[Node, int] | None:
    """(var_mean node, index) for ``getitem(var_mean(...), i)``."""
    if isinstance(n, Node) and n.op == "call_function" and n.target is operator.getitem and is_op(n.args[0], aten.var_mean):
        return n.args[0], n.args[1]
    return None


def _check_var_mean(vm: Node) -> Node:
    """The input of ``var_mean(xf, [-1], correction=0, keepdim=True)``; raises Refused for another one."""
    dims = vm.args[1] if len(vm.args) > 1 else vm.kwargs.get("dim")
    if vm.target is not aten.var_mean.correction:
        raise Refused(f"LayerNorm variance by {vm.target} (not var_mean.correction)")
    if dims is None or not canon.is_last_dim(dims, vm.args[0]):
        raise Refused("var_mean is not over the last dim")
    if vm.kwargs.get("correction", 1) != 0:
        raise Refused(f"LayerNorm variance with correction={vm.kwargs.get('correction', 1)} (nn.LayerNorm's is "
                      "the biased one, correction=0)")
    if not vm.kwargs.get("keepdim", False):
        raise Refused("var_mean without keepdim")
    return vm.args[0]


def _mean_last(m) -> Node | None:
    """xf for ``mean(xf, [-1], keepdim=True)``."""
    if not is_op(m, aten.mean) or len(m.args) < 2 or not canon.is_last_dim(m.args[1], m.args[0]):
        return None
    keep = m.args[2] if len(m.args) > 2 else m.kwargs.get("keepdim", False)
    return m.args[0] if keep else None


def _centred_parts(c) -> tuple[Node, Node] | None:
    """(xf, mean node) for ``sub(xf, mean)``, mean = ``mean(xf, -1, keepdim)`` or var_mean's mean."""
    pair = canon.binary(c, aten.sub)
    if pair is None or not all(isinstance(a, Node) for a in pair):
        return None
    xf, m = pair
    vm = _var_mean_parts(m)
    if vm is not None:
        if vm[1] != 1 or canon.upcast_source(_check_var_mean(vm[0])) is not canon.upcast_source(xf):
            return None
        return xf, m
    if _mean_last(m) is not xf:
        return None
    return xf, m


def _centred(n: Node):
    """(x, eps, nodes, eps_expr) for ``(xf - mean(xf)) * rsqrt(var(xf) + eps)`` (a LayerNorm), xf = float(x):
    the variance as ``var_mean(xf, -1, correction=0)[0]`` beside the mean ``var_mean(...)[1]``
    (nn.LayerNorm's decomposition), or ``mean((xf - mean(xf))^2, -1)`` (Cohere's, by hand)."""
    pair = canon.binary(n, aten.mul)
    if pair is None or dtype_of(n) != torch.float32:
        return None
    for c, r in canon.both_orders(pair):
        v = canon.rsqrt_operand(r)
        centred = _centred_parts(c) if v is not None else None
        if centred is None:
            continue
        xf, m = centred
        for var, e in canon.both_orders(canon.binary(v, aten.add)):
            eps = canon.scalar_or_tensor(e)
            if eps is None or not isinstance(var, Node):
                continue
            vm = _var_mean_parts(var)
            if vm is not None:  # nn.LayerNorm: var and mean of one var_mean
                if vm[1] != 0 or _var_mean_parts(m) is None or _var_mean_parts(m)[0] is not vm[0]:
                    continue
                nodes = [n, r, v, var, vm[0], m, c]
                src = vm[0].args[0]
            else:  # by hand: mean(square(xf - mean), -1)
                sq = _mean_last(var)
                c2 = canon.square_operand(sq) if sq is not None else None
                if c2 is None or _centred_parts(c2) != (xf, m):
                    continue
                nodes = [n, r, v, var, sq, m, *{c: None, c2: None}]
                src = xf
            if dtype_of(xf) != torch.float32 or dtype_of(src) != torch.float32:
                raise Refused(f"LayerNorm statistics computed in {dtype_of(xf)}, not float32")
            x = canon.upcast_source(xf)
            for cc in {xf: None, src: None}:  # chains of widening converts between x and xf
                while cc is not x and cc is not None:
                    nodes.append(cc)
                    cc = cc.args[0] if canon.is_copy(cc) else None
            return x, eps, nodes, e
    return None


def _normalised(n: Node, kinds):
    """(kind, x, eps, nodes, eps_expr, is_sum) of an RMS (``kinds`` has "rms") or LayerNorm ("layer")
    normalisation at n, else None."""
    if "rms" in kinds:
        r = _normalized(n)
        if r is not None:
            return ("rms", *r)
    if "layer" in kinds:
        r = _centred(n)
        if r is not None:
            return ("layer", *r, False)
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
    if v is None or v.dim() < 1:  # [D], or a row per head ([H, D], [H, 1, D]: checked by _finish_norm)
        return None
    return base, offset, leaves


def _bias(node: Node):
    """(body, bias, leaves) for ``body + b`` with b a [D] or [H, D] tensor (through widening
    converts), else (node, None, [])."""
    pair = canon.binary(node, aten.add)
    for body, b in canon.both_orders(pair):
        if not isinstance(b, Node) or not isinstance(body, Node):
            continue
        base = canon.upcast_source(b)
        v = tensor_val(base)
        if v is None or not 1 <= v.dim() < max(tensor_val(node).dim(), 2):  # (not a full-size add)
            continue
        leaves, c = [], b
        while c is not base:
            leaves.append(c)
            c = c.args[0]
        return body, base, leaves
    return node, None, []


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
    """Read y as a per-head RMSNorm output (no bias); raises Refused."""
    return match_norm(y, ("rms",), with_bias=False)


def match_norm(y: Node, kinds=("rms", "layer"), with_bias: bool = True) -> NormMatch:
    """Read y as the output of a norm of one of `kinds` ("rms", "layer"), with a bias after the weight
    when `with_bias`; raises Refused."""
    per_head = _norms_per_head(y, kinds) if with_bias else None
    if per_head is not None:
        return per_head
    node, final_convs = canon.strip_converts(y)
    top = node
    node, bias, bias_leaves = _bias(node) if with_bias else (node, None, [])
    if bias is not None and canon.depends_on(bias, node):
        node, bias, bias_leaves = top, None, []
    if bias is not None:
        if dtype_of(top) != torch.float32:
            raise Refused(f"norm bias added in {dtype_of(top)}, not float32")
        if dtype_of(node) != torch.float32:
            raise Refused(f"value rounded twice (the weight product in {dtype_of(node)}, then + bias)")
    outer = [*final_convs, top] if bias is not None else final_convs
    r = _normalised(node, kinds)
    if r is not None:
        kind, x, eps, nodes, e, is_sum = r
        return _finish_norm(x, None, 0.0, False, eps, e, _rounding(dtype_of(top), final_convs),
                            [*outer, *nodes], bias_leaves, is_sum, kind, bias)
    pair = canon.binary(node, aten.mul)
    for n_expr, w_expr in canon.both_orders(pair):
        if not isinstance(n_expr, Node) or not isinstance(w_expr, Node):
            continue
        n_src, n_convs = canon.strip_converts(n_expr)
        r = _normalised(n_src, kinds)
        if r is None:
            continue
        kind, x, eps, nodes, e, is_sum = r
        w = _weight(w_expr)
        if w is None:
            raise Refused("weight is not a [D] or [H, D] tensor (per-head norm weight)")
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
        return _finish_norm(x, weight, offset, cast_before, eps, e, _rounding(dtype_of(top), final_convs),
                            [*outer, node, *n_convs, *nodes], [*leaves, *bias_leaves], is_sum, kind, bias)
    if is_op(y, aten.cat):
        raise Refused("RoPE input is a concatenation (e.g. text and image tokens), not one norm output")
    other = other_norm_kind(y)
    if other is not None and other.startswith("a LayerNorm"):
        # (a LayerNorm output is matched above: this one reaches the RoPE through other ops)
        via = getattr(y.target, "__name__", str(y.target)) if isinstance(y, Node) else type(y).__name__
        raise Refused(f"{other} reaches this RoPE through {via} (e.g. RoPE on a slice of the sequence, as "
                      "CogView4/CogVideoX write it), not as its input")
    if other is not None:
        raise Refused(f"{other} feeds this RoPE, not an RMSNorm (not fused yet)")
    raise Refused("no RMSNorm (x * rsqrt(mean(x^2) + eps) [* w]) feeds this RoPE")


def _head_slice(n: Node, dim: int) -> tuple[Node, int] | None:
    """(X, i) for ``X[(:,)*dim, i:i+1]`` spelled as a slice or a getitem of ``split(X, 1, dim)``."""
    if is_op(n, aten.slice) and len(n.args) > 3 and n.args[1] == dim:
        step = n.args[4] if len(n.args) > 4 else 1
        start, stop = canon.static_int(n.args[2]), canon.static_int(n.args[3])
        if step == 1 and start is not None and stop == start + 1:
            return n.args[0], start
    if isinstance(n, Node) and n.op == "call_function" and n.target is operator.getitem and is_op(
            n.args[0], aten.split) and len(n.args[0].args) > 2:
        sp = n.args[0]
        nd = canon.ndim_of(sp.args[0])
        if sp.args[1] == 1 and nd is not None and canon.norm_dim(sp.args[2], nd) == dim:
            return sp.args[0], n.args[1]
    return None


def _norms_per_head(y: Node, kinds) -> NormMatch | None:
    """``cat([norm_0(X[:, 0:1]), ..., norm_{H-1}(X[:, H-1:H])], dim)``: one LayerNorm (or RMSNorm)
    per head of X along a leading dim (StableLM's StableLmLayerNormPerHead), read as one norm of X
    whose weight (and bias) has a row per head. None when y is no such cat; Refused when it is one
    whose norms the recipe cannot treat as one."""
    if not is_op(y, aten.cat):
        return None
    nd = canon.ndim_of(y)
    dim = canon.norm_dim(y.args[1] if len(y.args) > 1 else y.kwargs.get("dim", 0), nd)
    parts = list(y.args[0])
    if dim >= nd - 1 or len(parts) < 2:
        return None
    try:
        norms = [match_norm(p, kinds) for p in parts]
    except Refused:
        return None
    srcs = [_head_slice(m.x, dim) for m in norms]
    if any(s is None for s in srcs):
        return None
    X = srcs[0][0]
    if any(s[0] is not X for s in srcs) or [s[1] for s in srcs] != list(range(len(parts))):
        return None
    if canon.static_int(tensor_val(X).shape[dim]) != len(parts):
        return None
    first = norms[0]
    key = lambda m: (m.recipe_part(), m.weight is None, m.bias is None, m.heads_dim,  # noqa: E731
                     m.eps if not isinstance(m.eps, Node) else None)
    if any(key(m) != key(first) for m in norms) or first.heads_dim or any(
            isinstance(m.eps, Node) and m.eps is not first.eps for m in norms):
        raise Refused("the per-head norms of this concatenation differ (recipe, eps, weight or bias)")
    weights = None if first.weight is None else tuple(m.weight for m in norms)
    biases = None if first.bias is None else tuple(m.bias for m in norms)
    for ts in (weights, biases):
        if ts is not None and any(tensor_val(t).dim() != 1 or tensor_val(t).dtype != tensor_val(ts[0]).dtype
                                  for t in ts):
            raise Refused("the per-head norms' weights are not [head_dim] tensors of one dtype")
    split_nodes = []
    for m in norms:
        sl = m.x
        split_nodes += [sl] + ([sl.args[0]] if sl.target is operator.getitem else [])
    interior = [y, *{n: None for n in split_nodes}]
    for m in norms:
        interior += m.interior
    leaves = [lf for m in norms for lf in m.leaves]
    return NormMatch(X, weights, first.weight_offset, first.cast_before_weight, first.eps, first.norm_dtype,
                     interior, leaves, first.norm_sum, first.kind, biases, dim - nd)


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
                 norm_sum=False, kind="rms", bias=None) -> NormMatch:
    xv = tensor_val(x)
    if xv is None:
        raise Refused("norm input has no tensor metadata")
    heads = set()
    for t, what in ((weight, "weight"), (bias, "bias")):
        if t is None:
            continue
        shape = tensor_val(t).shape
        if not canon.same_int(shape[-1], xv.shape[-1]):
            raise Refused(f"{what} shape {tuple(shape)} != [head_dim]")
        lead = [i for i in range(len(shape) - 1) if canon.static_int(shape[i]) != 1]
        if len(shape) == 1 or not lead and len(shape) <= xv.dim():  # [D] (or [1, .., 1, D]: the launcher flattens it)
            heads.add(0)
            continue
        # a row per head: [H, D] against [.., H, D] (Cohere's q_norm), or [H, 1, D] against [.., H, S, D]
        if len(shape) > xv.dim() or len(lead) > 1:
            raise Refused(f"{what} shape {tuple(shape)} is not [heads, (1, ...,) head_dim] of the input {tuple(xv.shape)}")
        h = lead[0] - len(shape)  # the heads' dim, from the right
        if not canon.same_int(shape[h], xv.shape[h]):
            raise Refused(f"{what} shape {tuple(shape)} is not [heads, (1, ...,) head_dim] of the input {tuple(xv.shape)}")
        heads.add(h)
    if len(heads) > 1:
        raise Refused("the norm's weight and bias differ in layout ([D] and a row per head)")
    heads_dim = heads.pop() if heads else 0
    if isinstance(eps_expr, Node) and eps_expr is not eps:
        leaves = [*leaves, eps_expr]
    return NormMatch(x, weight, offset, cast_before, eps, norm_dtype, interior, leaves, norm_sum, kind, bias,
                     heads_dim)
