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
from tests.conftest import UNIT_ROUNDOFF


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


def _copy_graph(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of gm's graph on the same attributes: the pass rewrites gm's graph only, and
    deep-copying a graph's constant tensors can fail (e.g. Gemma3's, or a torch.tensor([-1]) index)."""
    return torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))


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
        original = _copy_graph(gm)
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


@dataclasses.dataclass
class CudaPassRun:
    rewritten: torch.fx.GraphModule  # the post-grad graph rewritten as on CUDA (not executable here)
    records: list

    @property
    def fused(self):
        return [r for r in self.records if r.fused]

    def kernel_calls(self) -> list[torch.fx.Node]:
        return [n for n in self.rewritten.graph.nodes
                if n.op == "call_function" and "triton_kernel_wrapper" in str(n.target)]


def graph_tolerance(dtype: torch.dtype) -> float:
    """How far a rewritten graph may be from the unfused one, at the tensor's scale: float32 1e-6
    (the sum of squares in another order), 16-bit two units of its rounding (a flipped tie; RoPE's
    sum carries two)."""
    return 1e-6 if dtype == torch.float32 else 2 * UNIT_ROUNDOFF[dtype]


def assert_equal_to_graph(run: PassRun, dtype: torch.dtype, context=None) -> None:
    """The rewritten graph's outputs equal the unfused graph's within graph_tolerance(dtype)."""
    tol = graph_tolerance(dtype)
    for out, ref in zip(run.out, run.ref):
        assert out.shape == ref.shape and out.dtype == ref.dtype, context
        assert scale_error(out, ref) <= tol, (context, scale_error(out, ref))


def assert_no_worse_than_graph_in_float64(run: PassRun, ref64, dtype: torch.dtype, tol: float | None = None) -> None:
    """Against the float64 module's outputs, each rewritten output is no further than the unfused
    graph's, but for `tol` (default graph_tolerance(dtype)) at the tensor's scale."""
    tol = graph_tolerance(dtype) if tol is None else tol
    for out, ref, r64 in zip(run.out, run.ref, ref64):
        assert scale_error(out, r64) <= scale_error(ref, r64) + tol, (scale_error(out, r64), scale_error(ref, r64))


def static_widths(args) -> None:
    """Mark every tensor's last dim static (head widths come from Linear weights and configs), so a
    dynamic=True trace makes only batch and sequence symbolic."""
    for t in args:
        torch._dynamo.mark_static(t, t.dim() - 1)


def assert_left_alone(run: PassRun, reason: str | None) -> None:
    """Nothing fused; every candidate refused with `reason` (None: no candidate at all); the outputs
    the unfused graph's, exactly."""
    assert run.fused == [], run.records
    if reason is None:
        assert run.records == [], run.records
    else:
        assert run.records and all(reason in r.reason for r in run.records), run.records
    for out, ref in zip(run.out, run.ref):
        assert scale_error(out, ref) == 0.0


def _as_fake_cuda(gm: torch.fx.GraphModule):
    """Give every node a fake CUDA value of its CPU value's shape, strides and dtype (static shapes):
    the pass then takes its CUDA path (the Triton kernel traced through wrap_triton)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()

    def convert(v):
        if isinstance(v, torch.Tensor):
            with mode:
                return torch.empty_strided(tuple(v.shape), tuple(v.stride()), dtype=v.dtype, device="cuda")
        if isinstance(v, (list, tuple)):
            return type(v)(convert(x) for x in v)
        return v

    for n in gm.graph.nodes:
        if "val" in n.meta:
            n.meta["val"] = convert(n.meta["val"])
    return mode


def run_pass_as_cuda(fn, *args, options: Options | None = None) -> CudaPassRun:
    """The last (with fullgraph=True: the only) graph of :func:`cuda_pass_runs`."""
    return cuda_pass_runs(fn, *args, options=options, fullgraph=True)[-1]


def cuda_pass_runs(fn, *args, options: Options | None = None, fullgraph: bool = False,
                   **kwargs) -> list[CudaPassRun]:
    """The pass on fn's post-grad graph as it would run on CUDA: traced on CPU, the values made
    fake CUDA tensors, Triton's front end pointed at a stand-in CUDA target (it only generates
    TTIR, for torch's analysis of what the kernel writes). Then Inductor's reinplace pass, which
    decides which kernel arguments are cloned."""
    from unittest import mock

    import triton
    from torch._inductor.fx_passes import reinplace
    from triton.backends.compiler import GPUTarget

    class Target:
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    captured = []

    def inner(gm, example_inputs, **kwargs):
        _prepare(gm)
        original = _copy_graph(gm)  # what runs (on CPU), so that the compile completes
        mode = _as_fake_cuda(gm)
        from torch._guards import TracingContext

        # the compile's own (CPU) fake mode is what the pass's tracing would pick up otherwise
        with mock.patch.object(triton.runtime.driver, "_active", Target()), mode, \
                mock.patch.object(TracingContext.get(), "fake_mode", mode):
            records = fuse.run(gm.graph, options or Options())
            gm.graph.lint()
            # the core of Inductor's reinplace pass (its wrapper's signature differs across versions)
            getattr(reinplace, "reinplace_inplaceable_ops_core", reinplace.reinplace_inplaceable_ops)(gm.graph)
        captured.append(CudaPassRun(gm, records))
        return make_boxed_func(original)

    def backend(gm, example_inputs):
        return compile_fx(gm, example_inputs, inner_compile=inner)

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(fn, backend=backend, fullgraph=fullgraph)(*args, **kwargs)
    return captured
