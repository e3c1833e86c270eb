"""Replace one group of matched sites (q, or q and k) by one fused call.

All fallible work (tracing the launcher) happens before the graph changes; the splice itself
undoes its own nodes if it fails, so a failed replacement leaves the graph as it was.
"""

from __future__ import annotations

import itertools

import torch
from torch.fx import Node

from ..patterns.norm_rope import Site
from . import splice
from .launchers import launcher
from .pairing import call_inputs, early_users

_call_ids = itertools.count()


def replace_group(graph: torch.fx.Graph, group: tuple[Site, ...], kernel: str, order: dict) -> list[Node]:
    """Replace `group` by one fused call served by `kernel`; returns the new output nodes.
    `order`: the graph's current node order."""
    fn, args = launcher(kernel, group)
    inputs = call_inputs(group, args)
    movers = early_users(group, order, inputs)
    if movers is None:
        raise RuntimeError("qkfuse: one call for these sites would be a cycle")
    gm = splice.trace(fn, [a.meta["val"] for a in args])
    targets = [t for s in group for t in s.targets()]
    returned = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    if len(returned) != len(targets):
        raise RuntimeError(f"qkfuse: the fused call returns {len(returned)} values for {len(targets)} targets")
    after = splice.insertion_point(graph, list(inputs), order)  # the latest input: the movers' bound
    after_call = after.next
    op = "qk_norm_rope" if len(group) > 1 else "norm_rope"
    outs = splice.insert(graph, gm, args, after=after, meta_from=group[0].anchor,
                         tag=f"{op}#{next(_call_ids)}")
    last = after_call.prev
    for n in movers:  # users that came before the call's inputs follow it now, in their order
        last.append(n)
        last = n
    for target, out in zip(targets, outs):
        target.replace_all_uses_with(out)
    splice.erase_dead(graph, [n for s in group for n in s.dead_after_replacement()])
    return outs
