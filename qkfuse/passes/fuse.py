"""The qkfuse post-grad pass: find every candidate site, match it, pair, replace.

Runs on the functional post-grad ATen graph (Inductor's ``post_grad_custom_pre_pass``), before
Inductor's own post-grad patterns and before reinplacing.

Families (qkfuse/patterns, the ``Family`` protocol): every enabled family proposes candidate
nodes; a node proposed by several is matched by the first of them (in ``patterns.FAMILIES``
order) that reads it as a site. Records and counters (``<family>_sites``, ``<family>_calls``,
``<family>_refused``) are per family.

Symbolic head_dim (``dynamic=True`` on raw ``[..., D]`` inputs): a site that matches once the
input sizes found only in last dims are read as their hints gets those sizes guarded to their
values (``guard_int``: the guard joins Dynamo's, so another head_dim recompiles while batch and
sequence sizes stay symbolic), and is then matched as static.

Containment: one odd site must never break a user's compile. An exception raised while matching
or replacing a site leaves that site unfused (replacements change the graph only once nothing can
fail), records the reason for ``explain`` and logs the traceback; ``Options.strict_errors`` (the
tests) re-raises instead.
"""

from __future__ import annotations

import itertools
import logging

import torch
from torch._dynamo.utils import counters
from torch.fx.experimental.symbolic_shapes import guard_int

from ..kernels import policy
from ..options import Options
from ..patterns import BY_NAME, FAMILIES, MatchContext, Refused, Site, canon, kv_cache
from ..patterns.canon import dtype_of, static_int, tensor_val
from ..patterns.family import ConcatSite
from .pairing import group_sites, placeable
from .records import SiteRecord, publish
from .replace import replace_group

log = logging.getLogger("qkfuse")
_graph_ids = itertools.count()


def _shape(n):
    v = tensor_val(n)
    # (a specialised head_dim is a SymInt with a constant value)
    return None if v is None else tuple(str(s) if static_int(s) is None else static_int(s) for s in v.shape)


def _graph_code(graph: torch.fx.Graph) -> str:
    try:
        return graph.python_code("self").src
    except Exception:  # printing must never break a compile
        return str(graph)


def _internal_error(what: str, node, e: Exception, options: Options) -> str:
    if options.strict_errors:
        raise e
    log.warning("qkfuse: internal error while %s at %s; the site is left to Inductor", what,
                getattr(node, "name", node), exc_info=True)
    return f"internal error while {what} ({type(e).__name__}: {e}); left to Inductor"


class _Run:
    """One pass run over one graph: its records and counters."""

    def __init__(self, graph: torch.fx.Graph, options: Options):
        self.graph, self.options = graph, options
        self.gid = next(_graph_ids)
        self.records: list[SiteRecord] = []

    def record(self, site_or_node, fused: bool, reason: str, partner: Site | None = None, family: str = ""):
        """One record (and counter) for a site, or for a refused candidate node of `family`."""
        if isinstance(site_or_node, Site):
            s = site_or_node
            rec = SiteRecord(s.family, fused, reason, s.anchor.name, _shape(s.anchor),
                             None if partner is None else _shape(partner.anchor),
                             str(dtype_of(s.anchor)).replace("torch.", ""), s.describe(), self.gid)
        else:
            n = site_or_node
            rec = SiteRecord(family, fused, reason, n.name, _shape(n), None,
                             str(dtype_of(n)).replace("torch.", ""), "", self.gid)
        self.records.append(rec)
        counters["qkfuse"][f"{rec.family}_sites" if fused else f"{rec.family}_refused"] += 1

    def proposals(self) -> dict:
        """{candidate node: the enabled families proposing it, in FAMILIES order}."""
        enabled = set(self.options.families)
        proposed: dict = {}
        for family in FAMILIES:
            if family.name in enabled:
                for n in family.candidates(self.graph):
                    proposed.setdefault(n, []).append(family)
        return proposed

    def match(self, order: dict) -> list[Site]:
        ctx = MatchContext(frozenset(self.options.families))
        specialisable = _specialisable_symbols(self.graph)
        proposed = self.proposals()
        sites: list[Site] = []
        claimed: set = set()
        writes_taken: set = set()
        for cand in sorted(proposed, key=order.__getitem__):
            family = proposed[cand][0].name  # whose refusal it is, unless a matcher says otherwise
            try:
                site = _match(cand, proposed[cand], ctx, specialisable)
                family = site.family
                if claimed.intersection(site.interior):
                    raise Refused("overlaps another site")
                if self.options.kv_cache:
                    site.cache, site.cache_note = _cache_write(site, order, writes_taken, self.options)
                    if site.cache_note:
                        log.info("qkfuse: %s: %s", site.anchor.name, site.cache_note)
            except Refused as e:
                self.record(cand, False, str(e), family=e.site_of or family)
                continue
            except Exception as e:
                self.record(cand, False, _internal_error("matching", cand, e, self.options), family=family)
                continue
            sites.append(site)
            claimed.update(site.interior)
            if site.cache is not None:
                writes_taken.update(site.cache.targets())
        # A site computed from another site's interior (e.g. its input is another site's output)
        # would be spliced from nodes that the other replacement erases.
        inside = {n for s in sites for n in s.interior}
        kept = []
        for s in sites:
            if inside.intersection(s.input_nodes()):
                self.record(s, False, "its input is computed inside another fused site")
            else:
                kept.append(s)
        return kept

    def replace(self, sites: list[Site], order: dict) -> None:
        for group in group_sites(sites, order):
            order = {n: i for i, n in enumerate(self.graph.nodes)}  # earlier replacements moved nodes
            if len(group) > 1 and not placeable(group, order):  # earlier merges made it a cycle
                group_list = [(s,) for s in group]
            else:
                group_list = [group]
            for grp, kernel, note in (t for g in group_list for t in _groups_to_try(g, self.options)):
                if len(grp) == 1 and BY_NAME[grp[0].family].pairs_only:
                    kernel, note = None, f"no q/k partner: a {grp[0].family} call for one tensor saves nothing"
                if kernel is None:
                    for s in grp:
                        self.record(s, False, note)
                    continue
                try:
                    replace_group(self.graph, grp, kernel, {n: i for i, n in enumerate(self.graph.nodes)})
                except Exception as e:
                    reason = _internal_error("replacing", grp[0].anchor, e, self.options)
                    for s in grp:
                        self.record(s, False, reason)
                    continue
                counters["qkfuse"][f"{grp[0].family}_calls"] += 1
                if any(s.cache is not None for s in grp):
                    counters["qkfuse"]["kv_cache_writes"] += 1
                for s in grp:
                    partner = next((p for p in grp if p is not s), None)
                    self.record(s, True, f"{note}; {s.cache_note}" if s.cache_note else note, partner)


def run(graph: torch.fx.Graph, options: Options) -> list[SiteRecord]:
    """Rewrite `graph` in place; returns one record per candidate site."""
    if not options.active:
        return []
    r = _Run(graph, options)
    if log.isEnabledFor(logging.DEBUG):
        log.debug("qkfuse: graph %d before:\n%s", r.gid, _graph_code(graph))
    order = {n: i for i, n in enumerate(graph.nodes)}
    r.replace(r.match(order), order)
    _ensure_ordered(graph, options)
    if log.isEnabledFor(logging.DEBUG):
        log.debug("qkfuse: graph %d after:\n%s", r.gid, _graph_code(graph))
    if r.records:
        fused = sum(rec.fused for rec in r.records)
        log.info("qkfuse: graph %d: %d site(s) fused, %d refused", r.gid, fused, len(r.records) - fused)
    publish(r.records)
    return r.records


def _ensure_ordered(graph: torch.fx.Graph, options: Options) -> None:
    """Every node after its inputs. The replacements keep the order by construction
    (tests/passes/test_pairing.py); should one not, the graph is sorted here rather than handed
    to Inductor out of order (strict mode: an error, so the tests see it)."""
    seen: set = set()
    for n in graph.nodes:
        if any(a not in seen for a in n.all_input_nodes):
            break
        seen.add(n)
    else:
        return
    if options.strict_errors:
        raise RuntimeError(f"qkfuse: the rewritten graph uses {n.name}'s inputs before they are computed")
    log.warning("qkfuse: the rewritten graph was out of order at %s; sorting it", n.name)
    from torch._inductor.pattern_matcher import stable_topological_sort

    stable_topological_sort(graph)


def _first_site(cand, families, ctx: MatchContext) -> Site:
    """The site of the first family that matches `cand`, else the refusal to report: the first one
    that is not a wrong_kind refusal, else the first (with the family it is a refusal of)."""
    refusals = []
    for family in families:
        try:
            return family.match(cand, ctx)
        except Refused as e:
            refusals.append((family, e))
    family, e = next(((f, e) for f, e in refusals if not e.wrong_kind), refusals[0])
    raise Refused(str(e), wrong_kind=e.wrong_kind, site_of=e.site_of or family.name)


def _specialisable_symbols(graph: torch.fx.Graph) -> frozenset:
    """The sizes the pass may specialise: those found only in the last dims of the graph's inputs
    (canon.innermost_symbols), less any the user marked dynamic (``torch._dynamo.mark_dynamic``:
    specialising one fails the compile). Read from the Dynamo frame being compiled; outside one
    (export, a direct compile_fx), or where Dynamo's internals differ, nothing is specialised
    (such sites are refused with a hint instead)."""
    try:
        return _unmarked_innermost_symbols(graph)
    except Exception:  # Dynamo internals: never a reason to break a compile
        log.debug("qkfuse: cannot tell which sizes are marked dynamic; none is specialised", exc_info=True)
        return frozenset()


def _unmarked_innermost_symbols(graph: torch.fx.Graph) -> frozenset:
    from torch._dynamo.symbolic_convert import InstructionTranslator

    innermost = canon.innermost_symbols(graph)
    if not innermost:
        return innermost
    try:
        tracked = InstructionTranslator.current_tx().output.tracked_fakes
    except AttributeError:  # no frame
        return frozenset()
    marked = set()
    for t in tracked:
        constraints = getattr(t.symbolic_context, "constraint_sizes", None) or ()
        for size, constraint in zip(t.fake.size() if isinstance(t.fake, torch.Tensor) else (), constraints):
            # (automatic dynamic shapes constrain with warn_only: specialising those is allowed)
            strict = constraint is not None and not getattr(constraint, "warn_only", False)
            if strict and isinstance(size, torch.SymInt):
                marked |= size.node.expr.free_symbols
    return innermost - marked


def _match(cand, families, ctx: MatchContext, specialisable: frozenset) -> Site:
    """_first_site, and where it refuses a site that matches with its specialisable sizes (a
    symbolic head_dim) read as their hints: those sizes specialised, then the site."""
    try:
        return _first_site(cand, families, ctx)
    except Refused:
        if not (specialisable and _specialises(cand, families, ctx, specialisable)):
            raise
    return _first_site(cand, families, ctx)


def _specialises(cand, families, ctx: MatchContext, symbols: frozenset) -> bool:
    """Whether `cand` matches with `symbols` read as their size hints. If it does, the sizes it read
    are guarded to those values (the guards join Dynamo's: another head_dim recompiles; batch and
    sequence sizes are not among `symbols`), so that it now matches as static."""
    with canon.reading_hints(symbols) as read:
        try:
            _first_site(cand, families, ctx)
        except Refused:
            return False
    for size in read:
        guard_int(size)
    return bool(read)


def _groups_to_try(group, options: Options):
    """[(sites, kernel, note)]: the pair if one call serves it, else each site alone."""
    kernel, note = _choose(group, options)
    if kernel is not None or len(group) == 1:
        return [(group, kernel, note)]
    return [((s,), *_choose((s,), options)) for s in group]


def _choose(group, options: Options):
    if isinstance(group[0], ConcatSite):  # one launch per part (q's part i with k's): one kernel for all
        choices = [_choose(parts, options) for parts in zip(*(s.parts for s in group))]
        kernel, note = next(((k, n) for k, n in choices if k is None), choices[0])
        if kernel is not None and any(k != kernel for k, _ in choices):
            return None, "the parts of the concatenation would take different kernels"
        return kernel, note
    q, k = group[0], (group[1] if len(group) > 1 else None)
    vals = [s.op_input(tensor_val(s.x)) for s in group]
    cos, sin = q.table_values()
    return policy.choose(
        options.kernels, vals[0], vals[1] if k is not None else None, cos, q.recipe,
        any(isinstance(s.eps, torch.fx.Node) for s in group), sin, q.param_value("weight"),
        None if k is None else k.param_value("weight"), q.param_value("bias"),
        None if k is None else k.param_value("bias"))


def _cache_write(site: Site, order: dict, taken: set, options: Options):
    """The KV-cache write `site` absorbs, as far as the kernel that will serve it can do it."""
    if isinstance(site, ConcatSite):  # (no model writes a concatenated k into a cache)
        return None, ""
    cw, note = kv_cache.match_cache_write(site.anchor, order, taken)
    if cw is None:
        return None, note
    rotated = site.op_input(tensor_val(site.x))
    kernel = policy.likely_kernel(options.kernels, rotated)

    def why(v):
        return policy.cache_unsupported(kernel, rotated, tensor_val(cw.cache), tensor_val(cw.index), cw.dim, v)

    if cw.v is not None:
        reason = why((tensor_val(cw.v.src).permute(cw.v.perm), tensor_val(cw.v.cache)))
        if reason is not None:
            cw.v, note = None, f"v-cache write left to Inductor: {reason}"
    reason = why(None)
    if reason is not None:
        return None, f"kv-cache write left to Inductor: {reason}"
    site.cache = cw
    if cw.v is not None and not placeable((site,), order):
        cw.v, note = None, "v-cache write left to Inductor: v is computed after k is read"
    return cw, note
