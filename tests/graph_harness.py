"""Run the qkfuse pass on the real post-grad graph of a function, without Inductor codegen.

``compile_fx`` with a custom ``inner_compile`` stops right where Inductor would run its post-grad
passes; we apply the same preparation Inductor does before ``post_grad_custom_pre_pass``
(view_to_reshape, DCE, reorder_for_locality), run the qkfuse pass on a copy, and execute both the
original and the rewritten graph eagerly, op by op. ~0.3 s per function on CPU.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch._functorch.aot_autograd import make_boxed_func
from torch._inductor.compile_fx import compile_fx
from torch._inductor.fx_passes.post_grad import view_to_reshape

from qkfuse.options import Options
from qkfuse.passes import fuse


@dataclasses.dataclass
class PassRun:
    original: torch.fx.GraphModule  # the post-grad graph Inductor would give the pass
    rewritten: torch.fx.GraphModule
    records: list  # SiteRecords of the pass
    out: tuple  # outputs of the rewritten graph
    ref: tuple  # outputs of the original graph on the same inputs
    inputs: tuple  # the graph's inputs after the rewritten graph ran (it may write some: a KV cache)
    ref_inputs: tuple  # copies of the same inputs after the original graph ran on them

    @property
    def fused(self):
        return [r for r in self.records if r.fused]

    @property
    def refused(self):
        return [r for r in self.records if not r.fused]

    def count(self, target_name: str) -> int:
        """``"qkfuse.qk_norm_rope"`` / ``"qkfuse.norm_rope"`` / ``"qkfuse"``: the fused calls of that
        kind, whatever kernel serves them (on CPU they are spliced as plain torch ops, each node
        tagged with its call in ``meta["qkfuse"]``); else the untagged nodes calling `target_name`."""
        nodes = [n for n in self.rewritten.graph.nodes if n.op == "call_function"]
        if target_name.startswith("qkfuse"):
            op = target_name.partition(".")[2]
            calls = {n.meta["qkfuse"] for n in nodes if "qkfuse" in n.meta}
            return sum(1 for c in calls if not op or c.split("#")[0] == op)
        return sum(1 for n in nodes if "qkfuse" not in n.meta and target_name in str(n.target))


def _prepare(gm: torch.fx.GraphModule) -> None:
    """What compile_fx / post_grad_passes do before post_grad_custom_pre_pass (inference)."""
    from torch._inductor.fx_passes.post_grad import reorder_for_locality

    view_to_reshape(gm)
    gm.graph.eliminate_dead_code()
    reorder_for_locality(gm.graph)
    gm.recompile()


def run_pass(fn, *args, dynamic: bool = False, options: Options | None = None) -> PassRun:
    """Trace fn(*args) to post-grad ATen, run the pass, execute original and rewritten graphs."""
    options = options or Options()
    captured: list = []
    ref_outs: list = []

    def inner(gm, example_inputs, **kwargs):
        _prepare(gm)
        original = copy.deepcopy(gm)
        records = fuse.run(gm.graph, options)
        gm.graph.lint()
        gm.recompile()
        captured.append((original, gm, records))

        def both(*a):
            copies = [x.clone() if isinstance(x, torch.Tensor) else x for x in a]
            ref_outs.append((original(*copies), a, copies))
            return gm(*a)

        return make_boxed_func(both)

    def backend(gm, example_inputs):
        return compile_fx(gm, example_inputs, inner_compile=inner)

    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(fn, backend=backend, dynamic=dynamic, fullgraph=True)(*args)
    original, rewritten, records = captured[-1]
    ref, inputs, ref_inputs = ref_outs[-1]
    return PassRun(original, rewritten, records, tuple(out), tuple(ref), tuple(inputs), tuple(ref_inputs))


def scale_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|: the error at the tensor's scale (RoPE sums cancel near 0)."""
    o, r = out.double(), ref.double()
    return float((o - r).abs().max() / r.abs().max().clamp_min(1e-30)) if r.numel() else 0.0
