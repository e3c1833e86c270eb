"""Canonical reading of post-grad ATen nodes: "normalise, then match once".

Real attention code reaches the post-grad graph in many spellings: ``x.view`` vs ``reshape``,
``chunk``/``split``+getitem vs slices, ``x*w`` vs ``w*x``, dtype converts present or absent
(float32 graphs have none), eps as a literal or (dynamic=True) a 0-d tensor input, ``add.Tensor``
vs ``add.Scalar``, ``rsqrt(v)`` vs ``pow(v, -0.5)``, ``out = empty_like(x); out[..., 0::2] = v``
(post-grad ``slice_scatter`` into an ``empty``) vs a ``cat``. The helpers here read every such spelling
into one form, without rewriting the graph, so each matcher (``rope.py``, ``rms_norm.py``) reads
one shape.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import operator
from collections.abc import Iterator

import torch
from torch.fx import Node

aten = torch.ops.aten
prims = torch.ops.prims

INT64_MAX = 2**63 - 1


# ---- node basics ------------------------------------------------------------------------------


def val(n):
    return n.meta.get("val") if isinstance(n, Node) else None


def tensor_val(n) -> torch.Tensor | None:
    v = val(n)
    return v if isinstance(v, torch.Tensor) else None


def dtype_of(n) -> torch.dtype | None:
    v = tensor_val(n)
    return None if v is None else v.dtype


def ndim_of(n) -> int | None:
    v = tensor_val(n)
    return None if v is None else v.dim()


def is_op(n, *targets) -> bool:
    """n calls one of targets (overloads, or packets matching any overload)."""
    if not isinstance(n, Node) or n.op != "call_function":
        return False
    t = n.target
    packet = getattr(t, "overloadpacket", None)
    return any(t is x or packet is x for x in targets)


def static_int(v) -> int | None:
    """v as a Python int when it is one: an int, a SymInt with a constant value, or a node computing
    one (a slice bound derived from a size). Inside ``reading_hints``, also a SymInt over the given
    symbols only, as its hint."""
    if isinstance(v, Node):
        v = val(v)
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, torch.SymInt):
        constant = v.node.maybe_as_int()
        if constant is not None:
            return int(constant)
        hinted = _HINTED.get()
        if hinted is not None and v.node.has_hint() and v.node.expr.free_symbols <= hinted[0]:
            hinted[1].append(v)
            return int(v.node.hint)
    return None


# (symbols, SymInts read as hints) while reading_hints is active
_HINTED: contextvars.ContextVar[tuple[frozenset, list] | None] = contextvars.ContextVar("qkfuse_hints", default=None)


@contextlib.contextmanager
def reading_hints(symbols):
    """Within the block, static_int reads a SymInt over `symbols` only as its size hint: a trial
    match of a site as it would be with those sizes specialised. Yields the SymInts read so."""
    read: list = []
    token = _HINTED.set((frozenset(symbols), read))
    try:
        yield read
    finally:
        _HINTED.reset(token)


def innermost_symbols(graph: torch.fx.Graph) -> frozenset:
    """The symbols that size only the last dim of the graph's input tensors (head_dim under
    dynamic=True on raw [..., D] inputs): specialising them pins no batch or sequence size."""
    last, other = set(), set()
    for n in graph.find_nodes(op="placeholder"):
        v = tensor_val(n)
        for i, size in enumerate(v.shape if v is not None else ()):
            if isinstance(size, torch.SymInt):
                (last if i == v.dim() - 1 else other).update(size.node.expr.free_symbols)
    return frozenset(last - other)


def same_int(a, b) -> bool:
    """a == b, statically (symbolic ints compare by expression)."""
    sa, sb = static_int(a), static_int(b)
    if sa is not None and sb is not None:
        return sa == sb
    if isinstance(a, torch.SymInt) and isinstance(b, torch.SymInt):
        return a.node.expr == b.node.expr
    return False


def norm_dim(d, ndim: int) -> int:
    return d + ndim if d < 0 else d


def is_last_dim(d, n: Node) -> bool:
    nd = ndim_of(n)
    if nd is None:
        return False
    if isinstance(d, (list, tuple)):
        if len(d) != 1:
            return False
        d = d[0]
    return isinstance(d, int) and norm_dim(d, nd) == nd - 1


# ---- converts ---------------------------------------------------------------------------------

_CONVERTS = (prims.convert_element_type,)


def is_convert(n) -> bool:
    if is_op(n, prims.convert_element_type):
        return True
    # aten._to_copy with only a dtype change is the same thing
    if is_op(n, aten._to_copy):
        kw = dict(n.kwargs)
        kw.pop("dtype", None)
        return not kw or all(v is None for v in kw.values())
    return False


def is_copy(n) -> bool:
    """A dtype convert, or a clone (layout only; torch.rms_norm's decomposition adds one)."""
    return is_convert(n) or is_op(n, aten.clone)


def strip_converts(n) -> tuple[Node, list[Node]]:
    """Follow converts and clones up; returns (source, those nodes from outermost to innermost)."""
    convs = []
    while is_copy(n):
        convs.append(n)
        n = n.args[0]
    return n, convs


def upcast_chain(n) -> tuple[Node, list[Node]]:
    """(the node n is an exact copy of, through widening converts and clones; those nodes from n in)."""
    chain = []
    while is_copy(n):
        src = n.args[0]
        if not is_widening(dtype_of(src), dtype_of(n)):
            break
        chain.append(n)
        n = src
    return n, chain


def upcast_source(n) -> Node:
    """The node n is an exact copy of: through widening converts and clones."""
    return upcast_chain(n)[0]


_WIDTH = {torch.float16: 1, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}


def is_widening(src: torch.dtype | None, dst: torch.dtype | None) -> bool:
    if src is None or dst is None:
        return False
    if src == dst:
        return True
    return src in _WIDTH and dst in _WIDTH and _WIDTH[dst] > _WIDTH[src] and not (
        src == torch.float16 and dst == torch.bfloat16
    )


# ---- arithmetic -------------------------------------------------------------------------------


def binary(n, *packets) -> tuple | None:
    """(a, b) of a Tensor/Scalar binary op with alpha == 1, else None."""
    if not is_op(n, *packets) or len(n.args) < 2:
        return None
    if n.kwargs.get("alpha", 1) != 1:
        return None
    return n.args[0], n.args[1]


def both_orders(pair) -> Iterator[tuple]:
    if pair is None:
        return
    a, b = pair
    yield a, b
    if a is not b:
        yield b, a


def scalar_or_tensor(x) -> float | Node | None:
    """A Python number, or a 0-d tensor node (a lifted float, e.g. eps under dynamic=True)."""
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return float(x)
    if isinstance(x, Node):
        v = tensor_val(x)
        if v is not None and v.dim() == 0 and v.dtype.is_floating_point:
            return strip_converts(x)[0] if dtype_of(strip_converts(x)[0]) is not None else x
    return None


def rsqrt_operand(n) -> Node | None:
    """v for ``rsqrt(v)`` or ``pow(v, -0.5)``."""
    if is_op(n, aten.rsqrt):
        return n.args[0]
    if is_op(n, aten.pow) and len(n.args) > 1 and n.args[1] == -0.5:
        return n.args[0]
    return None


def square_operand(n) -> Node | None:
    """x for ``pow(x, 2)`` (``torch.square`` too) or ``x * x``."""
    if is_op(n, aten.pow) and len(n.args) > 1 and n.args[1] == 2:
        return n.args[0]
    if is_op(n, aten.mul) and len(n.args) > 1 and n.args[0] is n.args[1]:
        return n.args[0]
    return None


# ---- slices of the last dim -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LastDimSlice:
    src: Node
    start: int
    stop: int  # exclusive, clamped to the dim size
    step: int


def _last_dim_bounds(src, dim, start, end, step) -> tuple[int, int, int] | None:
    """(start, stop, step) of ``src[..., start:end:step]`` along the last dim, bounds clamped."""
    nd = ndim_of(src)
    if nd is None or not isinstance(dim, int) or norm_dim(dim, nd) != nd - 1:
        return None
    size = static_int(tensor_val(src).shape[-1])
    start = 0 if start is None else static_int(start)
    end = size if end is None else static_int(end)
    step = static_int(step)
    if size is None or start is None or end is None or step is None:
        return None
    start, end = (v + size if v < 0 else v for v in (start, end))
    return max(0, start), min(end, size), step


def last_dim_slice(n) -> LastDimSlice | None:
    """Read slice/split/chunk/unbind spellings of ``src[..., start:stop:step]``."""
    if is_op(n, aten.slice):
        src = n.args[0]
        dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
        start = n.args[2] if len(n.args) > 2 else n.kwargs.get("start", None)
        end = n.args[3] if len(n.args) > 3 else n.kwargs.get("end", None)
        step = n.args[4] if len(n.args) > 4 else n.kwargs.get("step", 1)
        bounds = _last_dim_bounds(src, dim, start, end, step)
        return None if bounds is None else LastDimSlice(src, *bounds)
    if n is not None and isinstance(n, Node) and n.op == "call_function" and n.target is operator.getitem:
        parent, idx = n.args
        if is_op(parent, aten.split, aten.split_with_sizes):
            src = parent.args[0]
            dim = parent.args[2] if len(parent.args) > 2 else parent.kwargs.get("dim", 0)
            if not is_last_dim(dim, src):
                return None
            size = static_int(tensor_val(src).shape[-1])
            sizes = parent.args[1]
            if size is None:
                return None
            if isinstance(sizes, int):
                bounds = [(i, min(i + sizes, size)) for i in range(0, size, sizes)]
            else:
                sizes = [static_int(s) for s in sizes]
                if any(s is None for s in sizes):
                    return None
                offs = [sum(sizes[:i]) for i in range(len(sizes))]
                bounds = list(zip(offs, [o + s for o, s in zip(offs, sizes)]))
            if not 0 <= idx < len(bounds):
                return None
            return LastDimSlice(src, bounds[idx][0], bounds[idx][1], 1)
        if is_op(parent, aten.unbind):
            src = parent.args[0]
            dim = parent.args[1] if len(parent.args) > 1 else parent.kwargs.get("dim", 0)
            split = last_dim_split_source(src)
            nd = ndim_of(src)
            if split is None or not isinstance(dim, int) or nd is None:
                return None
            x, rows, width = split
            if norm_dim(dim, nd) == nd - 1 and width == 2:  # x.reshape(..., D/2, 2).unbind(-1)[i] == x[..., i::2]
                return LastDimSlice(x, idx, rows * width, 2)
            if norm_dim(dim, nd) == nd - 2 and rows == 2:  # x.reshape(..., 2, D/2).unbind(-2)[i]: a half
                return LastDimSlice(x, idx * width, (idx + 1) * width, 1)
    return None


@dataclasses.dataclass(frozen=True)
class ScatteredPart:
    start: int
    stop: int
    step: int
    value: Node  # what was written, before the write's conversion to the target's dtype
    nodes: list[Node]  # the slice_scatter, and its copy and target slice if any


def last_dim_setitems(n) -> tuple[Node, list[ScatteredPart]] | None:
    """``out = torch.empty_like(x); out[..., a:b:s] = v; ...`` (Wan's RoPE) as post-grad writes it:
    ``slice_scatter(base, copy(slice(base, -1, a, b, s), v), -1, a, b, s)`` chained onto an ``empty``.
    Returns (the empty, the parts in write order), else None. Whether the parts cover the tensor
    is the caller's to check (an unwritten element of an empty is garbage)."""
    parts = []
    while is_op(n, aten.slice_scatter):
        base, written = n.args[0], n.args[1]
        a = [*n.args[2:], *[None] * 4][:4]
        dim = a[0] if a[0] is not None else n.kwargs.get("dim", 0)
        bounds = _last_dim_bounds(base, dim, a[1] if a[1] is not None else n.kwargs.get("start"),
                                  a[2] if a[2] is not None else n.kwargs.get("end"),
                                  a[3] if a[3] is not None else n.kwargs.get("step", 1))
        if bounds is None:
            return None
        value, nodes = written, [n]
        if is_op(written, aten.copy) and not written.kwargs.get("non_blocking", False):
            target = last_dim_slice(written.args[0])
            if target is None or target.src is not base or (target.start, target.stop, target.step) != bounds:
                return None
            value, nodes = written.args[1], [n, written, written.args[0]]
        parts.append(ScatteredPart(*bounds, value, nodes))
        n = base
    if not parts or not is_op(n, aten.empty, aten.empty_like, aten.empty_strided):
        return None
    return n, parts[::-1]


def last_dim_split_source(n) -> tuple[Node, int, int] | None:
    """(x, rows, width) for ``x.reshape(*x.shape[:-1], rows, width)`` (the last dim split in two)."""
    if not is_op(n, aten.reshape, aten.view):
        return None
    src = n.args[0]
    sv, nv = tensor_val(src), tensor_val(n)
    if sv is None or nv is None or nv.dim() != sv.dim() + 1:
        return None
    if not all(same_int(a, b) for a, b in zip(sv.shape[:-1], nv.shape[:-2])):
        return None
    d, rows, width = (static_int(s) for s in (sv.shape[-1], nv.shape[-2], nv.shape[-1]))
    if d is None or rows is None or width is None or rows * width != d:
        return None
    return src, rows, width


def merges_last_two_dims(n) -> bool:
    """n is ``y.reshape(*y.shape[:-2], -1)`` (``flatten(-2)``): rows stay rows."""
    if not is_op(n, aten.reshape, aten.view):
        return False
    sv, nv = tensor_val(n.args[0]), tensor_val(n)
    if sv is None or nv is None or sv.dim() < 2 or nv.dim() != sv.dim() - 1:
        return False
    rows, width, d = (static_int(s) for s in (sv.shape[-2], sv.shape[-1], nv.shape[-1]))
    return None not in (rows, width, d) and rows * width == d and all(
        same_int(a, b) for a, b in zip(sv.shape[:-2], nv.shape[:-1]))


# ---- slices of a leading dim (rows of the sequence) -------------------------------------------

_END = 2**62  # a slice end at or past this is "to the end" (Dynamo writes sys.maxsize)


@dataclasses.dataclass(frozen=True)
class RowSlice:
    """``src[(:,) * dim, start:end]`` along a leading dim, step 1. start and end are static ints as
    written (negative: from the end, Python's rule); end None: to the end."""
    src: Node
    dim: int
    start: int
    end: int | None

    def key(self) -> slice:
        return slice(self.start, self.end)


def _row_bounds(src, dim, start, end, step) -> tuple[int, int, int | None] | None:
    nd = ndim_of(src)
    if nd is None or not isinstance(dim, int) or norm_dim(dim, nd) == nd - 1 or static_int(step) != 1:
        return None
    start = 0 if start is None else static_int(start)
    if start is None:
        return None
    if end is not None:
        end = static_int(end)
        if end is None:  # a symbolic end
            return None
        end = None if end >= _END else end
    return norm_dim(dim, nd), start, end


def row_slice(n) -> RowSlice | None:
    """Read ``aten.slice`` along a leading dim with step 1 and static bounds (``q[:, :-T]``)."""
    if not is_op(n, aten.slice):
        return None
    a = [*n.args[1:], *[None] * 4][:4]
    dim = a[0] if a[0] is not None else n.kwargs.get("dim", 0)
    bounds = _row_bounds(n.args[0], dim, a[1] if a[1] is not None else n.kwargs.get("start"),
                         a[2] if a[2] is not None else n.kwargs.get("end"),
                         a[3] if a[3] is not None else n.kwargs.get("step", 1))
    return None if bounds is None else RowSlice(n.args[0], *bounds)


@dataclasses.dataclass(frozen=True)
class AssembledPart:
    """One part of a tensor assembled along a leading dim: the node `value` (a concatenation's
    input, a value written by slice assignment), or, when value is None, rows [start:end] of
    `rows_of` (what a slice assignment leaves of its target)."""
    value: Node | None
    rows_of: Node | None = None
    start: int = 0
    end: int | None = None


def assembled_rows(n) -> tuple[int, list[AssembledPart], list[Node]] | None:
    """(dim, parts in order, the assembly's own nodes) for a tensor put together along a leading dim:
    ``cat([a, b, ...], dim)``, or a slice assignment ``x[:, :, T:] = v`` as post-grad writes it,
    ``slice_scatter(x, copy(slice(x, dim, T, end), v), dim, T, end)`` (the copy may be absent): read
    as the concatenation of x's rows before T, v, and x's rows after end. Else None."""
    if is_op(n, aten.cat):
        nd = ndim_of(n)
        dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
        if nd is None or not isinstance(dim, int) or norm_dim(dim, nd) == nd - 1:
            return None
        return norm_dim(dim, nd), [AssembledPart(v) for v in n.args[0]], [n]
    if not is_op(n, aten.slice_scatter):
        return None
    base, written = n.args[0], n.args[1]
    a = [*n.args[2:], *[None] * 4][:4]
    bounds = _row_bounds(base, a[0] if a[0] is not None else n.kwargs.get("dim", 0),
                         a[1] if a[1] is not None else n.kwargs.get("start"),
                         a[2] if a[2] is not None else n.kwargs.get("end"),
                         a[3] if a[3] is not None else n.kwargs.get("step", 1))
    if bounds is None:
        return None
    dim, start, end = bounds
    value, nodes = written, [n]
    if is_op(written, aten.copy) and not written.kwargs.get("non_blocking", False):
        target = row_slice(written.args[0])
        # (functionalization may view the target twice: two equal permutes of one tensor)
        if target is None or (target.dim, target.start, target.end) != bounds or (
                target.src is not base and data_identity(target.src) != data_identity(base)):
            return None
        value, nodes = written.args[1], [n, written, written.args[0]]
    parts = [AssembledPart(None, base, 0, start)] if start != 0 else []
    parts.append(AssembledPart(value))
    if end is not None:
        parts.append(AssembledPart(None, base, end, None))
    return dim, parts, nodes


# ---- views that keep rows intact ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RowViews:
    src: Node
    perm: list[int]  # the viewed node == src.permute(perm) as values (the last dim stays last)
    nodes: list[Node]  # the views, outermost first


def row_view_source(n) -> RowViews | None:
    """Follow views (and clones) that only reorder/relabel the leading dims (rows stay rows).

    None when a view moves data across rows (the caller refuses such a site).
    """
    perm: list[int] | None = None
    nodes = []
    while True:
        if is_op(n, aten.permute):
            p = [norm_dim(d, len(n.args[1])) for d in n.args[1]]
            if p[-1] != len(p) - 1:
                return None
            perm = p if perm is None else [p[i] for i in perm]
        elif not (is_op(n, aten.reshape, aten.view) and _same_shape(n.args[0], n) or is_op(n, aten.clone)):
            break  # (a clone only copies: e.g. torch.rms_norm on a transposed view)
        nodes.append(n)
        n = n.args[0]
    nd = ndim_of(n)
    return RowViews(n, perm if perm is not None else list(range(nd or 0)), nodes)


def _same_shape(a, b) -> bool:
    va, vb = tensor_val(a), tensor_val(b)
    return (
        va is not None
        and vb is not None
        and va.dim() == vb.dim()
        and all(same_int(x, y) for x, y in zip(va.shape, vb.shape))
    )


# ---- graph relations --------------------------------------------------------------------------


def depends_on(n, target: Node, limit: int = 400) -> bool:
    """Whether n is computed from target (bounded search; unknown counts as True)."""
    if not isinstance(n, Node):
        return False
    seen, stack = set(), [n]
    while stack:
        x = stack.pop()
        if x is target:
            return True
        if x in seen:
            continue
        seen.add(x)
        if len(seen) > limit:
            return True
        stack.extend(i for i in x.all_input_nodes)
    return False


_VIEW_OPS = (aten.unsqueeze, aten.reshape, aten.view, aten.expand, aten.permute, aten.slice, aten.squeeze)


# Views that keep the storage offset: a tensor made by a chain of them has its root's data pointer.
_SAME_POINTER_VIEWS = (aten.unsqueeze.default, aten.view.default, aten.expand.default, aten.permute.default,
                       aten.transpose.int, aten.squeeze.dim, aten.squeeze.default, aten.alias.default)


def same_pointer_views(n) -> tuple[Node, list]:
    """(root, [(op, args, kwargs) applied to it in order]) for a chain of same-pointer views whose
    other arguments are constants (no symbolic sizes), else (n, []): the root has n's data pointer,
    and replaying the ops on it rebuilds n."""
    chain = []
    while (isinstance(n, Node) and n.op == "call_function" and n.target in _SAME_POINTER_VIEWS
           and not any(isinstance(a, Node) for a in (*n.args[1:], *n.kwargs.values()))
           and tensor_val(n.args[0]) is not None):
        chain.append((n.target, n.args[1:], dict(n.kwargs)))
        n = n.args[0]
    return n, chain[::-1]


def data_identity(n):
    """A key equal for two nodes that hold the same values in the same layout: views of the same
    data, where that data may itself be a copy (clone, convert) computed the same way from the same
    source (GPT-J's repeat_interleave'd cos, written once per rotated tensor)."""
    if not isinstance(n, Node):
        return n
    base = n
    while is_op(base, *_VIEW_OPS):
        base = base.args[0]
    v = tensor_val(n)
    if v is None:
        return n
    if is_copy(base):
        base = (base.target, data_identity(base.args[0]), _hashable(val(base).stride()), val(base).dtype)
    elif base is n:
        return n
    return (base, _hashable(v.shape), _hashable(v.stride()), _hashable([v.storage_offset()]), v.dtype)


def _hashable(ints) -> tuple:
    """SymInts are not hashable; their expressions are."""
    return tuple(str(i.node.expr) if isinstance(i, torch.SymInt) else int(i) for i in ints)
