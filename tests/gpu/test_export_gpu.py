"""torch.export + AOTInductor on CUDA (issue 8.5): the package compiled with the pass installed
(``post_grad_custom_pre_pass=qkfuse.pass_()``) keeps the fused sites as the Triton kernel, and it
loads and runs in a fresh process that imports only torch and qkfuse, with eager's output.

    python -m pytest -q -m gpu tests/gpu/test_export_gpu.py
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch._dynamo.utils import counters

from tests.test_backend import Attention
from tests.test_export import attn_inputs, compile_package, run_fresh

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

# torch alone, no qkfuse: a two-layer MLP exported, packaged for CUDA and loaded back
_PLAIN_AOTI = r"""
import sys, tempfile, torch
m = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64)).cuda().eval()
x = torch.randn(4, 64, device="cuda")
with torch.no_grad():
    ep = torch.export.export(m, (x,))
    pkg = torch._inductor.aoti_compile_and_package(ep, package_path=tempfile.mkdtemp() + "/p.pt2")
    out = torch._inductor.aoti_load_package(pkg)(x)
    out = out[0] if isinstance(out, (list, tuple)) else out
    print("ok", float((out - m(x)).abs().max()))
"""


@pytest.fixture(scope="module")
def aoti_cuda_works():
    """Skip where torch itself cannot build and load a CUDA package. On the lent H200 (torch
    2.11.0+cu130) every package segfaulted at load, Inductor's own without qkfuse too, and so did
    this pure-torch script (benchmarks/diag_aoti_pure.py, benchmarks/results/2026-12-02-h200-*aoti*)."""
    p = subprocess.run([sys.executable, "-c", _PLAIN_AOTI], capture_output=True, text=True, timeout=600)
    if p.returncode != 0 or not p.stdout.startswith("ok"):
        pytest.skip(f"torch {torch.__version__} cannot compile and load an AOTInductor CUDA package on this "
                    f"machine without qkfuse (rc {p.returncode}): {p.stderr.strip()[-300:]}")


def test_export_aoti_cuda_runs_the_fused_kernel_in_a_fresh_process(tmp_path, aoti_cuda_works):
    torch.manual_seed(0)
    m = Attention().eval().cuda()
    # Dim.AUTO: on CUDA, SDPA's layout checks add guards (min(16*s, 32*s) == 16*s) that torch 2.11's
    # export cannot prove over a named Dim's range; AUTO keeps the dims dynamic and records the guards
    auto = torch.export.Dim.AUTO
    dims = {"h": {0: auto, 1: auto}, "cos": {0: auto, 1: auto}, "sin": {0: auto, 1: auto}}
    counters.clear()
    with torch.no_grad():
        example = tuple(t.cuda() for t in attn_inputs(2, 7))
        ep = torch.export.export(m, example, dynamic_shapes=dims)
        package, records = compile_package(ep, tmp_path / "attn_cuda.pt2")
        cases = []
        for x in (attn_inputs(2, 7, 1), attn_inputs(3, 12, 2), attn_inputs(5, 33, 3)):
            cases.append((x, m(*(t.cuda() for t in x)).cpu()))
    assert [r.fused for r in records] == [True, True], [(r.fused, r.reason) for r in records]
    assert all(r.reason.startswith("triton") for r in records), [r.reason for r in records]
    assert counters["qkfuse"]["norm_rope_calls"] == 1
    r = run_fresh(package, cases, tmp_path, device="cuda")  # counts launches of our Triton kernel
    assert r["imported"] == [], r
    assert r["our_calls"] == [1, 1, 1], r  # q and k in one launch, every shape
    assert all(e <= 1e-5 for e in r["rel_errs"]), r  # float32: the kernel rounds where the graph does
