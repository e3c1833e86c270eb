"""The numerics recipe of one fused norm→RoPE call.

Every kernel (reference, Triton, flashinfer) computes the same function, described here.
The recipe records *where the matched graph rounds*, so a fused call reproduces the unfused
graph's numerics instead of "something close":

    x            input, dtype X (any strides, last dim contiguous for the GPU kernels)
    n  = float(x) * rsqrt(mean(float(x)^2, -1) + eps)            # float32
    if weight:   w' = float(w) + weight_offset                   # float32 ((1+w) for Gemma)
                 n  = round(n, X) if cast_before_weight           # Llama/Qwen3: cast, then multiply
                 y  = round(n * w', norm_dtype)
    else:        y  = round(n, norm_dtype)
    (norm == "none": y = x)
    RoPE on y[..., :rotary_dim], every product and the sum rounded to rope_dtype:
                 o  = round(round(y*cos) + round(rot(y)*sin), rope_dtype) -> out_dtype
                 rot = half-split rotate_half (neox) or pairwise (interleaved)
    y[..., rotary_dim:] passes through.

A rounding "to float32" is a no-op: the kernels keep float32 intermediates and round only at the
steps the graph rounds at.
"""

from __future__ import annotations

import dataclasses

import torch

NORM_KINDS = ("rms", "none")
# Dtypes the GPU kernels can round to; codes are what the Triton kernels take as constexprs.
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@dataclasses.dataclass(frozen=True)
class Recipe:
    norm: str = "rms"
    weight_offset: float = 0.0
    cast_before_weight: bool = False
    norm_dtype: torch.dtype = torch.float32
    rope_dtype: torch.dtype = torch.float32
    out_dtype: torch.dtype = torch.float32
    rotary_dim: int = 0  # 0: no RoPE
    interleaved: bool = False

    def op_args(self) -> tuple:
        """The trailing positional arguments of the ``qkfuse::*norm_rope`` ops."""
        return (
            self.norm,
            float(self.weight_offset),
            bool(self.cast_before_weight),
            self.norm_dtype,
            self.rope_dtype,
            self.out_dtype,
            int(self.rotary_dim),
            bool(self.interleaved),
        )

    @classmethod
    def from_op_args(cls, *args) -> "Recipe":
        return cls(*args)

    def describe(self) -> str:
        parts = []
        if self.norm == "rms":
            kind = "rms(1+w)" if self.weight_offset else "rms"
            parts.append(kind + (" cast→w" if self.cast_before_weight else ""))
        if self.rotary_dim:
            parts.append(("interleaved" if self.interleaved else "neox") + f" rope[{self.rotary_dim}]")
        return " + ".join(parts) or "identity"


def check_inputs(x, weight, cos, sin, recipe: Recipe, name: str = "x") -> None:
    """Validate one tensor's inputs against a recipe; raises ValueError with a clear message."""
    if recipe.norm not in NORM_KINDS:
        raise ValueError(f"qkfuse: norm must be one of {NORM_KINDS}, got {recipe.norm!r}")
    if x.dim() < 2:
        raise ValueError(f"qkfuse: {name} must have at least 2 dims [..., head_dim], got {tuple(x.shape)}")
    head_dim = x.shape[-1]
    if weight is not None:
        if recipe.norm == "none":
            raise ValueError("qkfuse: a weight was given but norm='none'")
        if weight.dim() != 1 or weight.shape[0] != head_dim:
            raise ValueError(
                f"qkfuse: {name} weight must have shape [{head_dim}] (per-head norm), got {tuple(weight.shape)}"
            )
    rd = recipe.rotary_dim
    if rd < 0 or rd > head_dim or rd % 2:
        raise ValueError(f"qkfuse: rotary_dim must be even and in [0, {head_dim}], got {rd}")
    if rd:
        if cos is None or sin is None:
            raise ValueError("qkfuse: rotary_dim > 0 needs cos and sin")
        for t, tname in ((cos, "cos"), (sin, "sin")):
            if t.shape[-1] != rd:
                raise ValueError(f"qkfuse: {tname} last dim must equal rotary_dim={rd}, got {tuple(t.shape)}")
            try:
                torch.broadcast_shapes(t.shape[:-1], x.shape[:-1])
            except RuntimeError:
                raise ValueError(
                    f"qkfuse: {tname} of shape {tuple(t.shape)} does not broadcast to {name} {tuple(x.shape)}"
                ) from None
            if torch.broadcast_shapes(t.shape[:-1], x.shape[:-1]) != x.shape[:-1]:
                raise ValueError(f"qkfuse: {tname} {tuple(t.shape)} is larger than {name} {tuple(x.shape)}")
    elif recipe.norm == "none":
        raise ValueError("qkfuse: nothing to do (norm='none' and rotary_dim=0)")


def _hint(v) -> int:
    if isinstance(v, torch.SymInt):
        return v.node.hint if v.node.has_hint() else 8192
    return int(v)


def dense_strides(x: torch.Tensor) -> list:
    """Dense strides in x's stride order (outermost = largest stride; ties keep dim order).

    The output layout of every qkfuse kernel and fake impl. Unlike ``empty_like``, an explicit
    layout survives Inductor's lowering (its ``empty_like`` is always contiguous, and a user
    kernel writing a permuted output then forces a copy). Choices use size hints only, so no
    guards are added under dynamic shapes.
    """
    nd = x.dim()
    order = sorted(range(nd), key=lambda d: (-_hint(x.stride(d)), d))  # outermost first
    strides = [0] * nd
    acc = 1
    for d in reversed(order):
        strides[d] = acc
        acc = acc * x.shape[d]
    return strides


def new_output(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The uninitialised output of a fused call on x (see dense_strides)."""
    return torch.empty_strided(x.shape, dense_strides(x), dtype=dtype, device=x.device)
