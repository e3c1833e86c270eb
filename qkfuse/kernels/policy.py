"""Which kernel serves a fused site: ``qkfuse.kernels = "auto" | "triton" | "flashinfer" | "reference"``.

- ``reference``: the plain-torch ``qkfuse::`` custom op (any device; on CUDA it is an opaque call,
  useful for debugging numerics, slower than no fusion).
- ``triton``: the Triton kernel, launched directly by Inductor's generated code.
- ``flashinfer``: flashinfer's norm and RoPE kernels, wrapped as ``qkfuse::fi_*`` custom ops.
- ``auto``: CPU → reference; CUDA → Triton, or flashinfer where the committed measurements
  (kernels/policy.json, written by benchmarks/bench_qk_norm_rope.py) say it is faster.
"""

from __future__ import annotations

import functools
import json
import os

import torch

from ..ops.recipe import Recipe
from . import KernelUnavailable

KERNEL_CHOICES = ("auto", "triton", "flashinfer", "reference")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401

        from . import triton_norm_rope  # noqa: F401
    except Exception:
        return False
    return True


@functools.lru_cache(maxsize=None)
def _measured() -> dict:
    path = os.path.join(os.path.dirname(__file__), "policy.json")
    try:
        with open(path) as f:
            return json.load(f).get("flashinfer_faster", {})
    except (OSError, ValueError):
        return {}


def choose(preference: str, q: torch.Tensor, k: torch.Tensor | None, cos: torch.Tensor | None,
           recipe: Recipe, tensor_eps: bool = False, sin: torch.Tensor | None = None,
           q_weight: torch.Tensor | None = None, k_weight: torch.Tensor | None = None) -> tuple[str | None, str]:
    """(kernel or None, note). None means: leave the site unfused, note says why."""
    if preference not in KERNEL_CHOICES:
        raise ValueError(f"qkfuse.kernels must be one of {KERNEL_CHOICES}, got {preference!r}")
    device = q.device.type
    if preference == "reference" or device != "cuda":
        return "reference", "reference op" if device == "cuda" else f"reference op ({device})"
    if preference == "flashinfer":
        from . import flashinfer as fi

        fi.require()
        reason = "eps is a tensor (flashinfer takes a float)" if tensor_eps else fi.unsupported(q, k, cos, recipe)
        if reason is not None:
            return None, f"flashinfer: {reason}"
        return "flashinfer", "flashinfer"
    if not triton_available():
        if preference == "triton":
            raise KernelUnavailable("qkfuse.kernels='triton' but triton is not installed (pip install triton)")
        return None, "triton is not installed; site left to Inductor"
    from . import triton_norm_rope as tk

    reason = tk.supports(q, k, cos, recipe, sin, q_weight, k_weight)
    if reason is not None:
        return None, f"triton kernel: {reason}"
    if preference == "auto" and not tensor_eps and _flashinfer_measured_faster(q, k, recipe):
        from . import flashinfer as fi

        if fi.unsupported(q, k, cos, recipe) is None:
            return "flashinfer", "flashinfer (measured faster for this shape)"
    return "triton", "triton"


def _flashinfer_measured_faster(q, k, recipe) -> bool:
    table = _measured()
    if not table:
        return False
    from .triton_norm_rope import _bucket_tokens, _hint

    tokens = 1
    for s in q.shape[:-2]:
        tokens *= _hint(s)
    key = f"d{q.shape[-1]}_t{_bucket_tokens(tokens)}"
    return bool(table.get(key, False))
