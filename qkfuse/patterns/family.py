"""What a pattern family is, and the plain data it hands to the pass.

A family is a short composition of the reusable matchers (``rope.py``, ``rms_norm.py``, read
through ``canon.py``). It proposes candidate nodes and reads one candidate as a :class:`Site` or
raises :class:`Refused`; it never changes the graph and knows no kernels. ``qkfuse/passes`` applies
sites: pairing, kernel choice, splice, records and counters.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Protocol

import torch
from torch.fx import Node

from ..ops.recipe import Recipe
from . import canon
from .canon import dtype_of, tensor_val
from .kv_cache import CacheWrite


class Refused(Exception):
    """A candidate that does not match; str() is the reason shown by qkfuse.explain.

    ``wrong_kind``: the candidate is not of the refusing family's kind (e.g. no norm feeds the
    RoPE); when several families propose one node, a refusal that is not wrong_kind is reported.
    ``site_of``: the family whose kind the candidate is, when the refusing family can tell (the
    record and its counter go to that family).
    """

    def __init__(self, reason: str, *, wrong_kind: bool = False, site_of: str | None = None):
        super().__init__(reason)
        self.wrong_kind = wrong_kind
        self.site_of = site_of


@dataclasses.dataclass(frozen=True)
class ComplexPart:
    """A cos/sin table that is no node of the graph: the real (part 0) or imaginary (part 1) part of
    the complex node `of` (complex RoPE's frequencies), ``view_as_real(of)[..., part]``, a float32
    view with last-dim stride 2. Plain data: the pass inserts that view for the fused call."""
    of: Node
    part: int


Table = Node | ComplexPart


def table_node(t) -> Node | None:
    """The graph node a cos/sin table reads."""
    return t.of if isinstance(t, ComplexPart) else t if isinstance(t, Node) else None


def table_value(t) -> torch.Tensor | None:
    """A cos/sin table's (meta) value."""
    if isinstance(t, ComplexPart):
        v = tensor_val(t.of)
        if v is None or not v.is_complex():
            return None
        return torch.view_as_real(v).select(-1, t.part)  # (select: indexing needs a device guard)
    return tensor_val(t)


def table_identity(t):
    """canon.data_identity of a table: equal for tables holding the same values in the same layout."""
    return (canon.data_identity(t.of), t.part) if isinstance(t, ComplexPart) else canon.data_identity(t)


@dataclasses.dataclass(frozen=True)
class PartRows:
    """Where one part of a concatenation lies in the whole (``ConcatSite.parts``): rows [start,
    start + length) along `dim` of the RoPE's input (the op input's layout), and the cos/sin rows it
    reads: the same range along `table_dim` of the tables (None: they broadcast over `dim`).
    start and length are meta values (ints, or SymInts with dynamic shapes)."""
    dim: int
    start: object
    length: object
    table_dim: int | None


@dataclasses.dataclass(frozen=True)
class MatchContext:
    families: frozenset[str]  # the enabled families


class Family(Protocol):
    name: str
    # A lone site (no q/k partner) is left to Inductor: one call for one tensor saves nothing.
    pairs_only: bool

    def candidates(self, graph: torch.fx.Graph) -> Iterable[Node]:
        """The nodes this family reads as sites, in graph order."""

    def match(self, candidate: Node, ctx: MatchContext) -> "Site":
        """The site at `candidate`; raises Refused with the reason."""


@dataclasses.dataclass
class Site:
    family: str
    anchor: Node
    x: Node  # input of the fused op before `split` and `perm`
    perm: list[int]  # x[.unflatten(-1, split)].permute(perm) is the op input (RoPE layout)
    weight: Node | None
    eps: float | Node
    cos: Table | None
    sin: Table | None
    recipe: Recipe
    interior: list[Node]
    leaves: list[Node]
    cache: CacheWrite | None = None  # the KV-cache write this (k) site absorbs
    # (heads, head_dim): x's last dim holds all heads (a norm across heads, before the head view)
    split: tuple[int, int] | None = None
    cache_note: str = ""  # why a KV-cache write after this site stays with Inductor (shown by explain)
    # the norm's bias (added after the weight), laid out as the weight. weight and bias may be
    # one node per head (StableLM's LayerNorm per head): the op gets them stacked, [H, D]
    bias: Node | tuple[Node, ...] | None = None
    rows: PartRows | None = None  # a part of a ConcatSite: where its rows lie in the whole
    # (dim, slice): the site reads only these rows of x along x's leading dim `dim` (a part of a
    # norm_slice_rope site: HunyuanVideo's RoPE on q[:, :-T] of one norm output)
    x_rows: tuple[int, slice] | None = None

    def op_input(self, x):
        """The fused op's input from x (a tensor: a traced one or x's meta value)."""
        if self.x_rows is not None:
            dim, rows = self.x_rows
            # (aten.slice, not indexing: Python indexing of a fake CUDA tensor outside its mode fails)
            x = torch.ops.aten.slice(x, dim, rows.start or 0, rows.stop)
        if self.split is not None:
            x = x.unflatten(-1, self.split)
        return x.permute(self.perm)

    @property
    def shape(self):
        v = tensor_val(self.anchor)
        return tuple(v.shape) if v is not None else None

    def anchor_value(self) -> Node:
        """The node holding the fused op's (RoPE) output value, before any cache write."""
        return self.anchor

    def targets(self) -> list[Node]:
        """Nodes whose uses the fused call's outputs take over, in output order."""
        return self.cache.targets() if self.cache is not None else [self.anchor]

    def input_nodes(self) -> list[Node]:
        params = [n for p in (self.weight, self.bias) for n in (p if isinstance(p, tuple) else (p,))]
        tables = (table_node(self.cos), table_node(self.sin))
        nodes = [n for n in (self.x, *params, *tables, self.eps) if isinstance(n, Node)]
        return nodes + (self.cache.input_nodes() if self.cache is not None else [])

    def param_value(self, which: str):
        """The value the op gets as the weight (``which="weight"``) or bias: the node's, or the per-head
        nodes' stacked ([H, D]); None when there is none."""
        p = getattr(self, which)
        if isinstance(p, tuple):
            return torch.stack([tensor_val(n) for n in p])
        v = tensor_val(p)
        rows = bool(self.recipe.weight_heads_dim)
        if v is not None and v.dim() != (2 if rows else 1):  # as the launcher passes it: [H, 1, D] -> [H, D]
            v = v.reshape(-1, v.shape[-1]) if rows else v.reshape(-1)
        return v

    def table_values(self) -> tuple:
        """(cos, sin) meta values as this site reads them (a part: its rows of the tables)."""
        vals = table_value(self.cos), table_value(self.sin)
        r = self.rows
        if r is None or r.table_dim is None:
            return vals
        return tuple(None if v is None else v.narrow(r.table_dim, r.start, r.length) for v in vals)

    def describe(self) -> str:
        """The recipe as explain shows it."""
        text = self.recipe.describe(self.bias is not None)
        return text + (f" + {self.cache.describe()}" if self.cache is not None else "")

    def output_users(self) -> list[Node]:
        return [u for t in self.targets() for u in t.users]

    def dead_after_replacement(self) -> list[Node]:
        nodes = [*self.interior, *self.leaves]
        # a complex table's own view (k's unsqueeze of the shared freqs) is unread once the call
        # reads q's: Inductor runs complex views as fallback calls, so it goes too
        nodes += [t.of for t in (self.cos, self.sin) if isinstance(t, ComplexPart)]
        if self.cache is not None:
            nodes += self.cache.targets() + self.cache.views
            nodes += self.cache.v.interior if self.cache.v is not None else []
        return nodes

    def pair_key(self):
        """Sites with equal keys can share one launch."""
        w, b = self.param_value("weight"), self.param_value("bias")
        return (
            self.recipe,
            None if b is None else b.dtype,
            table_identity(self.cos),
            table_identity(self.sin),
            None if w is None else w.dtype,
            isinstance(self.eps, Node),
            dtype_of(self.x),
        )


@dataclasses.dataclass
class ConcatSite(Site):
    """A RoPE over a concatenation of norm outputs (Flux's double-stream blocks: text and image q
    normed apart, concatenated along the sequence, then rotated). Each part is a Site of its own
    norm (anchor: the concatenation's input; cos/sin: the RoPE's tables, read at ``part.rows``);
    the replacement computes each part into its rows of one output. The site's own recipe, x, perm,
    weight and eps are its first part's (its interior: the RoPE, the concatenation and every part's
    nodes)."""
    parts: tuple[Site, ...] = ()

    @property
    def cat_dim(self) -> int:
        return self.parts[0].rows.dim

    def input_nodes(self) -> list[Node]:
        nodes: list[Node] = []
        for p in self.parts:
            nodes += [n for n in p.input_nodes() if n not in nodes]
        return nodes

    def dead_after_replacement(self) -> list[Node]:
        nodes = [*self.interior, *self.leaves]
        for p in self.parts:
            nodes += p.dead_after_replacement()
        return nodes

    def describe(self) -> str:
        recipes = list(dict.fromkeys(p.describe() for p in self.parts))
        return f"{' | '.join(recipes)} over a concatenation of {len(self.parts)} parts (dim {self.cat_dim})"

    def pair_key(self):
        lengths = tuple(str(p.rows.length) for p in self.parts)
        return ("concat", self.cat_dim, lengths, tuple(p.pair_key() for p in self.parts))


def check_interior(site_nodes: list[Node], anchor: Node) -> list[Node]:
    """Every node of a site but its anchor is used only inside the site (else it must stay).
    Returns the size reads of interior nodes that only the site uses (with dynamic shapes, a
    ``sym_size`` of a concatenation that the RoPE's reshape takes): they belong to the interior too."""
    inside = set(site_nodes)
    size_reads = [u for n in site_nodes for u in n.users
                  if u not in inside and u.target is torch.ops.aten.sym_size.int and set(u.users) <= inside]
    inside.update(size_reads)
    for n in site_nodes:
        if n is anchor:
            continue
        for u in n.users:
            if u.op == "output":  # a training forward graph returns what backward needs
                raise Refused(f"intermediate {n.name} has a user outside the chain: it is a graph output "
                              "(returned, or saved for backward with grad enabled: the fused op has no "
                              "backward; infer under torch.no_grad())")
            if u not in inside:
                raise Refused(f"intermediate {n.name} has a user outside the chain ({u.name})")
    return list(dict.fromkeys(size_reads))


def require_static_head_dim(x: Node) -> None:
    if canon.static_int(tensor_val(x).shape[-1]) is None:
        raise Refused("head_dim is symbolic")
