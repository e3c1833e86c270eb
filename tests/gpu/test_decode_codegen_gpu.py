"""What Inductor's generated code launches for a fused site at decode shapes (CUDA).

- A q+k site at one token per sequence is our kernel and nothing else: no copy kernels after it
  (the declared output strides are the ones Inductor plans, size-1 dims included).
- A site followed by the StaticCache write (``index_copy_`` of k and v at the cache positions) is
  one launch of our kernel that writes the caches in place: no index_put / copy kernel, no clone of
  the cache buffers; the caches hold what the unfused code writes (k within the kernel's rounding,
  v bit for bit).

    python -m pytest -q -m gpu tests/gpu
"""

from __future__ import annotations

import re

import pytest
import torch

import qkfuse
from tests.patterns.test_norm_rope_negative import llama_norm, rope

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

HQ, HK, D, L = 32, 8, 128, 64


def launches(code: str) -> list[str]:
    body = code[code.find("def call("):]
    return re.findall(r"^\s+(\w+)\.run\(", body, flags=re.M) + re.findall(r"extern_kernels\.(\w+)\(", body)


def site(q, k, qw, kw, cos, sin):
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    return rope(llama_norm(q, qw).transpose(1, 2), c, s), rope(llama_norm(k, kw).transpose(1, 2), c, s)


def site_with_cache(q, k, v, qw, kw, cos, sin, k_cache, v_cache, pos):
    q, k = site(q, k, qw, kw, cos, sin)
    k_cache.index_copy_(2, pos, k)
    v_cache.index_copy_(2, pos, v.transpose(1, 2))
    return q


def inputs(batch, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s: torch.randn(*s, device="cuda", generator=g).bfloat16()  # noqa: E731
    ang = torch.rand(batch, 1, D // 2, device="cuda", generator=g) * 6.3
    cos, sin = torch.cat([ang.cos()] * 2, -1).bfloat16(), torch.cat([ang.sin()] * 2, -1).bfloat16()
    return r(batch, 1, HQ, D), r(batch, 1, HK, D), r(batch, 1, HK, D), 1 + 0.2 * r(D), 1 + 0.2 * r(D), cos, sin


def compiled_code(fn, *args):
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    with torch._inductor.config.patch(fx_graph_cache=False):
        out, codes = run_and_get_code(torch.compile(fn, backend=qkfuse.qkfuse_backend, fullgraph=True), *args)
    return out, "\n".join(codes)


@pytest.mark.parametrize("batch", [1, 16])
def test_decode_site_is_our_kernel_and_nothing_else(batch):
    q, k, _, qw, kw, cos, sin = inputs(batch)
    (qo, ko), code = compiled_code(site, q, k, qw, kw, cos, sin)
    assert launches(code) == ["qk_norm_rope_kernel_0"], launches(code)
    ref_q, ref_k = site(q, k, qw, kw, cos, sin)
    for out, ref in ((qo, ref_q), (ko, ref_k)):
        assert out.shape == ref.shape
        assert float((out.float() - ref.float()).abs().max()) <= 4 * 2.0**-8 * float(ref.float().abs().max())


@pytest.mark.parametrize("batch", [1, 16])
def test_decode_cache_write_is_in_our_kernel_in_place(batch):
    q, k, v, qw, kw, cos, sin = inputs(batch)
    g = torch.Generator(device="cuda").manual_seed(1)
    k_cache = torch.randn(batch, HK, L, D, device="cuda", generator=g).bfloat16()
    v_cache = torch.randn(batch, HK, L, D, device="cuda", generator=g).bfloat16()
    pos = torch.tensor([17], device="cuda")
    ref_kc, ref_vc = k_cache.clone(), v_cache.clone()
    ref_q = site_with_cache(q, k, v, qw, kw, cos, sin, ref_kc, ref_vc, pos)
    k_ptr, v_ptr = k_cache.data_ptr(), v_cache.data_ptr()
    from torch._dynamo.utils import counters

    counters.clear()
    qo, code = compiled_code(site_with_cache, q, k, v, qw, kw, cos, sin, k_cache, v_cache, pos)
    assert counters["qkfuse"]["kv_cache_writes"] == 1
    assert launches(code) == ["qk_norm_rope_kernel_0"], launches(code)  # no index_put, copy or clone kernel
    call = code[code.find("def call("):]
    assert ".copy_(" not in call and "clone" not in call  # the cache inputs are written in place
    assert k_cache.data_ptr() == k_ptr and v_cache.data_ptr() == v_ptr
    assert torch.equal(v_cache, ref_vc)
    others = torch.ones(L, dtype=torch.bool)
    others[17] = False
    assert torch.equal(k_cache[:, :, others], ref_kc[:, :, others])
    scale = float(ref_kc[:, :, 17].float().abs().max())
    assert float((k_cache[:, :, 17].float() - ref_kc[:, :, 17].float()).abs().max()) <= 4 * 2.0**-8 * scale
    assert float((qo.float() - ref_q.float()).abs().max()) <= 4 * 2.0**-8 * float(ref_q.float().abs().max())
