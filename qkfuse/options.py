"""Options of the qkfuse pass: ``options={"qkfuse.<name>": value}`` in torch.compile.

Keys that start with ``qkfuse.`` are ours; every other key goes to Inductor unchanged.
"""

from __future__ import annotations

import dataclasses
import os

from . import patterns
from .kernels.policy import KERNEL_CHOICES

PREFIX = "qkfuse."
FAMILIES = tuple(f.name for f in patterns.FAMILIES)  # "norm_rope", "norm_cat_rope", "norm_slice_rope", ...
DEFAULT_FAMILIES = ("norm_rope", "norm_cat_rope", "norm_slice_rope", "rope_norm")  # "rope" and "norm" are opt-in (see their docstrings)


@dataclasses.dataclass(frozen=True)
class Options:
    enable: bool = True
    kernels: str = "auto"
    families: tuple[str, ...] = DEFAULT_FAMILIES
    # A k site absorbs the KV-cache write that consumes it (HF StaticCache): one launch stores k and v.
    kv_cache: bool = True
    # Re-raise errors met while matching or replacing a site instead of leaving it unfused (tests
    # set QKFUSE_STRICT=1; users never need it: one odd site must not break their compile).
    strict: bool = False

    def __post_init__(self):
        if self.kernels not in KERNEL_CHOICES:
            raise ValueError(f"qkfuse.kernels must be one of {KERNEL_CHOICES}, got {self.kernels!r}")
        fams = (self.families,) if isinstance(self.families, str) else tuple(self.families)
        fams = tuple(f.strip() for name in fams for f in name.split(",") if f.strip())
        unknown = [f for f in fams if f not in FAMILIES]
        if unknown:
            raise ValueError(f"qkfuse.families: unknown {unknown}; known: {FAMILIES}")
        object.__setattr__(self, "families", fams)
        object.__setattr__(self, "enable", bool(self.enable))
        object.__setattr__(self, "strict", bool(self.strict))
        object.__setattr__(self, "kv_cache", bool(self.kv_cache))

    @property
    def active(self) -> bool:
        """Enabled, and not switched off by the QKFUSE_DISABLE=1 environment variable."""
        return self.enable and os.environ.get("QKFUSE_DISABLE", "0") in ("", "0")

    @property
    def strict_errors(self) -> bool:
        """strict=True, or the QKFUSE_STRICT=1 environment variable."""
        return self.strict or os.environ.get("QKFUSE_STRICT", "0") not in ("", "0")

    def cache_key(self) -> str:
        return (f"enable={self.active};kernels={self.kernels};families={','.join(self.families)};"
                f"kv_cache={self.kv_cache}")

    @classmethod
    def from_kwargs(cls, **kwargs) -> "Options":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ValueError(f"unknown qkfuse option(s) {unknown}; known: {sorted(names)}")
        return cls(**kwargs)


def split_options(options: dict | None) -> tuple[Options, dict]:
    """(our Options, the remaining Inductor options) from a torch.compile options dict."""
    ours, rest = {}, {}
    for key, value in (options or {}).items():
        if key.startswith(PREFIX):
            ours[key[len(PREFIX):]] = value
        else:
            rest[key] = value
    try:
        return Options.from_kwargs(**ours), rest
    except ValueError as e:
        raise ValueError(f"torch.compile(backend='qkfuse', options=...): {e}") from None
