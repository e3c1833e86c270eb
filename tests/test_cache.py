"""FX graph cache: a second compile in a new process hits the cache and still runs the fused op;
changing the pass's options misses it (the pass's uuid is part of the key).

The probes use the opaque reference op, whose calls the profiler sees at run time (the CPU default,
inline torch ops, leaves no trace of its own in a profile)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PROBE = os.path.join(os.path.dirname(__file__), "compile_probe.py")


REFERENCE = json.dumps({"qkfuse.kernels": "reference"})


def probe(cache_dir, *args):
    args = args or ("--options", REFERENCE)
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache_dir)}
    out = subprocess.run([sys.executable, PROBE, *args], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_second_process_hits_the_cache_and_still_calls_the_op(tmp_path):
    first = probe(tmp_path)
    assert first["inductor_counters"].get("fxgraph_cache_miss", 0) >= 1
    assert first["qkfuse_counters"]["norm_rope_calls"] == 2  # the pass ran
    second = probe(tmp_path)
    assert second["inductor_counters"].get("fxgraph_cache_hit", 0) + \
        second["inductor_counters"].get("autograd_cache_hit", 0) >= 1
    assert "norm_rope_calls" not in second["qkfuse_counters"]  # served from the cache: no pass run
    assert second["qkfuse_op_calls_per_forward"] == 2  # ... and the cached code calls the fused op
    assert second["max_abs_diff"] <= 1e-5 * second["max_abs_ref"]
    third = probe(tmp_path, "--options", json.dumps({"qkfuse.kernels": "reference", "qkfuse.kv_cache": False}))
    assert third["inductor_counters"].get("fxgraph_cache_miss", 0) >= 1  # another uuid
    assert third["qkfuse_counters"]["norm_rope_calls"] == 2
