"""Shared test setup: Hypothesis profiles and small helpers.

Profiles: ``ci`` (default; bounded examples so the suite stays well under 20 minutes on 2 CPU
cores) and ``dev`` (many more examples): ``pytest --hypothesis-profile=dev``.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
               derandomize=False, print_blob=True)
settings.register_profile("ci", max_examples=40, **_COMMON)
settings.register_profile("dev", max_examples=400, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# dtype -> unit roundoff (half an ulp at 1.0): tolerances in the tests are multiples of it.
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch (Dynamo caches per code object)."""
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    yield
    torch._dynamo.reset()
