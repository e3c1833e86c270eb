"""``python -m qkfuse scan``: the coverage scanner (qkfuse/scan.py), run in subprocesses as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from qkfuse import scan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def md_rows(text: str) -> dict:
    """{architecture: {column: cell}} from the scanner's markdown table(s)."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if len(cells) == len(scan.COLUMNS) and cells[0] not in ("architecture", "---"):
            rows[cells[0]] = dict(zip(scan.COLUMNS, cells))
    return rows


def run_scan(tmp_path, *args, timeout=600):
    out = tmp_path / "coverage.md"
    proc = subprocess.run([sys.executable, "-m", "qkfuse", "scan", *args, "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, out.read_text(), json.loads(out.with_suffix(".json").read_text())


@pytest.mark.slow  # ~15-25 s on 2 idle cores (two tiny-model compiles in parallel), more under load
def test_scan_qwen3_fused_llama_refused_with_reason(tmp_path):
    pytest.importorskip("transformers")
    proc, md, data = run_scan(tmp_path, "--only", "qwen3,llama", "--jobs", "2")
    rows = md_rows(md)
    qwen3, llama = rows["qwen3"], rows["llama"]
    # Qwen3: every candidate (q and k of both layers) fused, none refused, output equal to eager
    assert qwen3["status"] == "fused", qwen3
    assert qwen3["refused"] == "0" and qwen3["fused"] == "norm_rope 4", qwen3
    assert float(qwen3["max rel err"]) <= 1e-5, qwen3
    assert qwen3["QK-norm"] == "yes" and qwen3["RoPE"] == "yes"
    # Llama: RoPE without a q/k norm; the rope-only family is off by default, so its RoPE sites are
    # refused (or are no candidates at all), with the reason
    assert llama["status"] in ("refused", "no sites"), llama
    assert llama["fused"] == "0" and llama["refusal reasons / error"], llama
    assert llama["QK-norm"] == "" and llama["RoPE"] == "yes"
    assert float(llama["max rel err"]) <= 1e-5, llama
    # the header: versions, and the summary line
    assert "torch " in md and "transformers " in md and "date " in md
    assert "fused 1 of 1 architectures with QK-norm; 1 of 2 with RoPE" in md
    assert {r["name"] for r in data["rows"]} == {"qwen3", "llama"}
    assert "qwen3" in proc.stdout and "llama" in proc.stdout  # the printed table


def test_scan_timeout_kills_the_worker_and_lists_the_row(tmp_path):
    pytest.importorskip("transformers")
    proc, md, _ = run_scan(tmp_path, "--only", "qwen3", "--timeout", "1", timeout=120)
    row = md_rows(md)["qwen3"]
    assert row["status"] == "timeout", row
    assert "no result after 1 s" in row["refusal reasons / error"], row


def test_worker_reports_a_build_error():
    """An architecture that cannot be built from a tiny config (or fed a tiny input) is a row with
    the error, not a crash of the scan."""
    pytest.importorskip("transformers")
    proc = subprocess.run([sys.executable, "-m", "qkfuse.scan", "--worker", "transformers", "gemma3n_audio"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith(scan.RESULT_TAG)][-1]
    row = json.loads(line[len(scan.RESULT_TAG):])
    assert row["status"] == "build error" and row["error"], row


def test_normalize_reason_merges_node_names_and_shapes():
    a = scan.normalize_reason("intermediate mul_12 has a user outside the chain (add_3)")
    b = scan.normalize_reason("intermediate mul_7 has a user outside the chain (add)")
    assert a == b == "intermediate <node> has a user outside the chain (<node>)"
    assert scan.normalize_reason("cos (1, 8, 16) does not broadcast to x (2, 4, 8, 16)") == \
        "cos <shape> does not broadcast to x <shape>"


def test_markdown_summary_counts_qk_norm_and_rope_architectures():
    base = dict(kind="transformers", cls="X", error="", sites=4, fused={"norm_rope": 4}, refused=0, reasons=[],
                rel_err=1e-7, tol=1e-5, graphs=1, dtype="float32")
    rows = [dict(base, name="a", status="fused", rope=True, qk_norm=True),
            dict(base, name="b", status="partly fused", rope=True, qk_norm=True, refused=2,
                 reasons=[("some reason", 2)]),
            dict(base, name="c", status="build error", rope=True, qk_norm=True, sites=0, fused={},
                 error="tiny config: ValueError: x | y"),
            dict(base, name="d", status="refused", rope=True, qk_norm=False, fused={}, refused=4,
                 reasons=[("some reason", 4)])]
    md = scan.render_markdown(rows, dict(versions=scan.versions(), dtype="float32", timeout=300, tol=1e-5))
    assert "fused 2 of 3 architectures with QK-norm; 2 of 4 with RoPE" in md
    table = md_rows(md)
    assert table["c"]["status"] == "build error" and "x \\| y" in table["c"]["refusal reasons / error"]
    assert "| some reason | 2 | 6 |" in md  # top reasons: 2 architectures, 6 sites


def test_resumed_header_keeps_the_previous_runs(tmp_path):
    """A resumed scan's header lists the previous run (versions, command), its note and its history,
    from the JSON, or from the markdown of a scan that predates the field: nothing is dropped."""
    md = tmp_path / "coverage.md"
    md.write_text("# qkfuse coverage\n\n- versions: x\n- command: `a`\n- RoPE / QK-norm: y\n- note A\n- older B\n\n## transformers\n")
    legacy = scan._previous_header({"versions": {"torch": "2.13"}, "command": "scan --only a"}, md)
    assert legacy[0].startswith("before that: torch 2.13") and "`scan --only a`" in legacy[0]
    assert legacy[1:] == ["note A", "older B"]
    meta = {"versions": {"torch": "2.13"}, "command": "scan --only b", "note_lines": ["note C"], "history": legacy}
    again = scan._previous_header(meta, md)
    assert again[1] == "note C" and again[2:] == legacy
    assert all(f"- {line}" in scan.render_markdown([], {**meta, "versions": {}, "history": again}) for line in again)


def test_tiny_config_scales_an_mrope_section_that_only_the_model_code_sets():
    """GLM-OCR's text config has no mrope_section; its rotary embedding falls back to [8, 12, 12]
    (half of head_dim 64). The tiny config (head_dim 16 from hidden 64 / 4 heads) carries that default
    scaled to 8, so the model builds and runs."""
    pytest.importorskip("transformers")
    try:
        from transformers.models.glm_ocr.configuration_glm_ocr import GlmOcrTextConfig
    except ImportError:
        pytest.skip("this transformers has no GLM-OCR")
    assert scan._mrope_section_in_code(GlmOcrTextConfig) == [8, 12, 12]
    kw = scan._tiny_kwargs(GlmOcrTextConfig, GlmOcrTextConfig())
    section = kw["rope_parameters"]["mrope_section"]
    assert sum(section) == kw["hidden_size"] // kw["num_attention_heads"] // 2 and len(section) == 3, kw
