"""RoPE spellings and layouts beyond the HF Qwen3 form, on the pass level.

Drawn: the rotation (neox halves as slices, chunk, split, diffusers' ``reshape(..., 2, -1).unbind(-2)``;
interleaved pairs as GPT-J's ``x[:, :, :, ::2]`` slices or diffusers' ``reshape(..., -1, 2).unbind(-1)``,
both ``stack((-x2, x1), -1).flatten(-2)``), the partial-rotary split (none, slices, ``torch.split``,
``chunk``, ``narrow``) with its cat, the layout (RoPE after the transpose, norm and RoPE before it
as Gemma3n/GPT-J, packed ``[N, H, D]``), cos/sin in the input dtype or float32 (``x.float()``
... ``.to(dtype)``), GPT-J's in-graph ``repeat_interleave``'d cos (once, or once per tensor: the
copies pair), with a norm in front
(``norm_rope``) or without (``rope``). Asserted: one fused call for q+k, equal to the unfused
graph. Then the forms that must be refused, with their reasons.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._dynamo.utils import counters

from qkfuse.options import Options
from qkfuse.passes.records import collect
from tests.graph_harness import assert_equal_to_graph, assert_left_alone, run_pass
from tests.patterns.test_norm_rope_negative import llama_norm

ROTATIONS = ["neox_slice", "neox_chunk", "neox_split", "neox_unbind", "interleaved_slice", "interleaved_unbind"]
SPLITS = ["none", "slice", "split", "chunk", "narrow"]
LAYOUTS = ["rope_after_transpose", "rope_before_transpose", "packed"]


@dataclasses.dataclass(frozen=True)
class Form:
    rotation: str
    split: str
    layout: str
    float_cos: bool  # cos/sin in float32, x upcast and the result cast back (diffusers)
    norm: bool  # a per-head RMSNorm in front (family norm_rope), else none (family rope)
    # GPT-J prepares the repeat_interleave'd cos/sin inside the RoPE function, once per tensor: copies
    # computed alike from the same input pair (a table built by other ops per tensor would not)
    tables_per_tensor: bool
    D: int
    rd: int
    Hq: int
    Hk: int
    dtype: torch.dtype

    @property
    def interleaved(self) -> bool:
        return self.rotation.startswith("interleaved")


def rotate(x, how: str):
    if how.startswith("interleaved"):
        if how == "interleaved_slice":  # GPT-J rotate_every_two, cohere, glm
            x1, x2 = (x[:, :, :, ::2], x[:, :, :, 1::2]) if x.dim() == 4 else (x[..., ::2], x[..., 1::2])
        else:  # diffusers use_real_unbind_dim=-1 (Flux)
            x1, x2 = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
        return torch.stack((-x2, x1), dim=-1).flatten(-2)
    h = x.shape[-1] // 2
    if how == "neox_slice":
        x1, x2 = x[..., :h], x[..., h:]
    elif how == "neox_chunk":
        x1, x2 = x.chunk(2, dim=-1)
    elif how == "neox_split":
        x1, x2 = torch.split(x, h, dim=-1)
    else:  # diffusers use_real_unbind_dim=-2 (Stable Audio, CogView4, Cosmos)
        x1, x2 = x.reshape(*x.shape[:-1], 2, -1).unbind(-2)
    return torch.cat((-x2, x1), dim=-1)


def split_rotary(x, rd: int, how: str):
    D = x.shape[-1]
    if how == "slice":
        return x[..., :rd], x[..., rd:]
    if how == "split":
        return torch.split(x, [rd, D - rd], dim=-1)
    if how == "chunk":
        return x.chunk(2, dim=-1)
    return x.narrow(-1, 0, rd), x.narrow(-1, rd, D - rd)


def apply_rope(x, cos, sin, f: Form):
    xr, xp = (x, None) if f.split == "none" else split_rotary(x, f.rd, f.split)
    if f.float_cos:
        out = (xr.float() * cos + rotate(xr, f.rotation).float() * sin).to(x.dtype)
    else:
        out = xr * cos + rotate(xr, f.rotation) * sin
    return out if xp is None else torch.cat([out, xp], dim=-1)


def tables(cos, sin, dtype, f: Form):
    """Full-width tables from the per-frequency cos/sin, unsqueezed at the head dim."""
    if f.interleaved:  # GPT-J: repeat_interleave'd, in the graph
        cos, sin = cos.repeat_interleave(2, -1), sin.repeat_interleave(2, -1)
    else:
        cos, sin = torch.cat([cos] * 2, -1), torch.cat([sin] * 2, -1)
    if not f.float_cos:
        cos, sin = cos.to(dtype), sin.to(dtype)
    head_dim = 2 if f.layout == "rope_before_transpose" else 1
    return cos.unsqueeze(head_dim), sin.unsqueeze(head_dim)


def block(f: Form):
    def fn(q, k, qw, kw, freqs):
        q, k = q.view(*q.shape[:-1], -1, f.D), k.view(*k.shape[:-1], -1, f.D)
        if f.norm:
            q, k = llama_norm(q, qw), llama_norm(k, kw)
        if f.layout == "rope_after_transpose":
            q, k = q.transpose(1, 2), k.transpose(1, 2)
        cos, sin = freqs.cos(), freqs.sin()
        shared = None if f.tables_per_tensor else tables(cos, sin, q.dtype, f)
        q, k = (apply_rope(x, *(shared or tables(cos, sin, q.dtype, f)), f) for x in (q, k))
        if f.layout == "rope_before_transpose":
            q, k = q.transpose(1, 2), k.transpose(1, 2)
        return q, k

    return fn


def inputs(f: Form, seed: int):
    g = torch.Generator().manual_seed(seed)
    lead = (6,) if f.layout == "packed" else (2, 3)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return (r(*lead, f.Hq * f.D).to(f.dtype), r(*lead, f.Hk * f.D).to(f.dtype), (1 + 0.2 * r(f.D)).to(f.dtype),
            (1 + 0.2 * r(f.D)).to(f.dtype), torch.rand(*lead, f.rd // 2, generator=g) * 6.3)


@st.composite
def forms(draw):
    D = draw(st.sampled_from([16, 32, 64]))
    split = draw(st.sampled_from(SPLITS))
    rd = {"none": D, "chunk": D // 2}.get(split) or draw(st.sampled_from([D // 2, D // 4]))
    hk = draw(st.sampled_from([1, 2]))
    rotation = draw(st.sampled_from(ROTATIONS))
    per_tensor = rotation.startswith("interleaved") and draw(st.booleans())
    return Form(rotation, split, draw(st.sampled_from(LAYOUTS)), draw(st.booleans()), draw(st.booleans()),
                per_tensor, D, rd, hk * draw(st.sampled_from([1, 2])), hk,
                draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16])))


@settings(max_examples=max(40, settings.default.max_examples))
@given(f=forms(), seed=st.integers(0, 2**16))
def test_spelling_fuses_as_one_call_equal_to_the_graph(f, seed):
    family = "norm_rope" if f.norm else "rope"
    counters.clear()  # (per example)
    run = run_pass(block(f), *inputs(f, seed), options=Options(families=(family,)))
    assert [(r.family, r.fused) for r in run.records] == [(family, True)] * 2, (f, run.records)
    recipe = f"{'interleaved' if f.interleaved else 'neox'} rope[{f.rd}]"
    assert all(recipe in r.recipe for r in run.records), run.records
    assert run.count("qkfuse.qk_norm_rope") == 1 and counters["qkfuse"][f"{family}_calls"] == 1
    assert_equal_to_graph(run, f.dtype, f)


# ---- refused or not a candidate -----------------------------------------------------------------

B, S, HQ, HK, D = 2, 3, 4, 2, 16


def _qk(seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return r(B, S, HQ, D), r(B, S, HK, D), 1 + 0.2 * r(D), 1 + 0.2 * r(D), r(B, S, D), r(B, S, D)


def _check_left_alone(fn, reason: str | None, families=("norm_rope", "rope")):
    """Nothing fused; every candidate refused with `reason` (None: no candidate at all); exact."""
    run = run_pass(fn, *_qk(), options=Options(families=families))
    assert_left_alone(run, reason)
    assert run.count("qkfuse") == 0
    if reason is not None:
        assert len(run.refused) == 2 and all(reason in r.reason for r in run.refused), run.records
    return run


def test_stack_along_another_dim_is_not_an_interleaved_rotation():
    """stack((-x_odd, x_even), dim=-2).flatten(-2) is cat(-x_odd, x_even): no RoPE rotation."""

    def fn(q, k, qw, kw, cos, sin):
        def rot(x):
            return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-2).flatten(-2)

        c, s = cos.unsqueeze(2), sin.unsqueeze(2)
        q, k = llama_norm(q, qw), llama_norm(k, kw)
        return q * c + rot(q) * s, k * c + rot(k) * s

    _check_left_alone(fn, None)


def test_deepseek_interleave_after_a_norm_is_refused():
    """transformers' apply_rotary_pos_emb_interleave after a q/k norm: its de-interleaved recipe is
    for RoPE alone (the rope family, tests/patterns/test_deinterleaved_rope.py); with a norm in front
    the norm_rope site is refused with the reason (a norm weight would be read permuted)."""

    def fn(q, k, qw, kw, cos, sin):
        c, s = cos[..., : D // 2].unsqueeze(2), sin[..., : D // 2].unsqueeze(2)
        out = []
        for x, w in ((q, qw), (k, kw)):
            x = llama_norm(x, w)
            x1, x2 = x[..., 0::2], x[..., 1::2]
            out.append(torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1))
        return tuple(out)

    run = _check_left_alone(fn, "de-interleaved RoPE (apply_rotary_pos_emb_interleave) after a q/k norm")
    assert {r.family for r in run.records} == {"norm_rope"}


def _partial(order: str):
    rd = D // 2

    def rope_of(x, c, s):
        return x * c + torch.cat((-x[..., rd // 2:], x[..., : rd // 2]), dim=-1) * s

    def fn(q, k, qw, kw, cos, sin):
        c, s = cos[..., :rd].unsqueeze(2), sin[..., :rd].unsqueeze(2)
        out = []
        for x, w in ((q, qw), (k, kw)):
            x = llama_norm(x, w)
            if order == "pass_first":  # DeepSeek-V4: nope, rope = x[..., :-rd], x[..., -rd:]
                out.append(torch.cat([x[..., :-rd], rope_of(x[..., -rd:], c, s)], dim=-1))
            else:  # the pass-through part returned on its own
                out += [rope_of(x[..., :rd], c, s), x[..., rd:] * 2]
        return tuple(out)

    return fn


@pytest.mark.parametrize("order,reason", [("pass_first", "pass-through first"),
                                          ("not_concatenated", "not concatenated right after")])
def test_partial_rotary_the_recipe_does_not_compute_is_refused(order, reason):
    _check_left_alone(_partial(order), reason, families=("norm_rope",))


def test_hf_gptj_fuses_q_and_k_per_layer_under_family_rope():
    """transformers' GPT-J: interleaved partial rotary on [B, S, H, D] before the transpose, its
    repeat_interleave'd cos/sin prepared once per tensor, no q/k norm (family rope)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPTJConfig(vocab_size=128, n_positions=64, n_embd=64, n_layer=2, n_head=4, rotary_dim=8,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPTJForCausalLM(cfg).eval()
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad(), collect() as records:
        ref = model(ids).logits
        out = torch.compile(model, backend="qkfuse", options={"qkfuse.families": "rope"})(ids).logits
    assert counters["qkfuse"]["rope_calls"] == cfg.n_layer and counters["qkfuse"]["rope_sites"] == 2 * cfg.n_layer
    assert all(r.fused and r.k_shape is not None and r.recipe == "interleaved rope[8]" for r in records), records
    assert float((out - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
