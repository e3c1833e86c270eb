"""The qkfuse post-grad pass: find every candidate site, match it, replace it.

Runs on the functional post-grad ATen graph (Inductor's ``post_grad_custom_pre_pass``), before
Inductor's own post-grad patterns and before reinplacing.
"""

from __future__ import annotations

import itertools
import logging

import torch
from torch._dynamo.utils import counters

from ..kernels import policy
from ..options import Options
from ..patterns import norm_rope
from ..patterns.canon import dtype_of, tensor_val
from .records import SiteRecord, publish

log = logging.getLogger("qkfuse")
_graph_ids = itertools.count()


def _shape(n):
    v = tensor_val(n)
    return None if v is None else tuple(int(s) if isinstance(s, int) else str(s) for s in v.shape)


def _graph_code(graph: torch.fx.Graph) -> str:
    try:
        return graph.python_code("self").src
    except Exception:  # printing must never break a compile
        return str(graph)


def _op_input_val(site: norm_rope.Site):
    return tensor_val(site.x).permute(site.perm)


def run(graph: torch.fx.Graph, options: Options) -> list[SiteRecord]:
    """Rewrite `graph` in place; returns one record per candidate site."""
    if not options.active:
        return []
    gid = next(_graph_ids)
    if log.isEnabledFor(logging.DEBUG):
        log.debug("qkfuse: graph %d before:\n%s", gid, _graph_code(graph))
    families = frozenset(options.families)
    records: list[SiteRecord] = []
    sites: list[norm_rope.Site] = []
    claimed: set = set()

    def record(site_or_node, fused, reason, family=norm_rope.FAMILY, k_site=None):
        if isinstance(site_or_node, norm_rope.Site):
            s = site_or_node
            records.append(SiteRecord(
                s.family, fused, reason, s.anchor.name, _shape(s.anchor),
                None if k_site is None else _shape(k_site.anchor), str(dtype_of(s.anchor)).replace("torch.", ""),
                s.recipe.describe(), gid))
        else:
            n = site_or_node
            records.append(SiteRecord(family, fused, reason, n.name, _shape(n),
                                      None, str(dtype_of(n)).replace("torch.", ""), "", gid))
        fam = records[-1].family
        counters["qkfuse"][f"{fam}_sites" if fused else f"{fam}_refused"] += 1

    for cand in list(norm_rope.candidates(graph)):
        try:
            site = norm_rope.match_site(cand, families)
            if claimed.intersection(site.interior):
                raise norm_rope.Refused("overlaps another site")
        except norm_rope.Refused as e:
            record(cand, False, str(e))
            continue
        sites.append(site)
        claimed.update(site.interior)

    order = {n: i for i, n in enumerate(graph.nodes)}
    for group in norm_rope.pair_sites(sites):
        for grp, kernel, note in _groups_to_try(group, options):
            if kernel is None:
                for s in grp:
                    record(s, False, note)
                continue
            norm_rope.replace(graph, grp, kernel, order)
            counters["qkfuse"][f"{grp[0].family}_calls"] += 1
            record(grp[0], True, note, k_site=grp[1] if len(grp) > 1 else None)
            if len(grp) > 1:
                record(grp[1], True, note, k_site=grp[0])
    if log.isEnabledFor(logging.DEBUG):
        log.debug("qkfuse: graph %d after:\n%s", gid, _graph_code(graph))
    if records:
        fused = sum(r.fused for r in records)
        log.info("qkfuse: graph %d: %d site(s) fused, %d refused", gid, fused, len(records) - fused)
    publish(records)
    return records


def _groups_to_try(group, options: Options):
    """[(sites, kernel, note)]: the pair if one call serves it, else each site alone."""
    cos_v = tensor_val(group[0].cos)
    vals = [_op_input_val(s) for s in group]
    tensor_eps = any(isinstance(s.eps, torch.fx.Node) for s in group)
    sin_v = tensor_val(group[0].sin)
    weights = [tensor_val(s.weight) for s in group]
    kernel, note = policy.choose(options.kernels, vals[0], vals[1] if len(vals) > 1 else None, cos_v,
                                 group[0].recipe, tensor_eps, sin_v, weights[0], weights[1] if len(weights) > 1 else None)
    if kernel is not None or len(group) == 1:
        return [(group, kernel, note)]
    out = []
    for s, v in zip(group, vals):
        k1, n1 = policy.choose(options.kernels, v, None, cos_v, s.recipe, tensor_eps, sin_v, tensor_val(s.weight))
        out.append(((s,), k1, n1))
    return out
