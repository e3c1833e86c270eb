"""Plain-torch reference of the fused norm→RoPE op (the CPU kernel, and the oracle of the tests).

It executes the recipe (qkfuse/ops/recipe.py) with the same torch ops, in the same dtypes, as the
unfused HF graph does, so on CPU it returns what that graph returns (bit for bit in practice).
"""

from __future__ import annotations

import torch

from ..ops.recipe import Recipe, new_output


def _rotate(x: torch.Tensor, interleaved: bool) -> torch.Tensor:
    if interleaved:
        return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _full_width(t: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """A half table (one entry per rotated pair) as the full-width table it stands for: exact
    copies, so the products round as the graph's half-width products do."""
    if interleaved:
        return t.unsqueeze(-1).expand(*t.shape, 2).flatten(-2)
    return torch.cat((t, t), dim=-1)


def _affine_view(t: torch.Tensor, x: torch.Tensor, recipe: Recipe) -> torch.Tensor:
    """A weight or bias in float32, shaped to broadcast over x (see the recipe)."""
    t = t.to(torch.float32)
    hd, whd = recipe.norm_heads_dim, recipe.weight_heads_dim
    if hd:  # [heads * head_dim], head-major -> broadcast over x's dims (hd, -1)
        return t.view(x.shape[hd], *[1] * (-hd - 2), x.shape[-1])
    if whd:  # [heads, head_dim] -> head i of x's dim whd gets row i
        return t.view(x.shape[whd], *[1] * (-whd - 2), x.shape[-1])
    return t


def _rope(y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, recipe: Recipe, out_dtype) -> torch.Tensor:
    """The recipe's RoPE of y, rounded to out_dtype (the pass-through part converted to it)."""
    rd, rdt = recipe.rotary_dim, recipe.rope_dtype
    yr = y[..., :rd].to(rdt)
    if recipe.deinterleave_input:  # DeepSeek: x.view(..., rd/2, 2).transpose(-1, -2).reshape(..., rd)
        yr = yr.unflatten(-1, (rd // 2, 2)).transpose(-1, -2).reshape(yr.shape)
    c, s = cos.to(rdt), sin.to(rdt)
    if recipe.negate_sin:  # (exact: rot(y) * sin == rotate_half(y) * -sin, element for element)
        s = -s
    if recipe.half_table:
        c, s = _full_width(c, recipe.interleaved), _full_width(s, recipe.interleaved)
    out_r = (yr * c + _rotate(yr, recipe.interleaved) * s).to(out_dtype)
    if rd < y.shape[-1]:
        out_r = torch.cat((out_r, y[..., rd:].to(out_dtype)), dim=-1)
    return out_r


def norm_rope_reference(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    eps: float | torch.Tensor,
    recipe: Recipe,
    *,
    dense_layout: bool = True,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """One tensor's fused computation; the output is laid out by ``new_output(x)`` (the layout
    every kernel returns), or as torch's ops leave it with ``dense_layout=False`` (for traces that
    Inductor compiles: it plans layouts itself)."""
    x_in, rope_first = x, recipe.rope_first and bool(recipe.rotary_dim)
    if rope_first:  # RoPE on x, rounded to x's dtype (or kept); then the norm of that (no RoPE after it)
        x = _rope(x, cos, sin, recipe, recipe.norm_input_dtype(x.dtype))
    y = x
    if recipe.norm in ("rms", "layer"):
        xf = x.to(torch.float32)
        hd = recipe.norm_heads_dim
        dims = (hd, -1) if hd else -1
        eps_v = eps.to(torch.float32) if isinstance(eps, torch.Tensor) else eps
        if recipe.norm == "layer":  # centred first, then the (biased) variance of the centred values
            xc = xf - xf.mean(dims, keepdim=True)
            n = xc * torch.rsqrt(xc.pow(2).mean(dims, keepdim=True) + eps_v)
        else:
            ms = xf.pow(2).sum(dims, keepdim=True) if recipe.norm_sum else xf.pow(2).mean(dims, keepdim=True)
            n = xf * torch.rsqrt(ms + eps_v)
        if weight is None:
            y = n
        else:
            w = _affine_view(weight, x, recipe)
            if recipe.weight_offset:
                w = w + recipe.weight_offset
            if recipe.cast_before_weight:
                n = n.to(x.dtype)
            y = n * w if n.dtype == torch.float32 else n.float() * w
        if bias is not None:
            y = y + _affine_view(bias, x, recipe)
        y = y.to(recipe.norm_dtype)

    if recipe.rotary_dim and not rope_first:
        out_r = _rope(y, cos, sin, recipe, recipe.out_dtype)
    else:
        out_r = y.to(recipe.out_dtype)

    if not dense_layout:
        return out_r
    out = new_output(x_in, recipe.out_dtype)
    out.copy_(out_r)
    return out


def cos_sin_from_cache(cache: torch.Tensor, positions: torch.Tensor, interleaved: bool):
    """Full-width HF-layout cos/sin [..., rotary_dim] from a vLLM cos/sin cache and positions:
    frequency i serves elements (i, i + rd/2) in the neox layout and (2i, 2i + 1) interleaved."""
    rows = cache[positions.long()]
    half = rows.shape[-1] // 2
    c, s = rows[..., :half], rows[..., half:]
    if interleaved:
        return c.repeat_interleave(2, dim=-1), s.repeat_interleave(2, dim=-1)
    return torch.cat((c, c), dim=-1), torch.cat((s, s), dim=-1)
