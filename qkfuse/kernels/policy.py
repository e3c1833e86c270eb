"""Which kernel serves a fused site: ``qkfuse.kernels = "auto" | "triton" | "flashinfer" | "reference" | "inline"``.

- ``inline``: the reference recipe spliced as plain torch ops, compiled by Inductor with the rest of
  the graph (what ``auto`` picks on CPU: an opaque call there costs more than it saves).
- ``reference``: the plain-torch ``qkfuse::`` custom op (any device; an opaque call, useful for
  debugging numerics, slower than no fusion).
- ``triton``: the Triton kernel, launched directly by Inductor's generated code.
- ``flashinfer``: flashinfer's norm and RoPE kernels, wrapped as ``qkfuse::fi_*`` custom ops.
- ``auto``: CPU → inline; CUDA → Triton, or flashinfer where the committed measurements
  (kernels/policy.json, written by benchmarks/bench_qk_norm_rope.py) say it is faster. A norm
  across heads (OLMo2) is fused too: its grid beat Inductor at every measured shape on the H200
  (1.05x-1.36x device time, benchmarks/results/2026-12-02-h200-across.md); so is a LayerNorm q/k
  norm (Persimmon, Phi: 2.0x-3.1x device time at 64 to 32k tokens,
  benchmarks/results/2026-12-02-h200-layer.md); so is half_table RoPE (Wan's pair rotation,
  QwenImage's complex multiply: 1.96x-2.88x device time at Wan2.1's shapes, 4k and 32k tokens,
  benchmarks/results/2026-12-02-h200-wan.md); so is de-interleaved RoPE (DeepSeek's
  apply_rotary_pos_emb_interleave, Recipe.deinterleave_input: 1.14x-2.87x device time from 64 to 8k
  tokens, benchmarks/results/2026-12-02-h200-deinterleave.md); so are norms concatenated before the
  RoPE (norm_cat_rope, Flux's double-stream blocks: 2.6x-3.1x on the q/k block, 1.04x-1.32x on the
  attention block, benchmarks/results/2026-12-02-h200-concat.md); so is RoPE on a slice of a norm
  output's rows (norm_slice_rope: HunyuanVideo, CogView4: 1.58x-3.79x on the q/k block, 1.01x-1.17x
  on the attention block, benchmarks/results/2026-12-03-h200-slice.md). Left to Inductor under
  ``auto`` on CUDA (``triton`` fuses it): RoPE then norm (Recipe.rope_first, the rope_norm family)
  with a full-width cos/sin table, which lost to Inductor for HunYuan's neox RoPE + RMSNorm
  (0.78x-0.84x on the q/k block, benchmarks/results/2026-12-03-h200-rope_norm.md). No tile recovers
  it: over ten tiles the kernel alone took 27.7-40.5 us at 4096 tokens (Inductor's block 25.4 us, the
  norm-first kernel on the same bytes 23.6 us) and 107-150 us at 16384 (87.8 and 88.2 us),
  benchmarks/results/2026-12-03-h200-tune-rope-first-{4k,16k}.json. With a half
  table (Llama4's complex RoPE, which Inductor runs as eager complex ops) it is fused: 3.1x-3.4x on
  the q/k block, 1.05x-1.64x with SDPA after it (benchmarks/results/2026-12-03-h200-rope_norm-llama4.md).
"""

from __future__ import annotations

import functools
import json
import os

import torch

from ..ops.recipe import Recipe
from . import KernelUnavailable

KERNEL_CHOICES = ("auto", "triton", "flashinfer", "reference", "inline")

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
           q_weight: torch.Tensor | None = None, k_weight: torch.Tensor | None = None,
           q_bias: torch.Tensor | None = None, k_bias: torch.Tensor | None = None) -> tuple[str | None, str]:
    """(kernel or None, note). None means: leave the site unfused, note says why."""
    if preference not in KERNEL_CHOICES:
        raise ValueError(f"qkfuse.kernels must be one of {KERNEL_CHOICES}, got {preference!r}")
    device = q.device.type
    if preference == "reference":
        return "reference", "reference op" if device == "cuda" else f"reference op ({device})"
    if preference == "inline" or device != "cuda":
        return "inline", "inline torch ops" if device == "cuda" else f"inline torch ops ({device})"
    if preference == "flashinfer":
        from . import flashinfer as fi

        fi.require()
        reason = "eps is a tensor (flashinfer takes a float)" if tensor_eps else fi.unsupported(q, k, cos, recipe)
        if reason is None and (q_bias is not None or k_bias is not None):
            reason = "flashinfer's RMSNorm has no bias"
        if reason is not None:
            return None, f"flashinfer: {reason}"
        return "flashinfer", "flashinfer"
    if not triton_available():
        if preference == "triton":
            raise KernelUnavailable("qkfuse.kernels='triton' but triton is not installed (pip install triton)")
        return None, "triton is not installed; site left to Inductor"
    from . import triton_norm_rope as tk

    reason = tk.supports(q, k, cos, recipe, sin, q_weight, k_weight, None, q_bias, k_bias)
    if reason is not None:
        return None, f"triton kernel: {reason}"
    if preference == "auto" and recipe.rope_first and not recipe.half_table:
        # (Llama4's complex RoPE, a half table, is Inductor's eager fallback for complex ops: 3.1x-3.4x)
        return None, ("RoPE then norm (rope_norm) with a full-width cos/sin table: the kernel measured slower than "
                      "Inductor (HunYuan 0.78x-0.84x, benchmarks/results/2026-12-03-h200-rope_norm.md; no tile "
                      "recovers it, 2026-12-03-h200-tune-rope-first-4k.json); left to Inductor (kernels='triton' "
                      "fuses it)")
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


def likely_kernel(preference: str, q: torch.Tensor) -> str:
    """The kernel `choose` picks for q's device when the kernel supports the site."""
    if preference in ("reference", "inline", "flashinfer"):
        return preference
    return "triton" if q.device.type == "cuda" and triton_available() else "inline"


def cache_unsupported(kernel: str, rotated: torch.Tensor, cache: torch.Tensor, index: torch.Tensor, dim: int,
                      v: tuple[torch.Tensor, torch.Tensor] | None) -> str | None:
    """Why `kernel` cannot write `rotated` into `cache` at `index` along `dim` (and v into its cache),
    or None. Kernels that replay the graph's write can do any write the graph does."""
    if kernel != "triton":
        return None
    from . import triton_norm_rope as tk

    return tk.cache_unsupported(rotated, cache, index, dim, v)
