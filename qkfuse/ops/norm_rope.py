"""The ``qkfuse::norm_rope`` and ``qkfuse::qk_norm_rope`` custom ops.

Functional (no mutation). Outputs are laid out by ``recipe.new_output(input)`` (dense, in the
input's stride order), which is what every kernel returns and what the fake impls declare. The trailing arguments
are the numerics recipe (qkfuse/ops/recipe.py), so every pattern family uses these two ops.

Kernels: the plain-torch reference for CPU (and any device), the Triton kernel for CUDA. Inside
compiled graphs on CUDA the pass does not call these ops: it splices the Triton launch itself,
so Inductor launches the kernel directly (see qkfuse/passes/splice.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..kernels.reference import cos_sin_from_cache, norm_rope_reference
from .recipe import Recipe, check_inputs, new_output



def _eps(value: float, tensor: Tensor | None):
    return value if tensor is None else tensor


@torch.library.custom_op("qkfuse::norm_rope", mutates_args=())
def norm_rope(
    x: Tensor,
    weight: Tensor | None,
    cos: Tensor | None,
    sin: Tensor | None,
    eps: float,
    eps_tensor: Tensor | None,
    norm: str,
    weight_offset: float,
    cast_before_weight: bool,
    norm_dtype: torch.dtype,
    rope_dtype: torch.dtype,
    out_dtype: torch.dtype,
    rotary_dim: int,
    interleaved: bool,
) -> Tensor:
    """RMSNorm (optional) then RoPE (optional) of one tensor [..., head_dim]."""
    recipe = Recipe(norm, weight_offset, cast_before_weight, norm_dtype, rope_dtype, out_dtype, rotary_dim, interleaved)
    check_inputs(x, weight, cos, sin, recipe)
    return norm_rope_reference(x, weight, cos, sin, _eps(eps, eps_tensor), recipe)


@torch.library.custom_op("qkfuse::qk_norm_rope", mutates_args=())
def qk_norm_rope(
    q: Tensor,
    k: Tensor,
    q_weight: Tensor | None,
    k_weight: Tensor | None,
    cos: Tensor | None,
    sin: Tensor | None,
    q_eps: float,
    k_eps: float,
    q_eps_tensor: Tensor | None,
    k_eps_tensor: Tensor | None,
    norm: str,
    weight_offset: float,
    cast_before_weight: bool,
    norm_dtype: torch.dtype,
    rope_dtype: torch.dtype,
    out_dtype: torch.dtype,
    rotary_dim: int,
    interleaved: bool,
) -> tuple[Tensor, Tensor]:
    """The same for q and k with one shared cos/sin: one kernel launch on CUDA."""
    recipe = Recipe(norm, weight_offset, cast_before_weight, norm_dtype, rope_dtype, out_dtype, rotary_dim, interleaved)
    _check_qk(q, k, q_weight, k_weight, cos, sin, recipe)
    return (
        norm_rope_reference(q, q_weight, cos, sin, _eps(q_eps, q_eps_tensor), recipe),
        norm_rope_reference(k, k_weight, cos, sin, _eps(k_eps, k_eps_tensor), recipe),
    )


@torch.library.custom_op("qkfuse::qk_norm_rope_cached", mutates_args=())
def qk_norm_rope_cached(
    q: Tensor,
    k: Tensor,
    q_weight: Tensor | None,
    k_weight: Tensor | None,
    cos_sin_cache: Tensor,
    positions: Tensor,
    q_eps: float,
    k_eps: float,
    norm: str,
    weight_offset: float,
    cast_before_weight: bool,
    norm_dtype: torch.dtype,
    rope_dtype: torch.dtype,
    out_dtype: torch.dtype,
    rotary_dim: int,
    interleaved: bool,
) -> tuple[Tensor, Tensor]:
    """qk_norm_rope with vLLM-style RoPE inputs: ``cos_sin_cache`` [max_position, rotary_dim] (cos of
    the rotary_dim/2 frequencies, then their sin) and integer ``positions`` broadcastable to
    q.shape[:-1] with size 1 along the heads (e.g. [T, 1] for q [T, H, D])."""
    recipe = Recipe(norm, weight_offset, cast_before_weight, norm_dtype, rope_dtype, out_dtype, rotary_dim, interleaved)
    cos, sin = _cached_cos_sin(cos_sin_cache, positions, recipe)
    _check_qk(q, k, q_weight, k_weight, cos, sin, recipe)
    return (norm_rope_reference(q, q_weight, cos, sin, q_eps, recipe),
            norm_rope_reference(k, k_weight, cos, sin, k_eps, recipe))


def _check_qk(q, k, q_weight, k_weight, cos, sin, recipe: Recipe) -> None:
    check_inputs(q, q_weight, cos, sin, recipe, "q")
    check_inputs(k, k_weight, cos, sin, recipe, "k")


def _check_cache(cache: Tensor, positions: Tensor, recipe: Recipe) -> None:
    if cache.dim() != 2 or cache.shape[-1] != recipe.rotary_dim or recipe.rotary_dim % 2:
        raise ValueError(f"qkfuse: cos_sin_cache must be [max_position, rotary_dim={recipe.rotary_dim}], "
                         f"got {tuple(cache.shape)}")
    if positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"qkfuse: positions must be int32/int64, got {positions.dtype}")


def _cached_cos_sin(cache: Tensor, positions: Tensor, recipe: Recipe):
    _check_cache(cache, positions, recipe)
    return cos_sin_from_cache(cache, positions, recipe.interleaved)


@qk_norm_rope_cached.register_fake
def _qk_norm_rope_cached_fake(q, k, q_weight, k_weight, cos_sin_cache, positions, q_eps, k_eps, *recipe_args):
    recipe = Recipe(*recipe_args)
    _check_cache(cos_sin_cache, positions, recipe)
    return new_output(q, recipe.out_dtype), new_output(k, recipe.out_dtype)


@norm_rope.register_fake
def _norm_rope_fake(x, weight, cos, sin, eps, eps_tensor, norm, weight_offset, cast_before_weight,
                    norm_dtype, rope_dtype, out_dtype, rotary_dim, interleaved):
    check_inputs(x, weight, cos, sin, Recipe(norm, weight_offset, cast_before_weight, norm_dtype, rope_dtype,
                                             out_dtype, rotary_dim, interleaved))
    return new_output(x, out_dtype)


@qk_norm_rope.register_fake
def _qk_norm_rope_fake(q, k, q_weight, k_weight, cos, sin, q_eps, k_eps, q_eps_tensor, k_eps_tensor,
                       norm, weight_offset, cast_before_weight, norm_dtype, rope_dtype, out_dtype,
                       rotary_dim, interleaved):
    recipe = Recipe(norm, weight_offset, cast_before_weight, norm_dtype, rope_dtype, out_dtype, rotary_dim, interleaved)
    _check_qk(q, k, q_weight, k_weight, cos, sin, recipe)
    return new_output(q, out_dtype), new_output(k, out_dtype)


def _eps_value(value: float, tensor: Tensor | None) -> float:
    return value if tensor is None else float(tensor.item())


def _cuda_or_reference(q, k, q_weight, k_weight, cos, sin, q_eps, k_eps, recipe: Recipe, positions=None):
    from ..kernels import triton_norm_rope as tk

    if tk.supports(q, k, cos, recipe, sin, q_weight, k_weight, positions) is None:
        return tk.launch(q, k, q_weight, k_weight, cos, sin, q_eps, k_eps, recipe, positions=positions)
    if positions is not None:
        cos, sin = _cached_cos_sin(cos, positions, recipe)
    return (
        norm_rope_reference(q, q_weight, cos, sin, q_eps, recipe),
        None if k is None else norm_rope_reference(k, k_weight, cos, sin, k_eps, recipe),
    )


def _register_cuda_kernels() -> None:
    try:
        import triton  # noqa: F401
    except ImportError:  # the reference (default impl) serves CUDA too
        return

    @norm_rope.register_kernel("cuda")
    def _norm_rope_cuda(x, weight, cos, sin, eps, eps_tensor, *recipe_args):
        recipe = Recipe(*recipe_args)
        check_inputs(x, weight, cos, sin, recipe)
        e = _eps_value(eps, eps_tensor)
        return _cuda_or_reference(x, None, weight, None, cos, sin, e, e, recipe)[0]

    @qk_norm_rope.register_kernel("cuda")
    def _qk_norm_rope_cuda(q, k, q_weight, k_weight, cos, sin, q_eps, k_eps, q_eps_tensor, k_eps_tensor,
                           *recipe_args):
        recipe = Recipe(*recipe_args)
        _check_qk(q, k, q_weight, k_weight, cos, sin, recipe)
        return _cuda_or_reference(q, k, q_weight, k_weight, cos, sin, _eps_value(q_eps, q_eps_tensor),
                                  _eps_value(k_eps, k_eps_tensor), recipe)


    @qk_norm_rope_cached.register_kernel("cuda")
    def _qk_norm_rope_cached_cuda(q, k, q_weight, k_weight, cos_sin_cache, positions, q_eps, k_eps, *recipe_args):
        recipe = Recipe(*recipe_args)
        _check_cache(cos_sin_cache, positions, recipe)
        table = cos_sin_cache[:1].expand(*positions.shape, recipe.rotary_dim)  # shapes only, no gather
        _check_qk(q, k, q_weight, k_weight, table, table, recipe)
        return _cuda_or_reference(q, k, q_weight, k_weight, cos_sin_cache, None, q_eps, k_eps, recipe, positions)


_register_cuda_kernels()
