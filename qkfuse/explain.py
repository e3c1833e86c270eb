"""``qkfuse.explain``: compile once and report every candidate site the pass saw."""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from .passes.records import SiteRecord, collect


@dataclasses.dataclass
class Report:
    """The sites the qkfuse pass found in one compile: printable as a table."""

    sites: list[SiteRecord]
    graphs: int

    @property
    def fused(self) -> list[SiteRecord]:
        return [s for s in self.sites if s.fused]

    @property
    def refused(self) -> list[SiteRecord]:
        return [s for s in self.sites if not s.fused]

    def table(self) -> str:
        head = ("graph", "node", "family", "shape", "paired with", "dtype", "recipe", "fused", "kernel / reason")
        rows = [(str(s.graph), s.node, s.family, _fmt(s.shape), _fmt(s.k_shape), s.dtype, s.recipe,
                 "yes" if s.fused else "no", s.reason) for s in self.sites]
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
        line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
        out = [line(head), line(["-" * w for w in widths])] + [line(r) for r in rows]
        out.append(f"{len(self.fused)} fused, {len(self.refused)} refused, in {self.graphs} graph(s)")
        return "\n".join(out)

    def __str__(self) -> str:
        return self.table()


def _fmt(shape) -> str:
    return "-" if shape is None else "x".join(str(s) for s in shape)


def explain(model_or_fn, *args, dynamic: bool | None = None, options: dict | None = None, **kwargs) -> Report:
    """Compile ``model_or_fn`` with the qkfuse backend, run it on the inputs, and report every
    candidate site: family, shapes, dtype, fused or refused and why.

    The compile bypasses the FX graph and AOT caches (a cache hit would skip the pass) and does not
    change ``model_or_fn``. It runs in the caller's grad mode, so the report matches what a compile
    in that mode gets: with grad enabled and parameters or inputs that require grad, the graphs save
    the chains' intermediates for backward and the pass refuses those sites; call it under
    ``torch.no_grad()`` or ``torch.inference_mode()`` to see the inference graphs.
    """
    from torch._inductor import config as inductor_config

    from .backend import qkfuse_backend

    graphs = []

    def backend(gm, example_inputs, **kw):
        graphs.append(gm)
        return qkfuse_backend(gm, example_inputs, options=options, **kw)

    patches = inductor_config.patch({"fx_graph_cache": False})
    compiled = torch.compile(model_or_fn, backend=backend, dynamic=dynamic)
    with collect() as records, patches, _no_autograd_cache():
        compiled(*args, **kwargs)
    # number graphs 0, 1, ... in this report (the pass numbers them process-wide)
    ids = {g: i for i, g in enumerate(dict.fromkeys(r.graph for r in records))}
    sites = [dataclasses.replace(r, graph=ids[r.graph]) for r in records]
    return Report(sites, len(graphs))


@contextlib.contextmanager
def _no_autograd_cache():
    try:
        from torch._functorch import config as functorch_config
    except ImportError:  # pragma: no cover
        yield
        return
    with functorch_config.patch(enable_autograd_cache=False):
        yield
