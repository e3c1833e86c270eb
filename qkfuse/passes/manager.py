"""The pass object Inductor holds: a ``CustomGraphPass`` with a cache-correct ``uuid``.

Inductor keys its FX graph cache on ``uuid()``: it hashes the source of every file that decides
what the pass emits (passes, patterns, ops, kernels) plus the options, so the cache hits when
nothing changed and misses when the pass, a kernel or an option did. A user's own
``post_grad_custom_pre_pass`` is composed with, not dropped (torch 2.11 takes one object per hook).
"""

from __future__ import annotations

import functools
import hashlib
import pathlib

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

from ..options import Options
from . import fuse

_PKG = pathlib.Path(__file__).resolve().parent.parent
_HASHED_DIRS = ("passes", "patterns", "ops", "kernels")


@functools.lru_cache(maxsize=1)
def source_hash() -> str:
    h = hashlib.sha256()
    files = sorted(p for d in _HASHED_DIRS for p in (_PKG / d).rglob("*") if p.suffix in (".py", ".json"))
    files.append(_PKG / "options.py")
    for p in files:
        h.update(str(p.relative_to(_PKG)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


class QKFusePass(CustomGraphPass):
    """Runs the qkfuse families on a post-grad graph, then the user's own pass if any."""

    def __init__(self, options: Options | None = None, user_pass=None):
        self.options = options or Options()
        self.user_pass = user_pass

    def __call__(self, graph: torch.fx.Graph) -> None:
        if self.options.active:
            _remove_assert_ops(graph)
        fuse.run(graph, self.options)
        if self.user_pass is not None:
            self.user_pass(graph)

    def uuid(self):
        parts = [source_hash(), self.options.cache_key()]
        if self.user_pass is not None:
            other = getattr(self.user_pass, "uuid", None)
            other = other() if callable(other) else None
            if not other:
                return None  # the user's pass cannot be cached: neither can the composition
            parts.append(str(other))
        return hashlib.sha256("|".join(parts).encode()).hexdigest()

    def __repr__(self) -> str:
        return f"QKFusePass({self.options})"


def _remove_assert_ops(graph: torch.fx.Graph) -> None:
    """Erase ``aten._assert_tensor_metadata`` nodes, as Inductor itself does right after this hook
    (``remove_assert_ops``; the op lowers to nothing anyway). torch.export emits one after every
    ``.to(dtype)``; left in, it is a user of the chain's intermediates and every site is refused."""
    op = getattr(torch.ops.aten, "_assert_tensor_metadata", None)
    if op is None:
        return
    for node in graph.find_nodes(op="call_function", target=op.default):
        graph.erase_node(node)


def pass_(**options) -> QKFusePass:
    """The pass for stock Inductor: ``torch.compile(m, options={"post_grad_custom_pre_pass": qkfuse.pass_()})``."""
    return QKFusePass(Options.from_kwargs(**options))
