"""Shared test setup: Hypothesis profiles, strict errors and small helpers.

Profiles: ``ci`` (default; bounded examples so the suite stays well under 20 minutes on 2 CPU
cores; derandomized, so every run of a clean clone tries the same examples) and ``dev`` (many more,
random examples): ``pytest --hypothesis-profile=dev`` or ``HYPOTHESIS_PROFILE=dev``. No health
check is suppressed here: a test that needs one off says so itself.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

# The pass re-raises errors met on a site instead of leaving it unfused (Options.strict_errors):
# a bug must fail its test, not pass as a refused site. Subprocesses of tests inherit it.
os.environ.setdefault("QKFUSE_STRICT", "1")

# Every field that differs between the two is spelled out, on Hypothesis' own defaults as parent:
# with CI=true in the environment Hypothesis makes its built-in "ci" profile (derandomized, too_slow
# suppressed) the default, and a profile registered without a parent would inherit from it.
_COMMON = dict(parent=settings.get_profile("default"), deadline=None, print_blob=True, suppress_health_check=())
settings.register_profile("ci", max_examples=40, derandomize=True, database=None, **_COMMON)
settings.register_profile("dev", max_examples=400, derandomize=False, **_COMMON)
# --hypothesis-profile (Hypothesis' pytest plugin, applied after this file loads) overrides this.
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# dtype -> unit roundoff (half an ulp at 1.0): tolerances in the tests are multiples of it.
UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def coarsest_rounding(recipe, x_dtype: torch.dtype, has_weight: bool) -> torch.dtype:
    """The coarsest dtype a fused call's recipe rounds to (its spacing sets the tolerance)."""
    dts = [recipe.out_dtype]
    norm_x = recipe.norm_input_dtype(x_dtype)
    if recipe.rope_first:
        dts.append(norm_x)
    if recipe.norm == "rms":
        dts.append(recipe.norm_dtype)
        if has_weight and recipe.cast_before_weight:
            dts.append(norm_x)
    if recipe.rotary_dim:
        dts.append(recipe.rope_dtype)
    return max(dts, key=lambda dt: UNIT_ROUNDOFF[dt])


@pytest.fixture(autouse=True)
def _fresh_compiles():
    """Each test compiles from scratch: Dynamo caches per code object, and an FX-graph or AOT
    cache hit skips the post-grad passes (so the pass would not run and its counters stay 0).
    The caches themselves are tested in fresh processes (tests/test_cache.py)."""
    from torch._dynamo.utils import counters
    from torch._functorch import config as functorch_config
    from torch._inductor import config as inductor_config

    torch._dynamo.reset()
    counters.clear()
    with inductor_config.patch(fx_graph_cache=False), functorch_config.patch(enable_autograd_cache=False):
        yield
    torch._dynamo.reset()
