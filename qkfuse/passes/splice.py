"""Graph surgery: trace a Python callable on the graph's fake values and splice its nodes in.

This is how a replacement enters the post-grad graph. On CUDA the callable launches the Triton
kernel through ``torch.library.wrap_triton``; traced under ``torch.func.functionalize`` it becomes
``triton_kernel_wrapper_functional`` + getitem nodes, which Inductor lowers to a direct
``kernel.run(...)`` in its generated code (an opaque custom-op call would cost more than the
fusion saves). On CPU the callable is plain torch ops (the reference recipe), which Inductor
compiles into its C++ loops with the rest of the graph. Tracing happens in the graph's own fake mode, so symbolic sizes (dynamic=True) become ``sym_size`` nodes of this graph.
"""

from __future__ import annotations

import contextlib
import unittest.mock
from collections.abc import Callable, Sequence

import torch
from torch.fx import Node


def _fake_mode(vals):
    from torch._guards import detect_fake_mode

    return detect_fake_mode(vals)


def trace(fn: Callable, vals: Sequence) -> torch.fx.GraphModule:
    """make_fx of functionalize(fn) on fake values (those of the graph being rewritten), decomposed
    as Inductor's post-grad graphs are."""
    from torch._dispatch.python import enable_python_dispatcher
    from torch._inductor.decomposition import select_decomp_table
    from torch.fx.experimental.proxy_tensor import make_fx

    mode = _fake_mode(vals)
    # A 0-d eps tensor (dynamic=True lifts module floats to CPU inputs) is read with .item() by the
    # GPU launchers: an unbacked float in the graph, which Inductor reads on the host per call.
    scalars = contextlib.nullcontext()
    if getattr(mode, "shape_env", None) is not None and hasattr(mode, "allow_scalar_outputs"):
        scalars = unittest.mock.patch.object(mode, "allow_scalar_outputs", True)
    with mode if mode is not None else contextlib.nullcontext(), enable_python_dispatcher(), scalars:
        # Inductor's decompositions: the spliced ops must be ones its post-grad lowering takes
        gm = make_fx(torch.func.functionalize(fn), select_decomp_table(), tracing_mode="real")(*vals)
    # e.g. a second .item() of the same eps tensor: memoised, unused, and without the symbol
    # binding Inductor needs on every scalar node
    gm.graph.eliminate_dead_code()
    return gm


def insert(graph: torch.fx.Graph, gm: torch.fx.GraphModule, args: Sequence[Node], *, after: Node,
           meta_from: Node | None = None, tag: str | None = None) -> list:
    """Copy the traced nodes of `gm` into `graph` right after `after`, its placeholders bound to
    `args`; returns the nodes of its outputs. Nothing is left behind if copying fails.

    The trace's write-backs into its own inputs (``copy_(placeholder, new)``, what functionalize
    emits for a kernel that mutates an input such as a KV cache) are dropped: the traced outputs
    carry the new values, and the graph being rewritten keeps its own write-back."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(args):
        raise RuntimeError(f"qkfuse: traced {len(placeholders)} inputs for {len(args)} args")
    env: dict = dict(zip(placeholders, args))
    stack_trace = meta_from.meta.get("stack_trace") if meta_from is not None else None
    new_nodes: list[Node] = []
    outputs = None
    try:
        with graph.inserting_before(after.next):
            for n in gm.graph.nodes:
                if n.op == "placeholder":
                    continue
                if n.op == "output":
                    outputs = torch.fx.map_arg(n.args[0], lambda x: env[x])
                    continue
                if n.op != "call_function":
                    raise RuntimeError(f"qkfuse: cannot splice a {n.op} node ({n.format_node()})")
                if n.target is torch.ops.aten.copy_.default and n.args[0] in placeholders and not n.users:
                    continue
                new = graph.call_function(
                    n.target,
                    torch.fx.map_arg(n.args, lambda x: env[x]),
                    torch.fx.map_arg(n.kwargs, lambda x: env[x]),
                )
                new_nodes.append(new)
                for key in ("val", "tensor_meta", "unbacked_bindings"):
                    if key in n.meta:
                        new.meta[key] = n.meta[key]
                if stack_trace:
                    new.meta["stack_trace"] = stack_trace
                if tag is not None:
                    new.meta["qkfuse"] = tag
                env[n] = new
    except Exception:
        for new in reversed(new_nodes):
            graph.erase_node(new)
        raise
    return list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]


def insertion_point(graph: torch.fx.Graph, inputs: Sequence[Node], order: dict) -> Node:
    """The latest of `inputs` in graph order, but never among the placeholders (new nodes go after
    all of them)."""
    last_placeholder = None
    for n in graph.nodes:
        if n.op != "placeholder":
            break
        last_placeholder = n
    latest = max(inputs, key=order.__getitem__)
    return last_placeholder if latest.op == "placeholder" else latest


def erase_dead(graph: torch.fx.Graph, nodes: Sequence[Node]) -> None:
    """Erase the given nodes that have no users left, latest first."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    for n in sorted({n for n in nodes if n in order}, key=order.__getitem__, reverse=True):
        if not n.users and n.op == "call_function":
            graph.erase_node(n)
