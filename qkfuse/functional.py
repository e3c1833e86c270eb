"""The fused QK-norm + RoPE op for attention code written by hand (eager or compiled).

``qkfuse.qk_norm_rope`` and ``qkfuse.norm_rope`` are for model authors who write their own
attention (as sglang and vLLM do) rather than having the compile pass find the pattern. They
choose HF numerics for the input dtype, validate their arguments, and dispatch:

- eager CUDA, no autograd: the Triton kernel's launcher directly (no dispatcher, no custom-op
  Python layers: the host cost of one call is a few Python checks and one Triton launch);
- under ``torch.compile`` (or any tracing): the ``torch.ops.qkfuse.*`` custom op, so Dynamo
  records one call with a fake impl and the compiled graph runs the op;
- when autograd needs a gradient: the reference in plain torch ops (differentiable, unfused),
  because the fused op has no backward;
- elsewhere (CPU, other devices): the custom op, whose CPU kernel is the reference.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from .kernels.policy import triton_available
from .kernels.reference import cos_sin_from_cache, norm_rope_reference
from .ops.norm_rope import (check_cached, check_positions_in_range, check_qk, check_single, kernel_computes,
                             run_kernel)
from .ops.recipe import Recipe, check_tensor, tensor_key

__all__ = ["norm_rope", "qk_norm_rope"]


def qk_norm_rope(
    q: Tensor,
    k: Tensor,
    q_weight: Tensor | None,
    k_weight: Tensor | None,
    cos: Tensor | None = None,
    sin: Tensor | None = None,
    *,
    eps: float = 1e-6,
    k_eps: float | None = None,
    rotary_dim: int | None = None,
    interleaved: bool = False,
    half_table: bool = False,
    deinterleave_input: bool = False,
    norm: str = "rms",
    weight_offset: float = 0.0,
    cast_before_weight: bool | None = None,
    norm_dtype: torch.dtype | None = None,
    rope_dtype: torch.dtype | None = None,
    out_dtype: torch.dtype | None = None,
    cos_sin_cache: Tensor | None = None,
    positions: Tensor | None = None,
    across_heads: bool = False,
    q_bias: Tensor | None = None,
    k_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Per-head RMSNorm of ``q`` and ``k``, then rotary embedding (RoPE): one kernel launch on CUDA.

    Computes what HF Qwen3 / Llama attention computes between the q/k projections and attention,
    for ``x`` in ``(q, k)``, each with its own weight (and eps)::

        n   = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
        y   = weight * n.to(x.dtype)                      # Qwen3RMSNorm (cast_before_weight=True)
        out = y * cos + rotate_half(y) * sin              # on y[..., :rotary_dim]; the rest passes

    with the same rounding steps (see ``qkfuse/ops/recipe.py``): float32 statistics, rounded to
    the 16-bit dtype where the eager code rounds.

    Parameters
    ----------
    q : torch.Tensor
        Queries, ``[..., tokens, heads, head_dim]``: vLLM/sglang ``[T, H, D]``, HF
        ``q_proj(x).view(B, S, H, D)`` ``[B, S, H, D]``, or the transposed HF view
        ``[B, H, S, D]`` (then cos/sin must have q's rank, see ``cos``). Any strides whose last
        dim is contiguous use the kernel (strided slices of a fused qkv projection included);
        other strides are computed by the reference. dtype float32, float16 or bfloat16 (float64
        is computed by the reference).
    k : torch.Tensor
        Keys, same rank, dtype, device and ``head_dim`` as ``q``; may differ from ``q`` in one
        leading dim, the heads (GQA: ``[..., tokens, kv_heads, head_dim]``).
    q_weight, k_weight : torch.Tensor or None
        The RMSNorm weights, ``[head_dim]`` each (``[heads * head_dim]`` with ``across_heads``; any
        float dtype), or ``None`` for a norm without weight.
    cos, sin : torch.Tensor, optional
        RoPE tables, ``[..., tokens, rotary_dim]`` (one dim fewer than ``q``: a heads axis is
        inserted before the last dim, as HF's ``unsqueeze_dim=2``) or with ``q``'s rank and
        broadcastable to ``q.shape[:-1] + (rotary_dim,)`` (e.g. HF's ``cos.unsqueeze(1)`` for the
        ``[B, H, S, D]`` form). HF layout: the frequency table duplicated for the two halves
        (neox) or for each pair (``interleaved``); with ``half_table``, one entry per pair
        (``[..., tokens, rotary_dim // 2]``). Leave out for a norm without RoPE, or use
        ``cos_sin_cache`` and ``positions``.
    eps : float
        RMSNorm epsilon of q (and of k, unless ``k_eps`` is given). Default ``1e-6`` (Qwen3).
    k_eps : float, optional
        RMSNorm epsilon of k. Default: ``eps``.
    rotary_dim : int, optional
        Number of leading elements of each head that are rotated (even, at most ``head_dim``; the
        rest passes through after the norm, as partial-rotary models do). Default: the last dim
        of ``cos`` (twice it with ``half_table``; or of ``cos_sin_cache``), 0 without them.
    interleaved : bool
        Rotate pairs ``(x[2i], x[2i+1])`` (GPT-J / GLM style) instead of the halves
        ``(x[i], x[i + rotary_dim/2])`` (neox / ``rotate_half``). Default ``False``.
    half_table : bool
        ``cos``/``sin`` hold one entry per rotated pair: last dim ``rotary_dim // 2``, any stride
        along it. Pair ``i`` (``(x[2i], x[2i+1])`` with ``interleaved``, else
        ``(x[i], x[i + rotary_dim/2])``) uses ``cos[..., i]`` and ``sin[..., i]`` for both its
        elements, as the full table repeating each entry for its pair would, without building it
        (diffusers Wan / SkyReels-V2: ``freqs_cos[..., 0::2]`` and ``freqs_sin[..., 1::2]``, as
        those views; a complex-multiply RoPE such as QwenImage's: the real and imaginary parts of
        its frequencies, ``interleaved``). Not with ``cos_sin_cache`` (per pair already). Default
        ``False``.
    deinterleave_input : bool
        DeepSeek's ``apply_rotary_pos_emb_interleave``: the rotary part is first de-interleaved,
        ``x' = cat(x[..., 0:rd:2], x[..., 1:rd:2])``, then rotated as neox halves, so pair ``i``
        is ``(x[2i], x[2i+1])`` and its outputs go to ``(i, i + rotary_dim/2)``. Tables as for
        neox (full width, or ``half_table``). RoPE alone: ``norm="none"`` and no weights; not
        with ``interleaved`` or ``cos_sin_cache``. Default ``False``.
    norm : str
        ``"rms"`` (default), ``"layer"`` (LayerNorm, ``torch.nn.LayerNorm(head_dim)``: the mean
        subtracted, the biased variance, then weight and bias in float32 and one rounding) or
        ``"none"`` (RoPE only; weights must be ``None``).
    weight_offset : float
        Added to the weight in float32 before it scales: ``1.0`` for Gemma's ``(1 + w)``.
    cast_before_weight : bool, optional
        Round the normalised value to the input dtype before the weight multiplies it (HF Llama,
        Qwen3: ``weight * n.to(dtype)``), rather than multiplying in float32 and rounding after
        (OLMo2, ``torch.nn.functional.rms_norm``, Gemma). Default: ``True``, except ``False``
        when ``weight_offset`` is non-zero (Gemma). A no-op for float32 inputs.
    norm_dtype : torch.dtype, optional
        dtype of the norm's result. Default: the input dtype (Qwen3 with weights in the model
        dtype; pass ``torch.float32`` for float32 weights on 16-bit activations).
    rope_dtype : torch.dtype, optional
        dtype of RoPE's products and sum. Default: the promotion of ``norm_dtype`` and the cos/sin
        dtype, which is what ``y * cos + rotate_half(y) * sin`` computes in eager torch (the input
        dtype for HF, whose rotary embedding returns cos/sin in the input dtype).
    out_dtype : torch.dtype, optional
        dtype of the results. Default: the input dtype.
    cos_sin_cache : torch.Tensor, optional
        vLLM-style RoPE table instead of ``cos``/``sin``: ``[max_position, rotary_dim]``, the cos
        of the ``rotary_dim / 2`` frequencies, then their sin. Needs ``positions``.
    positions : torch.Tensor, optional
        int32/int64 row of ``cos_sin_cache`` of each token: ``[..., tokens]`` (a heads axis is
        inserted) or broadcastable to ``q.shape[:-1]`` with size 1 along the heads. Each must be
        in ``[0, max_position)``: checked, with a ValueError in eager code (one reduction and one
        device sync), with an asynchronous assert (RuntimeError on CPU, device-side assert on CUDA)
        in traced code and while a CUDA graph is captured.
    across_heads : bool
        Normalise each token over all its heads at once (OLMo2/3, OLMoE: ``q_norm`` on the flat
        ``[..., H * D]`` projection before the head view) instead of each head; the weights are then
        ``[heads * head_dim]`` (head-major) and the heads are ``q``'s dim -2. Default ``False``.
    q_bias, k_bias : torch.Tensor, optional
        LayerNorm biases (``norm="layer"``), shaped as the weights: added after the weight, in
        float32, before the one rounding (as ``nn.LayerNorm`` does). Both or neither.

    Returns
    -------
    q_out, k_out : tuple of torch.Tensor
        New tensors with the shapes of ``q`` and ``k``, dtype ``out_dtype``, dense in the inputs'
        stride order (a transposed ``[B, H, S, D]`` view gives a transposed result).

    Raises
    ------
    TypeError
        A tensor of a wrong dtype (integer q, a float8 weight, ...), q and k of different dtypes,
        a recipe dtype outside float32/float16/bfloat16/float64, a non-number eps.
    ValueError
        Shapes that do not fit (``head_dim`` of a weight, cos/sin that do not broadcast to the
        tokens or whose last dim is not ``rotary_dim`` (``rotary_dim // 2`` with ``half_table``),
        an odd or too large ``rotary_dim``, q/k ranks), tensors on different devices, positions
        out of range, ``half_table`` with ``cos_sin_cache``. The message names the argument.

    Notes
    -----
    - **Dispatch.** Eager CUDA calls without autograd launch the Triton kernel directly (it caches
      its launch configuration per shape); under ``torch.compile`` the call is the custom op
      ``torch.ops.qkfuse.qk_norm_rope`` (``qk_norm_rope_cached`` with positions), traced by
      Dynamo without graph breaks; on CPU the op's kernel is the reference (plain torch).
    - **Autograd.** The fused kernel has no backward. When grad mode is on and any input
      requires grad, the result is computed by the reference in plain torch ops instead:
      differentiable, same numerics, unfused (slower). Use ``torch.no_grad()`` or
      ``torch.inference_mode()`` for the kernel.
    - **Special values.** NaN and Inf propagate as in the eager code (a NaN turns its row NaN,
      an Inf its own element); empty inputs (0 tokens or heads) give empty results.
    - Inputs that the kernel cannot compute exactly (last dim not contiguous, float64) are
      computed by the reference, with the same result as the eager code.

    Examples
    --------
    HF Qwen3 attention, bf16, GQA (32 query heads, 8 kv heads), cos/sin from the model's rotary
    embedding ``[B, S, D]``:

    >>> q = q_proj(x).view(B, S, 32, 128)
    >>> k = k_proj(x).view(B, S, 8, 128)
    >>> q, k = qkfuse.qk_norm_rope(q, k, attn.q_norm.weight, attn.k_norm.weight, cos, sin,
    ...                            eps=config.rms_norm_eps)
    >>> q, k = q.transpose(1, 2), k.transpose(1, 2)   # [B, H, S, D] for SDPA

    vLLM layout: ``q [T, 32, 128]``, a float32 ``cos_sin_cache [max_pos, 128]``, ``positions [T]``:

    >>> q, k = qkfuse.qk_norm_rope(q, k, q_w, k_w, cos_sin_cache=cache, positions=positions)
    """
    return _call(q, k, q_weight, k_weight, cos, sin, eps, eps if k_eps is None else k_eps, rotary_dim,
                 interleaved, norm, weight_offset, cast_before_weight, norm_dtype, rope_dtype, out_dtype,
                 cos_sin_cache, positions, across_heads, q_bias, k_bias, half_table, deinterleave_input)


def norm_rope(
    x: Tensor,
    weight: Tensor | None,
    cos: Tensor | None = None,
    sin: Tensor | None = None,
    *,
    eps: float = 1e-6,
    rotary_dim: int | None = None,
    interleaved: bool = False,
    half_table: bool = False,
    deinterleave_input: bool = False,
    norm: str = "rms",
    weight_offset: float = 0.0,
    cast_before_weight: bool | None = None,
    norm_dtype: torch.dtype | None = None,
    rope_dtype: torch.dtype | None = None,
    out_dtype: torch.dtype | None = None,
    across_heads: bool = False,
    bias: Tensor | None = None,
) -> Tensor:
    r"""Per-head RMSNorm then RoPE of one tensor ``x`` ``[..., tokens, heads, head_dim]``.

    :func:`qk_norm_rope` for a single tensor (e.g. models that normalise only q, or DiT blocks
    with q and k of different token counts); same parameters, defaults, dispatch, errors and
    notes, without ``k``, ``k_eps`` and the cos/sin cache form (its LayerNorm bias is ``bias``).
    Returns a new tensor shaped as ``x``, dtype ``out_dtype``. ``torch.compile`` traces the
    ``torch.ops.qkfuse.norm_rope`` op.

    >>> q = qkfuse.norm_rope(q, attn.q_norm.weight, cos, sin, eps=1e-6)
    """
    return _call(x, None, weight, None, cos, sin, eps, eps, rotary_dim, interleaved, norm, weight_offset,
                 cast_before_weight, norm_dtype, rope_dtype, out_dtype, None, None, across_heads, bias, None,
                 half_table, deinterleave_input)[0]


def _with_heads_axis(t: Tensor, q: Tensor, name: str, rank_without: int, axis: int) -> Tensor:
    """t with q's rank: as given, or (with rank ``rank_without``) with a heads axis inserted at ``axis``."""
    if t.dim() == rank_without:
        return t.unsqueeze(axis)
    if t.dim() == rank_without + 1:
        return t
    raise ValueError(f"qkfuse: {name} must have {rank_without} dims (a heads axis is then inserted) or "
                     f"{rank_without + 1} (broadcast to q {tuple(q.shape)}), got {tuple(t.shape)}")


def _number(v, name: str):
    if type(v) is float:  # the common case, before the slower ABC check
        return v
    if isinstance(v, torch.SymFloat):  # a float input that torch.compile made dynamic
        return v
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"qkfuse: {name} must be a float, got {type(v).__name__}")
    return float(v)


def _recipe(q, tables, rotary_dim, interleaved, norm, weight_offset, cast_before_weight, norm_dtype,
            rope_dtype, out_dtype, across_heads=False, half_table=False, deinterleave_input=False) -> Recipe:
    """The recipe of HF numerics for q's dtype, with the caller's overrides."""
    weight_offset = _number(weight_offset, "weight_offset")
    for flag, name in ((half_table, "half_table"), (deinterleave_input, "deinterleave_input")):
        if not isinstance(flag, bool):
            raise TypeError(f"qkfuse: {name} must be a bool, got {type(flag).__name__}")
    if rotary_dim is None:
        rotary_dim = tables[0].shape[-1] * (2 if half_table else 1) if tables else 0
        if half_table and rotary_dim > q.shape[-1]:  # most likely a full-width table: say so, not "rotary_dim"
            raise ValueError(f"qkfuse: with half_table=True, cos/sin last dim must be rotary_dim // 2 (at most "
                             f"head_dim // 2 = {q.shape[-1] // 2}), got {tuple(tables[0].shape)}")
    elif isinstance(rotary_dim, bool) or not isinstance(rotary_dim, numbers.Integral):
        raise TypeError(f"qkfuse: rotary_dim must be an int, got {type(rotary_dim).__name__}")
    if cast_before_weight is None:
        cast_before_weight = weight_offset == 0.0
    norm_dtype = q.dtype if norm_dtype is None else norm_dtype
    if rope_dtype is None:
        rope_dtype = norm_dtype
        for t in tables:
            rope_dtype = torch.promote_types(rope_dtype, t.dtype)
    if not isinstance(across_heads, bool):
        raise TypeError(f"qkfuse: across_heads must be a bool, got {type(across_heads).__name__}")
    return Recipe(norm, weight_offset, bool(cast_before_weight), norm_dtype, rope_dtype,
                  q.dtype if out_dtype is None else out_dtype, int(rotary_dim), bool(interleaved),
                  -2 if across_heads else 0,  # the heads are q's dim -2
                  half_table=half_table, deinterleave_input=deinterleave_input)


def _direct_kernel(q: Tensor) -> bool:
    """Launch the Triton kernel from Python: eager code on CUDA with plain tensors (not under
    Dynamo, a dispatch mode such as FakeTensorMode or make_fx, or functorch transforms)."""
    if torch.compiler.is_compiling() or not q.is_cuda or type(q) is not torch.Tensor:
        return False
    if torch._C._len_torch_dispatch_stack() or torch._C._functorch.is_functorch_wrapped_tensor(q):
        return False
    return triton_available()


def _call(q, k, q_weight, k_weight, cos, sin, q_eps, k_eps, rotary_dim, interleaved, norm, weight_offset,
          cast_before_weight, norm_dtype, rope_dtype, out_dtype, cache, positions, across_heads=False,
          q_bias=None, k_bias=None, half_table=False, deinterleave_input=False):
    # Argument checks that decide the defaults come first, so a bad q or cos is named as such
    # rather than as the recipe dtype derived from it; the op's own checks do the rest.
    check_tensor(q, "q", None)
    if k is not None:
        check_tensor(k, "k", None)
    q_eps, k_eps = _number(q_eps, "eps"), _number(k_eps, "k_eps")
    if (cache is None) != (positions is None):
        raise ValueError("qkfuse: cos_sin_cache and positions go together")
    if cache is not None:
        if cos is not None or sin is not None:
            raise ValueError("qkfuse: give cos/sin or cos_sin_cache/positions, not both")
        if half_table is True:  # (a non-bool is _recipe's TypeError)
            raise ValueError("qkfuse: half_table=True is for cos/sin tables; cos_sin_cache already holds one "
                             "cos and one sin per pair (leave half_table out)")
        if deinterleave_input is True:
            raise ValueError("qkfuse: deinterleave_input=True takes cos/sin tables, not cos_sin_cache")
        check_tensor(cache, "cos_sin_cache", q.device)
        check_tensor(positions, "positions", q.device, (torch.int32, torch.int64))
        positions = _with_heads_axis(positions, q, "positions", q.dim() - 2, -1)
        tables = [cache]
    else:
        for t, name in ((cos, "cos"), (sin, "sin")):
            if t is not None:
                check_tensor(t, name, q.device)
        cos = None if cos is None else _with_heads_axis(cos, q, "cos", q.dim() - 1, -2)
        sin = None if sin is None else _with_heads_axis(sin, q, "sin", q.dim() - 1, -2)
        tables = [t for t in (cos, sin) if t is not None]
    if half_table is True and not tables:  # else check_recipe's "rotary_dim=0", which hides the cause
        raise ValueError("qkfuse: half_table=True needs cos and sin")
    recipe = _recipe(q, tables, rotary_dim, interleaved, norm, weight_offset, cast_before_weight, norm_dtype,
                     rope_dtype, out_dtype, across_heads, half_table, deinterleave_input)

    biases = (q_bias, k_bias)
    if (q_bias is None) != (k_bias is None) and k is not None:
        raise ValueError("qkfuse: give q_bias and k_bias together (or neither)")
    inputs = (q, k, q_weight, k_weight, cos, sin, cache, q_bias, k_bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        return _reference(q, k, q_weight, k_weight, cos, sin, q_eps, k_eps, recipe, cache, positions, biases)
    if _direct_kernel(q):
        return _direct_call(q, k, q_weight, k_weight, cos, sin, q_eps, k_eps, recipe, cache, positions, biases)
    args = recipe.op_args()
    if k is None:
        return (torch.ops.qkfuse.norm_rope.default(q, q_weight, cos, sin, q_eps, None, *args, q_bias),)
    if cache is not None:
        return torch.ops.qkfuse.qk_norm_rope_cached.default(q, k, q_weight, k_weight, cache, positions, q_eps,
                                                            k_eps, *args, q_bias, k_bias)
    return torch.ops.qkfuse.qk_norm_rope.default(q, k, q_weight, k_weight, cos, sin, q_eps, k_eps, None, None,
                                                 *args, q_bias, k_bias)


# Input layouts (and aliasing) whose checks passed: (whether the Triton kernel computes them, else
# the reference does; the kernel's launch plan for them or None). The checks read shapes, strides
# and dtypes only, so an eager loop pays them, and the launch planning, once per layout.
_CHECKED: dict = {}
_MAX_CHECKED = 1024


def _direct_call(q, k, q_weight, k_weight, cos, sin, q_eps, k_eps, recipe, cache, positions, biases=(None, None)):
    from .kernels import triton_norm_rope as tk

    table = cos if cache is None else cache  # what the kernel reads the rotation from
    # the kernel's tensors, in its plan's order (with a cos/sin cache: the cache, no sin)
    tensors = (q, k, q_weight, k_weight, table, sin, positions, *biases)
    # the whole recipe (half_table included: a half and a full table of one shape are other calls)
    key = (recipe, cache is None, tk.aliases(tensors), *map(tensor_key, tensors))
    entry = _CHECKED.get(key)
    if entry is None:
        _check(q, k, q_weight, k_weight, cos, sin, recipe, cache, positions, data=False, biases=biases)
        kernel_ok = kernel_computes(q, k, q_weight, k_weight, table, sin, recipe, positions,
                                    q_bias=biases[0], k_bias=biases[1])
        plan = tk.plan_for(*tensors[:6], recipe, positions, *biases) if kernel_ok else None
        entry = _CHECKED[key] = (kernel_ok, plan)
        if len(_CHECKED) > _MAX_CHECKED:
            _CHECKED.pop(next(iter(_CHECKED)))
    kernel_ok, plan = entry
    if cache is not None:  # the positions' values, on every call
        check_positions_in_range(positions, cache.shape[0])
    if plan is not None:
        return plan.run(tensors, q_eps, k_eps)
    return run_kernel(q, k, q_weight, k_weight, table, sin, q_eps, k_eps, recipe, positions,
                      q_bias=biases[0], k_bias=biases[1], use_kernel=kernel_ok)


def _check(q, k, q_weight, k_weight, cos, sin, recipe, cache, positions, data=True, biases=(None, None)) -> None:
    """The op's checks, for the paths that do not call the op."""
    q_bias, k_bias = biases
    if k is None:
        check_single(q, q_weight, cos, sin, None, recipe, q_bias)
    elif cache is not None:
        check_cached(q, k, q_weight, k_weight, cache, positions, recipe, q_bias, k_bias)
        if data:
            check_positions_in_range(positions, cache.shape[0])
    else:
        check_qk(q, k, q_weight, k_weight, cos, sin, recipe, q_bias=q_bias, k_bias=k_bias)


def _reference(q, k, q_weight, k_weight, cos, sin, q_eps, k_eps, recipe, cache, positions, biases=(None, None)):
    _check(q, k, q_weight, k_weight, cos, sin, recipe, cache, positions, biases=biases)
    if cache is not None:
        cos, sin = cos_sin_from_cache(cache, positions, recipe.interleaved)
    return (norm_rope_reference(q, q_weight, cos, sin, q_eps, recipe, bias=biases[0]),
            None if k is None else norm_rope_reference(k, k_weight, cos, sin, k_eps, recipe, bias=biases[1]))
