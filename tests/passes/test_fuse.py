"""The pass runner: logging at DEBUG, records, counters."""

from __future__ import annotations

import logging

import torch
from torch._dynamo.utils import counters

from qkfuse.options import Options
from tests.graph_harness import run_pass
from tests.patterns.test_norm_rope_negative import inputs, llama_norm, rope


def qk(q, k, qw, kw, cos, sin):
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    return rope(llama_norm(q, qw).transpose(1, 2), c, s), rope(llama_norm(k, kw).transpose(1, 2), c, s)


def test_debug_log_shows_graphs_before_and_after(caplog):
    with caplog.at_level(logging.DEBUG, logger="qkfuse"):  # the opaque op shows in the code
        run_pass(qk, *inputs(), options=Options(kernels="reference"))
    before = [r.getMessage() for r in caplog.records if "before" in r.getMessage()]
    after = [r.getMessage() for r in caplog.records if "after" in r.getMessage()]
    assert before and "aten.rsqrt" in before[0] and "qkfuse.qk_norm_rope" not in before[0]
    assert after and "qkfuse.qk_norm_rope" in after[0] and "aten.rsqrt" not in after[0]
    assert any("1 site(s) fused" in r.getMessage() or "2 site(s) fused" in r.getMessage() for r in caplog.records)


def test_records_and_counters_agree():
    run = run_pass(qk, *inputs(torch.float32))
    assert [(r.fused, r.family, r.reason) for r in run.records] == [(True, "norm_rope", "inline torch ops (cpu)")] * 2
    assert run.records[0].shape == (2, 4, 5, 16) and run.records[0].k_shape == (2, 2, 5, 16)
    assert counters["qkfuse"]["norm_rope_sites"] == 2 and counters["qkfuse"]["norm_rope_calls"] == 1
