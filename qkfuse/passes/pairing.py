"""Pairing: which matched sites share one fused call (q and k of one attention), and where it goes.

Two sites may share a call when the pattern says their data fit one launch (same recipe and
cos/sin, shapes that differ only in the head dim) *and* the call can be placed: it goes right after
the latest of both sites' inputs, so that point must come before every user of both outputs. In a
multi-layer graph whose layer-0 q site was refused, layer 0's k must not pair with layer 1's q:
layer 1's q is computed from layer 0's attention, which reads layer 0's k (a cycle).
"""

from __future__ import annotations

from ..patterns import norm_rope
from ..patterns.canon import same_int, static_int, tensor_val

Site = norm_rope.Site


def placeable(group: tuple[Site, ...], order: dict) -> bool:
    """A call computing every site of `group` fits after all their inputs and before all their users."""
    latest = max((order[n] for s in group for n in s.input_nodes()), default=-1)
    first_use = min((order[u] for s in group for u in s.output_users()), default=len(order))
    return latest < first_use


def shapes_fit_one_launch(a: Site, b: Site) -> bool:
    """q and k must differ only in the head dim (GQA) for one launch; cos broadcasts over it."""
    va, vb = tensor_val(a.anchor_value()), tensor_val(b.anchor_value())
    if va.dim() != vb.dim() or not same_int(va.shape[-1], vb.shape[-1]):
        return False
    diff = [i for i in range(va.dim() - 1) if not same_int(va.shape[i], vb.shape[i])]
    if len(diff) > 1:
        return False
    if diff and a.cos is not None:
        cv = tensor_val(a.cos)
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
