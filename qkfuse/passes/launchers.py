"""The callables a replacement traces and splices in (see splice.py), one per kernel choice.

Each takes only tensors (placeholders of the trace); everything else is bound in the closure.
"""

from __future__ import annotations

import torch
from torch.fx import Node

from ..ops.recipe import Recipe


def launcher(kernel: str, recipe: Recipe, q, k, q_weight, k_weight, cos, sin,
             q_eps: float, k_eps: float, q_eps_t, k_eps_t):
    """(fn, arg nodes) computing the fused op for q (and k) with `kernel`."""
    named = dict(q=q, k=k, q_weight=q_weight, k_weight=k_weight, cos=cos, sin=sin,
                 q_eps_t=q_eps_t, k_eps_t=k_eps_t)
    present = [name for name, v in named.items() if isinstance(v, Node)]
    args = [named[name] for name in present]

    def bind(tensors):
        t = dict.fromkeys(named)
        t.update(zip(present, tensors))
        return t

    if kernel == "reference" or kernel == "flashinfer":
        op_args = recipe.op_args()

        def fn(*tensors):
            t = bind(tensors)
            if kernel == "flashinfer":
                from ..kernels import flashinfer as fi

                return fi.norm_rope_call(t, q_eps, k_eps, recipe)
            if t["k"] is None:
                return (torch.ops.qkfuse.norm_rope.default(
                    t["q"], t["q_weight"], t["cos"], t["sin"], q_eps, t["q_eps_t"], *op_args),)
            return torch.ops.qkfuse.qk_norm_rope.default(
                t["q"], t["k"], t["q_weight"], t["k_weight"], t["cos"], t["sin"], q_eps, k_eps,
                t["q_eps_t"], t["k_eps_t"], *op_args)

        return fn, args

    if kernel == "triton":
        from ..kernels import triton_norm_rope as tk

        def fn(*tensors):
            t = bind(tensors)
            qe = q_eps if t["q_eps_t"] is None else t["q_eps_t"].item()
            ke = k_eps if t["k_eps_t"] is None else t["k_eps_t"].item()
            qo, ko = tk.launch(t["q"], t["k"], t["q_weight"], t["k_weight"], t["cos"], t["sin"], qe, ke,
                               recipe, traceable=True)
            return (qo,) if ko is None else (qo, ko)

        return fn, args

    raise ValueError(f"qkfuse: unknown kernel {kernel!r}")
