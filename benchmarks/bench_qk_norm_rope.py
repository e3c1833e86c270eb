"""QK-norm + RoPE on the GPU: correctness first, then timings of every way to run it.

    python benchmarks/bench_qk_norm_rope.py [--shapes main,extra,across,layer,wan,sweep] [--no-flashinfer] [--tag T]

For each shape it
1. checks correctness: fresh random inputs, a float64 reference of the same HF code, memory
   poisoned with NaN before each call (unwritten outputs show up), the qkfuse result's error vs
   float64 no worse than the unfused eager graph's (plus the dtype's rounding);
2. times, as medians of triton.testing.do_bench: eager HF code, torch.compile backend="inductor",
   backend="qkfuse" (end to end through the pass), the raw qkfuse op called eagerly, the
   flashinfer path (backend="qkfuse", kernels="flashinfer"), each compiled variant also with
   mode="reduce-overhead" (CUDA graphs; inputs marked static so no input copies are timed), and the
   device time of each (CUDA-graph replay of one call);
3. reports microseconds, GB/s, fraction of the measured copy floor and speedup over Inductor.

Writes benchmarks/results/<date>-h200.{md,json,png} (and the same under $OUT when set).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import qkfuse  # noqa: E402
# diffusers Wan's apply_rotary_emb, transcribed once (it is local to WanAttnProcessor: not importable)
from tests.kernels.test_reference import wan_apply_rotary_emb  # noqa: E402

DEV = "cuda"
RESULTS = os.path.join(os.path.dirname(__file__), "results")


# ---- the attention code being optimised (as HF / diffusers write it) ----------------------------

def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def rms_norm_llama(x, w, eps):  # Llama/Qwen3: cast back before the weight multiply
    dt = x.dtype
    x = x.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return w * x.to(dt)


def rms_norm_gemma(x, w, eps):  # Gemma / Qwen3.5: (1 + w) in float32, cast at the end
    out = x.float()
    out = out * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + eps)
    return (out * (1.0 + w.float())).type_as(x)


def qwen3(q, k, qw, kw, cos, sin):
    """HF Qwen3: per-head norm on [B,S,H,D], transpose, rotate_half RoPE (cos [B,S,D])."""
    q = rms_norm_llama(q, qw, 1e-6).transpose(1, 2)
    k = rms_norm_llama(k, kw, 1e-6).transpose(1, 2)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def qwen35_partial(q, k, qw, kw, cos, sin):
    """Qwen3.5 / Qwen3-Next: (1+w) norm, partial rotary (cos covers rotary_dim < head_dim)."""
    q = rms_norm_gemma(q, qw, 1e-6).transpose(1, 2)
    k = rms_norm_gemma(k, kw, 1e-6).transpose(1, 2)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rd = cos.shape[-1]
    out = []
    for x in (q, k):
        xr, xp = x[..., :rd], x[..., rd:]
        out.append(torch.cat([xr * cos + rotate_half(xr) * sin, xp], dim=-1))
    return tuple(out)


def flux_interleaved(q, k, qw, kw, cos, sin):
    """diffusers Flux: torch rms_norm on [B,S,H,D], interleaved RoPE in float32 (cos [S,D] fp32)."""
    q = torch.nn.functional.rms_norm(q, (q.shape[-1],), qw, 1e-6)
    k = torch.nn.functional.rms_norm(k, (k.shape[-1],), kw, 1e-6)
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    out = []
    for x in (q, k):
        xr, xi = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
        rot = torch.stack([-xi, xr], dim=-1).flatten(3)
        out.append((x.float() * c + rot.float() * s).to(x.dtype))
    return tuple(out)


ACROSS_HEAD_DIM = 128


def olmo2_across(q, k, qw, kw, cos, sin):
    """HF OLMo2/3, OLMoE, MiniMax-M2: RMSNorm across all heads of the flat projection ([H*D] weight,
    multiplied in float32), then the head view, transpose, RoPE with float32 cos/sin, cast back."""
    D = ACROSS_HEAD_DIM
    out = []
    for x, w in ((q, qw), (k, kw)):
        dt = x.dtype
        xf = x.to(torch.float32)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)
        x = (w * xf).to(dt).view(*x.shape[:-1], -1, D).transpose(1, 2)
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        out.append((x * c + rotate_half(x) * s).to(dt))
    return tuple(out)


def persimmon_layernorm(q, k, qw, kw, qb, kb, cos, sin):
    """HF Persimmon / Phi (qk_layernorm): per-head nn.LayerNorm(head_dim) with weight and bias on
    [B,S,H,D], transpose, partial rotary (cos covers rotary_dim < head_dim)."""
    out = []
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    rd = cos.shape[-1]
    for x, w, b in ((q, qw, qb), (k, kw, kb)):
        x = torch.nn.functional.layer_norm(x, (x.shape[-1],), w, b, 1e-5).transpose(1, 2)
        xr, xp = x[..., :rd], x[..., rd:]
        out.append(torch.cat([xr * c + rotate_half(xr) * s, xp], dim=-1))
    return tuple(out)


WAN_HEAD_DIM = 128


def wan_across(q, k, qw, kw, freqs_cos, freqs_sin):
    """diffusers Wan self-attention: torch.nn.RMSNorm over all heads of the flat [B,S,H*D]
    projection, unflatten to heads, RoPE per pair with float32 freqs [1,S,1,D] (the recipe's
    half_table: their step-2 views)."""
    out = []
    for x, w in ((q, qw), (k, kw)):
        x = torch.nn.functional.rms_norm(x, (x.shape[-1],), w, 1e-6).unflatten(2, (-1, WAN_HEAD_DIM))
        out.append(wan_apply_rotary_emb(x, freqs_cos, freqs_sin))
    return tuple(out)


def qkv_strided(qkv, qw, kw, cos, sin, Hq, Hk, D):
    """A fused qkv projection: q and k are strided slices of one [B,S,(Hq+2Hk)*D] tensor."""
    B, S = qkv.shape[:2]
    q = qkv[..., : Hq * D].view(B, S, Hq, D)
    k = qkv[..., Hq * D:(Hq + Hk) * D].view(B, S, Hk, D)
    return qwen3(q, k, qw, kw, cos, sin)


@dataclasses.dataclass
class Case:
    name: str
    tokens: int
    hq: int
    hk: int
    d: int
    form: str = "qwen3"  # qwen3 | partial | interleaved | qkv | across | layer | wan
    dtype: torch.dtype = torch.bfloat16
    group: str = "main"

    rd: int = 0  # rotary_dim, where the form does not imply it

    def rotary_dim(self):
        if self.rd:
            return self.rd
        return self.d // 4 if self.form == "partial" else self.d

    def make(self, gen):
        T, Hq, Hk, D, dt = self.tokens, self.hq, self.hk, self.d, self.dtype
        r = lambda *s, dtype=dt: torch.randn(*s, device=DEV, dtype=dtype, generator=gen)  # noqa: E731
        qw, kw = r(D) * 0.5 + 1, r(D) * 0.5 + 1
        if self.form == "across":  # float32 cos/sin, [H*D] weights; D = 128 (olmo2_across)
            assert D == ACROSS_HEAD_DIM
            ang = torch.rand(1, T, D // 2, device=DEV, generator=gen) * 6.28
            cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
            return olmo2_across, (r(1, T, Hq * D), r(1, T, Hk * D), r(Hq * D) * 0.5 + 1, r(Hk * D) * 0.5 + 1,
                                  cos, sin)
        if self.form == "wan":  # float32 freqs as diffusers builds them (repeat_interleave'd), [H*D] weights
            assert D == WAN_HEAD_DIM
            ang = torch.rand(1, T, 1, D // 2, device=DEV, generator=gen) * 6.28
            fc, fs = ang.cos().repeat_interleave(2, -1), ang.sin().repeat_interleave(2, -1)
            return wan_across, (r(1, T, Hq * D), r(1, T, Hk * D), r(Hq * D) * 0.5 + 1, r(Hk * D) * 0.5 + 1, fc, fs)
        if self.form == "layer":
            rd = self.rotary_dim()
            ang = torch.rand(1, T, rd // 2, device=DEV, generator=gen) * 6.28
            cos, sin = torch.cat([ang.cos()] * 2, -1).to(dt), torch.cat([ang.sin()] * 2, -1).to(dt)
            return persimmon_layernorm, (r(1, T, Hq, D), r(1, T, Hk, D), qw, kw, r(D) * 0.1, r(D) * 0.1, cos, sin)
        if self.form == "interleaved":
            ang = torch.rand(T, D // 2, device=DEV, generator=gen) * 6.28
            cos = torch.repeat_interleave(ang.cos(), 2, -1)
            sin = torch.repeat_interleave(ang.sin(), 2, -1)
            return flux_interleaved, (r(1, T, Hq, D), r(1, T, Hk, D), qw, kw, cos, sin)
        ang = torch.rand(1, T, self.rotary_dim() // 2, device=DEV, generator=gen) * 6.28
        cos = torch.cat([ang.cos()] * 2, -1).to(dt)
        sin = torch.cat([ang.sin()] * 2, -1).to(dt)
        if self.form == "partial":
            return qwen35_partial, (r(1, T, Hq, D), r(1, T, Hk, D), r(D) * 0.1, r(D) * 0.1, cos, sin)
        if self.form == "qkv":
            fn = lambda qkv, qw, kw, cos, sin: qkv_strided(qkv, qw, kw, cos, sin, Hq, Hk, D)  # noqa: E731
            return fn, (r(1, T, (Hq + 2 * Hk) * D), qw, kw, cos, sin)
        return qwen3, (r(1, T, Hq, D), r(1, T, Hk, D), qw, kw, cos, sin)

    def bytes_moved(self):
        """Read q, k, cos, sin once; write q, k once."""
        e = torch.finfo(self.dtype).bits // 8
        cs = 4 if self.form in ("interleaved", "across", "wan") else e
        rd = self.rotary_dim()
        return 2 * self.tokens * (self.hq + self.hk) * self.d * e + 2 * self.tokens * rd * cs


MAIN = [  # ../shared/gpu.md's table
    Case("decode 64, 32/8, 128", 64, 32, 8, 128),
    Case("prefill 4k, 32/8, 128", 4096, 32, 8, 128),
    Case("prefill 32k, 32/8, 128", 32768, 32, 8, 128),
    Case("DiT 4k, 24/24, 128", 4096, 24, 24, 128),
    Case("DiT 32k, 40/40, 128", 32768, 40, 40, 128),
    Case("16k, 16/16, 64", 16384, 16, 16, 64),
    Case("8k, 16/8, 256", 8192, 16, 8, 256),
]
EXTRA = [
    Case("4k partial 25% (1+w)", 4096, 16, 2, 256, "partial", group="extra"),
    Case("4k interleaved fp32 cos", 4096, 24, 24, 128, "interleaved", group="extra"),
    Case("4k fp16", 4096, 32, 8, 128, dtype=torch.float16, group="extra"),
    Case("4k strided qkv", 4096, 32, 8, 128, "qkv", group="extra"),
]
ACROSS = [  # a norm across heads (measured 2026-12-02: kernels="auto" fuses it)
    Case("across decode 64, OLMo2-7B 32/32", 64, 32, 32, 128, "across", group="across"),
    Case("across 4k, OLMo2-7B 32/32", 4096, 32, 32, 128, "across", group="across"),
    Case("across 32k, OLMo2-7B 32/32", 32768, 32, 32, 128, "across", group="across"),
    Case("across 4k, OLMoE 16/16", 4096, 16, 16, 128, "across", group="across"),
    Case("across 4k, MiniMax-M2 48/8", 4096, 48, 8, 128, "across", group="across"),
]
LAYER = [  # LayerNorm q/k norms (kernels="auto" was held until these measured it)
    Case("layer decode 64, Persimmon-8B 64/64 x64", 64, 64, 64, 64, "layer", rd=32, group="layer"),
    Case("layer 4k, Persimmon-8B 64/64 x64", 4096, 64, 64, 64, "layer", rd=32, group="layer"),
    Case("layer 4k, Phi-2 32/32 x80", 4096, 32, 32, 80, "layer", rd=32, group="layer"),
    Case("layer 32k, Phi-2 32/32 x80", 32768, 32, 32, 80, "layer", rd=32, group="layer"),
]
WAN = [  # Wan's half tables (one cos/sin per pair; kernels="auto" was held until these measured it)
    Case("wan 4k, Wan2.1-14B 40x128", 4096, 40, 40, 128, "wan", group="wan"),
    Case("wan 32k, Wan2.1-14B 40x128", 32768, 40, 40, 128, "wan", group="wan"),
    Case("wan 4k, Wan2.1-1.3B 12x128", 4096, 12, 12, 128, "wan", group="wan"),
    Case("wan 32k, Wan2.1-1.3B 12x128", 32768, 12, 12, 128, "wan", group="wan"),
]
SWEEP = [Case(f"sweep {t}", t, 32, 8, 128, group="sweep") for t in (64, 256, 1024, 4096, 16384, 32768)]


# ---- helpers ---------------------------------------------------------------------------------

def poison():
    """Fill freed cached memory with NaN so an unwritten output element shows up as NaN."""
    free = torch.cuda.mem_get_info()[0]
    n = min(free // 8, 2 << 30) // 4
    torch.empty(n, device=DEV, dtype=torch.float32).fill_(float("nan"))
    torch.cuda.synchronize()


def rel_err(out, ref):
    out, ref = [o.double() for o in out], [r.double() for r in ref]
    num = sum(float((o - r).norm() ** 2) for o, r in zip(out, ref)) ** 0.5
    den = sum(float(r.norm() ** 2) for r in ref) ** 0.5
    return num / den


def copy_bandwidth():
    from triton.testing import do_bench

    x = torch.empty(1 << 28, device=DEV, dtype=torch.float32)  # 1 GiB
    y = torch.empty_like(x)
    t = do_bench(lambda: y.copy_(x), warmup=100, rep=500, return_mode="median") * 1e-3
    return 2 * x.numel() * 4 / t


def static_inputs(args):
    for a in args:
        torch._dynamo.mark_static_address(a)


def timed(fn, args):
    from triton.testing import do_bench, do_bench_cudagraph

    e2e = min(do_bench(lambda: fn(*args), warmup=25, rep=150, return_mode="median") for _ in range(3)) * 1e3
    try:
        dev = do_bench_cudagraph(lambda: fn(*args), rep=150, return_mode="median") * 1e3
    except Exception:
        dev = float("nan")
    return e2e, dev


def variants(fn, with_flashinfer, form="qwen3"):
    qk = qkfuse.qkfuse_backend
    # the Triton kernel itself, as when these rows decided the policy
    opts = {"qkfuse.kernels": "triton"} if form in ("layer", "wan") else None
    # (torch.compile refuses mode= with options=; qkfuse.fuse merges them)
    v = {
        "eager": lambda: fn,
        "inductor": lambda: torch.compile(fn, backend="inductor"),
        "qkfuse": lambda: torch.compile(fn, backend=qk, options=opts),
        "inductor+cg": lambda: torch.compile(fn, backend="inductor", mode="reduce-overhead"),
        "qkfuse+cg": lambda: (qkfuse.fuse(fn, mode="reduce-overhead", options=opts) if opts else
                              torch.compile(fn, backend=qk, mode="reduce-overhead")),
    }
    if with_flashinfer:
        v["flashinfer"] = lambda: torch.compile(fn, backend=qk, options={"qkfuse.kernels": "flashinfer"})
    return v


def raw_op(case, args):
    """The qkfuse op called eagerly (torch.ops.qkfuse.qk_norm_rope, CUDA kernel = Triton)."""
    if case.form != "qwen3":
        return None
    q, k, qw, kw, cos, sin = args
    dt = case.dtype
    recipe = (  # Qwen3's recipe: cast before weight, everything rounded to bf16
        "rms", 0.0, True, dt, dt, dt, case.d, False)
    qt, kt = q.transpose(1, 2), k.transpose(1, 2)
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    return lambda *a: torch.ops.qkfuse.qk_norm_rope(qt, kt, qw, kw, c, s, 1e-6, 1e-6, None, None, *recipe)


# ---- main --------------------------------------------------------------------------------------

def run_case(case, bw, with_flashinfer):
    from torch._dynamo.utils import counters

    gen = torch.Generator(device=DEV).manual_seed(1234 + case.tokens)
    fn, args = case.make(gen)
    row = {"case": case.name, "group": case.group, "tokens": case.tokens, "heads": [case.hq, case.hk],
           "head_dim": case.d, "form": case.form, "dtype": str(case.dtype).split(".")[-1],
           "bytes": case.bytes_moved(), "floor_us": case.bytes_moved() / bw * 1e6, "us": {}, "dev_us": {},
           "checks": {}}
    with torch.no_grad():
        ref64 = fn(*[a.double() for a in args])
        eager = fn(*args)
        row["checks"]["eager_rel_err_vs_fp64"] = rel_err(eager, ref64)
        todo = variants(fn, with_flashinfer and case.form not in ("across", "layer", "wan"), case.form)
        if case.group == "sweep":
            todo = {n: todo[n] for n in ("inductor", "qkfuse")}
        for name, make in todo.items():
            torch._dynamo.reset()
            counters.clear()
            if name.endswith("+cg"):
                static_inputs(args)
            try:
                f = make()
                poison()
                out = f(*args)
                torch.cuda.synchronize()
                nan = any(bool(torch.isnan(o).any()) for o in out)
                err = rel_err(out, ref64)
                fused = counters["qkfuse"].get("norm_rope_sites", 0)
                row["checks"][name] = {"rel_err_vs_fp64": err, "nan": nan, "sites_fused": fused}
                row["us"][name], row["dev_us"][name] = timed(f, args)
            except Exception as e:
                traceback.print_exc()
                row["checks"][name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
        raw = raw_op(case, args) if case.group != "sweep" else None
        if raw is not None:
            poison()
            out = raw()
            row["checks"]["raw op"] = {"rel_err_vs_fp64": rel_err(out, ref64),
                                       "nan": any(bool(torch.isnan(o).any()) for o in out)}
            row["us"]["raw op"], row["dev_us"]["raw op"] = timed(raw, ())
    return row


def verdicts(row):
    """Correctness verdicts: no NaN, qkfuse error no worse than eager's (+ half an ulp)."""
    dt_eps = {"bfloat16": 2**-8, "float16": 2**-11, "float32": 2**-24}[row["dtype"]]
    bad = []
    limit = row["checks"]["eager_rel_err_vs_fp64"] + dt_eps / 2
    for name, c in row["checks"].items():
        if not isinstance(c, dict):
            continue
        if "error" in c:
            bad.append(f"{name}: {c['error']}")
        elif c.get("nan"):
            bad.append(f"{name}: NaN (unwritten output)")
        elif name.startswith("qkfuse") or name == "raw op":
            if c["rel_err_vs_fp64"] > limit:
                bad.append(f"{name}: error {c['rel_err_vs_fp64']:.2e} > eager's {limit:.2e}")
            if name.startswith("qkfuse") and c.get("sites_fused", 1) == 0:
                bad.append(f"{name}: the pass fused nothing")
    return bad


def write(rows, meta, out_dirs):
    date = meta["date"] + (f"-{meta['tag']}" if meta.get("tag") else "")
    md = [f"# QK-norm + RoPE on {meta['gpu']} ({date})", "",
          f"torch {meta['torch']}, triton {meta['triton']}, flashinfer {meta['flashinfer']}; "
          f"copy bandwidth {meta['copy_tbps']:.2f} TB/s (1 GiB device copy, read+write).",
          "Command: `python benchmarks/bench_qk_norm_rope.py`. Medians of triton.testing.do_bench; "
          "`e2e` = per call from Python (host overhead included), `dev` = CUDA-graph replay of one "
          "call (device time). floor = bytes that must move / copy bandwidth. x ind = Inductor's time "
          "over this one (same column kind).", ""]
    names = ["eager", "inductor", "qkfuse", "raw op", "flashinfer", "inductor+cg", "qkfuse+cg"]
    md.append("| shape | floor us | " + " | ".join(f"{n} e2e/dev" for n in names) +
              " | qkfuse x ind (e2e / dev) | qkfuse dev / floor | GB/s (qkfuse dev) | checks |")
    md.append("|" + "---|" * (len(names) + 6))
    for r in rows:
        us, dev = r["us"], r["dev_us"]

        def cell(n):
            return f"{us[n]:.1f} / {dev[n]:.1f}" if n in us else "-"
        ratio = (f"{us['inductor'] / us['qkfuse']:.2f} / {dev['inductor'] / dev['qkfuse']:.2f}"
                 if "qkfuse" in us and "inductor" in us else "-")
        floor_frac = f"{dev['qkfuse'] / r['floor_us']:.2f}" if "qkfuse" in dev else "-"
        gbps = f"{r['bytes'] / dev['qkfuse'] / 1e3:.0f}" if "qkfuse" in dev else "-"
        bad = verdicts(r)
        md.append(f"| {r['case']} | {r['floor_us']:.1f} | " + " | ".join(cell(n) for n in names) +
                  f" | {ratio} | {floor_frac} | {gbps} | {'ok' if not bad else '; '.join(bad)} |")
    md += ["", "Relative L2 error vs float64 (eager bf16 graph / qkfuse):", ""]
    for r in rows:
        c = r["checks"]
        q = c.get("qkfuse", {}).get("rel_err_vs_fp64", float("nan"))
        md.append(f"- {r['case']}: eager {c['eager_rel_err_vs_fp64']:.3e}, qkfuse {q:.3e}")
    text = "\n".join(md) + "\n"
    doc = {"meta": meta, "rows": rows}
    for d in out_dirs:
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"{date}-h200.md"), "w") as f:
            f.write(text)
        with open(os.path.join(d, f"{date}-h200.json"), "w") as f:
            json.dump(doc, f, indent=1)
    sweep = [r for r in rows if r["group"] == "sweep"]
    if sweep:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(figsize=(7, 4.5))
            toks = [r["tokens"] for r in sweep]
            for name, style in (("inductor", "o-"), ("qkfuse", "s-"), ("flashinfer", "^-")):
                ys = [r["bytes"] / r["dev_us"][name] / 1e3 for r in sweep if name in r["dev_us"]]
                if len(ys) == len(toks):
                    ax.plot(toks, ys, style, label=name)
            ax.axhline(meta["copy_tbps"] * 1e3, color="gray", ls="--", label="copy bandwidth")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("tokens (32 q / 8 kv heads, head_dim 128, bf16)")
            ax.set_ylabel("achieved GB/s (device time)")
            ax.set_title(f"QK-norm + RoPE, {meta['gpu']}")
            ax.legend()
            ax.grid(alpha=0.3)
            for d in out_dirs:
                fig.savefig(os.path.join(d, f"{date}-h200.png"), dpi=110, bbox_inches="tight")
        except Exception:
            traceback.print_exc()
    print(text)


def write_policy(rows):
    """kernels/policy.json: per shape bucket, whether flashinfer beat the Triton path (device time).
    qkfuse.kernels="auto" reads it (kernels/policy.py)."""
    from qkfuse.kernels.triton_norm_rope import _bucket_tokens

    faster = {}
    for r in rows:
        fi, tr = r["dev_us"].get("flashinfer"), r["dev_us"].get("qkfuse")
        if fi is None or tr is None:
            continue
        key = f"d{r['head_dim']}_t{_bucket_tokens(r['tokens'])}"
        faster[key] = bool(faster.get(key, False) or fi < tr)
    if not faster:  # no flashinfer rows (e.g. --shapes across): keep the committed measurements
        return
    path = os.path.join(os.path.dirname(__file__), "..", "qkfuse", "kernels", "policy.json")
    with open(path, "w") as f:
        json.dump({"note": "written by benchmarks/bench_qk_norm_rope.py from measured device times",
                   "flashinfer_faster": faster}, f, indent=1, sort_keys=True)


def main():
    # Every variant is compiled fresh: a cache hit would skip the pass (and its fired-counter check).
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="main,extra,sweep")
    ap.add_argument("--no-flashinfer", action="store_true")
    ap.add_argument("--only", default="", help="run only cases whose name contains this")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--tag", default="", help="results file suffix: <date>-h200-<tag>.*")
    ap.add_argument("--merge", nargs="+", help="re-render these result JSONs (from several runs) as one")
    a = ap.parse_args()
    if a.merge:
        docs = [json.load(open(f)) for f in a.merge]
        rows = [r for d in docs for r in d["rows"]]
        write(rows, docs[0]["meta"], [RESULTS])
        write_policy(rows)
        return
    import triton

    fi_version = "not installed"
    with_fi = not a.no_flashinfer
    if with_fi:
        try:
            import flashinfer

            fi_version = flashinfer.__version__
        except Exception:
            with_fi = False
    groups = a.shapes.split(",")
    cases = [c for c in MAIN + EXTRA + ACROSS + LAYER + WAN + SWEEP if c.group in groups and a.only in c.name]
    bw = copy_bandwidth()
    meta = {"gpu": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
            "torch": torch.__version__, "triton": triton.__version__, "flashinfer": fi_version,
            "copy_tbps": bw / 1e12, "tag": a.tag}
    rows = []
    t0 = time.time()
    for c in cases:
        rows.append(run_case(c, bw, with_fi and c.group != "sweep"))
        print(f"[{time.time() - t0:5.0f}s] {c.name}: " +
              ", ".join(f"{k} {v:.1f}/{rows[-1]['dev_us'].get(k, float('nan')):.1f}" for k, v in rows[-1]["us"].items()),
              flush=True)
    dirs = ([] if a.no_write else [RESULTS]) + ([os.environ["OUT"]] if os.environ.get("OUT") else [])
    write(rows, meta, dirs)


if __name__ == "__main__":
    main()
