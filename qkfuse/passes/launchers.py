"""The callables a replacement traces and splices in (see splice.py), one per kernel choice.

``launcher(kernel, group)`` returns ``(fn, args)``: ``fn`` takes the tensors of ``args`` (graph
nodes: the placeholders of the trace) and returns one value per target of the group's sites, in
order (``Site.targets``): the RoPE output of a site, or for a site that absorbs a KV-cache write
the updated key cache (and value cache). Everything else is bound in the closure.

- ``triton``: the Triton kernel through ``wrap_triton`` (Inductor launches it directly); it
  writes absorbed cache rows itself.
- ``inline``: the reference recipe as plain torch ops, which Inductor compiles with the rest of the
  graph (the CPU path: an opaque call there would cost more than it saves).
- ``reference`` / ``flashinfer``: the ``qkfuse::`` custom ops (opaque calls).
The last two replay an absorbed cache write as the graph wrote it.
"""

from __future__ import annotations

import torch
from torch.fx import Node

from ..patterns import canon
from ..patterns.family import ComplexPart, ConcatSite
from ..patterns.norm_rope import Site

aten = torch.ops.aten


def _eps_parts(eps):
    """(float, tensor node or None) for the op's eps / eps_tensor arguments."""
    return (0.0, eps) if isinstance(eps, Node) else (float(eps), None)


class _Inputs:
    """Collects a group's graph inputs as trace arguments, once each (a node used twice, e.g. one
    cos for q and k, is one placeholder), and binds the traced tensors back by name."""

    def __init__(self):
        self.nodes: list[Node] = []
        self.names: dict[str, int] = {}

    def add(self, name: str, node):
        if isinstance(node, Node):
            if node not in self.nodes:
                self.nodes.append(node)
            self.names[name] = self.nodes.index(node)

    def add_site(self, tag: str, s):
        """A site's x, weight, bias and tensor eps as <tag>_x, <tag>_weight, <tag>_bias, <tag>_eps_t."""
        self.add(f"{tag}_x", s.x)
        self.add_param(f"{tag}_weight", s.weight)
        self.add_param(f"{tag}_bias", s.bias)
        self.add(f"{tag}_eps_t", _eps_parts(s.eps)[1])

    def add_param(self, name: str, param):
        """A weight or bias: one node, or one node per head (stacked into [H, D] by `bind`)."""
        if isinstance(param, tuple):
            for i, n in enumerate(param):
                self.add(f"{name}#{i}", n)
            self.stacked = {**getattr(self, "stacked", {}), name: len(param)}
        else:
            self.add(name, param)

    def add_table(self, name: str, table):
        """cos or sin: a node, or a ComplexPart (the real or imaginary part of complex frequencies),
        which `bind` takes as ``view_as_real(freqs)[..., part]``: a strided view, no copy.

        A table that is a same-pointer view of another tensor (HF's ``cos.unsqueeze(1)``) comes in as
        that tensor, the view rebuilt by `bind` (as ``<name>``, its root as ``<name>#base``): a kernel
        that takes the base as its pointer leaves Inductor no view to build per call."""
        if isinstance(table, ComplexPart):
            self.add(f"{name}#complex", table.of)
            self.parts = {**getattr(self, "parts", {}), name: table.part}
            return
        root, chain = canon.same_pointer_views(table)
        if chain:
            self.add(f"{name}#base", root)
            self.views = {**getattr(self, "views", {}), name: chain}
        else:
            self.add(name, table)

    def bind(self, tensors, rows: bool = False) -> dict:
        """Name -> traced tensor; weights and biases become [H, D] with `rows` (a row per head: stacked
        per-head nodes, or an [H, 1, D] one flattened), else [D] (or [H * D] across heads)."""
        t = {name: tensors[i] for name, i in self.names.items()}
        for name, n in getattr(self, "stacked", {}).items():
            t[name] = torch.stack([t.pop(f"{name}#{i}") for i in range(n)])
        for name, part in getattr(self, "parts", {}).items():
            t[name] = torch.view_as_real(t.pop(f"{name}#complex")).select(-1, part)
        for name, chain in getattr(self, "views", {}).items():
            x = t[f"{name}#base"]
            for op, args, kwargs in chain:
                x = op(x, *args, **kwargs)
            t[name] = x
        return _params_as(t, ("q", "k"), rows)


def _params_as(t: dict, tags, rows: bool) -> dict:
    """t with the weights and biases of `tags` ("q": q_weight, q_bias) as [H, D] with `rows`, else
    [D] ([1, .., 1, D] -> [D])."""
    for name in (f"{tag}_{p}" for tag in tags for p in ("weight", "bias")):
        if name in t and t[name].dim() != (2 if rows else 1):
            t[name] = t[name].reshape(-1, t[name].shape[-1]) if rows else t[name].reshape(-1)
    return t


def launcher(kernel: str, group: tuple[Site, ...]):
    """(fn, arg nodes) computing the fused call for `group` (q, or q and k) with `kernel`."""
    if isinstance(group[0], ConcatSite):
        return _concat_launcher(kernel, group)
    q = group[0]
    k = group[1] if len(group) > 1 else None
    recipe = q.recipe
    ins = _Inputs()
    for tag, s in (("q", q), ("k", k)):
        if s is None:
            continue
        ins.add_site(tag, s)
        if s.cache is not None:
            ins.add("cache", s.cache.cache)
            ins.add("index", s.cache.index)
            if s.cache.v is not None:
                ins.add("v", s.cache.v.src)
                ins.add("v_cache", s.cache.v.cache)
    ins.add_table("cos", q.cos)
    ins.add_table("sin", q.sin)
    cached = k if k is not None else q  # the one site that may absorb a cache write
    cw = cached.cache
    q_eps = _eps_parts(q.eps)[0]
    k_eps = _eps_parts(k.eps)[0] if k is not None else 0.0

    def inputs(t):
        qx = q.op_input(t["q_x"])
        kx = None if k is None else k.op_input(t["k_x"])
        v = None if cw is None or cw.v is None else t["v"].permute(cw.v.perm)
        return qx, kx, v

    if kernel == "triton":
        from ..kernels import triton_norm_rope as tk

        # Outputs laid out as the unfused graph's were: Inductor planned their consumers (and the
        # graph's outputs) with those strides, size-1 dims included; any other layout costs a copy.
        strides = tuple(None if s is None or s.cache is not None else _dense_strides_of(s.anchor)
                        for s in (q, k))

        def fn(*tensors):
            t = ins.bind(tensors, rows=bool(recipe.weight_heads_dim))
            qx, kx, v = inputs(t)
            qe = q_eps if "q_eps_t" not in t else t["q_eps_t"].item()
            ke = k_eps if "k_eps_t" not in t else t["k_eps_t"].item()
            kv = None
            if cw is not None:
                kv = tk.CacheTarget(t["cache"], t["index"], cw.dim, v, t.get("v_cache"))
            # the inputs before their permutes (same data pointer) as the kernel's pointers
            bases = {name: t[key] for name, key in (("q", "q_x"), ("k", "k_x"), ("v", "v"),
                                                    ("cos", "cos#base"), ("sin", "sin#base")) if key in t}
            qo, ko = tk.launch(qx, kx, t.get("q_weight"), t.get("k_weight"), t.get("cos"), t.get("sin"),
                               qe, ke, recipe, traceable=True, cache=kv, out_strides=strides, bases=bases,
                               q_bias=t.get("q_bias"), k_bias=t.get("k_bias"))
            if kv is None:
                return (qo,) if ko is None else (qo, ko)
            caches = (kv.cache,) + ((kv.v_cache,) if kv.v is not None else ())
            return ((qo,) if k is not None else ()) + caches  # the cached tensor's rows went into the cache

        return fn, ins.nodes

    if kernel in ("inline", "reference", "flashinfer"):
        def fn(*tensors):
            t = ins.bind(tensors, rows=bool(recipe.weight_heads_dim))
            qx, kx, v = inputs(t)
            qo, ko = _unfused_call(kernel, t, qx, kx, recipe, q_eps, k_eps)
            if cw is None:
                return (qo,) if ko is None else (qo, ko)
            written = ko if k is not None else qo
            caches = [_replay_write(cw.node, t["cache"], t["index"], written)]
            if cw.v is not None:
                caches.append(_replay_write(cw.v.node, t["v_cache"], t["index"], v))
            return (*([qo] if k is not None else []), *caches)

        return fn, ins.nodes

    raise ValueError(f"qkfuse: unknown kernel {kernel!r}")


def _unfused_call(kernel: str, t: dict, qx, kx, recipe, q_eps: float, k_eps: float):
    """(q out, k out or None) of the recipe on qx (and kx) as plain torch ops (``inline``), the
    ``qkfuse::`` reference op, or flashinfer's kernels; t: the call's tensors by name."""
    if kernel == "inline":
        from ..kernels.reference import norm_rope_reference

        qo = norm_rope_reference(qx, t.get("q_weight"), t.get("cos"), t.get("sin"), t.get("q_eps_t", q_eps), recipe,
                                 dense_layout=False, bias=t.get("q_bias"))
        ko = None if kx is None else norm_rope_reference(
            kx, t.get("k_weight"), t.get("cos"), t.get("sin"), t.get("k_eps_t", k_eps), recipe,
            dense_layout=False, bias=t.get("k_bias"))
        return qo, ko
    if kernel == "flashinfer":
        from ..kernels import flashinfer as fi

        named = dict(q=qx, k=kx, q_weight=t.get("q_weight"), k_weight=t.get("k_weight"),
                     cos=t.get("cos"), sin=t.get("sin"))
        outs = fi.norm_rope_call(named, q_eps, k_eps, recipe)
        return outs[0], (outs[1] if kx is not None else None)
    op_args = recipe.op_args()
    if kx is None:
        return torch.ops.qkfuse.norm_rope.default(
            qx, t.get("q_weight"), t.get("cos"), t.get("sin"), q_eps, t.get("q_eps_t"), *op_args,
            t.get("q_bias")), None
    return torch.ops.qkfuse.qk_norm_rope.default(
        qx, kx, t.get("q_weight"), t.get("k_weight"), t.get("cos"), t.get("sin"), q_eps, k_eps,
        t.get("q_eps_t"), t.get("k_eps_t"), *op_args, t.get("q_bias"), t.get("k_bias"))


def _concat_launcher(kernel: str, group: tuple[ConcatSite, ...]):
    """(fn, arg nodes) for a group of ConcatSites: part i of q with part i of k in one launch, each
    writing its rows of the whole outputs (Triton: in place, the later launches writing into the
    buffers the first allocated; the other kernels: their outputs concatenated)."""
    q = group[0]
    k = group[1] if len(group) > 1 else None
    n_parts = len(q.parts)
    ins = _Inputs()
    for i in range(n_parts):
        for tag, s in (("q", q), ("k", k)):
            if s is not None:
                ins.add_site(f"{tag}{i}", s.parts[i])
    ins.add_table("cos", q.cos)
    ins.add_table("sin", q.sin)
    dim = q.cat_dim
    out_dtype = q.recipe.out_dtype
    strides = tuple(None if s is None else _dense_strides_of(s.anchor) for s in (q, k))
    # per part: (q's, k's) float eps (a tensor eps is read from the call's tensors)
    float_eps = [tuple(_eps_parts(s.parts[i].eps)[0] if s is not None else 0.0 for s in (q, k))
                 for i in range(n_parts)]

    def part_call(t: dict, i: int, start, length) -> dict:
        """Part i's tensors under the names of one (q, k) call: x, weights, biases, eps, its cos/sin rows."""
        named = {}
        for tag in ("q", "k"):
            for name in ("weight", "bias", "eps_t"):
                if f"{tag}{i}_{name}" in t:
                    named[f"{tag}_{name}"] = t[f"{tag}{i}_{name}"]
        rows = q.parts[i].rows
        for name in ("cos", "sin"):
            table = t.get(name) if q.parts[i].recipe.rotary_dim else None  # (a part left unrotated)
            if table is not None and rows.table_dim is not None:
                table = table.narrow(rows.table_dim, start, length)
            named[name] = table
        return _params_as(named, ("q", "k"), bool(q.parts[i].recipe.weight_heads_dim))

    def fn(*tensors):
        t = ins.bind(tensors)
        xs = [(q.parts[i].op_input(t[f"q{i}_x"]), None if k is None else k.parts[i].op_input(t[f"k{i}_x"]))
              for i in range(n_parts)]
        lengths = [qx.shape[dim] for qx, _ in xs]
        starts = [sum(lengths[:i]) for i in range(n_parts)]
        if kernel != "triton":
            outs = []
            for i, (qx, kx) in enumerate(xs):
                outs.append(_unfused_call(kernel, part_call(t, i, starts[i], lengths[i]), qx, kx, q.parts[i].recipe,
                                          *float_eps[i]))
            qo = torch.cat([o[0] for o in outs], dim)
            return (qo,) if k is None else (qo, torch.cat([o[1] for o in outs], dim))
        from ..kernels import triton_norm_rope as tk

        def whole(x, strides):
            shape = list(x.shape)
            shape[dim] = sum(lengths)
            if strides is None:
                return torch.empty(shape, dtype=out_dtype, device=x.device)
            return torch.empty_strided(shape, strides, dtype=out_dtype, device=x.device)

        qo = whole(xs[0][0], strides[0])
        ko = None if k is None else whole(xs[0][1], strides[1])
        for i, (qx, kx) in enumerate(xs):
            p = q.parts[i]
            named = part_call(t, i, starts[i], lengths[i])
            views = tuple(None if o is None else o.narrow(dim, starts[i], lengths[i]) for o in (qo, ko))
            # the whole inputs, tables and outputs as the kernel's pointers, this part's rows at an
            # offset (a part of a norm_slice_rope site reads its rows of the one norm input)
            bases = {"q": t[f"q{i}_x"], "q_out": qo, **{name: t.get(f"{name}#base", t.get(name))
                                                      for name in ("cos", "sin")}}
            if k is not None:
                bases.update(k=t[f"k{i}_x"], k_out=ko)
            eps = [e if f"{tag}_eps_t" not in named else named[f"{tag}_eps_t"].item()
                   for e, tag in zip(float_eps[i], ("q", "k"))]
            tk.launch(qx, kx, named.get("q_weight"), named.get("k_weight"), named["cos"], named["sin"], *eps,
                      p.recipe, traceable=True, out=views, bases=bases, q_bias=named.get("q_bias"),
                      k_bias=named.get("k_bias"))
        return (qo,) if k is None else (qo, ko)

    return fn, ins.nodes


def _dense_strides_of(node: Node):
    """node's strides if they lay its value out densely (no gaps, no overlap), else None."""
    from ..ops.recipe import _hint

    v = node.meta["val"]
    dims = sorted((d for d in range(v.dim()) if _hint(v.shape[d]) != 1), key=lambda d: _hint(v.stride(d)))
    expect = 1
    for d in dims:
        if _hint(v.stride(d)) != expect:
            return None
        expect *= _hint(v.shape[d])
    return tuple(v.stride())


def _replay_write(node: Node, cache, index, values):
    """The graph's own functional cache write, on the traced tensors."""
    if node.target is aten.index_copy.default:
        return aten.index_copy.default(cache, node.args[1], index, values)
    indices = [None] * (len(node.args[1]) - 1) + [index]
    return aten.index_put.default(cache, indices, values, *node.args[3:])
