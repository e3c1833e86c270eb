"""Whole models under torch.compile: backend="inductor" vs backend="qkfuse" (issue 6: never slower).

    python benchmarks/bench_models.py [--models qwen3,gemma3,flux] [--cases prefill,generate,...]
        [--layers N] [--shapes 1x4096,8x512,1x32768] [--batches 1,16,64] [--rounds 5] [--graph-rounds 30]
        [--new-tokens 64]
        [--quick] [--tiny] [--out DIR] [--tag NAME] [--plan] [--budget SECONDS]
    python benchmarks/bench_models.py --render a.json [b.json ...] [--tag NAME]   # merge runs, redraw md/png

Models, built from configs with random weights (nothing is downloaded), bf16 on CUDA:
- qwen3: Qwen3-8B-shaped Qwen3ForCausalLM (hidden 4096, MLP 12288, 32 q / 8 kv heads, head_dim 128,
  vocab 151936, rope_theta 1e6, 36 layers);
- gemma3: Gemma3ForCausalLM with Gemma3-12B's dims (hidden 3840, MLP 15360, 16 / 8 heads, head_dim
  256, vocab 262208, sliding_window 1024, HF's default 5 sliding : 1 full layer pattern), 12 of its
  48 layers by default (two periods of the pattern; --layers 48 for the full depth);
- flux: Flux-shaped, self-contained DiT (diffusers is not on the GPU machine): 8 blocks shaped like
  diffusers' FluxSingleTransformerBlock (hidden 3072, 24 heads x 128, nn.RMSNorm(128) q/k norms on
  [B,S,H,D], diffusers' interleaved RoPE with float32 cos/sin [S,D], SDPA, GELU MLP, adaLN). Prefill only.

Cases (each builds backend="inductor" and backend="qkfuse" in one process, warms both, then times
them alternating, order reversed every round (A B, B A, ...); medians; speed-up = inductor / qkfuse;
every row also has the paired ratio: per round, that round's inductor / its qkfuse (the two ran back to
back, so clock drift between rounds cancels), its median, 25-75% range, min-max and round count):
- prefill: torch.compile(model, dynamic=False) forward at each --shapes BxS; causal LMs run with
  use_cache=False and logits_to_keep=1 (the last position's logits only, as generate's prefill does;
  full logits at 32k tokens would be 10 GB). Wall ms per forward from Python (what a user sees). On
  CUDA each shape also makes a prefill_graph row from the same compile.
- prefill_graph: device time of the same compiled prefill forward (static inputs), captured per
  backend in a torch.cuda.CUDAGraph; replays in bursts of about 50 ms (1-20 replays), alternating
  A B B A A B ... with no host sync between bursts (the GPU runs them back to back; CUDA events between
  bursts), up to --graph-rounds rounds filling about 6 s: drift hits both alike. ms per replay. Where
  capture or replay fails, the row holds the wall-clock numbers (unit "ms (wall)") and says why. As a
  case of its own (--cases prefill_graph) it skips the wall-clock rounds: one compile per backend per
  shape, then device time and the profile only.
- generate: model.generate(ids, cache_implementation="static", compile_config=CompileConfig(backend=b))
  (HF compiles the decode step itself, mode="reduce-overhead" = CUDA graphs; fullgraph and dynamic at
  HF's defaults); prompt --prompt tokens, batch --batches. ms/token = (t(N) - t(N/4)) / (N - N/4) with
  N = --new-tokens: the difference of two generate lengths removes prefill, cache setup and CUDA-graph
  re-recording (each generate makes a new static cache), leaving the per-token cost a user sees;
  --generate-rounds A/B rounds (default 15).
- decode_eager: torch.compile(model) (no CUDA graphs, dynamic=None as users have it; the cache
  length is marked dynamic up front so one compile serves every step) with HF's DynamicCache, batch 1:
  N forward steps after an eager prefill of --prompt tokens. ms/token = time of the N steps / N.
- decode_graph: device time of one decode step: torch.compile(model, dynamic=False, fullgraph=True)
  (mode default) on a StaticCache (length prompt + N, prefilled eagerly), one step captured per
  backend in a torch.cuda.CUDAGraph, replays timed with CUDA events around each replay (per round the
  median of up to 20 back-to-back replays; the cache is rewound to the prompt before each round).
  us per step.
- fn64: the QK-norm + RoPE function alone (HF Qwen3 code: Qwen3RMSNorm on [B,S,H,D], transpose,
  apply_rotary_pos_emb; 64 tokens, 32/8 heads, head_dim 128) through torch.compile without CUDA
  graphs: us per call from Python, host overhead included.

Also reported: agreement (max |out - eager| / max |eager|: last-token logits of prefill, logits of
one decode step) with a sanity flag (not an assertion), qkfuse's fused-site count (q and k count
apart), and for prefill_graph and decode_graph on CUDA the ceiling, from torch.profiler kernel times of one
compiled step per backend. The q/k norm + RoPE subgraph under Inductor = its kernels named
triton_{poi,red,per}_fused_<ops> whose ops hold "neg" with "rsqrt", "cat" or "stack" (RoPE's
rotate_half / interleaved rotation: nothing else in these models negates) + the RMSNorm-reduction
launches (red/per kernels with rsqrt, or pow and mean, no neg) that the qkfuse build no longer makes (a
q/k norm Inductor kept apart from its RoPE; the models' big RMSNorms stay in both builds) + the
static-cache write kernels (index_copy: qkfuse's kernel absorbs them). share = that / all of
Inductor's kernel time; recovered = (that subgraph's time under Inductor - the same kernels' time
under qkfuse: its kernel, any RoPE or cache-write kernel left) / the former: 1.0 = the fused kernel
costs nothing, 0 = no gain, below 0 = slower. (A difference of the two builds' total kernel times,
kept in the JSON as recovered_total, is swamped by run-to-run drift of the GEMMs and attention:
identical cuBLAS/cuDNN kernels differ by 1-3% between two profiles.) Kernel names are kept whole (Inductor's
kernel_name_max_ops is raised; it is a name only) so no op is cut off; the JSON keeps the top kernels
of both builds with their class, to audit the rule.

Robustness: results (JSON, md, png) are rewritten after every row (one shape or batch size), so a
run killed at a time limit keeps what finished; each row and each case catches its own exception
(recorded, the rest goes on); GPU memory and Dynamo state are freed between cases and models.

Time: compiling dominates: every shape or batch size compiles both backends once (no reuse across
them: static shapes; a prefill shape's two rows share one compile), a full 36-layer Qwen3 at about
50 s each (COMPILE_S: fitted to the 8-layer H200 compiles, the slope per layer from CPU). The whole
default run is ~35 min, so split it; with --budget 500 a row whose estimate no longer fits is skipped
(recorded) instead of being killed. Estimated (--plan):
    --models qwen3 --cases prefill,fn64 --shapes 1x4096,8x512         ~5 min
    --models qwen3 --cases prefill,decode_eager --shapes 1x32768       ~6.5 min
    --models qwen3 --cases generate                                    ~6.5 min
    --models qwen3 --cases decode_graph                                ~6 min
    --models qwen3 --cases prefill_graph --shapes 1x4096,8x512         ~4.5 min
    --models gemma3,flux --cases prefill                               ~6 min
    --models gemma3 --cases generate,decode_eager                      ~4 min
    --models gemma3 --cases decode_graph                               ~3 min
then merge: --render <tag1>.json <tag2>.json ... --tag <name>. Outputs go to --out and to $OUT when
set. Each row's JSON records its seconds next to the estimate. --plan prints the plan, runs nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import inspect
import json
import os
import platform
import re
import statistics
import sys
import time
import traceback
from collections import defaultdict

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import qkfuse  # noqa: E402

BACKENDS = ("inductor", "qkfuse")
CASES = ("prefill", "prefill_graph", "generate", "decode_eager", "decode_graph", "fn64")
CUDA_ONLY = {"generate": "CUDA graphs (mode=reduce-overhead)", "decode_graph": "CUDA graph capture",
             "prefill_graph": "CUDA graph capture"}
RESULTS = os.path.join(os.path.dirname(__file__), "results")

# max |out - eager| / max |eager| above which a row is flagged (bf16, random weights, many layers).
AGREEMENT_FLAG = 0.05

# ---- models -------------------------------------------------------------------------------------

QWEN3_8B = dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=1e6, rms_norm_eps=1e-6,
                max_position_embeddings=40960, tie_word_embeddings=False)
GEMMA3_12B = dict(vocab_size=262208, hidden_size=3840, intermediate_size=15360, num_hidden_layers=12,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=256, sliding_window=1024,
                  query_pre_attn_scalar=256, max_position_embeddings=131072)
# The sizes of qkfuse/cli.py's demo models: Inductor compiles them in seconds on CPU.
TINY_LM = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
LMS = {
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", QWEN3_8B, TINY_LM),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", GEMMA3_12B, dict(TINY_LM, sliding_window=32)),
}
FLUX = dict(dim=3072, heads=24, head_dim=128, blocks=8)
TINY_FLUX = dict(dim=64, heads=4, head_dim=16, blocks=2)
MODELS = (*LMS, "flux")

# Rough time model for --plan and --budget. Seconds per whole-model compile (one shape, one backend) =
# base + per_layer * layers: Dynamo, AOT and Inductor's lowering scale with the layer count (Triton
# kernels repeat across layers: compiled once). Measured on the H200 (2026-12-01, torch 2.11): a median
# of about 15 s per backend for 8-layer Qwen3, 12 s for 6-layer Gemma3, 11 s for 8-block Flux; the
# slope from the tiny-width Qwen3 of --tiny on CPU (Inductor's Python side, which dims do not change):
# 13 s at 8 layers, 45 s at 36, i.e. about 1.15 s per layer; a little margin on both. One prefill
# forward: tokens * layers * (linear + seq * attention) seconds at Qwen3-8B's layer size, times
# FORWARD_SCALE (measured: 28 ms at 1x4096 and 640 ms at 1x32768 for 8 Qwen3 layers; HF materialises
# the causal mask under torch.compile).
COMPILE_S = {"qwen3": (7.0, 1.2), "gemma3": (6.0, 1.3), "flux": (4.0, 1.0)}
TINY_COMPILE_S = 15.0
FORWARD_S_PER_TOKEN_LAYER = (0.7e-6, 6.5e-11)
FORWARD_SCALE = {"qwen3": 1.0, "gemma3": 1.2, "flux": 0.6}
# prefill_graph: bursts of about GRAPH_BURST_S of replays, rounds filling about GRAPH_TOTAL_S.
GRAPH_BURST_S, GRAPH_TOTAL_S = 0.05, 6.0
STARTUP_S = 30.0  # imports, CUDA init, Inductor's compile workers, building a model


def rope_interleaved(x, cos, sin):
    """diffusers' apply_rotary_emb(use_real=True, use_real_unbind_dim=-1) on [B,S,H,D], cos/sin [S,D] fp32."""
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    x_real, x_imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    x_rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)
    return (x.float() * cos + x_rotated.float() * sin).to(x.dtype)


class FluxShapedBlock(torch.nn.Module):
    """Flux-shaped, self-contained: the computation of diffusers' FluxSingleTransformerBlock
    (AdaLayerNormZeroSingle, parallel attention + GELU MLP, one output projection, gated residual)."""

    def __init__(self, dim, heads, head_dim, mlp_ratio=4):
        super().__init__()
        self.heads = heads
        self.norm = torch.nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.norm_linear = torch.nn.Linear(dim, 3 * dim)
        self.proj_mlp = torch.nn.Linear(dim, mlp_ratio * dim)
        self.to_q = torch.nn.Linear(dim, heads * head_dim)
        self.to_k = torch.nn.Linear(dim, heads * head_dim)
        self.to_v = torch.nn.Linear(dim, heads * head_dim)
        self.norm_q = torch.nn.RMSNorm(head_dim, eps=1e-6)
        self.norm_k = torch.nn.RMSNorm(head_dim, eps=1e-6)
        self.proj_out = torch.nn.Linear(heads * head_dim + mlp_ratio * dim, dim)

    def attention(self, x, cos, sin):
        q = self.norm_q(self.to_q(x).unflatten(-1, (self.heads, -1)))
        k = self.norm_k(self.to_k(x).unflatten(-1, (self.heads, -1)))
        v = self.to_v(x).unflatten(-1, (self.heads, -1))
        q, k = rope_interleaved(q, cos, sin), rope_interleaved(k, cos, sin)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2).flatten(2, 3)

    def forward(self, x, temb, cos, sin):
        shift, scale, gate = self.norm_linear(F.silu(temb)).chunk(3, dim=1)
        h = self.norm(x) * (1 + scale[:, None]) + shift[:, None]
        mlp = F.gelu(self.proj_mlp(h), approximate="tanh")
        out = self.proj_out(torch.cat([self.attention(h, cos, sin), mlp], dim=2))
        return x + gate[:, None] * out


class FluxShapedDiT(torch.nn.Module):
    """Flux-shaped, self-contained: a stack of single-stream blocks (no diffusers needed)."""

    def __init__(self, dim, heads, head_dim, blocks):
        super().__init__()
        self.dim, self.head_dim = dim, head_dim
        self.blocks = torch.nn.ModuleList(FluxShapedBlock(dim, heads, head_dim) for _ in range(blocks))

    def forward(self, x, temb, cos, sin):
        for block in self.blocks:
            x = block(x, temb, cos, sin)
        return x


@contextlib.contextmanager
def default_dtype(dtype):
    """Build in the target dtype directly (as from_pretrained does): no float32 copy of 8B weights."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build(name, layers, tiny, device, dtype):
    torch.manual_seed(0)
    with torch.device(device), default_dtype(dtype):
        if name == "flux":
            dims = dict(TINY_FLUX if tiny else FLUX)
            dims["blocks"] = layers or dims["blocks"]
            return FluxShapedDiT(**dims).eval()
        import transformers

        config_cls, model_cls, full, small = LMS[name]
        dims = dict(small if tiny else full)
        dims["num_hidden_layers"] = layers or dims["num_hidden_layers"]
        if tiny and name == "gemma3":  # both layer kinds in a few layers (HF's 5:1 pattern needs 6)
            dims["layer_types"] = [("sliding_attention", "full_attention")[i % 2]
                                   for i in range(dims["num_hidden_layers"])]
        config = getattr(transformers, config_cls)(**dims, attn_implementation="sdpa")
        return getattr(transformers, model_cls)(config).eval()


def layer_count(model):
    return len(model.blocks) if isinstance(model, FluxShapedDiT) else model.config.num_hidden_layers


def shared_weight_copy(model):
    """A second model object on the same parameter and buffer tensors (HF caches one compiled decode
    step per model object, so each backend needs its own object)."""
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo)


def cache_kwarg(model):
    """transformers renamed forward's past_key_values to cache (5.24 has cache, 5.17 past_key_values)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def rewind(cache, length, tensors=True):
    """Set a StaticCache back to `length` tokens: the next step writes position `length` again.
    tensors=False rewinds only the Python ints (sliding layers keep one; a compiled step guards on it)
    and launches no kernel, so a profile or a CUDA-graph capture of the step holds the step alone."""
    for layer in cache.layers:
        if tensors:
            layer.cumulative_length.fill_(length)
        if hasattr(layer, "cumulative_length_int"):
            layer.cumulative_length_int = length


# ---- measuring -----------------------------------------------------------------------------------

class Bench:
    """Device, settings, sync and the row sink shared by every case."""

    def __init__(self, args, device, emit):
        self.args, self.device, self.emit = args, device, emit
        self.cuda = device == "cuda"
        self.gen = torch.Generator(device=device).manual_seed(1234)
        self.start = time.perf_counter()

    def elapsed(self):
        return time.perf_counter() - self.start

    def over_budget(self, estimate_s):
        """Why a step estimated at `estimate_s` seconds must be skipped under --budget, else None."""
        left = self.args.budget - self.elapsed()
        if self.args.budget and estimate_s > left:
            return f"over --budget (estimate {estimate_s:.0f} s, {max(left, 0):.0f} s left)"
        return None

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def randint(self, high, shape):
        return torch.randint(0, high, shape, device=self.device, generator=self.gen)

    def randn(self, *shape, dtype=torch.bfloat16):
        return torch.randn(*shape, device=self.device, dtype=dtype, generator=self.gen)

    def seconds_per_call(self, fn, calls):
        self.sync()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        self.sync()
        return (time.perf_counter() - start) / calls

    def calls_for(self, seconds_one_call, target=0.25, most=50):
        """Calls per measurement so that one measurement lasts about `target` seconds."""
        return max(1, min(most, round(target / max(seconds_one_call, 1e-6))))

    def alternate(self, measure, rounds=None):
        """measure[backend]() -> one number; rounds (default --rounds) of A B then B A ...: drift hits
        both alike."""
        raw = {b: [] for b in measure}
        for r in range(rounds or self.args.rounds):
            for b in (BACKENDS if r % 2 == 0 else BACKENDS[::-1]):
                raw[b].append(measure[b]())
        return raw

    def first_calls(self, calls):
        """Run each backend's first call (the compile); compile seconds, fused sites, graphs, outputs."""
        from torch._dynamo.utils import counters

        out, compile_s, sites, graphs = {}, {}, {}, {}
        for b in BACKENDS:
            counters["qkfuse"].clear()
            before = unique_graphs()
            start = time.perf_counter()
            out[b] = calls[b]()
            self.sync()
            compile_s[b] = round(time.perf_counter() - start, 2)
            sites[b] = counters["qkfuse"].get("norm_rope_sites", 0)
            graphs[b] = recompiled_since(before)
            log(f"    first call {b}: {compile_s[b]:.1f} s (compile; {graphs[b]} graph(s), {sites[b]} fused sites)")
        return out, compile_s, {"qkfuse_fused_sites": sites["qkfuse"], "graphs_compiled": graphs}

    def kernel_profile(self, fn, steps=2):
        """Per step: {kernel name: [launches, microseconds]} from torch.profiler's CUDA activity."""
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile

        fn()
        self.sync()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                fn()
            self.sync()
        kernels = defaultdict(lambda: [0, 0.0])
        for e in prof.events():
            if e.device_type == DeviceType.CUDA:
                kernels[e.name][0] += 1
                kernels[e.name][1] += e.time_range.elapsed_us()
        return {name: [n / steps, us / steps] for name, (n, us) in kernels.items()}


def unique_graphs():
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def recompiled_since(before):
    return unique_graphs() - before


_TRITON_NAME = re.compile(r"triton_(?:poi|red|per)_fused_(.*?)(?:_\d+)?$")


def kernel_group(name):
    """A kernel's name without Inductor's per-graph index: the same ops in two compiles compare equal."""
    return re.sub(r"_\d+$", "", name) if _TRITON_NAME.match(name) else name


def kernel_class(name):
    """'qkfuse' (our kernel), 'rope' (an Inductor kernel that holds RoPE's negation: neg with rsqrt, cat
    or stack; nothing else in these models negates), 'norm' (an RMSNorm reduction without RoPE: the
    models' big norms, or a q/k norm Inductor kept apart from its RoPE), 'kv_write' (index_copy /
    index_put / scatter: static-cache writes) or 'other'."""
    if "norm_rope" in name:
        return "qkfuse"
    m = _TRITON_NAME.match(name)
    if not m:
        return "other"
    ops = set(m.group(1).split("_"))
    if "neg" in ops and ops & {"rsqrt", "cat", "stack"}:
        return "rope"
    # a reduction: pointwise kernels also carry these names when a norm's ops were fused into them
    # (e.g. the GQA expand of the cache), but only a reduction computes a norm
    if not name.startswith("triton_poi") and ("rsqrt" in ops or {"pow", "mean"} <= ops):
        return "norm"
    if ops & {"index", "scatter"}:
        return "kv_write"
    return "other"


def ceiling(profiles):
    """Share of Inductor's kernel time spent in the q/k norm + RoPE subgraph, and how much of it qkfuse
    recovered. The subgraph under Inductor = its 'rope' kernels + the 'norm' reductions that the qkfuse
    build no longer makes (q/k norms Inductor emitted apart from RoPE; the big norms stay in both) +
    its static-cache write kernels (qkfuse's kernel absorbs them)."""
    groups = {}
    for b, kernels in profiles.items():
        g = groups[b] = defaultdict(lambda: [0.0, 0.0])
        for name, (launches, us) in kernels.items():
            g[kernel_group(name)][0] += launches
            g[kernel_group(name)][1] += us
    ind, qk = groups["inductor"], groups["qkfuse"]

    def time_of(g, cls):
        return sum(us for name, (_, us) in g.items() if kernel_class(name) == cls)

    replaced_norm = sum(us * (n - qk[name][0]) / n for name, (n, us) in ind.items()
                        if kernel_class(name) == "norm" and qk[name][0] < n)
    total = {b: sum(us for _, us in g.values()) for b, g in groups.items()}
    subgraph_ind = time_of(ind, "rope") + replaced_norm + time_of(ind, "kv_write")
    subgraph_qk = time_of(qk, "qkfuse") + time_of(qk, "rope") + time_of(qk, "kv_write")
    top = {b: sorted(([n, round(c, 2), round(us, 2), kernel_class(n)] for n, (c, us) in k.items()),
                     key=lambda r: -r[2])[:25] for b, k in profiles.items()}
    return {
        "total_kernel_us": {b: round(v, 2) for b, v in total.items()},
        "norm_rope_us": {"inductor": round(subgraph_ind, 2), "qkfuse": round(subgraph_qk, 2)},
        "inductor_rope_kernels_us": round(time_of(ind, "rope"), 2),
        "inductor_replaced_norm_us": round(replaced_norm, 2),
        "kv_write_us": {b: round(time_of(g, "kv_write"), 2) for b, g in groups.items()},
        "qkfuse_launches": sum(n for name, (n, _) in qk.items() if kernel_class(name) == "qkfuse"),
        "share": subgraph_ind / total["inductor"] if total["inductor"] else None,
        "recovered": (subgraph_ind - subgraph_qk) / subgraph_ind if subgraph_ind else None,
        "recovered_total": (total["inductor"] - total["qkfuse"]) / subgraph_ind if subgraph_ind else None,
        "top_kernels": top,
    }


def recovered(ceil: dict):
    """The subgraph's share that qkfuse recovered, from its kernel times (rows written before the
    field was redefined carry the drift-dominated total-based value: recomputed here)."""
    sub = ceil.get("norm_rope_us")
    if not sub or not sub.get("inductor"):
        return ceil.get("recovered")
    return (sub["inductor"] - sub["qkfuse"]) / sub["inductor"]


def rel_diff(out, ref):
    ref = ref.float()
    return float((out.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def agreement(outs, ref):
    d = {f"{b}_vs_eager": rel_diff(outs[b], ref) for b in BACKENDS}
    d["qkfuse_vs_inductor"] = rel_diff(outs["qkfuse"], outs["inductor"])
    d["ok"] = d["qkfuse_vs_eager"] <= max(2 * d["inductor_vs_eager"], AGREEMENT_FLAG)
    return d


def quantile(values, q):
    """The q-quantile of values, linear between order statistics (numpy's default; any count >= 1)."""
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def paired(raw):
    """Per-round paired ratios inductor / qkfuse: round i's A and B ran back to back, so clock drift
    between rounds cancels in the ratio. Median and spread (25-75% and min-max of the ratios)."""
    ratios = [a / b for a, b in zip(raw["inductor"], raw["qkfuse"]) if b]
    if not ratios:
        return None
    return {"median": statistics.median(ratios), "p25": quantile(ratios, 0.25), "p75": quantile(ratios, 0.75),
            "min": min(ratios), "max": max(ratios), "rounds": len(ratios)}


def row(model, case, shape, unit, raw, **extra):
    med = {b: statistics.median(v) for b, v in raw.items()}
    r = {"model": model, "case": case, "shape": shape, "unit": unit, "median": med,
         "speedup": med["inductor"] / med["qkfuse"], "paired": paired(raw), "raw": raw}
    r.update(extra)
    return r


def guarded(bench, model, case, shape, fn, estimate_s):
    """One row: fn() -> row dict; an exception becomes an error row and the run goes on; a row that
    does not fit in what is left of --budget is skipped."""
    skip = bench.over_budget(estimate_s)
    if skip:
        bench.emit({"model": model, "case": case, "shape": shape, "skipped": skip})
        return
    start = time.perf_counter()
    try:
        r = fn()
    except Exception as e:  # noqa: BLE001  (OOM, compile errors, HF API drift: record, go on)
        traceback.print_exc()
        r = {"model": model, "case": case, "shape": shape, "error": f"{type(e).__name__}: {str(e)[:400]}"}
    r["seconds"] = {"took": round(time.perf_counter() - start, 1), "estimate": round(estimate_s, 1)}
    bench.emit(r)
    free_memory()


def free_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---- cases ---------------------------------------------------------------------------------------

def lm_forward(m, inputs):
    return m(input_ids=inputs, use_cache=False, logits_to_keep=1).logits


def dit_forward(m, inputs):
    return m(*inputs)


def dit_inputs(bench, model, batch, seq):
    x = bench.randn(batch, seq, model.dim)
    temb = bench.randn(batch, model.dim)
    pos = torch.arange(seq, device=bench.device, dtype=torch.float32)
    inv_freq = 10000.0 ** (-torch.arange(0, model.head_dim, 2, device=bench.device, dtype=torch.float32)
                           / model.head_dim)
    angles = pos[:, None] * inv_freq[None, :]
    cos = angles.cos().repeat_interleave(2, dim=-1)  # [S, D] float32, pairs (2i, 2i+1) share an angle
    sin = angles.sin().repeat_interleave(2, dim=-1)
    return x, temb, cos, sin


def case_prefill(bench, name, model, wall=True):
    """Per shape, one compile per backend serves two rows: "prefill" (wall clock from Python, what a
    user sees; wall=True) and, on CUDA, "prefill_graph" (device time: the same compiled forward
    captured in a CUDA graph per backend, replays timed with CUDA events in many short A/B rounds)."""
    is_dit = isinstance(model, FluxShapedDiT)
    forward = dit_forward if is_dit else lm_forward
    compiled = {b: torch.compile(model, backend=b, dynamic=False) for b in BACKENDS}
    layers = layer_count(model)
    compile_s_est = 2 * compile_estimate_s(bench.args, name, layers)
    for batch, seq in bench.args.shape_list:
        shape = f"{batch}x{seq}"
        wall_est, graph_est = prefill_row_estimates_s(bench.args, name, layers, batch, seq, wall)
        state = {}

        def setup(batch=batch, seq=seq, state=state):
            """Inputs (static: the CUDA graphs read them in place), the eager reference and each
            backend's first call (the compile), once per shape for both rows."""
            if state:
                if "info" not in state:
                    raise RuntimeError("this shape's compile failed in the prefill row (see there)")
                return False
            state["inputs"] = inputs = (dit_inputs(bench, model, batch, seq) if is_dit
                                        else bench.randint(model.config.vocab_size, (batch, seq)))
            ref = forward(model, inputs)
            outs, compile_s, info = bench.first_calls({b: lambda b=b: forward(compiled[b], inputs) for b in BACKENDS})
            state.update(compile_s=compile_s, agreement=agreement(outs, ref), info=info)
            del outs, ref
            return True

        def shared(state=state, compiled_here=True):
            d = dict(agreement=state["agreement"], **state["info"])
            if compiled_here:
                d["compile_s"] = state["compile_s"]
            else:
                d["compile_shared_with"] = "prefill"
            return d

        def wall_clock(state=state):
            """Wall ms per forward from Python (sync after the calls), alternating A/B rounds."""
            inputs = state["inputs"]
            calls = bench.calls_for(min(bench.seconds_per_call(lambda: forward(compiled["inductor"], inputs), 1)
                                        for _ in range(3)))
            graphs = unique_graphs()
            raw = bench.alternate({b: lambda b=b: 1e3 * bench.seconds_per_call(lambda: forward(compiled[b], inputs),
                                                                               calls) for b in BACKENDS})
            state["wall"] = dict(raw=raw, calls=calls, recompiled=recompiled_since(graphs))
            return state["wall"]

        def wall_row(shape=shape, state=state):
            compiled_here = setup()
            w = wall_clock()
            return row(name, "prefill", shape, "ms", w["raw"], calls_per_measurement=w["calls"],
                       recompiled_while_timing=w["recompiled"], timing="wall clock",
                       **shared(compiled_here=compiled_here))

        def graph_row(shape=shape, state=state):
            compiled_here = setup()
            inputs = state["inputs"]
            graphs_before = unique_graphs()
            extra = {}
            try:
                graphs = {b: capture(bench, lambda b=b: forward(compiled[b], inputs), lambda: None)
                          for b in BACKENDS}
                raw, extra = paired_replays(bench, graphs)
                graphs.clear()  # the captured graphs hold their memory pools
                unit, timing = "ms", "device (CUDA graph replays)"
            except Exception as e:  # noqa: BLE001  (capture of a compiled forward can fail: use wall clock)
                traceback.print_exc()
                graphs = None  # a graph captured before the failure: its memory pool goes now
                with contextlib.suppress(Exception):
                    bench.sync()
                free_memory()
                w = state.get("wall") or wall_clock()
                raw, unit, timing = w["raw"], "ms (wall)", "wall clock (fallback)"
                extra = dict(fallback=f"CUDA graph capture or replay failed, wall clock instead: {type(e).__name__}: "
                                      f"{str(e)[:200]}", calls_per_measurement=w["calls"])
            recompiled = recompiled_since(graphs_before)
            ceil = ceiling({b: bench.kernel_profile(lambda b=b: forward(compiled[b], inputs)) for b in BACKENDS})
            return row(name, "prefill_graph", shape, unit, raw, timing=timing, ceiling=ceil,
                       recompiled_while_timing=recompiled, **extra, **shared(compiled_here=compiled_here))

        try:
            if wall:
                guarded(bench, name, "prefill", shape, wall_row, wall_est)
            if bench.cuda:
                guarded(bench, name, "prefill_graph", shape, graph_row,
                        graph_est + (0 if "info" in state else compile_s_est))
        finally:
            state.clear()


def case_prefill_graph(bench, name, model):
    case_prefill(bench, name, model, wall=False)


def paired_replays(bench, graphs, burst_s=GRAPH_BURST_S, total_s=GRAPH_TOTAL_S):
    """Device ms per replay of each captured graph, in short bursts alternating A B B A A B ... with no
    host sync in between (the GPU runs them back to back, CUDA events between the bursts): clock drift
    hits both alike, and each round's two bursts give one paired ratio. A burst is about `burst_s` of
    replays; rounds fill about `total_s`, between 6 and --graph-rounds."""
    for g in graphs.values():  # warm: the first replays of a fresh graph upload it
        g.replay()
        g.replay()
    bench.sync()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for g in graphs.values():
        g.replay()
    end.record()
    bench.sync()
    one_s = start.elapsed_time(end) / 1e3 / len(graphs)
    replays = max(1, min(20, round(burst_s / max(one_s, 1e-6))))
    most = bench.args.graph_rounds
    rounds = max(min(6, most), min(most, int(total_s / (2 * replays * max(one_s, 1e-6)))))
    bursts = []  # (backend, event before, event after)
    last = torch.cuda.Event(enable_timing=True)
    last.record()
    for r in range(rounds):
        for b in (BACKENDS if r % 2 == 0 else BACKENDS[::-1]):
            for _ in range(replays):
                graphs[b].replay()
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            bursts.append((b, last, ev))
            last = ev
    bench.sync()
    raw = {b: [] for b in BACKENDS}
    for b, before, after in bursts:
        raw[b].append(before.elapsed_time(after) / replays)
    return raw, dict(replays_per_burst=replays, rounds=rounds)


def case_generate(bench, name, model):
    from transformers import CompileConfig

    a = bench.args
    models = {"inductor": model, "qkfuse": shared_weight_copy(model)}
    configs = {b: CompileConfig(backend=b) for b in BACKENDS}
    long, short = a.new_tokens, max(1, a.new_tokens // 4)
    estimates = row_estimates_s(a, name, "generate", layer_count(model))
    try:
        for batch, estimate in zip(a.batch_list, estimates):
            def one(batch=batch):
                # A fresh Dynamo state per batch size: the previous size would make the batch dim dynamic.
                torch._dynamo.reset()
                ids = bench.randint(model.config.vocab_size, (batch, a.prompt))

                def generate(b, n):
                    out = models[b].generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                             min_new_tokens=n, do_sample=False, pad_token_id=0,
                                             cache_implementation="static", compile_config=configs[b])
                    if out.shape[1] != a.prompt + n:
                        raise RuntimeError(f"generate made {out.shape[1] - a.prompt} tokens, not {n}")

                # The long one first: HF sizes every later static cache to the longest seen (no recompile).
                _, compile_s, info = bench.first_calls({b: lambda b=b: generate(b, long) for b in BACKENDS})
                for b in BACKENDS:
                    generate(b, long)  # CUDA graphs: the first calls warm up and record
                lengths = {b: [] for b in BACKENDS}

                def ms_per_token(b):
                    t_short = bench.seconds_per_call(lambda: generate(b, short), 1)
                    t_long = bench.seconds_per_call(lambda: generate(b, long), 1)
                    lengths[b].append([t_short, t_long])
                    return 1e3 * (t_long - t_short) / (long - short)

                graphs = unique_graphs()
                raw = bench.alternate({b: lambda b=b: ms_per_token(b) for b in BACKENDS}, a.generate_rounds)
                return row(name, "generate", f"bs{batch}", "ms/token", raw, compile_s=compile_s,
                           generate_s_short_long=lengths, new_tokens=[short, long], prompt=a.prompt,
                           recompiled_while_timing=recompiled_since(graphs), **info)
            guarded(bench, name, "generate", f"bs{batch}", one, estimate)
    finally:
        for m in models.values():  # drop HF's cached compiled step (it holds CUDA-graph memory)
            m.__dict__.pop("_compiled_call", None)
            m.__dict__.pop("_last_compile_config", None)


def case_decode_eager(bench, name, model):
    from transformers import DynamicCache

    a = bench.args
    kw = cache_kwarg(model)
    compiled = {b: torch.compile(model, backend=b) for b in BACKENDS}
    batch = 1

    def one():
        cache0 = DynamicCache(config=model.config)
        model(input_ids=bench.randint(model.config.vocab_size, (batch, a.prompt)), use_cache=True, **{kw: cache0})
        for layer in cache0.layers:  # one compile for every cache length instead of a static one first
            torch._dynamo.maybe_mark_dynamic(layer.keys, 2)
            torch._dynamo.maybe_mark_dynamic(layer.values, 2)
        token = bench.randint(model.config.vocab_size, (batch, 1))
        positions = [torch.full((batch, 1), a.prompt + i, device=bench.device) for i in range(a.new_tokens)]

        def steps(m, n):
            """n decode steps on a fresh copy of the prefilled cache: (seconds per step, first logits)."""
            cache = copy.deepcopy(cache0)
            first = []

            def run():
                for i in range(n):
                    logits = m(input_ids=token, position_ids=positions[i], use_cache=True, **{kw: cache}).logits
                    if i == 0:
                        first.append(logits)
            return bench.seconds_per_call(run, 1) / n, first[0]

        ref = steps(model, 1)[1]
        # Three steps: a model whose Python ints change per step (Gemma3's sliding layers) recompiles once.
        outs, compile_s, info = bench.first_calls({b: lambda b=b: steps(compiled[b], 3)[1] for b in BACKENDS})
        agree = agreement(outs, ref)
        graphs = unique_graphs()
        raw = bench.alternate({b: lambda b=b: 1e3 * steps(compiled[b], a.new_tokens)[0] for b in BACKENDS})
        return row(name, "decode_eager", f"bs{batch}", "ms/token", raw, compile_s=compile_s, agreement=agree,
                   steps=a.new_tokens, prompt=a.prompt, recompiled_while_timing=recompiled_since(graphs), **info)
    (estimate,) = row_estimates_s(a, name, "decode_eager", layer_count(model))
    guarded(bench, name, "decode_eager", f"bs{batch}", one, estimate)


def capture(bench, fn, reset):
    """One call of fn captured in a CUDA graph (after warm-up calls on a side stream, as torch advises)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            reset()
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    reset()
    with torch.cuda.graph(graph):
        fn()
    bench.sync()
    return graph


def replay_us(bench, graph, reset, replays):
    """Median device time of one replay, from CUDA events around each of `replays` back-to-back replays."""
    reset()
    events = [torch.cuda.Event(enable_timing=True) for _ in range(replays + 1)]
    events[0].record()
    for i in range(replays):
        graph.replay()
        events[i + 1].record()
    bench.sync()
    return 1e3 * statistics.median(events[i].elapsed_time(events[i + 1]) for i in range(replays))


def case_decode_graph(bench, name, model):
    from transformers import StaticCache

    a = bench.args
    kw = cache_kwarg(model)
    # fullgraph: a graph break would run eager HF code inside the CUDA-graph capture.
    compiled = {b: torch.compile(model, backend=b, dynamic=False, fullgraph=True) for b in BACKENDS}
    # Each replay or profiled step writes one cache position further (the graph advances the cache's
    # length tensor); the cache is rewound before each round, which stays inside its prompt + N slots.
    replays = min(20, a.new_tokens - 1)
    estimates = row_estimates_s(a, name, "decode_graph", layer_count(model))
    for batch, estimate in zip(a.batch_list, estimates):
        def one(batch=batch):
            cache = StaticCache(config=model.config, max_cache_len=a.prompt + a.new_tokens)
            model(input_ids=bench.randint(model.config.vocab_size, (batch, a.prompt)), use_cache=True, **{kw: cache})
            token = bench.randint(model.config.vocab_size, (batch, 1))
            position = torch.full((batch, 1), a.prompt, device=bench.device)

            def reset():
                rewind(cache, a.prompt)

            def step(m):
                rewind(cache, a.prompt, tensors=False)
                return m(input_ids=token, position_ids=position, use_cache=True, **{kw: cache}).logits

            def step_from_prompt(m):
                reset()
                return step(m)

            ref = step_from_prompt(model)
            outs, compile_s, info = bench.first_calls({b: lambda b=b: step_from_prompt(compiled[b]) for b in BACKENDS})
            agree = agreement(outs, ref)
            del outs, ref
            graphs_before = unique_graphs()
            graphs = {b: capture(bench, lambda b=b: step(compiled[b]), reset) for b in BACKENDS}
            raw = bench.alternate({b: lambda b=b: replay_us(bench, graphs[b], reset, replays) for b in BACKENDS})
            graphs.clear()  # the captured graphs hold their memory pools
            profiles = {}
            for b in BACKENDS:
                reset()
                profiles[b] = bench.kernel_profile(lambda b=b: step(compiled[b]))
            return row(name, "decode_graph", f"bs{batch}", "us/step", raw, compile_s=compile_s, agreement=agree,
                       replays_per_round=replays, cache_len=a.prompt + a.new_tokens, ceiling=ceiling(profiles),
                       recompiled_while_timing=recompiled_since(graphs_before), **info)
        guarded(bench, name, "decode_graph", f"bs{batch}", one, estimate)


def case_fn64(bench):
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm, apply_rotary_pos_emb

    tokens, hq, hk, d = 64, 32, 8, 128
    with torch.device(bench.device):
        q_norm, k_norm = Qwen3RMSNorm(d).to(torch.bfloat16), Qwen3RMSNorm(d).to(torch.bfloat16)
    for norm in (q_norm, k_norm):
        norm.weight.data = bench.randn(d) * 0.5 + 1

    def qk_norm_rope(q, k, cos, sin):  # as Qwen3Attention.forward spells it
        return apply_rotary_pos_emb(q_norm(q).transpose(1, 2), k_norm(k).transpose(1, 2), cos, sin)

    def one():
        angles = torch.rand(1, tokens, d // 2, device=bench.device, generator=bench.gen) * 6.28
        cos, sin = (torch.cat([f(angles)] * 2, -1).to(torch.bfloat16) for f in (torch.cos, torch.sin))
        args = (bench.randn(1, tokens, hq, d), bench.randn(1, tokens, hk, d), cos, sin)
        compiled = {b: torch.compile(qk_norm_rope, backend=b, dynamic=False) for b in BACKENDS}
        ref = torch.cat([t.flatten() for t in qk_norm_rope(*args)])
        outs, compile_s, info = bench.first_calls(
            {b: lambda b=b: torch.cat([t.flatten() for t in compiled[b](*args)]) for b in BACKENDS})
        calls = 200
        raw = bench.alternate({b: lambda b=b: 1e6 * bench.seconds_per_call(lambda: compiled[b](*args), calls)
                               for b in BACKENDS})
        return row("fn", "fn64", f"{tokens} tok {hq}/{hk}x{d}", "us/call", raw, compile_s=compile_s,
                   agreement=agreement(outs, ref), calls_per_measurement=calls, **info)
    guarded(bench, "fn", "fn64", f"{tokens} tok {hq}/{hk}x{d}", one, row_estimates_s(bench.args, "fn", "fn64", 0)[0])


LM_CASES = {"prefill": case_prefill, "prefill_graph": case_prefill_graph, "generate": case_generate,
            "decode_eager": case_decode_eager, "decode_graph": case_decode_graph}
DIT_CASES = {"prefill": case_prefill, "prefill_graph": case_prefill_graph}


# ---- planning ------------------------------------------------------------------------------------

def compile_estimate_s(args, name, layers):
    if args.tiny:
        return TINY_COMPILE_S
    base, per_layer = COMPILE_S[name]
    return base + per_layer * layers


def forward_estimate_s(name, layers, batch, seq):
    linear, attention = FORWARD_S_PER_TOKEN_LAYER
    return batch * seq * layers * (linear + seq * attention) * FORWARD_SCALE[name]


def prefill_row_estimates_s(args, name, layers, batch, seq, wall=True):
    """(wall row, device-time row) seconds of one prefill shape; the compile (both backends) is in the
    first row that runs: the wall row, or the device-time row when wall=False. Device-time row 0 on CPU."""
    compiles = 2 * compile_estimate_s(args, name, layers)
    cuda = args.device == "cuda"
    if args.tiny:
        return (compiles + 2.0 if wall else 0.0), (2.0 + (0 if wall else compiles) if cuda else 0.0)
    t = forward_estimate_s(name, layers, batch, seq)
    profile = 6 * t + 2.0 + 0.1 * layers  # torch.profiler: 3 forwards per backend + trace processing
    # wall: eager reference, 3 calibration calls, rounds x 2 measurements of max(0.25 s, one forward)
    wall_s = t + 3 * t + args.rounds * 2 * max(0.25, t) + 2.0
    # device: warm-up + capture (3 forwards per backend), 3 warm replays each, the paired rounds
    burst = max(1, min(20, round(GRAPH_BURST_S / t))) * t
    rounds = max(min(6, args.graph_rounds), min(args.graph_rounds, int(GRAPH_TOTAL_S / (2 * burst))))
    graph_s = 12 * t + rounds * 2 * burst + profile + 1.0
    if not wall:
        return 0.0, compiles + t + graph_s
    return compiles + wall_s, (graph_s if cuda else 0.0)


def row_estimates_s(args, name, case, layers):
    """Rough seconds of each row of a case (each compiles both backends once, then times them); a prefill
    shape on CUDA makes two rows (wall clock and device time: one compile), summed here."""
    if case == "fn64":
        return [20.0]
    if case in ("prefill", "prefill_graph"):
        return [sum(prefill_row_estimates_s(args, name, layers, b, s, wall=case == "prefill"))
                for b, s in args.shape_list]
    compiles = 2 * compile_estimate_s(args, name, layers)
    if args.tiny:
        return [compiles + 2.0] * (1 if case == "decode_eager" else len(args.batch_list))
    if case == "decode_eager":  # rounds x 2 x N eager-launched steps
        return [compiles + 5.0 + 0.3 * layers]
    # decode_graph: cache prefill, replays and torch.profiler; generate: 2 lengths x rounds x 2 backends
    per_layer = {"generate": 0.4 * args.generate_rounds / 5, "decode_graph": 0.1}[case]
    return [compiles + {"generate": 8.0, "decode_graph": 4.0}[case] + per_layer * layers] * len(args.batch_list)


def default_layers(args, name):
    if args.layers:
        return args.layers
    if name == "flux":
        return (TINY_FLUX if args.tiny else FLUX)["blocks"]
    return TINY_LM["num_hidden_layers"] if args.tiny else LMS[name][2]["num_hidden_layers"]


def plan(args):
    """[(model, case, row estimates in seconds, skip reason or None)] in run order; fn64 runs once, first."""
    tasks = [("fn", "fn64", row_estimates_s(args, "fn", "fn64", 0), None)] if "fn64" in args.case_list else []
    for name in args.model_list:
        for case in args.case_list:
            if case == "fn64" or (name == "flux" and case not in DIT_CASES):  # a DiT has no decode
                continue
            skip = f"needs CUDA ({CUDA_ONLY[case]})" if args.device != "cuda" and case in CUDA_ONLY else None
            if case == "prefill_graph" and "prefill" in args.case_list and not skip:
                skip = "the prefill case measures device time too (its prefill_graph rows)"
            tasks.append((name, case, [] if skip else row_estimates_s(args, name, case, default_layers(args, name)),
                          skip))
    return tasks


# ---- output --------------------------------------------------------------------------------------

def fmt(v, digits=3):
    if v is None:
        return "-"
    return f"{v:.{digits}g}" if abs(v) < 1000 else f"{v:.0f}"


def markdown(doc):
    m = doc["meta"]
    lines = [f"# Whole models: Inductor vs qkfuse on {m.get('gpu', m.get('device'))} ({m['date']})", "",
             f"torch {m['torch']}, triton {m.get('triton')}, transformers {m.get('transformers')}, "
             f"Python {m.get('python')}; qkfuse pass {m.get('qkfuse_uuid', '?')[:12]}.",
             "Commands: " + "; ".join(f"`{c}`" for c in m.get("commands", [m.get("command", "")])), "",
             "Models (random weights, bf16): qwen3 = Qwen3-8B-shaped Qwen3ForCausalLM; gemma3 = Gemma3ForCausalLM "
             "with Gemma3-12B's dims; flux = Flux-shaped, self-contained DiT (single-stream blocks); fn = the "
             "QK-norm + RoPE function alone.", "",
             "Medians of alternating A/B rounds; speed-up = inductor / qkfuse (> 1: qkfuse faster). "
             "prefill: ms per forward (LMs: use_cache=False, logits_to_keep=1). generate: HF generate with "
             "a static cache and CompileConfig(backend=...) (CUDA graphs), ms/token from the difference of "
             "two generate lengths. decode_eager: torch.compile, DynamicCache, no CUDA graphs, ms/token. "
             "prefill_graph: the prefill rows' compiled forward (same compile) captured in a CUDA graph per "
             "backend, device ms per replay (CUDA events), bursts of a few replays alternating A B B A ... "
             "without a host sync, many short rounds (falls back to wall clock, unit 'ms (wall)', where "
             "capture fails). "
             "decode_graph: one compiled decode step captured in a CUDA graph, device us per replay. "
             "fn64: the Qwen3 QK-norm + RoPE function alone, us per call from Python. "
             "share = Inductor's q/k norm + RoPE + KV-cache write kernels / all kernel time (torch.profiler); "
             "recovered = (that subgraph's kernel time under Inductor - the same kernels' under qkfuse) / "
             "the former (1 = the fused kernel is free; the totals' difference is drift-dominated). "
             "agreement = max |out - eager| / max |eager| (inductor / qkfuse); flagged above "
             f"{AGREEMENT_FLAG} or twice Inductor's. "
             "paired ratio = median over rounds of (that round's inductor / its qkfuse: the two ran back to "
             "back, so drift between rounds cancels), with the 25-75% range of those ratios and the round "
             "count; '-' where a row predates it.", "",
             "| model | case | shape | inductor | qkfuse | unit | speed-up | paired ratio (25-75%; rounds) | "
             "compile s (ind / qk) | norm+RoPE share | recovered | agreement (ind / qk) | fused sites | "
             "row s (estimate) | note |",
             "|---|---|---|---:|---:|---|---:|---:|---|---:|---:|---|---:|---|---|"]
    for r in doc["rows"]:
        layers = f" ({r['layers']} layers)" if "layers" in r else ""
        head = f"| {r['model']}{layers} | {r['case']} | {r.get('shape', '')} |"
        if "error" in r or "skipped" in r:
            lines.append(head + " - | - | | | | | | | | | | " + (r.get("error") or f"skipped: {r['skipped']}")
                         .replace("|", "/").replace("\n", " ")[:160] + " |")
            continue
        med, c = r["median"], r.get("compile_s", {})
        ceil = r.get("ceiling") or {}
        ag = r.get("agreement") or {}
        notes = []
        if ag and not ag.get("ok", True):
            notes.append("AGREEMENT FLAG")
        if r.get("recompiled_while_timing"):
            notes.append(f"{r['recompiled_while_timing']} recompile(s) while timing")
        if r.get("fallback"):
            notes.append(r["fallback"].replace("|", "/").replace("\n", " ")[:160])
        if r.get("replays_per_burst"):
            notes.append(f"{r['replays_per_burst']} replay(s) per burst")
        pr = r.get("paired")
        pr = f"{pr['median']:.4f}x ({pr['p25']:.4f}-{pr['p75']:.4f}; {pr['rounds']})" if pr else "-"
        compile_s = ("shared" if r.get("compile_shared_with") else
                     f"{c['inductor']:.0f} / {c['qkfuse']:.0f}" if "inductor" in c else "-")
        share = f"{100 * ceil['share']:.1f}%" if ceil.get("share") is not None else "-"
        took = r.get("seconds", {})
        took = f"{took['took']:.0f} ({took['estimate']:.0f})" if took else "-"
        agree = f"{ag['inductor_vs_eager']:.2g} / {ag['qkfuse_vs_eager']:.2g}" if ag else "-"
        lines.append(head + f" {fmt(med['inductor'], 4)} | {fmt(med['qkfuse'], 4)} | {r['unit']} | "
                     f"{r['speedup']:.3f}x | {pr} | {compile_s} | {share} | "
                     f"{fmt(recovered(ceil), 2)} | {agree} | {r.get('qkfuse_fused_sites', '-')} | {took} | "
                     f"{'; '.join(notes)} |")
    ceiled = [r for r in doc["rows"] if r.get("ceiling")]
    if ceiled:
        lines += ["", "Kernel time per step (torch.profiler, us): all kernels; the q/k norm + RoPE subgraph "
                  "(Inductor: its RoPE kernels + the norm launches the qkfuse build no longer makes; qkfuse: its "
                  "kernel + any RoPE kernel left); static-cache write kernels; qkfuse kernel launches per step.", "",
                  "| model | case | shape | total ind / qk | norm+RoPE ind / qk | of which ind RoPE / norm kernels | "
                  "kv write ind / qk | qkfuse launches |",
                  "|---|---|---|---|---|---|---|---:|"]
        for r in ceiled:
            c = r["ceiling"]
            pair = lambda d: f"{d['inductor']:.1f} / {d['qkfuse']:.1f}"  # noqa: E731
            lines.append(f"| {r['model']} | {r['case']} | {r['shape']} | {pair(c['total_kernel_us'])} | "
                         f"{pair(c['norm_rope_us'])} | {c['inductor_rope_kernels_us']:.1f} / "
                         f"{c['inductor_replaced_norm_us']:.1f} | {pair(c['kv_write_us'])} | "
                         f"{c['qkfuse_launches']:g} |")
    return "\n".join(lines) + "\n"


def plot(doc, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [r for r in doc["rows"] if "speedup" in r]
    if not rows:
        return
    colors = dict(zip(CASES, ("tab:blue", "tab:cyan", "tab:orange", "tab:green", "tab:red", "tab:purple")))
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(rows) + 1.5))
    labels = [f"{r['model']} {r['case']} {r['shape']}" for r in rows]
    speedups = [r["speedup"] for r in rows]
    # Bars grow from 1.0: right of the line qkfuse is faster, left of it slower.
    ax.barh(range(len(rows)), [s - 1 for s in speedups], left=1.0, color=[colors.get(r["case"], "gray") for r in rows])
    for i, s in enumerate(speedups):
        ax.text(max(s, 1.0), i, f" {s:.3f}x", va="center", ha="left", fontsize=7)
    ax.axvline(1.0, color="black", lw=1)
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(1 - 1.3 * max(0.04, 1 - min(speedups)), 1 + 1.3 * max(0.04, max(speedups) - 1))
    ax.set_xlabel("speed-up of qkfuse over Inductor (inductor time / qkfuse time)")
    ax.set_title(f"Whole models, {doc['meta'].get('gpu', doc['meta'].get('device'))} ({doc['meta']['date'][:10]})")
    ax.grid(axis="x", alpha=0.3)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def write_outputs(doc, out_dir, tag):
    """<tag>.{json,md,png} in out_dir and, where the GPU machine's $OUT is set, there too."""
    text = markdown(doc)
    for folder in dict.fromkeys(d for d in (out_dir, os.environ.get("OUT")) if d):
        os.makedirs(folder, exist_ok=True)
        base = os.path.join(folder, tag)
        with open(base + ".json.tmp", "w") as f:
            json.dump(doc, f, indent=1)
        os.replace(base + ".json.tmp", base + ".json")  # a kill mid-write leaves the previous JSON whole
        with open(base + ".md", "w") as f:
            f.write(text)
        try:
            plot(doc, base + ".png")
        except Exception:  # noqa: BLE001  (a broken plot must not lose the numbers)
            traceback.print_exc()


def render(paths, out_dir, tag):
    """Merge result JSONs (later files replace rows with the same model, case and shape) and redraw."""
    docs = [json.load(open(p)) for p in paths]
    rows = {}
    for d in docs:
        for r in d["rows"]:
            rows[(r["model"], r["case"], r.get("shape"))] = r
    meta = dict(docs[-1]["meta"])
    meta["commands"] = [c for d in docs for c in d["meta"].get("commands", [d["meta"].get("command", "")])]
    doc = {"meta": meta, "rows": list(rows.values())}
    write_outputs(doc, out_dir, tag)
    print(markdown(doc))


# ---- main ----------------------------------------------------------------------------------------

_bar = None


def log(msg):
    (_bar.write if _bar is not None else print)(msg)
    sys.stdout.flush()


def parse_shapes(text):
    return [tuple(int(v) for v in s.lower().split("x")) for s in text.split(",") if s]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)}")
    p.add_argument("--cases", default=",".join(c for c in CASES if c != "prefill_graph"),
                   help=f"comma list of {', '.join(CASES)} (default: all but prefill_graph, which prefill includes)")
    p.add_argument("--layers", type=int, default=None, help="override every model's layer / block count")
    p.add_argument("--shapes", default=None, help="prefill BxS list (default 1x4096,8x512,1x32768)")
    p.add_argument("--batches", default=None, help="generate / decode_graph batch sizes (default 1,16,64)")
    p.add_argument("--rounds", type=int, default=None, help="alternating A/B rounds (default 5)")
    p.add_argument("--generate-rounds", type=int, default=None,
                   help="generate: A/B rounds (default 15, 3 with --quick/--tiny: one generate pair is a "
                        "fraction of a second, and 5 rounds left +-3%% between runs)")
    p.add_argument("--graph-rounds", type=int, default=None,
                   help="prefill_graph: most A/B rounds of CUDA-graph replay bursts (default 30; 8 with --quick)")
    p.add_argument("--new-tokens", type=int, default=None, help="decode tokens N (default 64)")
    p.add_argument("--prompt", type=int, default=None, help="decode prompt tokens (default 128)")
    p.add_argument("--quick", action="store_true", help="small shapes, few rounds, 2 layers: a smoke test")
    p.add_argument("--tiny", action="store_true", help="tiny model dims (runs on CPU; CUDA-only cases skipped)")
    p.add_argument("--out", default=RESULTS, help="output folder (also written to $OUT when that is set)")
    p.add_argument("--tag", default=None, help="output file names: <out>/<tag>.{json,md,png}")
    p.add_argument("--plan", action="store_true", help="print the planned cases and time estimates, run nothing")
    p.add_argument("--budget", type=float, default=0,
                   help="seconds for the whole run: skip each row (or case) whose estimate exceeds what is left")
    p.add_argument("--render", nargs="+", metavar="JSON", help="merge these result JSONs and redraw md/png")
    a = p.parse_args(argv)
    small = a.quick or a.tiny
    a.model_list = [m for m in a.models.split(",") if m]
    a.case_list = [c for c in a.cases.split(",") if c]
    for value, known, what in ((a.model_list, MODELS, "model"), (a.case_list, CASES, "case")):
        bad = sorted(set(value) - set(known))
        if bad:
            p.error(f"unknown {what}(s) {bad}; choose from {list(known)}")
    default_shapes = "1x64,4x16" if a.tiny else "1x1024,4x256" if a.quick else "1x4096,8x512,1x32768"
    try:
        a.shape_list = parse_shapes(a.shapes or default_shapes)
        a.batch_list = [int(b) for b in (a.batches or ("1,4" if small else "1,16,64")).split(",") if b]
    except ValueError:
        p.error("--shapes takes BxS,BxS,... and --batches B,B,... (integers)")
    if any(len(shape) != 2 for shape in a.shape_list):
        p.error("--shapes takes BxS,BxS,...")
    a.rounds = a.rounds or (3 if small else 5)
    a.generate_rounds = a.generate_rounds or (3 if small else 15)
    a.graph_rounds = a.graph_rounds or (8 if small else 30)
    a.new_tokens = a.new_tokens or (8 if a.tiny else 16 if a.quick else 64)
    a.prompt = a.prompt or (16 if a.tiny else 32 if a.quick else 128)
    if a.quick and a.layers is None and not a.tiny:
        a.layers = 2
    if a.new_tokens < 4 or a.rounds < 1 or a.graph_rounds < 1:  # decode_graph advances the cache up to 3 slots
        p.error("--new-tokens must be at least 4, --rounds and --graph-rounds at least 1")
    # --plan is for planning a GPU run from anywhere: it plans for CUDA unless --tiny.
    a.device = "cuda" if torch.cuda.is_available() or (a.plan and not a.tiny) else "cpu"
    return a


def metadata(args):
    import transformers

    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "device": args.device,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "cpus": os.cpu_count(),
            "command": "python benchmarks/bench_models.py " + " ".join(sys.argv[1:]),
            "qkfuse_uuid": str(qkfuse.pass_().uuid()),
            "config": {k: v for k, v in vars(args).items() if k not in ("render",)}}
    meta["commands"] = [meta["command"]]
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    if args.device == "cuda":
        meta["gpu"] = torch.cuda.get_device_name()
    return meta


def set_config(module, value, *names):
    """Set the first of `names` that this torch has (config names differ between torch versions)."""
    for name in names:
        if hasattr(module, name):
            setattr(module, name, value)
            return


def configure_torch():
    # Every compile runs the pass (an FX-graph cache hit would skip it and its fused-site counter).
    set_config(torch._inductor.config, False, "fx_graph_cache")
    set_config(torch._functorch.config, False, "enable_autograd_cache")
    # Both backends and several shapes share the model's code object: room for all their graphs.
    set_config(torch._dynamo.config, 64, "recompile_limit", "cache_size_limit")
    set_config(torch._dynamo.config, 4096, "accumulated_recompile_limit", "accumulated_cache_size_limit")
    # Whole kernel names (op lists), so the ceiling's name rule sees every op of a kernel.
    set_config(torch._inductor.config, 1000, "kernel_name_max_ops")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except ImportError:
        pass


def print_plan(args, tasks):
    print(f"bench_models: {args.device}, models {args.model_list}, cases {args.case_list}, shapes {args.shape_list}, "
          f"batches {args.batch_list}, rounds {args.rounds} (graph {args.graph_rounds}), prompt {args.prompt}, new tokens {args.new_tokens}, "
          f"layers {args.layers or 'default'}" + (f", budget {args.budget:.0f} s" if args.budget else ""), flush=True)
    for name, case, rows, skip in tasks:
        layers = "" if name == "fn" else f"{default_layers(args, name):3d} layers"
        print(f"  {name:7s} {case:13s} {layers:10s} " + (f"skipped: {skip}" if skip else
              f"~{sum(rows):4.0f} s  (rows: {', '.join(f'{r:.0f}' for r in rows)} s)"), flush=True)
    total = STARTUP_S + sum(sum(t[2]) for t in tasks)
    print(f"  estimated total ~{total:.0f} s ({total / 60:.1f} min), rough; --budget S skips what would not fit",
          flush=True)


def run_case(bench, name, case, model):
    if case == "fn64":
        case_fn64(bench)
    else:
        (DIT_CASES if name == "flux" else LM_CASES)[case](bench, name, model)


def main(argv=None):
    global _bar
    args = parse_args(argv)
    today = datetime.date.today().isoformat()
    if args.render:
        render(args.render, args.out, args.tag or f"{today}-models-merged")
        return 0
    args.tag = args.tag or f"{today}-models" + ("-tiny" if args.tiny else "-quick" if args.quick else "")
    tasks = plan(args)
    print_plan(args, tasks)
    if args.plan:
        return 0
    if args.device != "cuda" and not args.tiny:
        print("bench_models: no CUDA here; full-size models need a GPU (use --tiny for a CPU smoke test)",
              file=sys.stderr)
        return 2
    configure_torch()
    qkfuse.register()
    doc = {"meta": metadata(args), "rows": []}

    def emit(r):
        if model is not None and r["model"] == model_name:
            r["layers"] = layer_count(model)
        doc["rows"].append(r)
        write_outputs(doc, args.out, args.tag)
        what = (f"ERROR {r['error']}" if "error" in r else f"skipped: {r['skipped']}" if "skipped" in r else
                f"inductor {fmt(r['median']['inductor'], 4)} / qkfuse {fmt(r['median']['qkfuse'], 4)} {r['unit']}"
                f" -> {r['speedup']:.3f}x" + (f", paired {r['paired']['median']:.4f}x ({r['paired']['p25']:.4f}-"
                                              f"{r['paired']['p75']:.4f})" if r.get("paired") else "")
                + (f" [{r['fallback']}]" if r.get("fallback") else ""))
        log(f"  {r['model']} {r['case']} {r['shape']}: {what}")

    model, model_name = None, None
    bench = Bench(args, args.device, emit)
    # A bar on a terminal; in a captured log (no tty) the "[t s] (i/n)" lines are the progress.
    try:
        from tqdm import tqdm

        _bar = tqdm(total=len(tasks), desc="cases", file=sys.stdout) if sys.stdout.isatty() else None
    except ImportError:
        _bar = None
    with torch.no_grad():
        for i, (name, case, rows, skip) in enumerate(tasks):
            skip = skip or bench.over_budget(min(rows))  # not even its cheapest row fits: skip the case
            log(f"[{bench.elapsed():5.0f} s] ({i + 1}/{len(tasks)}) {name} {case}" +
                (f": skipped, {skip}" if skip else f" (estimate ~{sum(rows):.0f} s)"))
            if skip:
                emit({"model": name, "case": case, "shape": "", "skipped": skip})
            else:
                case_start = time.perf_counter()
                try:
                    if case != "fn64" and model_name != name:
                        model = model_name = None
                        free_memory()
                        t0 = time.perf_counter()
                        model, model_name = build(name, args.layers, args.tiny, args.device, torch.bfloat16), name
                        log(f"  built {name}: {layer_count(model)} layers, "
                            f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f} B params "
                            f"in {time.perf_counter() - t0:.1f} s")
                    run_case(bench, name, case, model)
                except Exception as e:  # noqa: BLE001  (a failed case must not lose the others)
                    traceback.print_exc()
                    emit({"model": name, "case": case, "shape": "", "error": f"{type(e).__name__}: {str(e)[:400]}"})
                torch._dynamo.reset()
                free_memory()
                log(f"  {name} {case} took {time.perf_counter() - case_start:.0f} s (estimate {sum(rows):.0f} s)")
            if _bar is not None:
                _bar.update(1)
    if _bar is not None:
        _bar.close()
        _bar = None
    print(f"\nbench_models: done in {bench.elapsed():.0f} s; {os.path.join(args.out, args.tag)}.{{json,md,png}}\n")
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
