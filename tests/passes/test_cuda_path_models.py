"""Tiny HF models through the pass's CUDA path on fake CUDA tensors (tests/scan_cuda_path.py):
what fuses on CPU fuses on CUDA, one Triton launch per q+k pair, nothing cloned; the norm across
heads (OLMo2) fuses under kernels="auto" as under "triton".
The whole list of architectures: docs/coverage-cuda-path.md."""

from __future__ import annotations

import pytest

pytest.importorskip("triton")
pytest.importorskip("transformers")

from tests.scan_cuda_path import scan_one  # noqa: E402


@pytest.mark.slow
@pytest.mark.parametrize("name,kernels,fused,policy", [
    ("qwen3", "auto", 4, 0), ("gemma3", "auto", 4, 0), ("olmo2", "auto", 4, 0), ("olmo2", "triton", 4, 0)])
def test_cuda_path_fuses_what_the_cpu_path_fuses(name, kernels, fused, policy):
    row = scan_one("transformers", name, kernels)
    assert row["status"] == "ok", row
    assert row["cpu_fused"] == 4 and row["cuda_sites"] == 4, row  # 2 layers x (q, k)
    assert (row["cuda_fused"], row["policy"]) == (fused, policy), row
    assert row["launches"] == fused // 2 and row["cloned"] == 0, row


@pytest.mark.slow
def test_decode_step_absorbs_the_cache_writes_on_the_cuda_path():
    """One StaticCache decode step of a tiny Qwen3: every KV-cache write absorbed on CPU is absorbed
    by the Triton call too (one per layer), one launch per layer, nothing cloned."""
    row = scan_one("transformers", "qwen3", decode=True)
    assert row["status"] == "ok", row
    assert row["cpu_cache"] == row["cuda_cache"] == 2 and row["launches"] == 2 and row["cloned"] == 0, row
