"""``python -m qkfuse demo``."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

import qkfuse.cli


@pytest.mark.slow
def test_demo_qwen3():
    pytest.importorskip("transformers")
    proc = subprocess.run([sys.executable, "-m", "qkfuse", "demo", "--model", "qwen3", "--iters", "3"],
                          capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert re.search(r"^graph\s+node\s+family\s.*kernel / reason$", proc.stdout, re.M), output  # explain's table
    fused = re.search(r"^fused sites: (\d+)", proc.stdout, re.M)
    assert fused and int(fused.group(1)) > 0, output
    assert "qkfuse demo: ok" in proc.stdout, output


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given on a machine without CUDA")
def test_demo_cuda_unavailable(capsys):
    try:
        status = qkfuse.cli.main(["demo", "--device", "cuda"])
    except SystemExit as e:
        status = e.code
    assert status not in (0, None)
    err = capsys.readouterr().err
    assert "CUDA is not available" in err
    assert "Traceback" not in err
