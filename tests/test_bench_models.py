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


def _bench_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_models_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_paired_ratio_is_per_round_with_spread():
    bm = _bench_module()
    # Drift: round 2 is slow for both backends alike; the per-round ratio stays 1.02.
    raw = {"inductor": [10.2, 20.4, 10.2, 10.2], "qkfuse": [10.0, 20.0, 10.0, 10.0]}
    p = bm.paired(raw)
    assert p["rounds"] == 4 and p["median"] == pytest.approx(1.02)
    assert p["p25"] == pytest.approx(1.02) and p["p75"] == pytest.approx(1.02)
    assert bm.quantile([1.0, 2.0, 3.0, 4.0], 0.25) == pytest.approx(1.75) and bm.quantile([5.0], 0.75) == 5.0
    r = bm.row("qwen3", "decode_graph", "bs1", "us/step", raw)
    assert r["paired"] == p


def test_markdown_shows_paired_column_and_renders_old_rows():
    bm = _bench_module()
    meta = {"date": "2026-12-02T00:00:00", "torch": "2.11", "device": "cuda"}
    old = {"model": "qwen3", "case": "prefill", "shape": "1x4096", "unit": "ms", "speedup": 0.987,
           "median": {"inductor": 28.2, "qkfuse": 28.6}, "compile_s": {"inductor": 24, "qkfuse": 15}}
    new = bm.row("qwen3", "prefill_graph", "1x4096", "ms", {"inductor": [25.1, 25.0], "qkfuse": [24.9, 24.8]},
                 compile_shared_with="prefill", replays_per_burst=2)
    text = bm.markdown({"meta": meta, "rows": [old, new]})
    (old_line,) = [line for line in text.splitlines() if line.startswith("| qwen3 | prefill |")]
    (new_line,) = [line for line in text.splitlines() if line.startswith("| qwen3 | prefill_graph |")]
    header = next(line for line in text.splitlines() if line.startswith("| model | case |"))
    assert old_line.count("|") == new_line.count("|") == header.count("|")
    assert "| 0.987x | - | 24 / 15 |" in old_line, old_line
    assert "| 1.008x | 1.0080x (1.0080-1.0081; 2) | shared |" in new_line, new_line


def test_plan_prefill_graph_is_cuda_only_and_not_doubled():
    proc = subprocess.run([sys.executable, SCRIPT, "--plan", "--models", "qwen3", "--layers", "36", "--cases",
                           "prefill,prefill_graph", "--shapes", "1x4096"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "prefill_graph  36 layers skipped: the prefill case measures device time too" in proc.stdout, proc.stdout
    proc = subprocess.run([sys.executable, SCRIPT, "--plan", "--tiny", "--cases", "prefill_graph"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "skipped: needs CUDA (CUDA graph capture)" in proc.stdout, proc.stdout
