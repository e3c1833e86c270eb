"""What the pass decided about each candidate site (shown by qkfuse.explain)."""

from __future__ import annotations

import contextlib
import dataclasses


@dataclasses.dataclass
class SiteRecord:
    family: str
    fused: bool
    reason: str  # kernel used, or why the site was left unfused
    node: str
    shape: tuple | None = None
    k_shape: tuple | None = None
    dtype: str = ""
    recipe: str = ""
    graph: int = 0


_listeners: list[list] = []


def publish(records: list[SiteRecord]) -> None:
    for sink in _listeners:
        sink.extend(records)


@contextlib.contextmanager
def collect():
    """Collect the records of every pass run inside the block (qkfuse.explain uses it)."""
    sink: list[SiteRecord] = []
    _listeners.append(sink)
    try:
        yield sink
    finally:
        _listeners.remove(sink)
