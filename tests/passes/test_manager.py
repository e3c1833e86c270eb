"""The CustomGraphPass object: uuid (FX graph cache key), options, composition."""

from __future__ import annotations

import shutil

import pytest

from qkfuse.options import Options, split_options
from qkfuse.passes import manager
from qkfuse.passes.manager import QKFusePass, pass_


def test_uuid_is_stable_and_depends_on_options(monkeypatch):
    assert QKFusePass().uuid() == QKFusePass(Options()).uuid()
    assert QKFusePass(Options(kernels="reference")).uuid() != QKFusePass().uuid()
    assert QKFusePass(Options(families=("norm_rope", "rope"))).uuid() != QKFusePass().uuid()
    assert QKFusePass(Options(enable=False)).uuid() != QKFusePass().uuid()
    before = QKFusePass().uuid()
    monkeypatch.setenv("QKFUSE_DISABLE", "1")  # the kill switch changes what the pass emits
    assert QKFusePass().uuid() != before


def test_uuid_hashes_kernel_and_pattern_sources(tmp_path, monkeypatch):
    """Editing a kernel or pattern file must change the uuid (else the FX cache serves stale code)."""
    copy = tmp_path / "qkfuse"
    shutil.copytree(manager._PKG, copy)
    monkeypatch.setattr(manager, "_PKG", copy)
    manager.source_hash.cache_clear()
    try:
        base = manager.source_hash()
        for rel in ("kernels/triton_norm_rope.py", "patterns/norm_rope.py", "kernels/triton_configs.json"):
            f = copy / rel
            f.write_text(f.read_text() + "\n# edited\n")
            manager.source_hash.cache_clear()  # computed once per process: files don't change in one
            now = manager.source_hash()
            assert now != base, rel
            base = now
    finally:
        manager.source_hash.cache_clear()


def test_composition_with_a_user_pass():
    class WithUuid:
        def __init__(self):
            self.calls = 0

        def __call__(self, graph):
            self.calls += 1

        def uuid(self):
            return "v1"

    class NoUuid:
        def __call__(self, graph):
            pass

    user = WithUuid()
    p = QKFusePass(user_pass=user)
    assert p.uuid() and p.uuid() != QKFusePass().uuid()
    assert QKFusePass(user_pass=NoUuid()).uuid() is None  # uncacheable user pass: bypass the cache
    import torch

    p(torch.fx.Graph())
    assert user.calls == 1


def test_options_validation():
    with pytest.raises(ValueError, match="qkfuse.kernels must be one of"):
        Options(kernels="cuda")
    with pytest.raises(ValueError, match="unknown"):
        Options(families=("qk_norm",))
    assert Options(families="norm_rope, rope").families == ("norm_rope", "rope")
    ours, rest = split_options({"qkfuse.kernels": "reference", "max_autotune": True})
    assert ours.kernels == "reference" and rest == {"max_autotune": True}
    with pytest.raises(ValueError, match="unknown qkfuse option"):
        split_options({"qkfuse.kernal": "triton"})
    with pytest.raises(ValueError, match="unknown qkfuse option"):
        pass_(kernal="triton")
    assert pass_(kernels="reference").options.kernels == "reference"
