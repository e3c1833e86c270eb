"""What torch's analysis of our Triton kernel says it writes: that decides what Inductor clones.

Inductor launches the spliced kernel through ``triton_kernel_wrapper_functional``, which clones
every argument the kernel may write unless the reinplace pass proves the clone unneeded. torch finds
the written arguments by walking the kernel's TTIR back from its stores. A store in a tile that
cannot run, or an output pointer aliasing another argument, shows up there as extra clones and
copy kernels in the generated code (seen on the H200: two ``as_strided_clone`` kernels per call).
The analysis needs only Triton's front end, so it runs here with a stand-in CUDA target.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch

triton = pytest.importorskip("triton")
tkw = pytest.importorskip("torch._higher_order_ops.triton_kernel_wrap")

from qkfuse.kernels import triton_norm_rope as tk  # noqa: E402
from qkfuse.ops.recipe import Recipe  # noqa: E402

KERNEL = tk.qk_norm_rope_kernel
D = 64


class _Target:
    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)


def written(*args, **kwargs) -> set[str]:
    """Names of the kernel arguments torch's analysis says a launch(*args, **kwargs) writes."""
    captured = {}

    class Capture:
        def __getitem__(self, grid):
            def run(*a, **kw):
                captured.update(zip(KERNEL.arg_names, a))
                captured.update({k: v for k, v in kw.items() if k in KERNEL.arg_names})
            return run

    with mock.patch.object(tk, "qk_norm_rope_kernel", Capture()):
        tk.launch(*args, **kwargs)
    with mock.patch.object(triton.runtime.driver, "_active", _Target()):
        if hasattr(tkw, "identify_accessed_tensors"):  # torch 2.13
            writes = tkw.identify_accessed_tensors(KERNEL, captured, {}).read_writes.writes
            return {d.name for d in writes}
        return set(tkw.identify_mutated_tensors(KERNEL, captured, {}))


def _inputs():
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g).bfloat16()  # noqa: E731
    q, k = r(2, 5, 4, D).transpose(1, 2), r(2, 5, 2, D).transpose(1, 2)
    return q, k, r(D), r(D), r(2, 1, 5, D), r(2, 1, 5, D)


RECIPE = Recipe(norm="rms", cast_before_weight=True, norm_dtype=torch.bfloat16, rope_dtype=torch.bfloat16,
                out_dtype=torch.bfloat16, rotary_dim=D)


def test_q_and_k_write_only_their_outputs():
    q, k, qw, kw, cos, sin = _inputs()
    assert written(q, k, qw, kw, cos, sin, 1e-6, 1e-6, RECIPE) == {"qo_ptr", "ko_ptr"}


def test_a_single_tensor_writes_only_its_output():
    q, _, qw, _, cos, sin = _inputs()
    assert written(q, None, qw, None, cos, sin, 1e-6, 1e-6, RECIPE) == {"qo_ptr"}


def test_a_cache_write_writes_q_and_the_caches():
    """Not the positions, though they feed the store addresses (they are loaded where they are used:
    through a helper's result the analysis would count them as written, and Inductor clone them)."""
    q, k, qw, kw, cos, sin = _inputs()
    k_cache, v_cache = torch.randn(2, 2, 16, D).bfloat16(), torch.randn(2, 2, 16, D).bfloat16()
    target = tk.CacheTarget(k_cache, torch.arange(5), 2, k.clone(), v_cache)
    assert written(q, k, qw, kw, cos, sin, 1e-6, 1e-6, RECIPE, cache=target) == {"qo_ptr", "ko_ptr", "vo_ptr"}
