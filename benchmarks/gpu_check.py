"""GPU checks in one run: kernel numerics, the compiled path's generated code, quick timings.

    python benchmarks/gpu_check.py [--quick]

Prints a summary table last. Meant for the lent H200 (see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import qkfuse  # noqa: E402
from qkfuse.kernels import triton_norm_rope as tk  # noqa: E402
from qkfuse.kernels.reference import norm_rope_reference  # noqa: E402
from qkfuse.ops.recipe import Recipe  # noqa: E402

DEV = "cuda"
SUMMARY: list[str] = []


def say(msg: str) -> None:
    print(msg, flush=True)
    SUMMARY.append(msg)


def ulp_err(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype | None = None) -> float:
    """max |out - ref| / (eps(dtype) * max |ref|): error in units of `dtype`'s spacing at the
    tensor's scale (RoPE sums cancel, so per-element relative error is meaningless near 0).
    `dtype` is the coarsest rounding of the computation (default: the output's)."""
    o, r = out.double(), ref.double()
    if not o.numel():
        return 0.0
    scale = torch.finfo(dtype or ref.dtype).eps * float(r.abs().max().clamp_min(1e-30))
    return float((o - r).abs().max()) / scale


# ---- 1. kernel numerics vs the reference (same rounding recipe) -------------------------------

def make_inputs(dt, layout, B, S, Hq, Hk, D, rd, cos_dt):
    g = torch.Generator(device=DEV).manual_seed(hash((layout, D, rd)) % 2**31)
    r = lambda *s, dtype=dt: torch.randn(*s, device=DEV, dtype=dtype, generator=g)  # noqa: E731
    if layout == "bshd_T":  # Qwen3: norm on [B,S,H,D], RoPE after transpose
        q, k = r(B, S, Hq, D).transpose(1, 2), r(B, S, Hk, D).transpose(1, 2)
        cos, sin = r(B, 1, S, rd, dtype=cos_dt), r(B, 1, S, rd, dtype=cos_dt)
    elif layout == "qkv":  # strided slices of a fused projection
        qkv = r(B, S, (Hq + 2 * Hk) * D)
        q = qkv[..., : Hq * D].view(B, S, Hq, D)
        k = qkv[..., Hq * D:(Hq + Hk) * D].view(B, S, Hk, D)
        cos, sin = r(S, 1, rd, dtype=cos_dt), r(S, 1, rd, dtype=cos_dt)
    elif layout == "bhsd":  # contiguous [B,H,S,D]
        q, k = r(B, Hq, S, D), r(B, Hk, S, D)
        cos, sin = r(S, rd, dtype=cos_dt), r(S, rd, dtype=cos_dt)
    return q, k, r(D), r(D), cos, sin


def check_kernel_numerics(quick: bool) -> None:
    cases = []
    dts = [torch.bfloat16, torch.float16, torch.float32]
    for dt, D, layout in itertools.product(dts, [64, 80, 128, 256], ["bshd_T", "qkv", "bhsd"]):
        for rd, inter, norm, offset, cast in [(D, False, "rms", 0.0, True), (D // 2, False, "rms", 1.0, False),
                                              (D, True, "rms", 0.0, False), (D, False, "none", 0.0, False),
                                              (0, False, "rms", 0.0, True)]:
            cases.append((dt, D, layout, rd, inter, norm, offset, cast))
    if quick:
        cases = cases[::4]
    worst = {}
    fails = 0
    for dt, D, layout, rd, inter, norm, offset, cast in cases:
        for cos_dt in ([dt, torch.float32] if dt != torch.float32 else [dt]):
            q, k, qw, kw, cos, sin = make_inputs(dt, layout, 2, 37, 8, 2, D, max(rd, 2), cos_dt)
            if norm == "none":
                qw = kw = None
            if not rd:
                cos = sin = None
            rdt = torch.promote_types(dt, cos_dt) if rd else dt
            rec = Recipe(norm, offset, cast and norm == "rms", dt, rdt, rdt, rd, inter)
            qo, ko = tk.launch(q, k, qw, kw, cos, sin, 1e-6, 1e-5, rec)
            rq = norm_rope_reference(q, qw, cos, sin, 1e-6, rec)
            rk = norm_rope_reference(k, kw, cos, sin, 1e-5, rec)
            torch.cuda.synchronize()
            e = max(ulp_err(qo, rq, dt), ulp_err(ko, rk, dt))
            bad = (qo.stride() != rq.stride()) or not torch.isfinite(qo.float()).all()
            key = (str(dt).split(".")[-1], norm, "inter" if inter else "neox", "partial" if 0 < rd < D else "full" if rd else "norope")
            worst[key] = max(worst.get(key, 0.0), e)
            # the kernel keeps float32 and rounds where the graph rounds: within ~1 ulp of the
            # output dtype at the tensor's scale (rsqrt/division last-bit differences).
            if e > 2.0 or bad:
                fails += 1
                if fails < 6:
                    print("FAIL", key, D, layout, cos_dt, "ulp", e, "stride", qo.stride(), rq.stride())
    for key, e in sorted(worst.items()):
        print(f"  kernel vs reference {key}: max {e:.2f} ulp")
    say(f"kernel numerics: {len(cases)} cases x cos dtypes, {fails} failing (> 2 ulp at scale)")


# ---- 2. the compiled path ---------------------------------------------------------------------

def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class QwenStyle(torch.nn.Module):
    """HF Qwen3 attention's q/k part: per-head RMSNorm, transpose, rotate_half RoPE."""

    def __init__(self, D):
        super().__init__()
        self.qw = torch.nn.Parameter(torch.randn(D))
        self.kw = torch.nn.Parameter(torch.randn(D))
        self.eps = 1e-6

    @staticmethod
    def norm(x, w, eps):
        dt = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        return w * x.to(dt)

    def forward(self, q, k, cos, sin):
        q = self.norm(q, self.qw, self.eps).transpose(1, 2)
        k = self.norm(k, self.kw, self.eps).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def qwen_inputs(T, Hq, Hk, D, dt, B=1):
    S = T // B
    r = lambda *s: torch.randn(*s, device=DEV, dtype=dt)  # noqa: E731
    return r(B, S, Hq, D), r(B, S, Hk, D), r(B, S, D), r(B, S, D)


def check_compiled() -> None:
    from torch._inductor.utils import run_and_get_code

    for dyn in (False, True):
        torch._dynamo.reset()
        m = QwenStyle(128).to(DEV, torch.bfloat16)
        args = qwen_inputs(256, 16, 4, 128, torch.bfloat16)
        c = torch.compile(m, backend=qkfuse.qkfuse_backend, dynamic=dyn)
        try:
            with torch.no_grad():
                out, code = run_and_get_code(c, *args)
                ref = m(*args)
                args2 = qwen_inputs(320, 16, 4, 128, torch.bfloat16)
                out2 = c(*args2)
                ref2 = m(*args2)
        except Exception:
            traceback.print_exc()
            say(f"compiled dynamic={dyn}: FAILED (see traceback)")
            continue
        src = "\n".join(code)
        direct = "qk_norm_rope_kernel" in src and ".run(" in src
        opaque = "torch.ops.qkfuse" in src
        n_kernels = src.count("async_compile.triton(")
        err = max(ulp_err(o, r) for o, r in zip(out, ref))
        err2 = max(ulp_err(o, r) for o, r in zip(out2, ref2))
        say(f"compiled dynamic={dyn}: direct launch={direct} opaque op={opaque} "
            f"inductor kernels={n_kernels} max ulp vs eager {err:.1f} / 2nd shape {err2:.1f}")
        if dyn:
            with open(os.path.join(os.environ.get("OUT", "/tmp"), "generated_dynamic.py"), "w") as f:
                f.write(src)
        else:
            with open(os.path.join(os.environ.get("OUT", "/tmp"), "generated_static.py"), "w") as f:
                f.write(src)


# ---- 3. quick timings -------------------------------------------------------------------------

SHAPES = [  # (name, tokens, q heads, kv heads, head_dim)
    ("decode 64", 64, 32, 8, 128),
    ("prefill 4k", 4096, 32, 8, 128),
    ("prefill 32k", 32768, 32, 8, 128),
    ("DiT 4k 24/24", 4096, 24, 24, 128),
    ("DiT 32k 40/40", 32768, 40, 40, 128),
    ("16k hd64", 16384, 16, 16, 64),
    ("8k hd256", 8192, 16, 8, 256),
]


def floor_us(T, Hq, Hk, D, dt_bytes=2, bw=4.2e12):
    moved = (2 * T * (Hq + Hk) * D + 2 * T * D) * dt_bytes
    return moved / bw * 1e6


def qwen_fn(q, k, qw, kw, cos, sin):
    q = QwenStyle.norm(q, qw, 1e-6).transpose(1, 2)
    k = QwenStyle.norm(k, kw, 1e-6).transpose(1, 2)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def time_shapes(quick: bool) -> None:
    from torch._inductor.utils import run_and_get_code
    from triton.testing import do_bench, do_bench_cudagraph

    rows = []
    for name, T, Hq, Hk, D in (SHAPES[:2] if quick else SHAPES):
        torch._dynamo.reset()
        q, k, cos, sin = qwen_inputs(T, Hq, Hk, D, torch.bfloat16)
        qw, kw = torch.randn(D, device=DEV, dtype=torch.bfloat16), torch.randn(D, device=DEV, dtype=torch.bfloat16)
        args = (q, k, qw, kw, cos, sin)
        with torch.no_grad():
            ind = torch.compile(qwen_fn, backend="inductor")
            qkf = torch.compile(qwen_fn, backend=qkfuse.qkfuse_backend)
            _, code_i = run_and_get_code(ind, *args)
            _, code_q = run_and_get_code(qkf, *args)
            nk_i = "\n".join(code_i).count(".run(")
            nk_q = "\n".join(code_q).count(".run(")
            e2e = lambda f: do_bench(lambda: f(*args), warmup=50, rep=300, return_mode="median") * 1e3  # noqa: E731
            dev = lambda f: do_bench_cudagraph(lambda: f(*args), rep=300, return_mode="median") * 1e3  # noqa: E731
            t_ind, t_qkf = e2e(ind), e2e(qkf)
            d_ind, d_qkf = dev(ind), dev(qkf)
            qn, kn = q.transpose(1, 2), k.transpose(1, 2)
            rec = Recipe("rms", 0.0, True, torch.bfloat16, torch.bfloat16, torch.bfloat16, D, False)
            c1, s1 = cos.unsqueeze(1), sin.unsqueeze(1)
            raw = lambda: tk.launch(qn, kn, qw, kw, c1, s1, 1e-6, 1e-6, rec)  # noqa: E731
            t_raw = do_bench(raw, warmup=50, rep=300, return_mode="median") * 1e3
            d_raw = do_bench_cudagraph(raw, rep=300, return_mode="median") * 1e3
        fl = floor_us(T, Hq, Hk, D)
        rows.append((name, fl, t_ind, t_qkf, t_raw, d_ind, d_qkf, d_raw, nk_i, nk_q))
    say("e2e = do_bench per call (host overhead included); dev = CUDA-graph replay (device time)")
    say(f"{'shape':14s} {'floor':>6s} | {'ind e2e':>7s} {'qkf e2e':>7s} {'raw e2e':>7s} | {'ind dev':>7s} "
        f"{'qkf dev':>7s} {'raw dev':>7s} | {'x e2e':>5s} {'x dev':>5s} {'dev/fl':>6s} launches i/q")
    for name, fl, a, b, c, da, db, dc, ni, nq in rows:
        say(f"{name:14s} {fl:6.1f} | {a:7.1f} {b:7.1f} {c:7.1f} | {da:7.1f} {db:7.1f} {dc:7.1f} | "
            f"{a / b:5.2f} {da / db:5.2f} {db / fl:6.2f} {ni}/{nq}")


def profile_host() -> None:
    """Where the host time of one compiled call goes (cProfile over 300 calls)."""
    import cProfile
    import pstats

    T, Hq, Hk, D = 4096, 32, 8, 128
    q, k, cos, sin = qwen_inputs(T, Hq, Hk, D, torch.bfloat16)
    qw, kw = torch.randn(D, device=DEV, dtype=torch.bfloat16), torch.randn(D, device=DEV, dtype=torch.bfloat16)
    args = (q, k, qw, kw, cos, sin)
    for name, backend in (("inductor", "inductor"), ("qkfuse", qkfuse.qkfuse_backend)):
        torch._dynamo.reset()
        f = torch.compile(qwen_fn, backend=backend)
        with torch.no_grad():
            for _ in range(20):
                f(*args)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(300):
                f(*args)
            host = (time.perf_counter() - t0) / 300 * 1e6
            torch.cuda.synchronize()
            pr = cProfile.Profile()
            pr.enable()
            for _ in range(300):
                f(*args)
            pr.disable()
            torch.cuda.synchronize()
        say(f"host per call (no sync) {name}: {host:.1f} us")
        with open(os.path.join(os.environ.get("OUT", "/tmp"), f"profile_{name}.txt"), "w") as fh:
            pstats.Stats(pr, stream=fh).sort_stats("tottime").print_stats(25)


def check_static_launch() -> None:
    """Does Inductor launch our kernel with its static launcher? (strict mode raises the reason)"""
    from torch._inductor import config as ic

    say(f"static_launch_user_defined_triton_kernels in config: {hasattr(ic, 'static_launch_user_defined_triton_kernels')}")
    torch._dynamo.reset()
    args = qwen_inputs(256, 16, 4, 128, torch.bfloat16)
    qw = torch.randn(128, device=DEV, dtype=torch.bfloat16)
    try:
        with ic.patch({"strict_static_cuda_launcher": True, "fx_graph_cache": False}):
            torch.compile(qwen_fn, backend=qkfuse.qkfuse_backend)(args[0], args[1], qw, qw, args[2], args[3])
        say("static launch: ok (strict mode did not raise)")
    except Exception as e:
        say(f"static launch refused: {type(e).__name__}: {str(e)[:300]}")


def check_cudagraphs() -> None:
    """mode="reduce-overhead": per-call time, cudagraph skips and re-recordings, both backends."""
    from torch._dynamo.utils import counters

    for T in (4096, 32768):
        q, k, cos, sin = qwen_inputs(T, 32, 8, 128, torch.bfloat16)
        qw, kw = torch.randn(128, device=DEV, dtype=torch.bfloat16), torch.randn(128, device=DEV, dtype=torch.bfloat16)
        args = (q, k, qw, kw, cos, sin)
        for a in args:
            torch._dynamo.mark_static_address(a)
        for name, backend in (("inductor", "inductor"), ("qkfuse", qkfuse.qkfuse_backend)):
            torch._dynamo.reset()
            counters.clear()
            f = torch.compile(qwen_fn, backend=backend, mode="reduce-overhead")
            with torch.no_grad():
                for _ in range(10):
                    f(*args)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(200):
                    f(*args)
                torch.cuda.synchronize()
            per_call = (time.perf_counter() - t0) / 200 * 1e6
            cg = {k: v for k, v in counters["inductor"].items() if "cudagraph" in k}
            say(f"reduce-overhead T={T} {name}: {per_call:.1f} us/call (200 calls, synced once) {cg}")


def compiled_vs_raw() -> None:
    """Same kernel, same config: device time inside Inductor's code vs a direct launch."""
    import re

    from torch._inductor.utils import run_and_get_code
    from triton.testing import do_bench_cudagraph

    for T, H in ((32768, 40), (32768, 32)):
        torch._dynamo.reset()
        q, k, cos, sin = qwen_inputs(T, H, H if H == 40 else 8, 128, torch.bfloat16)
        qw, kw = torch.randn(128, device=DEV, dtype=torch.bfloat16), torch.randn(128, device=DEV, dtype=torch.bfloat16)
        args = (q, k, qw, kw, cos, sin)
        f = torch.compile(qwen_fn, backend=qkfuse.qkfuse_backend)
        with torch.no_grad():
            _, code = run_and_get_code(f, *args)
            src = "\n".join(code)
            consts = re.search(r"'constants': (\{[^}]*\})", src)
            confs = re.search(r"configs=(\[[^\]]*\])", src)
            rec = Recipe("rms", 0.0, True, torch.bfloat16, torch.bfloat16, torch.bfloat16, 128, False)
            qt, kt, c1, s1 = q.transpose(1, 2), k.transpose(1, 2), cos.unsqueeze(1), sin.unsqueeze(1)
            cfg = tk.choose_config(T, H, kt.shape[1], 128)
            t_c = do_bench_cudagraph(lambda: f(*args), rep=200, return_mode="median") * 1e3
            t_r = do_bench_cudagraph(lambda: tk.launch(qt, kt, qw, kw, c1, s1, 1e-6, 1e-6, rec), rep=200,
                                     return_mode="median") * 1e3
            for st in (1, 2, 3):
                t_s = do_bench_cudagraph(lambda: tk.launch(qt, kt, qw, kw, c1, s1, 1e-6, 1e-6, rec, config=cfg,
                                                           num_stages=st), rep=200, return_mode="median") * 1e3
                say(f"  T={T} H={H} raw num_stages={st}: {t_s:.1f} us")
        say(f"T={T} H={H}: compiled {t_c:.1f} us, raw {t_r:.1f} us, table config {cfg}")
        runs = [ln.strip()[:160] for ln in src.splitlines() if ".run(" in ln or "extern_kernels" in ln]
        say(f"  launches in the compiled graph: {len(runs)}: " + " | ".join(runs))
        say(f"  inductor launch configs {confs.group(1) if confs else '?'}; constants "
            f"{consts.group(1)[-120:] if consts else '?'}")


def check_cache_mode() -> None:
    """vLLM-style cos/sin cache + positions: numerics vs the reference, device time vs cos/sin tensors."""
    from triton.testing import do_bench_cudagraph

    from qkfuse.kernels.reference import cos_sin_from_cache

    T, Hq, Hk, D = 4096, 32, 8, 128
    for interleaved, rd in ((False, 128), (True, 128), (False, 64)):
        q = torch.randn(T, Hq, D, device=DEV, dtype=torch.bfloat16)
        k = torch.randn(T, Hk, D, device=DEV, dtype=torch.bfloat16)
        qw, kw = torch.randn(D, device=DEV, dtype=torch.bfloat16), torch.randn(D, device=DEV, dtype=torch.bfloat16)
        angle = torch.rand(8192, rd // 2, device=DEV) * 6.3
        cache = torch.cat((angle.cos(), angle.sin()), -1)
        pos = torch.randint(0, 8192, (T, 1), device=DEV)
        rec = Recipe("rms", 0.0, True, torch.bfloat16, torch.float32, torch.bfloat16, rd, interleaved)
        qo, ko = tk.launch(q, k, qw, kw, cache, None, 1e-6, 1e-6, rec, positions=pos)
        cos, sin = cos_sin_from_cache(cache, pos, interleaved)
        err = max(ulp_err(qo, norm_rope_reference(q, qw, cos, sin, 1e-6, rec), torch.bfloat16),
                  ulp_err(ko, norm_rope_reference(k, kw, cos, sin, 1e-6, rec), torch.bfloat16))
        t_cache = do_bench_cudagraph(lambda: tk.launch(q, k, qw, kw, cache, None, 1e-6, 1e-6, rec, positions=pos),
                                     rep=100, return_mode="median") * 1e3
        t_cs = do_bench_cudagraph(lambda: tk.launch(q, k, qw, kw, cos, sin, 1e-6, 1e-6, rec), rep=100,
                                  return_mode="median") * 1e3
        say(f"cache mode {'interleaved' if interleaved else 'neox'} rd={rd}: max {err:.2f} ulp at scale; "
            f"{t_cache:.1f} us (cos/sin tensors: {t_cs:.1f} us)")


def check_hf() -> None:
    from torch._dynamo.utils import counters
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    for dyn in (False, True):
        torch._dynamo.reset()
        counters.clear()
        m = Qwen3ForCausalLM(cfg).to(DEV, torch.bfloat16).eval()
        ids = torch.randint(0, 256, (2, 33), device=DEV)
        with torch.no_grad():
            ref = m(ids).logits
            qkfuse.optimize(m, dynamic=dyn)
            out = m(ids).logits
        err = float((out.float() - ref.float()).abs().max())
        say(f"HF Qwen3 bf16 optimize(dynamic={dyn}): max|logits diff| {err:.3g} counters {dict(counters['qkfuse'])}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip", default="")
    a = ap.parse_args()
    import triton

    say(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}")
    t0 = time.time()
    for name, fn in (("numerics", check_kernel_numerics), ("compiled", check_compiled), ("hf", check_hf),
                     ("static", check_static_launch), ("profile", profile_host), ("cg", check_cudagraphs),
                     ("craw", compiled_vs_raw), ("cache", check_cache_mode),
                     ("timing", time_shapes)):
        if name in a.skip:
            continue
        try:
            fn(a.quick) if fn in (check_kernel_numerics, time_shapes) else fn()
        except Exception:
            traceback.print_exc()
            say(f"{name}: FAILED")
        print(f"[{name} done at {time.time() - t0:.0f}s]", flush=True)
    print("\n==== summary ====")
    print("\n".join(SUMMARY))


if __name__ == "__main__":
    main()
