"""User entry points: the ``"qkfuse"`` torch.compile backend, ``@qkfuse.fuse`` and ``qkfuse.optimize``.

The backend is Inductor (``compile_fx``) with the qkfuse pass installed as
``post_grad_custom_pre_pass`` for this compile only (config patches, never global config). It is
registered through the ``torch_dynamo_backends`` entry point alone: this module must not call
``register_backend("qkfuse")`` at import, or the entry-point lookup asserts on a duplicate name.
"""

from __future__ import annotations

import functools
import logging
import warnings

import torch

from . import ops  # noqa: F401  (registers the qkfuse:: ops; cached graphs call them)
from .options import split_options
from .passes.manager import QKFusePass

log = logging.getLogger("qkfuse")

_HOOK = "post_grad_custom_pre_pass"
_STATIC_LAUNCH = "static_launch_user_defined_triton_kernels"


class _ComposedPass:
    """Several user passes given as a list (torch 2.13 allows lists; 2.11 takes one object)."""

    def __init__(self, passes):
        self.passes = list(passes)

    def __call__(self, graph):
        for p in self.passes:
            p(graph)

    def uuid(self):
        uuids = [getattr(p, "uuid", lambda: None)() for p in self.passes]
        return None if not all(uuids) else "|".join(map(str, uuids))


def _inductor_patches(mode: str | None, inductor_options: dict) -> dict:
    from torch._inductor import config as inductor_config
    from torch._inductor import list_mode_options

    patches = dict(list_mode_options(mode)) if mode and mode != "default" else {}
    known = inductor_config.get_config_copy()
    for key, value in inductor_options.items():
        name = key.replace("-", "_")
        if name not in known:
            raise RuntimeError(f"qkfuse: unknown Inductor option {key!r} (qkfuse's own options start with 'qkfuse.')")
        patches[name] = value
    return patches


def make_pass(options: dict | None = None, user_pass=None) -> QKFusePass:
    ours, rest = split_options(options)
    if rest:
        raise ValueError(f"qkfuse.pass_() takes only qkfuse options, got {sorted(rest)}")
    return QKFusePass(ours, user_pass)


def qkfuse_backend(gm: torch.fx.GraphModule, example_inputs, *, mode: str | None = None,
                   options: dict | None = None, **unused):
    """torch.compile backend: Inductor plus the qkfuse post-grad pass.

    ``mode`` and ``options`` are those of torch.compile; options starting with ``qkfuse.`` are
    the pass's (``qkfuse.enable``, ``qkfuse.kernels``, ``qkfuse.families``), the rest go to Inductor.
    """
    from torch._inductor import config as inductor_config
    from torch._inductor.compile_fx import compile_fx

    ours, rest = split_options(options)
    patches = _inductor_patches(mode, rest)
    user_pass = patches.pop(_HOOK, None) or inductor_config.post_grad_custom_pre_pass
    if isinstance(user_pass, (list, tuple)):
        user_pass = _ComposedPass(user_pass)
    if isinstance(user_pass, QKFusePass):  # already ours (e.g. set globally): keep its user pass
        user_pass = user_pass.user_pass
    patches[_HOOK] = QKFusePass(ours, user_pass)
    # Launch our Triton kernel with Inductor's C++ static launcher, as Inductor's own kernels are:
    # Triton's Python launcher costs tens of microseconds per call for a kernel with many args.
    if _STATIC_LAUNCH in inductor_config.get_config_copy():
        patches.setdefault(_STATIC_LAUNCH, True)
    return compile_fx(gm, example_inputs, config_patches=patches)


def _reset() -> None:
    from torch._inductor import config as inductor_config

    if inductor_config.triton.cudagraphs or torch.cuda.is_available():
        try:
            from torch._inductor.cudagraph_trees import reset_cudagraph_trees

            reset_cudagraph_trees()
        except Exception:  # nothing to reset on machines without CUDA graphs
            pass


qkfuse_backend.reset = _reset


def register() -> None:
    """Register the backend by hand (source checkouts without the installed entry point). Idempotent."""
    from torch._dynamo.backends import registry

    if "qkfuse" not in registry._COMPILER_FNS:
        registry.register_backend(qkfuse_backend, name="qkfuse")


def _compile_kwargs(dynamic, mode, options, fullgraph=False) -> dict:
    split_options(options)  # validate early, at decoration time
    kw = dict(backend=qkfuse_backend, dynamic=dynamic, fullgraph=fullgraph)
    if mode is not None and options:
        # torch.compile refuses mode= with options=: pass the mode's Inductor options merged with
        # the caller's (which win), as options alone.
        from torch._inductor import list_mode_options

        kw["options"] = {**list_mode_options(mode), **options}
    elif mode is not None:
        kw["mode"] = mode
    elif options:
        kw["options"] = options
    return kw


def _warn_if_training(modules, what: str) -> None:
    """One warning per call: training graphs save the norm/RoPE intermediates for backward, so the
    pass leaves every site alone there and the user gets Inductor without the fusion."""
    if any(m.training for m in modules):
        warnings.warn(
            f"{what}: the model is in training mode. qkfuse fuses nothing in modules run with grad enabled "
            "(training graphs save the norm and RoPE intermediates for backward); for inference call "
            "model.eval() and run it under torch.no_grad() or torch.inference_mode().",
            stacklevel=3)


def fuse(obj=None, *, dynamic: bool | None = None, mode: str | None = None, options: dict | None = None,
         fullgraph: bool = False):
    """Compile with the qkfuse backend. Works on an nn.Module class, an instance, or a function.

    - ``@qkfuse.fuse class MyAttention(nn.Module)``: every instance's forward is compiled;
    - ``qkfuse.fuse(module)``: this instance, in place (returns it);
    - ``@qkfuse.fuse def f(...)``: the function;
    - ``@qkfuse.fuse(dynamic=True, options={...})``: the same with torch.compile arguments.
    """
    if obj is None:
        return functools.partial(fuse, dynamic=dynamic, mode=mode, options=options, fullgraph=fullgraph)
    kw = _compile_kwargs(dynamic, mode, options, fullgraph)
    if isinstance(obj, type):
        if not issubclass(obj, torch.nn.Module):
            raise TypeError(f"qkfuse.fuse: a class must be an nn.Module subclass, got {obj.__name__}")
        if obj.__dict__.get("_qkfuse_fused"):
            return obj
        forward = obj.forward
        obj.forward = functools.wraps(forward)(torch.compile(forward, **kw))
        obj._qkfuse_fused = True
        return obj
    if isinstance(obj, torch.nn.Module):
        if not getattr(obj, "_qkfuse_fused", False):
            _warn_if_training([obj], "qkfuse.fuse")
            obj.compile(**kw)
            obj._qkfuse_fused = True
        return obj
    if callable(obj):
        return torch.compile(obj, **kw)
    raise TypeError(f"qkfuse.fuse: cannot compile {type(obj).__name__}")


def _is_attention(module: torch.nn.Module) -> bool:
    name = type(module).__name__
    return name.endswith("Attention") or name.endswith("Attn") or (
        hasattr(module, "q_norm") and hasattr(module, "k_norm")
    )


def compile_regions(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules optimize() compiles: each repeated block (an element of a ModuleList) that holds
    an attention module, else the attention modules themselves, else the whole model."""
    attention = [m for m in model.modules() if _is_attention(m)]
    if not attention:
        return [model]
    blocks = []
    seen = set()
    for ml in model.modules():
        if not isinstance(ml, torch.nn.ModuleList):
            continue
        for block in ml:
            if id(block) in seen or any(id(b) in seen for b in block.modules()):
                continue
            if any(_is_attention(m) for m in block.modules()):
                blocks.append(block)
                seen.update(id(m) for m in block.modules())
    covered = {id(m) for b in blocks for m in b.modules()}
    blocks += [a for a in attention if id(a) not in covered and not any(id(p) in covered for p in a.modules())]
    # an attention inside another chosen attention is covered by it
    chosen_ids = set()
    out = []
    for b in blocks:
        if id(b) in chosen_ids:
            continue
        out.append(b)
        chosen_ids.update(id(m) for m in b.modules())
    return out


def optimize(model: torch.nn.Module, *, dynamic: bool | None = None, mode: str | None = None,
             options: dict | None = None) -> torch.nn.Module:
    """Drop-in for unmodified transformers / diffusers models: compile each decoder/transformer
    block that holds attention (regional compilation: one compile serves all layers) with the
    qkfuse backend, in place. Idempotent; returns the model."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"qkfuse.optimize expects an nn.Module, got {type(model).__name__}")
    if getattr(model, "_qkfuse_optimized", False):
        return model
    kw = _compile_kwargs(dynamic, mode, options)
    regions = compile_regions(model)
    _warn_if_training([model, *regions], "qkfuse.optimize")
    for region in regions:
        if not getattr(region, "_qkfuse_fused", False):
            region.compile(**kw)
            region._qkfuse_fused = True
    log.info("qkfuse.optimize: compiled %d region(s) of %s", len(regions), type(model).__name__)
    model._qkfuse_optimized = True
    return model
