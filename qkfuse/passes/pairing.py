"""Pairing: which matched sites share one fused call (q and k of one attention), and where it goes.

Two sites may share a call when the pattern says their data fit one launch (same recipe and
cos/sin, shapes that differ only in the head dim) *and* one call computing both is acyclic: no
input of either site may be computed from an output of either. In a multi-layer graph whose
layer-0 q site was refused, layer 0's k must not pair with layer 1's q: layer 1's q is computed from
layer 0's attention, which reads layer 0's k.

The call goes right after the latest of the group's inputs; users of the outputs that come before
that point (e.g. q's transpose, placed right after q) move down behind it. The check runs on the
graph as it is when the group is replaced (earlier replacements merged other pairs).
"""

from __future__ import annotations

from ..patterns import norm_rope
from ..patterns.canon import same_int, static_int, tensor_val
from ..patterns.family import table_value

Site = norm_rope.Site


def call_inputs(group: tuple[Site, ...], extra=()) -> set:
    """Every node the group's sites read, plus `extra` (the fused call's own arguments). The call
    goes after the latest of them, and the outputs' users before that point move behind it: both
    must use this one set (a k site's own unsqueeze of the shared cos, which the call does not read,
    still counts: a user of q placed between it and the call's last argument reads later nodes)."""
    return {n for s in group for n in s.input_nodes()} | set(extra)


def early_users(group: tuple[Site, ...], order: dict, inputs: set | None = None) -> list | None:
    """The nodes computed from the group's outputs that come before its latest input (in graph
    order; they move behind the fused call), or None if an input is among them (a cycle).
    `inputs`: call_inputs of the group (by default without the call's own arguments)."""
    if inputs is None:
        inputs = call_inputs(group)
    latest = max((order[n] for n in inputs), default=-1)
    seen: set = set()
    stack = [u for s in group for u in s.output_users()]
    while stack:
        n = stack.pop()
        if n in seen or order[n] >= latest and n not in inputs:
            continue  # after every input: cannot lead back to one (the graph is ordered)
        if n in inputs:
            return None
        seen.add(n)
        stack.extend(n.users)
    return sorted(seen, key=order.__getitem__)


def placeable(group: tuple[Site, ...], order: dict) -> bool:
    """One call can compute every site of `group` without a cycle."""
    return early_users(group, order) is not None


def shapes_fit_one_launch(a: Site, b: Site) -> bool:
    """q and k must differ only in the head dim (GQA) for one launch; cos broadcasts over it."""
    va, vb = tensor_val(a.anchor_value()), tensor_val(b.anchor_value())
    if va.dim() != vb.dim() or not same_int(va.shape[-1], vb.shape[-1]):
        return False
    diff = [i for i in range(va.dim() - 1) if not same_int(va.shape[i], vb.shape[i])]
    if len(diff) > 1:
        return False
    if diff and a.cos is not None:
        cv = table_value(a.cos)
        ci = diff[0] - (va.dim() - cv.dim())
        if ci >= 0 and static_int(cv.shape[ci]) != 1:
            return False
    return True


def group_sites(sites: list[Site], order: dict) -> list[tuple[Site, ...]]:
    """Sites grouped into (q, k) pairs where one call can serve both, else alone; in graph order.

    Each site pairs with the nearest later compatible site whose pairing is placeable."""
    by_key: dict = {}
    for s in sorted(sites, key=lambda s: order[s.anchor]):
        by_key.setdefault(s.pair_key(), []).append(s)
    groups = []
    for members in by_key.values():
        used: set[int] = set()
        for i, a in enumerate(members):
            if i in used:
                continue
            used.add(i)
            for j in range(i + 1, len(members)):
                b = members[j]
                pair = _as_q_k(a, b)
                if j not in used and pair is not None and shapes_fit_one_launch(a, b) and placeable(pair, order):
                    used.add(j)
                    groups.append(pair)
                    break
            else:
                groups.append((a,))
    return sorted(groups, key=lambda g: min(order[s.anchor] for s in g))


def _as_q_k(a: Site, b: Site) -> tuple[Site, Site] | None:
    """(q, k): one launch writes at most one KV-cache pair, that of k (the second site)."""
    if a.cache is not None and b.cache is not None:
        return None
    return (b, a) if a.cache is not None else (a, b)
