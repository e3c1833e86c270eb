"""The numerics recipe of one fused norm→RoPE call.

Every kernel (reference, Triton, flashinfer) computes the same function, described here.
The recipe records *where the matched graph rounds*, so a fused call reproduces the unfused
graph's numerics instead of "something close":

    x            input, dtype X (any strides, last dim contiguous for the GPU kernels)
    n  = float(x) * rsqrt(mean(float(x)^2, -1) + eps)            # float32, norm == "rms"
                 (norm_heads_dim = h < 0: the mean is over x's dims (h, -1), the
                 heads and head_dim, as a norm across heads on the flat projection;
                 the weight is then [heads * head_dim], head-major; norm_sum: sum, not
                 mean, an L2 norm)
    n  = c * rsqrt(mean(c^2, -1) + eps), c = float(x) - mean(float(x), -1)
                 # float32, norm == "layer" (LayerNorm: the biased variance; over the
                 # same dims as the RMS, norm_heads_dim included)
    if weight:   w' = float(w) + weight_offset                   # float32 ((1+w) for Gemma)
                 n  = round(n, X) if cast_before_weight           # Llama/Qwen3: cast, then multiply
                 y  = round(n * w' [+ float(bias)], norm_dtype)
    else:        y  = round(n [+ float(bias)], norm_dtype)
                 (weight_heads_dim = h < 0: weight and bias are [x.shape[h], head_dim],
                 one row per head of x's dim h (Cohere's [H, D] q_norm, StableLM's
                 LayerNorm per head); else [head_dim], or [heads * head_dim] across heads.
                 The bias is an optional tensor argument of the ops, not a recipe field.)
    (norm == "none": y = x)
    RoPE on y[..., :rotary_dim], every product and the sum rounded to rope_dtype:
                 o  = round(round(y*cos) + round(rot(y)*sin), rope_dtype) -> out_dtype
                 rot = half-split rotate_half (neox) or pairwise (interleaved)
                 (half_table: cos/sin hold one value per rotated pair, rotary_dim/2
                 wide, any last-dim stride; pair p is elements (p, p + rotary_dim/2)
                 (neox) or (2p, 2p + 1) (interleaved) and both use cos[p], sin[p]: Wan's
                 freqs_cos[..., 0::2] / freqs_sin[..., 1::2], passed as those views)
                 (deinterleave_input, neox only: the rotary part is first de-interleaved,
                 y' = cat(y[..., 0:rd:2], y[..., 1:rd:2]), and y' is rotated as above: pair i
                 is (y[2i], y[2i + 1]) and its outputs go to (i, i + rotary_dim/2); the tables
                 are neox (full-width, or half with half_table). DeepSeek-V2/V3's
                 apply_rotary_pos_emb_interleave, for RoPE alone: norm="none")
    y[..., rotary_dim:] passes through.
    (negate_sin: rot is rotate_half's negation, cat(-(-y2), -y1) = cat(y2, -y1), nanochat's rotation
    the other way; computed as the rotation above with -sin, which rounds the same: negation is exact.)
    (rope_first: the two steps swap. The RoPE above runs on y = float(x), its output rounded to
    rope_dtype and then to x's dtype; the norm above then reads that as its x, and its output y,
    rounded to norm_dtype, is the result (-> out_dtype). Llama4's L2 norm, nanochat, HunYuan:
    q = norm(rope(q)). Per head only. With keep_rope_dtype the RoPE's output is not rounded to x's
    dtype: the norm reads it as rope_dtype, and its casts "to the input's dtype" are to rope_dtype.
    That is Llama4's graph on torch < 2.13, whose joint-graph pass drops the bf16 -> float32 round
    trip between the RoPE's type_as and the norm's x.float().)

A rounding "to float32" is a no-op: the kernels keep float32 intermediates and round only at the
steps the graph rounds at.
"""

from __future__ import annotations

import dataclasses

import torch

NORM_KINDS = ("rms", "layer", "none")
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
    # 0: the norm is per head (over head_dim). h < 0: across heads, over dims (h, -1) of the op's
    # input, whose dim h holds the heads (OLMo2's q_norm on [B, S, H*D] before the head view).
    norm_heads_dim: int = 0
    # True: n = x * rsqrt(sum(x^2) + eps), an L2 norm onto the unit sphere (nGPT / Dory), not the RMS
    norm_sum: bool = False
    # 0: the weight (and bias) is [head_dim] (or [heads * head_dim] across heads). h < 0: it is
    # [x.shape[h], head_dim], one row per head of the op input's dim h (Cohere, StableLM).
    weight_heads_dim: int = 0
    # True: cos/sin are [..., rotary_dim // 2], one value per rotated pair (see the module docstring)
    half_table: bool = False
    # True: the rotary part of x is read as pairs (x[2i], x[2i+1]) and rotated as neox halves, the
    # output written as halves: DeepSeek's apply_rotary_pos_emb_interleave (see the module docstring)
    deinterleave_input: bool = False
    # True: RoPE first, then the norm of its output (see the module docstring)
    rope_first: bool = False
    # True: rot(y) is rotate_half's negation, cat(y2, -y1) (nanochat): computed as sin negated
    negate_sin: bool = False
    # True (rope_first only): the norm reads the RoPE's output unrounded, in rope_dtype (see above)
    keep_rope_dtype: bool = False

    def norm_input_dtype(self, x_dtype: torch.dtype) -> torch.dtype:
        """The dtype the norm's input is rounded to, and its casts "to the input's dtype" are to: x's,
        or with rope_first and keep_rope_dtype the RoPE's (the norm reads the RoPE's output)."""
        return self.rope_dtype if self.keep_rope_dtype else x_dtype

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
            int(self.norm_heads_dim),
            bool(self.norm_sum),
            int(self.weight_heads_dim),
            bool(self.half_table),
            bool(self.deinterleave_input),
            bool(self.rope_first),
            bool(self.negate_sin),
            bool(self.keep_rope_dtype),
        )

    @classmethod
    def from_op_args(cls, *args) -> "Recipe":
        return cls(*args)

    def describe(self, bias: bool = False) -> str:
        """A short name of the recipe (``bias``: the call adds a norm bias, which is an argument of
        the ops, not a recipe field)."""
        parts = []
        rope_part = None
        if self.rotary_dim:
            rope_part = (("interleaved" if self.interleaved else "neox") + f" rope[{self.rotary_dim}]"
                         + (" half-table" if self.half_table else "")
                         + (" de-interleaved" if self.deinterleave_input else "")
                         + (" -sin" if self.negate_sin else "")
                         + (f" ({_dtype_name(self.rope_dtype)} into the norm)" if self.keep_rope_dtype else ""))
        if rope_part and self.rope_first:
            parts.append(rope_part)
        if self.norm in ("rms", "layer"):
            kind = "layernorm" if self.norm == "layer" else ("l2" if self.norm_sum else "rms")
            kind += "+b" if bias else ""
            kind += "(1+w)" if self.weight_offset else ""
            kind += " across heads" if self.norm_heads_dim else ""
            kind += " per-head w" if self.weight_heads_dim else ""
            parts.append(kind + (" cast→w" if self.cast_before_weight else ""))
        if rope_part and not self.rope_first:
            parts.append(rope_part)
        return (" then " if self.rope_first else " + ").join(parts) or "identity"


# Schema types of the Recipe fields (annotations are strings here: `from __future__ import annotations`).
_SCHEMA_TYPES = {"str": "str", "float": "float", "bool": "bool", "torch.dtype": "ScalarType", "int": "SymInt"}
# The first eight fields are positional and required in every op call (as in qkfuse 0.1); fields
# added after them carry their default, so calls written before them keep working.
_REQUIRED_FIELDS = 8
N_FIELDS = len(dataclasses.fields(Recipe))


def split_op_args(args) -> tuple[Recipe, tuple]:
    """(Recipe, the tensor arguments after it) from an op's trailing arguments: the Recipe's fields,
    then the optional tensors the schema appends after them (the norm's bias, defaulting to None;
    custom ops take no keyword-only tensors). A call may leave defaulted recipe fields out only
    when it passes nothing after them."""
    return Recipe(*args[:N_FIELDS]), tuple(args[N_FIELDS:])


def recipe_schema() -> str:
    """The trailing arguments of the ``qkfuse::*norm_rope*`` op schemas, generated from the Recipe's
    fields in order: adding a field to the recipe needs no edit of the ops, their fakes or kernels'
    registrations (they take ``*recipe_args`` and read them with ``split_op_args``)."""
    parts = []
    for i, f in enumerate(dataclasses.fields(Recipe)):
        arg = f"{_SCHEMA_TYPES[f.type]} {f.name}"
        if i >= _REQUIRED_FIELDS:
            if not isinstance(f.default, (bool, int, float)):
                raise TypeError(f"Recipe.{f.name}: a field added after the first {_REQUIRED_FIELDS} needs a "
                                "bool/int/float default (the op schemas give it to callers that omit it)")
            arg += f"={f.default!r}"
        parts.append(arg)
    return ", ".join(parts)


# Dtypes the reference computes (what the matched graphs use); the GPU kernels take DTYPE_CODES.
FLOAT_DTYPES = (*DTYPE_CODES, torch.float64)


def _dtype_name(dt) -> str:
    return str(dt).replace("torch.", "")


def check_recipe(recipe: Recipe) -> None:
    """Validate a recipe on its own (no tensors): TypeError for a wrong type, ValueError otherwise."""
    if recipe.norm not in NORM_KINDS:
        raise ValueError(f"qkfuse: norm must be one of {NORM_KINDS}, got {recipe.norm!r}")
    for field in ("norm_dtype", "rope_dtype", "out_dtype"):
        dt = getattr(recipe, field)
        if dt not in FLOAT_DTYPES:
            raise TypeError(f"qkfuse: {field} must be one of {[_dtype_name(d) for d in FLOAT_DTYPES]}, got {dt}")
    # (symbolic under torch.compile(dynamic=True): the fake impls check shapes with it, and the
    # real impls get an int)
    if not isinstance(recipe.rotary_dim, (int, torch.SymInt)) or isinstance(recipe.rotary_dim, bool):
        raise TypeError(f"qkfuse: rotary_dim must be an int, got {type(recipe.rotary_dim).__name__}")
    if not isinstance(recipe.norm_heads_dim, (int, torch.SymInt)) or isinstance(recipe.norm_heads_dim, bool):
        raise TypeError(f"qkfuse: norm_heads_dim must be an int, got {type(recipe.norm_heads_dim).__name__}")
    if recipe.norm_heads_dim > 0:
        raise ValueError(f"qkfuse: norm_heads_dim must be 0 (per-head norm) or a negative dim, "
                         f"got {recipe.norm_heads_dim}")
    if recipe.norm_heads_dim and recipe.norm == "none":
        raise ValueError("qkfuse: norm_heads_dim is set but norm='none'")
    if recipe.norm_sum and recipe.norm != "rms":
        raise ValueError(f"qkfuse: norm_sum (an L2 norm) is set but norm={recipe.norm!r}")
    whd = recipe.weight_heads_dim
    if not isinstance(whd, (int, torch.SymInt)) or isinstance(whd, bool):
        raise TypeError(f"qkfuse: weight_heads_dim must be an int, got {type(whd).__name__}")
    if whd > 0:
        raise ValueError(f"qkfuse: weight_heads_dim must be 0 (a [head_dim] weight) or a negative dim, got {whd}")
    if whd and recipe.norm == "none":
        raise ValueError("qkfuse: weight_heads_dim is set but norm='none'")
    if recipe.half_table and not recipe.rotary_dim:
        raise ValueError("qkfuse: half_table is set but rotary_dim=0")
    if recipe.deinterleave_input:
        if not recipe.rotary_dim:
            raise ValueError("qkfuse: deinterleave_input is set but rotary_dim=0")
        if recipe.interleaved:
            raise ValueError("qkfuse: deinterleave_input reads the pairs of x and writes neox halves; it is not "
                             "combined with interleaved=True")
        if recipe.norm != "none":
            # (a weight, a bias or a row per head would have to be read in the same permuted order:
            # not implemented; DeepSeek's RoPE has no norm in front)
            raise ValueError(f"qkfuse: deinterleave_input is implemented for RoPE alone (norm='none'), "
                             f"got norm={recipe.norm!r}")
    if recipe.negate_sin and not recipe.rotary_dim:
        raise ValueError("qkfuse: negate_sin is set but rotary_dim=0")
    if recipe.keep_rope_dtype and not recipe.rope_first:
        raise ValueError("qkfuse: keep_rope_dtype is set but rope_first is not (it is the rounding between the two)")
    if recipe.rope_first:
        if not recipe.rotary_dim or recipe.norm == "none":
            raise ValueError("qkfuse: rope_first needs a RoPE (rotary_dim > 0) and a norm after it")
        if recipe.norm_heads_dim or recipe.deinterleave_input:
            raise ValueError("qkfuse: rope_first is implemented for a per-head norm after a plain, interleaved or "
                             "half-table RoPE (not norm_heads_dim, not deinterleave_input)")
    if whd and recipe.norm_heads_dim:
        raise ValueError("qkfuse: weight_heads_dim and norm_heads_dim are both set (a norm across heads has "
                         "its [heads * head_dim] weight)")


def check_tensor(t, name: str, device, dtypes=FLOAT_DTYPES) -> None:
    """t is a tensor of one of `dtypes` on `device` (None: any device)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"qkfuse: {name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"qkfuse: {name} dtype must be one of {[_dtype_name(d) for d in dtypes]}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"qkfuse: {name} is on {t.device} but the input is on {device}")


def check_table_shape(shape, tname: str, x, name: str, rd: int, half: bool = False) -> None:
    """A per-token table of shape `shape` (cos, sin, positions + [rd]) broadcasts to x's rows; `half`:
    one entry per rotated pair (Recipe.half_table), rd // 2 wide."""
    if shape[-1] != (rd // 2 if half else rd):
        what = f"rotary_dim // 2={rd // 2} (half_table)" if half else f"rotary_dim={rd}"
        raise ValueError(f"qkfuse: {tname} last dim must equal {what}, got {tuple(shape)}")
    lead, rows = shape[:-1], x.shape[:-1]
    # The common case without torch.broadcast_shapes' ~10 us, for plain tensors (fake ones, whose
    # sizes may be symbolic, take torch.broadcast_shapes as before).
    if type(x) is torch.Tensor and len(lead) <= len(rows) and all(
            a == 1 or a == b for a, b in zip(reversed(lead), reversed(rows))):
        return
    try:
        full = torch.broadcast_shapes(shape[:-1], x.shape[:-1])
    except RuntimeError:
        raise ValueError(
            f"qkfuse: {tname} of shape {tuple(shape)} does not broadcast to {name} {tuple(x.shape)} "
            f"(too few or too many positions?)"
        ) from None
    if full != x.shape[:-1]:
        raise ValueError(f"qkfuse: {tname} {tuple(shape)} is larger than {name} {tuple(x.shape)}")


def check_inputs(x, weight, cos, sin, recipe: Recipe, name: str = "x", rope_shape=None, bias=None) -> None:
    """Validate one tensor's inputs against a recipe: metadata only (fake impls call it too).

    TypeError for a wrong type or dtype, ValueError (naming the argument) for anything else.
    ``rope_shape``: the shape cos/sin would have when they are not given as tensors (the cached
    op gathers them from a cache: positions.shape + [rotary_dim]). ``bias``: the norm's bias (the
    weight's shape).
    """
    check_recipe(recipe)
    check_tensor(x, name, None)
    if x.dim() < 2:
        raise ValueError(f"qkfuse: {name} must have at least 2 dims [..., head_dim], got {tuple(x.shape)}")
    head_dim = x.shape[-1]
    if head_dim == 0:
        raise ValueError(f"qkfuse: {name} has head_dim 0")
    hd = recipe.norm_heads_dim
    if hd and not -x.dim() <= hd <= -2:
        raise ValueError(f"qkfuse: norm_heads_dim={hd} is not a leading dim of {name} {tuple(x.shape)}")
    whd = recipe.weight_heads_dim
    if whd and not -x.dim() <= whd <= -2:
        raise ValueError(f"qkfuse: weight_heads_dim={whd} is not a leading dim of {name} {tuple(x.shape)}")
    if hd:
        shape, what = (x.shape[hd] * head_dim,), "heads * head_dim (norm across heads)"
    elif whd:
        shape, what = (x.shape[whd], head_dim), f"a row per head of dim {whd} (weight_heads_dim)"
    else:
        shape, what = (head_dim,), "per-head norm"
    for t, tname in ((weight, "weight"), (bias, "bias")):
        if t is None:
            continue
        if recipe.norm == "none":
            raise ValueError(f"qkfuse: a {tname} was given but norm='none'")
        check_tensor(t, f"{name} {tname}", x.device)
        if t.dim() != len(shape) or any(a != b for a, b in zip(t.shape, shape)):
            raise ValueError(f"qkfuse: {name} {tname} must have shape {list(shape)} ({what}), got {tuple(t.shape)}")
    rd = recipe.rotary_dim
    if rd < 0 or rd > head_dim or rd % 2:
        raise ValueError(f"qkfuse: rotary_dim must be even and in [0, {head_dim}], got {rd}")
    if rd and rope_shape is not None:
        if recipe.half_table:
            raise ValueError("qkfuse: half_table is for cos/sin tensors, not a cos/sin cache")
        if recipe.deinterleave_input:
            raise ValueError("qkfuse: deinterleave_input is for cos/sin tensors, not a cos/sin cache")
        check_table_shape(rope_shape, "positions (+ [rotary_dim])", x, name, rd)
    elif rd:
        if cos is None or sin is None:
            raise ValueError("qkfuse: rotary_dim > 0 needs cos and sin")
        for t, tname in ((cos, "cos"), (sin, "sin")):
            check_tensor(t, tname, x.device)
            if t is cos or t.shape != cos.shape:
                check_table_shape(t.shape, tname, x, name, rd, recipe.half_table)
    else:
        if cos is not None or sin is not None:
            raise ValueError("qkfuse: cos/sin were given but rotary_dim=0")
        if recipe.norm == "none":
            raise ValueError("qkfuse: nothing to do (norm='none' and rotary_dim=0)")


def check_eps_tensor(t, name: str) -> None:
    """A tensor eps (the pass's lifted module float): one float value, on any device."""
    if t is None:
        return
    check_tensor(t, name, None)
    if t.numel() != 1:
        raise ValueError(f"qkfuse: {name} must hold one value, got shape {tuple(t.shape)}")


def _hint(v) -> int:
    if isinstance(v, torch.SymInt):
        return v.node.hint if v.node.has_hint() else 8192
    return int(v)


def tensor_key(t):
    """What a launch plan or an input check depends on of a tensor (not its data or address):
    None, or (shape, strides, dtype, device). Only for concrete shapes (eager calls)."""
    return None if t is None else (tuple(t.shape), t.stride(), t.dtype, t.device)


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
