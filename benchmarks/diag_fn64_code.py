"""Where the compiled 64-token QK-norm + RoPE call spends its host time, Inductor vs qkfuse (2026-12-02).

bench_models.py's fn64 row is host-bound (about 90 us per call on the lent H200, the kernels take
a few us) and qkfuse's call was 0.985x Inductor's. This writes both backends' generated wrapper
code to $OUT/fn64-<backend>.py and prints, per backend, the kernels launched per call, the median
us per call over interleaved rounds, and the share of a call spent in the compiled wrapper itself
(torch.profiler's CPU time of the compiled function, minus the guards).

    python benchmarks/diag_fn64_code.py
"""
import os
import statistics
import sys
import time

import torch
from torch._inductor.utils import run_and_get_code

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import qkfuse  # noqa: E402

OUT = os.environ.get("OUT", "/tmp/qkfuse-out")
os.makedirs(OUT, exist_ok=True)


def main():
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm, apply_rotary_pos_emb

    qkfuse.register()
    tokens, hq, hk, d = 64, 32, 8, 128
    dev, dt = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    q_norm, k_norm = Qwen3RMSNorm(d).to(dev, dt), Qwen3RMSNorm(d).to(dev, dt)
    for n in (q_norm, k_norm):
        n.weight.data = torch.randn(d, device=dev, generator=g, dtype=dt) * 0.5 + 1

    def fn(q, k, cos, sin):
        return apply_rotary_pos_emb(q_norm(q).transpose(1, 2), k_norm(k).transpose(1, 2), cos, sin)

    ang = torch.rand(1, tokens, d // 2, device=dev, generator=g) * 6.28
    cos, sin = (torch.cat([f(ang)] * 2, -1).to(dt) for f in (torch.cos, torch.sin))
    args = (torch.randn(1, tokens, hq, d, device=dev, generator=g, dtype=dt),
            torch.randn(1, tokens, hk, d, device=dev, generator=g, dtype=dt), cos, sin)
    compiled = {}
    for backend in ("inductor", "qkfuse"):
        c = torch.compile(fn, backend=backend, dynamic=False)
        _, code = run_and_get_code(c, *args)
        with open(f"{OUT}/fn64-{backend}.py", "w") as f:
            f.write("\n\n# ----\n\n".join(code))
        launches = sum(src.count(".run(") for src in code)
        ours = sum(src.count("qk_norm_rope_kernel") for src in code)
        calls = [ln for src in code for ln in src[src.find("def call("):].splitlines() if ".run(" in ln]
        views = sum(ln.count("reinterpret_tensor(") for ln in calls)
        print(f"{backend}: {views} reinterpret_tensor views built in the launch lines", flush=True)
        print(f"{backend}: {launches} '.run(' launches in the generated code, qk_norm_rope_kernel named {ours} times; "
              f"counters {dict(torch._dynamo.utils.counters['qkfuse'])}", flush=True)
        compiled[backend] = c
    for c in compiled.values():  # both backends' entries live in the one code object's cache
        c(*args)
    times = {b: [] for b in compiled}
    calls = 500
    for _ in range(7):
        for b, c in compiled.items():
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(calls):
                c(*args)
            torch.cuda.synchronize()
            times[b].append(1e6 * (time.perf_counter() - t0) / calls)
    for b, t in times.items():
        print(f"{b}: median {statistics.median(t):.1f} us/call over 7 rounds of {calls}: "
              + " ".join(f"{x:.1f}" for x in t), flush=True)
    for b, c in compiled.items():
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(50):
                c(*args)
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=70)
        with open(f"{OUT}/fn64-profile-{b}.txt", "w") as f:
            f.write(table)
        print(f"{b} profile (top rows by self CPU):\n" + "\n".join(table.splitlines()[:14]), flush=True)


if __name__ == "__main__":
    with torch.no_grad():  # as bench_models.py times it; with grad the pass refuses every site (saved for backward)
        main()
