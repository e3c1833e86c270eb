"""Each script in examples/ runs on its own (a fresh interpreter), checks itself and says "ok"."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
SCRIPTS = ["hf_optimize.py", "hf_generate.py", "compile_backend.py", "fuse_decorator.py", "stock_inductor_pass.py",
           "explain.py", "export_aoti.py"]


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_example(script):
    if script.startswith("hf_"):
        pytest.importorskip("transformers")
    proc = subprocess.run([sys.executable, str(EXAMPLES / script)], cwd=EXAMPLES, capture_output=True, text=True,
                          timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert any(line.startswith(f"ok {script[:-3]}") for line in proc.stdout.splitlines()), output
