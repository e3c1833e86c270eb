"""The qkfuse logger is one of torch's logs: TORCH_LOGS="+qkfuse" prints each graph before and after
the pass (DEBUG), TORCH_LOGS="qkfuse" the per-graph summary (INFO)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest

import qkfuse  # noqa: F401

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A fresh interpreter: TORCH_LOGS is read when torch is imported.
COMPILE_ATTENTION = textwrap.dedent("""
    import torch
    from tests.test_backend import Attention, inputs

    with torch.no_grad():
        torch.compile(Attention().eval(), backend="qkfuse")(*inputs())
""")


def test_qkfuse_is_a_registered_torch_log():
    from torch._logging._internal import log_registry

    assert log_registry.is_log("qkfuse")
    assert log_registry.log_alias_to_log_qnames["qkfuse"] == ["qkfuse"]


@pytest.mark.parametrize("setting, debug", [("+qkfuse", True), ("qkfuse", False)])
def test_torch_logs_env_var(tmp_path, setting, debug):
    env = {**os.environ, "TORCH_LOGS": setting, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path)}  # cold cache: the pass runs
    proc = subprocess.run([sys.executable, "-c", COMPILE_ATTENTION], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"qkfuse: graph \d+: 2 site\(s\) fused, 0 refused", proc.stderr), proc.stderr[-3000:]
    before = re.search(r"qkfuse: graph \d+ before:", proc.stderr)
    after = re.search(r"qkfuse: graph \d+ after:", proc.stderr)
    assert bool(before) is debug and bool(after) is debug, proc.stderr[-3000:]
    if debug:  # the graph itself follows the message
        assert "def forward(" in proc.stderr[before.end():after.start()]
