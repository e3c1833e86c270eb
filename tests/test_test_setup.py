"""The test setup itself (tests/conftest.py): the ci Hypothesis profile is derandomized (a clean clone
tries the same examples on every run), dev is selectable by --hypothesis-profile or
HYPOTHESIS_PROFILE, no health check is suppressed globally, and QKFUSE_STRICT=1 is on."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE_OUT = "QKFUSE_TEST_PROBE_OUT"
# The profile in force when this module is collected (inside a @given test, settings.default is
# that test's own settings).
LOADED = {"max_examples": settings.default.max_examples, "derandomize": settings.default.derandomize}


def test_profiles_suppress_no_health_check():
    for name in ("ci", "dev"):
        assert not settings.get_profile(name).suppress_health_check, name
    assert settings.get_profile("ci").derandomize is True
    assert settings.get_profile("ci").database is None  # derandomized: no example database either
    assert settings.get_profile("dev").max_examples > settings.get_profile("ci").max_examples


@pytest.mark.skipif(PROBE_OUT not in os.environ, reason="run by test_profile_selection in a subprocess")
@settings(max_examples=10)
@given(st.integers(), st.floats(allow_nan=False))
def test_probe(i, x):
    with open(os.environ[PROBE_OUT], "a") as f:
        f.write(json.dumps({"examples": [i, x], "strict": os.environ.get("QKFUSE_STRICT"), **LOADED}) + "\n")


def probe(tmp_path, name, *args, **env):
    out = tmp_path / f"{name}.jsonl"
    base = {k: v for k, v in os.environ.items() if k not in ("HYPOTHESIS_PROFILE", "QKFUSE_STRICT", "CI")}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           f"{__file__}::test_probe", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**base, PROBE_OUT: str(out), **env})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows
    return rows


def test_profile_selection(tmp_path):
    ci = settings.get_profile("ci")
    dev = settings.get_profile("dev")
    # CI=true makes Hypothesis load its own built-in "ci" profile first: ours must not inherit from it.
    first, second = probe(tmp_path, "ci1"), probe(tmp_path, "ci2", CI="true")
    assert [r["examples"] for r in first] == [r["examples"] for r in second]  # derandomized
    for rows in (first, second):
        assert {(r["max_examples"], r["derandomize"], r["strict"]) for r in rows} == {(ci.max_examples, True, "1")}
    for name, args, env in (("cli", ["--hypothesis-profile=dev"], {}), ("env", [], {"HYPOTHESIS_PROFILE": "dev"}),
                            ("cli-in-ci", ["--hypothesis-profile=dev"], {"CI": "true"})):
        rows = probe(tmp_path, name, *args, **env)
        assert {(r["max_examples"], r["derandomize"]) for r in rows} == {(dev.max_examples, False)}, name
