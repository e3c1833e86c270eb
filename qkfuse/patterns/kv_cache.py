"""The KV-cache write that consumes a k site's RoPE output (HF ``StaticCache`` and its sliding layers).

HF's ``self.keys.index_copy_(2, cache_position, k)`` reaches the post-grad graph functionalized::

    new_keys = index_put(keys, [None, None, pos], k_rot)     # or index_copy(keys, 2, pos, k_rot)
    ... attention reads new_keys ...
    copy_(keys, new_keys)                                     # the write-back into the graph input

and the values the same way with the same positions. Left to Inductor, the k norm+RoPE and the
write are one generated kernel; a fused call that stopped at k_rot would bring the write back as a
kernel of its own. So the k site absorbs it: the fused kernel stores k_rot (and v, which needs no
norm or RoPE) straight into the cache rows, and the graph's write-back lets Inductor reuse the
input buffer (no clone).

This module only reads the graph: it returns what it found, or None with the reason.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.fx import Node

from . import canon
from .canon import aten, dtype_of, is_op, tensor_val


@dataclasses.dataclass
class ValueWrite:
    node: Node  # the write whose result is the updated value cache
    cache: Node
    src: Node  # v before the row views between it and the write
    perm: list[int]  # src.permute(perm) is what is written
    interior: list[Node]  # those views (used only by the write)


@dataclasses.dataclass
class CacheWrite:
    node: Node  # the write whose result is the updated key cache
    cache: Node  # the key cache buffer (a graph input, written back with copy_)
    index: Node  # 1-D integer positions along `dim`
    dim: int  # the sequence dim of the cache
    v: ValueWrite | None = None
    views: list[Node] = dataclasses.field(default_factory=list)  # between k and the write (dead after)

    def targets(self) -> list[Node]:
        """Nodes whose uses the fused call's cache outputs take over."""
        return [self.node] + ([self.v.node] if self.v is not None else [])

    def input_nodes(self) -> list[Node]:
        nodes = [self.cache, self.index]
        if self.v is not None:
            nodes += [self.v.cache, self.v.src]
        return nodes

    def describe(self) -> str:
        return "kv-cache write (k, v)" if self.v is not None else "k-cache write"


@dataclasses.dataclass(frozen=True)
class _Write:
    node: Node
    cache: Node
    index: Node
    dim: int
    values: Node  # what is written, before `views`
    views: tuple[Node, ...] = ()  # reshapes that only add or drop leading size-1 dims


def _read_write(n: Node) -> _Write | None:
    """index_put(cache, [None]*dim + [index], values) or index_copy(cache, dim, index, values)."""
    if is_op(n, aten.index_put):
        cache, indices, values = n.args[:3]
        accumulate = n.args[3] if len(n.args) > 3 else n.kwargs.get("accumulate", False)
        if accumulate or not isinstance(indices, (list, tuple)):
            return None
        given = [i for i, x in enumerate(indices) if x is not None]
        if len(given) != 1 or given[0] != len(indices) - 1:
            return None
        dim, index = given[0], indices[given[0]]
    elif is_op(n, aten.index_copy):
        cache, dim, index, values = n.args[:4]
        if not isinstance(dim, int):
            return None
    else:
        return None
    cv = tensor_val(cache)
    if cv is None or not isinstance(index, Node) or not isinstance(values, Node):
        return None
    values, views = _through_leading_ones(values)
    return _Write(n, cache, index, canon.norm_dim(dim, cv.dim()), values, tuple(views))


def _drop_leading_ones(shape) -> list:
    shape = list(shape)
    while shape and canon.static_int(shape[0]) == 1:
        shape.pop(0)
    return shape


def _through_leading_ones(n: Node) -> tuple[Node, list[Node]]:
    """(source, views) for reshapes that only add or drop leading size-1 dims (``cache[:, :, pos] = k``
    with a batch of 1 writes k squeezed); n itself when there are none."""
    views = []
    while is_op(n, aten.reshape, aten.view) and len(n.users) == 1:
        src = n.args[0]
        a, b = _drop_leading_ones(tensor_val(src).shape), _drop_leading_ones(tensor_val(n).shape)
        if len(a) != len(b) or not all(canon.same_int(x, y) for x, y in zip(a, b)):
            break
        views.append(n)
        n = src
    return n, views


def _reads_a_cache_input(n: Node) -> bool:
    return isinstance(n.args[0], Node) and n.args[0].op in ("placeholder", "get_attr")


def _written_back(w: _Write) -> bool:
    """The graph ends by copying the write's result into the cache input (in-place semantics)."""
    return w.cache.op in ("placeholder", "get_attr") and any(
        is_op(u, aten.copy_) and u.args[0] is w.cache and u.args[1] is w.node for u in w.node.users)


def _check(w: _Write) -> str | None:
    cv, iv, vv = tensor_val(w.cache), tensor_val(w.index), tensor_val(w.values)
    if iv is None or vv is None:
        return "no tensor metadata"
    if iv.dim() != 1 or iv.dtype not in (torch.int32, torch.int64):
        return f"positions are {iv.dtype} of {iv.dim()} dims, not a 1-D integer tensor"
    if cv.dtype != vv.dtype:
        return f"cache dtype {cv.dtype} != written dtype {vv.dtype}"
    expect = list(cv.shape)
    expect[w.dim] = iv.shape[0]
    if vv.dim() != cv.dim() or not all(canon.same_int(a, b) for a, b in zip(vv.shape, expect)):
        return f"written shape {tuple(vv.shape)} is not the cache's {tuple(cv.shape)} at {iv.shape[0]} positions"
    if w.dim == cv.dim() - 1:
        return "the write indexes head_dim"
    if is_op(w.cache, aten.index) and _reads_a_cache_input(w.cache):
        # HF's sliding-window layer once its window is full: the whole cache, gathered rolled by one
        # position, then the new row written into that copy (not a row write into the cache)
        return "it writes into a rolled copy of the cache (a full sliding window), not rows of the cache"
    if not _written_back(w):
        return "the cache is not a graph input written back in place"
    return None


def match_cache_write(k_anchor: Node, order: dict, taken: set) -> tuple[CacheWrite | None, str]:
    """The cache write consuming a k site's output, with the value write beside it; (None, why) if
    there is none the kernel could absorb. `taken`: writes already absorbed by other sites."""
    users = list(k_anchor.users)
    if len(users) != 1:
        return None, ""
    write = users[0]
    while is_op(write, aten.reshape, aten.view) and len(write.users) == 1:
        write = next(iter(write.users))
    w = _read_write(write)
    if w is None or w.values is not k_anchor:
        return None, ""
    why = _check(w)
    if why is not None:
        return None, f"k-cache write left to Inductor: {why}"
    return CacheWrite(w.node, w.cache, w.index, w.dim, _value_write(w, order, taken), list(w.views)), ""


def _value_write(k: _Write, order: dict, taken: set) -> ValueWrite | None:
    """The nearest other write to the same positions of a cache shaped like k's (its v)."""
    best = None
    for n in k.index.users:
        w = _read_write(n)
        if w is None or n is k.node or n in taken or w.index is not k.index or w.dim != k.dim:
            continue
        kv, vv = tensor_val(k.cache), tensor_val(w.cache)
        if w.cache is k.cache or vv.dim() != kv.dim() or not all(
                canon.same_int(a, b) for a, b in zip(vv.shape[:-1], kv.shape[:-1])):
            continue
        if _check(w) is not None:
            continue
        if best is None or abs(order[n] - order[k.node]) < abs(order[best.node] - order[k.node]):
            best = w
    if best is None:
        return None
    rv = canon.row_view_source(best.values)
    src, perm = (rv.src, rv.perm) if rv is not None else (best.values, list(range(tensor_val(best.values).dim())))
    interior = list(best.views) + (rv.nodes if rv is not None else [])
    if any(len(x.users) != 1 for x in interior):  # a view someone else reads stays where it is
        src, perm = best.values, list(range(tensor_val(best.values).dim()))
        interior = list(best.views)
    if dtype_of(src) != dtype_of(best.cache):
        return None
    return ValueWrite(best.node, best.cache, src, perm, interior)
