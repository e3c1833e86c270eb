"""flashinfer as a second CUDA backend, wrapped as compile-safe ``qkfuse::fi_*`` custom ops.

flashinfer's own Python functions are invisible to torch.compile (its op registration is a
no-op), so each kernel used here gets a ``torch.library`` op with a fake impl and its mutation
declared. flashinfer is optional: nothing here imports it until a kernel runs, and asking for it
explicitly without it installed fails with one clear line.

Numerics. flashinfer rounds once, at the end of each kernel (RMSNorm, then RoPE), while the HF
graph rounds after the norm, the weight multiply and every RoPE product; results agree within
the dtype's rounding, not bit for bit (the Triton kernel reproduces the graph's rounding). Its
RoPE reads a cos|sin cache of rotary_dim/2 frequencies, built here from the first half of HF's
cos/sin (neox) or their even entries (interleaved), which is exact for the HF convention of
duplicated frequencies. This backend is therefore opt-in (``qkfuse.kernels="flashinfer"``) or
chosen by ``auto`` only where measurements committed in kernels/policy.json say it is faster.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from ..ops.recipe import Recipe, new_output
from . import KernelUnavailable

INSTALL_HINT = "pip install 'qkfuse[flashinfer]' (flashinfer-python, CUDA only)"


@functools.lru_cache(maxsize=None)
def available() -> bool:
    try:
        import flashinfer  # noqa: F401
    except Exception:
        return False
    return True


def require() -> None:
    if not available():
        raise KernelUnavailable(f"qkfuse.kernels='flashinfer' needs flashinfer: {INSTALL_HINT}")


# ---- custom ops --------------------------------------------------------------------------------


@torch.library.custom_op("qkfuse::fi_rmsnorm", mutates_args=())
def fi_rmsnorm(x: Tensor, weight: Tensor, eps: float, gemma: bool) -> Tensor:
    """flashinfer RMSNorm of [T, H, D] (or [T, D]) rows; ``gemma`` multiplies by (1 + w)."""
    import flashinfer

    out = new_output(x, x.dtype)
    if gemma:
        # gemma_rmsnorm is 2-D: rows must be evenly spaced
        flashinfer.norm.gemma_rmsnorm(x.reshape(-1, x.shape[-1]), weight, eps, out=out.view(-1, x.shape[-1]))
    else:
        flashinfer.norm.rmsnorm(x, weight, eps, out=out)
    return out


@fi_rmsnorm.register_fake
def _(x, weight, eps, gemma):
    return new_output(x, x.dtype)


@torch.library.custom_op("qkfuse::fi_rope_cos_sin_cache_", mutates_args=("query", "key"))
def fi_rope_cos_sin_cache_(positions: Tensor, query: Tensor, key: Tensor, head_size: int,
                           cos_sin_cache: Tensor, is_neox: bool) -> None:
    """In place: flashinfer.rope.apply_rope_with_cos_sin_cache_inplace on [T, H*D] q and k."""
    import flashinfer

    flashinfer.rope.apply_rope_with_cos_sin_cache_inplace(positions, query, key, head_size, cos_sin_cache, is_neox)


@fi_rope_cos_sin_cache_.register_fake
def _(positions, query, key, head_size, cos_sin_cache, is_neox):
    return None


@torch.library.custom_op("qkfuse::fi_rope_pos_ids_", mutates_args=("q", "k"))
def fi_rope_pos_ids_(q: Tensor, k: Tensor, pos_ids: Tensor, rotary_dim: int, interleave: bool,
                     rope_scale: float, rope_theta: float) -> None:
    """In place: flashinfer.rope.apply_rope_pos_ids_inplace (cos/sin computed from rope_theta)."""
    import flashinfer

    flashinfer.rope.apply_rope_pos_ids_inplace(q, k, pos_ids, rotary_dim, interleave, rope_scale, rope_theta)


@fi_rope_pos_ids_.register_fake
def _(q, k, pos_ids, rotary_dim, interleave, rope_scale, rope_theta):
    return None


# ---- the fused op on flashinfer ------------------------------------------------------------------


def unsupported(q: Tensor, k: Tensor | None, cos: Tensor | None, recipe: Recipe) -> str | None:
    """None if the flashinfer path computes this site, else why not."""
    if not available():
        return f"flashinfer is not installed ({INSTALL_HINT})"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"flashinfer kernels take fp16/bf16, not {q.dtype}"
    if recipe.out_dtype != q.dtype or recipe.norm_dtype != q.dtype:
        return "flashinfer returns the input dtype"
    if recipe.norm_heads_dim:
        return "flashinfer's RMSNorm is per head, not across heads"
    if recipe.norm_sum:
        return "flashinfer has no L2 norm (sum of squares)"
    if recipe.norm == "layer":
        return "flashinfer has no LayerNorm (mean subtracted) in its fused path"
    if recipe.weight_heads_dim:
        return "flashinfer's RMSNorm weight is [head_dim], not one row per head"
    if recipe.norm == "rms" and recipe.weight_offset not in (0.0, 1.0):
        return f"weight offset {recipe.weight_offset}"
    if recipe.negate_sin:
        return "flashinfer's RoPE rotates one way (not negate_sin)"
    if recipe.rope_first:
        return "flashinfer normalises, then rotates; not the RoPE first (rope_first)"
    if recipe.half_table:
        return "flashinfer's RoPE takes full-width cos/sin, not one entry per pair (half_table)"
    if recipe.deinterleave_input:
        return "flashinfer's RoPE reads x as neox halves or interleaved pairs, not pairs rotated into halves " \
               "(deinterleave_input)"
    if recipe.rotary_dim and (cos is None or cos.shape[-1] != recipe.rotary_dim):
        return "cos/sin do not cover rotary_dim"
    for t in (q, k):
        if t is not None and (t.dim() < 3 or t.stride(-1) != 1):
            return "needs [..., heads, head_dim] with a contiguous last dim"
    if recipe.rotary_dim and cos is not None:
        # the innermost leading dim is flashinfer's head dim: cos/sin must not vary along it
        inner = min(range(q.dim() - 1), key=lambda d: q.stride(d))
        cd = inner - (q.dim() - cos.dim())
        if cd >= 0 and cos.shape[cd] != 1:
            return "cos/sin vary along the innermost (head) dim"
    if recipe.norm == "rms" and recipe.weight_offset and q.dim() >= 3:
        inner = min(range(q.dim() - 1), key=lambda d: q.stride(d))
        if q.stride(inner) != q.shape[-1]:
            return "gemma_rmsnorm is 2-D: heads must be contiguous rows"
    return None


@torch.library.custom_op("qkfuse::fi_norm_rope", mutates_args=())
def fi_norm_rope(q: Tensor, k: Tensor | None, q_weight: Tensor | None, k_weight: Tensor | None,
                 cos_sin_cache: Tensor | None, positions: Tensor | None, q_eps: float, k_eps: float,
                 norm: bool, gemma: bool, is_neox: bool) -> list[Tensor]:
    """Functional composite for compiled graphs: flashinfer RMSNorm of q and k [T, H, D] into fresh
    outputs, then flashinfer RoPE in place on those outputs (no extra copies)."""
    import flashinfer

    outs = []
    for x, w, eps in ((q, q_weight, q_eps), (k, k_weight, k_eps)):
        if x is None:
            continue
        if norm:
            weight = w if w is not None else torch.ones(x.shape[-1], dtype=x.dtype, device=x.device)
            outs.append(fi_rmsnorm(x, weight, eps, gemma))
        else:
            y = new_output(x, x.dtype)
            y.copy_(x)
            outs.append(y)
    if cos_sin_cache is not None:
        n_tok = q.shape[0]
        yk = outs[1] if len(outs) > 1 else torch.empty(n_tok, 1, q.shape[-1], dtype=q.dtype, device=q.device)
        flashinfer.rope.apply_rope_with_cos_sin_cache_inplace(
            positions, outs[0].view(n_tok, -1), yk.view(n_tok, -1), q.shape[-1], cos_sin_cache, is_neox)
    return outs


@fi_norm_rope.register_fake
def _(q, k, q_weight, k_weight, cos_sin_cache, positions, q_eps, k_eps, norm, gemma, is_neox):
    return [new_output(x, x.dtype) for x in (q, k) if x is not None]


def _token_order(x: Tensor) -> list[int]:
    """x's leading dims from outermost to innermost in memory (the last one is the head dim)."""
    return sorted(range(x.dim() - 1), key=lambda d: -x.stride(d))


def norm_rope_call(t: dict, q_eps: float, k_eps: float, recipe: Recipe):
    """The fused computation on flashinfer kernels, as traced into a compiled graph."""
    q, k = t["q"], t["k"]
    views = []
    for x in (q, k):
        if x is not None:
            order = _token_order(x)
            xt = x.permute(*order, x.dim() - 1)
            views.append((order, xt.shape, xt.reshape(-1, xt.shape[-2], xt.shape[-1])))
    cache = pos = None
    if recipe.rotary_dim:
        cache = _cos_sin_cache(t["cos"], t["sin"], q, recipe)
        pos = torch.arange(cache.shape[0], device=q.device, dtype=torch.int64)
    ys = torch.ops.qkfuse.fi_norm_rope(
        views[0][2], views[1][2] if k is not None else None, t["q_weight"], t["k_weight"], cache, pos,
        q_eps, k_eps, recipe.norm == "rms", bool(recipe.weight_offset), not recipe.interleaved)
    results = []
    for (order, shape, _), y in zip(views, ys):
        inverse = [order.index(d) for d in range(len(order))] + [len(order)]
        results.append(y.view(shape).permute(inverse))
    return tuple(results)


def _cos_sin_cache(cos: Tensor, sin: Tensor, q: Tensor, recipe: Recipe) -> Tensor:
    """[tokens, rotary_dim] float32 cos|sin rows in q's token order (see module docstring)."""
    rd = recipe.rotary_dim
    lead = q.shape[:-1]
    order = _token_order(q)
    head_dim = order[-1]

    def per_token(c):
        c = torch.broadcast_to(c, (*lead, rd)).select(head_dim, 0)
        keep = [d if d < head_dim else d - 1 for d in order[:-1]]
        c = c.permute(*keep, c.dim() - 1).reshape(-1, rd)
        return c[:, 0::2] if recipe.interleaved else c[:, : rd // 2]

    return torch.cat((per_token(cos), per_token(sin)), dim=-1).float().contiguous()
