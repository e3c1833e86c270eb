"""benchmarks/bench_models.py: the whole-model benchmark runs end to end on CPU (tiny models)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_models.py")


@pytest.mark.slow
def test_tiny_quick_prefill_writes_both_backends(tmp_path):
    pytest.importorskip("transformers")
    cmd = [sys.executable, SCRIPT, "--tiny", "--quick", "--models", "qwen3", "--cases", "prefill",
           "--shapes", "1x32", "--rounds", "2", "--out", str(tmp_path), "--tag", "smoke"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"))
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    doc = json.loads((tmp_path / "smoke.json").read_text())
    assert doc["meta"]["torch"] and doc["meta"]["transformers"], doc["meta"]
    (row,) = doc["rows"]
    assert "error" not in row, row
    assert (row["model"], row["case"], row["shape"]) == ("qwen3", "prefill", "1x32")
    for backend in ("inductor", "qkfuse"):
        assert len(row["raw"][backend]) == 2 and all(t > 0 for t in row["raw"][backend]), row["raw"]
    assert row["speedup"] == pytest.approx(row["median"]["inductor"] / row["median"]["qkfuse"])
    assert row["qkfuse_fused_sites"] == 2 * row["layers"], row  # q and k of every layer
    assert "| qwen3 (2 layers) | prefill | 1x32 |" in (tmp_path / "smoke.md").read_text()


def test_plan_runs_nothing_and_lists_cases():
    proc = subprocess.run([sys.executable, SCRIPT, "--plan", "--models", "qwen3,flux"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = {tuple(line.split()[:2]) for line in proc.stdout.splitlines()}
    assert ("fn", "fn64") in lines, proc.stdout
    for case in ("prefill", "generate", "decode_eager", "decode_graph"):
        assert ("qwen3", case) in lines, proc.stdout
    assert ("flux", "prefill") in lines and ("flux", "generate") not in lines, proc.stdout  # a DiT has no decode
