"""The ``qkfuse::norm_rope`` and ``qkfuse::qk_norm_rope`` custom ops.

Functional (no mutation). Outputs are laid out by ``recipe.new_output(input)`` (dense, in the
input's stride order), which is what every kernel returns and what the fake impls declare. The trailing arguments
are the numerics recipe (qkfuse/ops/recipe.py), so every pattern family uses these ops; their schema
part is generated from the Recipe's fields (``recipe_schema``).

Kernels: the plain-torch reference for CPU (and any device), the Triton kernel for CUDA. Inside
compiled graphs on CUDA the pass does not call these ops: it splices the Triton launch itself,
so Inductor launches the kernel directly (see qkfuse/passes/splice.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..kernels.reference import cos_sin_from_cache, norm_rope_reference
from .recipe import Recipe, check_eps_tensor, check_inputs, check_tensor, new_output, recipe_schema, split_op_args


def _eps(value: float, tensor: Tensor | None):
    return value if tensor is None else tensor


def _schema(head: str, out: str, tail: str) -> str:
    """head, the recipe's fields, then `tail`: optional tensors (the norms' biases) that default to
    None, after the recipe so that positional calls written before them keep working."""
    return f"({head}, {recipe_schema()}, {tail}) -> {out}"


def _biases(extra: tuple, n: int) -> tuple:
    """The n bias arguments after the recipe's fields (None where left out)."""
    return tuple(extra) + (None,) * (n - len(extra))


@torch.library.custom_op("qkfuse::norm_rope", mutates_args=(), schema=_schema(
    "Tensor x, Tensor? weight, Tensor? cos, Tensor? sin, float eps, Tensor? eps_tensor", "Tensor",
    "Tensor? bias=None"))
def norm_rope(x: Tensor, weight: Tensor | None, cos: Tensor | None, sin: Tensor | None, eps: float,
              eps_tensor: Tensor | None, *recipe_args) -> Tensor:
    """RMSNorm or LayerNorm (optional) then RoPE (optional) of one tensor [..., head_dim];
    ``recipe_args`` are the Recipe's fields in order (qkfuse/ops/recipe.py), then the norm's bias."""
    recipe, extra = split_op_args(recipe_args)
    (bias,) = _biases(extra, 1)
    check_single(x, weight, cos, sin, eps_tensor, recipe, bias)
    return norm_rope_reference(x, weight, cos, sin, _eps(eps, eps_tensor), recipe, bias=bias)


@torch.library.custom_op("qkfuse::qk_norm_rope", mutates_args=(), schema=_schema(
    "Tensor q, Tensor k, Tensor? q_weight, Tensor? k_weight, Tensor? cos, Tensor? sin, float q_eps, "
    "float k_eps, Tensor? q_eps_tensor, Tensor? k_eps_tensor", "(Tensor, Tensor)",
    "Tensor? q_bias=None, Tensor? k_bias=None"))
def qk_norm_rope(q: Tensor, k: Tensor, q_weight: Tensor | None, k_weight: Tensor | None, cos: Tensor | None,
                 sin: Tensor | None, q_eps: float, k_eps: float, q_eps_tensor: Tensor | None,
                 k_eps_tensor: Tensor | None, *recipe_args) -> tuple[Tensor, Tensor]:
    """The same for q and k with one shared cos/sin: one kernel launch on CUDA."""
    recipe, extra = split_op_args(recipe_args)
    q_bias, k_bias = _biases(extra, 2)
    check_qk(q, k, q_weight, k_weight, cos, sin, recipe, q_eps_tensor, k_eps_tensor, q_bias=q_bias, k_bias=k_bias)
    return (
        norm_rope_reference(q, q_weight, cos, sin, _eps(q_eps, q_eps_tensor), recipe, bias=q_bias),
        norm_rope_reference(k, k_weight, cos, sin, _eps(k_eps, k_eps_tensor), recipe, bias=k_bias),
    )


@torch.library.custom_op("qkfuse::qk_norm_rope_cached", mutates_args=(), schema=_schema(
    "Tensor q, Tensor k, Tensor? q_weight, Tensor? k_weight, Tensor cos_sin_cache, Tensor positions, "
    "float q_eps, float k_eps", "(Tensor, Tensor)", "Tensor? q_bias=None, Tensor? k_bias=None"))
def qk_norm_rope_cached(q: Tensor, k: Tensor, q_weight: Tensor | None, k_weight: Tensor | None,
                        cos_sin_cache: Tensor, positions: Tensor, q_eps: float, k_eps: float,
                        *recipe_args) -> tuple[Tensor, Tensor]:
    """qk_norm_rope with vLLM-style RoPE inputs: ``cos_sin_cache`` [max_position, rotary_dim] (cos of
    the rotary_dim/2 frequencies, then their sin) and integer ``positions`` broadcastable to
    q.shape[:-1] with size 1 along the heads (e.g. [T, 1] for q [T, H, D]), each in
    [0, max_position) (checked: a ValueError otherwise)."""
    recipe, extra = split_op_args(recipe_args)
    q_bias, k_bias = _biases(extra, 2)
    check_cached(q, k, q_weight, k_weight, cos_sin_cache, positions, recipe, q_bias, k_bias)
    check_positions_in_range(positions, cos_sin_cache.shape[0])
    cos, sin = cos_sin_from_cache(cos_sin_cache, positions, recipe.interleaved)
    return (norm_rope_reference(q, q_weight, cos, sin, q_eps, recipe, bias=q_bias),
            norm_rope_reference(k, k_weight, cos, sin, k_eps, recipe, bias=k_bias))


# ---- validation, shared by the default (CPU), fake and CUDA impls and qkfuse.functional ----------
# Metadata only, except check_positions_in_range (real impls only: fake impls see no data).


def check_single(x, weight, cos, sin, eps_tensor, recipe: Recipe, bias=None) -> None:
    check_inputs(x, weight, cos, sin, recipe, bias=bias)
    check_eps_tensor(eps_tensor, "eps_tensor")


def check_qk(q, k, q_weight, k_weight, cos, sin, recipe: Recipe, q_eps_tensor=None, k_eps_tensor=None,
             rope_shape=None, q_bias=None, k_bias=None) -> None:
    check_inputs(q, q_weight, cos, sin, recipe, "q", rope_shape, q_bias)
    check_inputs(k, k_weight, cos, sin, recipe, "k", rope_shape, k_bias)
    # One launch serves both with q's head_dim, dtype and axes (the Triton kernel assumes it).
    if k.dtype != q.dtype:
        raise TypeError(f"qkfuse: q and k must have the same dtype, got q {q.dtype} and k {k.dtype}")
    if k.device != q.device:
        raise ValueError(f"qkfuse: k is on {k.device} but q is on {q.device}")
    if k.dim() != q.dim() or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"qkfuse: k {tuple(k.shape)} must have q's number of dims and head_dim "
                         f"(q {tuple(q.shape)})")
    check_eps_tensor(q_eps_tensor, "q_eps_tensor")
    check_eps_tensor(k_eps_tensor, "k_eps_tensor")


def check_cached(q, k, q_weight, k_weight, cache: Tensor, positions: Tensor, recipe: Recipe, q_bias=None,
                 k_bias=None) -> None:
    """The cached op's inputs; cache and positions stand in for cos/sin of shape
    positions.shape + [rotary_dim]."""
    rd = recipe.rotary_dim
    check_tensor(q, "q", None)
    check_tensor(cache, "cos_sin_cache", q.device)
    if cache.dim() != 2 or cache.shape[-1] != rd or rd <= 0 or rd % 2:
        raise ValueError(f"qkfuse: cos_sin_cache must be [max_position, rotary_dim={rd}] with an even "
                         f"rotary_dim > 0, got {tuple(cache.shape)}")
    check_tensor(positions, "positions", q.device, (torch.int32, torch.int64))
    check_qk(q, k, q_weight, k_weight, None, None, recipe, rope_shape=(*positions.shape, rd), q_bias=q_bias,
             k_bias=k_bias)


def check_positions_in_range(positions: Tensor, rows: int) -> None:
    """Every position indexes a row of the cache: a ValueError otherwise (a data-dependent check:
    one reduction and one sync). While tracing (torch.compile) or capturing a CUDA graph, where a
    sync is impossible, an asynchronous assert (a RuntimeError on CPU, a device-side assert on
    CUDA) stops the computation instead: no out-of-bounds or wrapped-around read either way."""
    if torch.compiler.is_compiling() or (positions.is_cuda and torch.cuda.is_current_stream_capturing()):
        torch._assert_async(((positions >= 0) & (positions < rows)).all(),
                            "qkfuse: positions out of range of cos_sin_cache")
        return
    if positions.numel() == 0:
        return
    lo, hi = torch.stack(torch.aminmax(positions)).tolist()
    if lo < 0 or hi >= rows:
        raise ValueError(f"qkfuse: positions must be in [0, {rows}) (the rows of cos_sin_cache), "
                         f"got values in [{lo}, {hi}]")


@qk_norm_rope_cached.register_fake
def _qk_norm_rope_cached_fake(q, k, q_weight, k_weight, cos_sin_cache, positions, q_eps, k_eps, *recipe_args):
    recipe, extra = split_op_args(recipe_args)
    check_cached(q, k, q_weight, k_weight, cos_sin_cache, positions, recipe, *_biases(extra, 2))
    return new_output(q, recipe.out_dtype), new_output(k, recipe.out_dtype)


@norm_rope.register_fake
def _norm_rope_fake(x, weight, cos, sin, eps, eps_tensor, *recipe_args):
    recipe, extra = split_op_args(recipe_args)
    check_single(x, weight, cos, sin, eps_tensor, recipe, *_biases(extra, 1))
    return new_output(x, recipe.out_dtype)


@qk_norm_rope.register_fake
def _qk_norm_rope_fake(q, k, q_weight, k_weight, cos, sin, q_eps, k_eps, q_eps_tensor, k_eps_tensor, *recipe_args):
    recipe, extra = split_op_args(recipe_args)
    q_bias, k_bias = _biases(extra, 2)
    check_qk(q, k, q_weight, k_weight, cos, sin, recipe, q_eps_tensor, k_eps_tensor, q_bias=q_bias, k_bias=k_bias)
    return new_output(q, recipe.out_dtype), new_output(k, recipe.out_dtype)


def _eps_value(value: float, tensor: Tensor | None) -> float:
    return value if tensor is None else float(tensor.item())


def kernel_computes(q, k, q_weight, k_weight, cos, sin, recipe: Recipe, positions=None, kernels=None,
                    q_bias=None, k_bias=None) -> bool:
    """Whether the Triton kernel computes these (validated) inputs exactly; else the reference does."""
    if kernels is None:
        from ..kernels import triton_norm_rope as kernels

    return not _rounds_tables(cos, sin, recipe) and kernels.supports(q, k, cos, recipe, sin, q_weight, k_weight,
                                                                     positions, q_bias, k_bias) is None


def run_kernel(q, k, q_weight, k_weight, cos, sin, q_eps: float, k_eps: float, recipe: Recipe, positions=None,
               kernels=None, q_bias=None, k_bias=None, use_kernel=None):
    """Validated inputs → the Triton kernel where it computes them exactly (tk.supports), else the
    reference. With positions, cos is the cos/sin cache (range-checked by the caller) and sin unused.
    ``kernels``: the Triton kernel module (tests pass a copy run by Triton's interpreter).
    ``use_kernel``: kernel_computes' answer for these inputs, when the caller has it."""
    if kernels is None:
        from ..kernels import triton_norm_rope as kernels

    if use_kernel is None:
        use_kernel = kernel_computes(q, k, q_weight, k_weight, cos, sin, recipe, positions, kernels, q_bias, k_bias)
    if use_kernel:
        return kernels.launch(q, k, q_weight, k_weight, cos, sin, q_eps, k_eps, recipe, positions=positions,
                              q_bias=q_bias, k_bias=k_bias)
    if positions is not None:
        cos, sin = cos_sin_from_cache(cos, positions, recipe.interleaved)
    return (
        norm_rope_reference(q, q_weight, cos, sin, q_eps, recipe, bias=q_bias),
        None if k is None else norm_rope_reference(k, k_weight, cos, sin, k_eps, recipe, bias=k_bias),
    )


def _rounds_tables(cos, sin, recipe: Recipe) -> bool:
    """cos/sin (or the cache) are wider than rope_dtype: the recipe rounds them to it before the
    products (``cos.to(rope_dtype)``), which the Triton kernel does not do (it multiplies the
    loaded values). The pass never asks for it (its rope_dtype is the promotion of cos's dtype);
    an explicit rope_dtype of the functional API can."""
    return bool(recipe.rotary_dim) and any(
        torch.promote_types(t.dtype, recipe.rope_dtype) != recipe.rope_dtype for t in (cos, sin) if t is not None)


def _register_cuda_kernels() -> None:
    try:
        import triton  # noqa: F401
    except ImportError:  # the reference (default impl) serves CUDA too
        return

    @norm_rope.register_kernel("cuda")
    def _norm_rope_cuda(x, weight, cos, sin, eps, eps_tensor, *recipe_args):
        recipe, extra = split_op_args(recipe_args)
        (bias,) = _biases(extra, 1)
        check_single(x, weight, cos, sin, eps_tensor, recipe, bias)
        e = _eps_value(eps, eps_tensor)
        return run_kernel(x, None, weight, None, cos, sin, e, e, recipe, q_bias=bias)[0]

    @qk_norm_rope.register_kernel("cuda")
    def _qk_norm_rope_cuda(q, k, q_weight, k_weight, cos, sin, q_eps, k_eps, q_eps_tensor, k_eps_tensor,
                           *recipe_args):
        recipe, extra = split_op_args(recipe_args)
        q_bias, k_bias = _biases(extra, 2)
        check_qk(q, k, q_weight, k_weight, cos, sin, recipe, q_eps_tensor, k_eps_tensor, q_bias=q_bias,
                 k_bias=k_bias)
        return run_kernel(q, k, q_weight, k_weight, cos, sin, _eps_value(q_eps, q_eps_tensor),
                          _eps_value(k_eps, k_eps_tensor), recipe, q_bias=q_bias, k_bias=k_bias)

    @qk_norm_rope_cached.register_kernel("cuda")
    def _qk_norm_rope_cached_cuda(q, k, q_weight, k_weight, cos_sin_cache, positions, q_eps, k_eps, *recipe_args):
        recipe, extra = split_op_args(recipe_args)
        q_bias, k_bias = _biases(extra, 2)
        check_cached(q, k, q_weight, k_weight, cos_sin_cache, positions, recipe, q_bias, k_bias)
        check_positions_in_range(positions, cos_sin_cache.shape[0])
        return run_kernel(q, k, q_weight, k_weight, cos_sin_cache, None, q_eps, k_eps, recipe, positions,
                          q_bias=q_bias, k_bias=k_bias)


_register_cuda_kernels()
