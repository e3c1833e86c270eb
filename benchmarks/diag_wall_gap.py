"""Why a whole-model row's wall clock can differ from its device time (issue 6).

    python benchmarks/diag_wall_gap.py [--layers 36] [--shape 1x4096] [--decode] [--out DIR]

On 2026-12-03 the 36-layer Qwen3-8B-shaped prefill at 1x4096 measured 0.983x by wall clock while the
same compiled forward replayed in a CUDA graph measured 1.000x (device time): the difference is on the
host or in the allocator, not in the kernels. Per backend, this script measures, A/B interleaved:
- host ms per forward (call to return, no sync) and wall ms (to the sync after it);
- the caching allocator's counters over the timed calls (cudaMalloc/cudaFree calls, retries, syncs)
  and the peak memory of one forward;
- from one torch.profiler trace: the CUDA runtime calls that block or allocate, the kernel launches,
  the GPU's busy time, its idle time inside the forward and the largest idle gaps (with the kernels
  around them).
With --decode, the same for one decode step with HF's DynamicCache under plain torch.compile (no CUDA
graphs), batch 1: there the host time is the step time.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import bench_models as bm  # noqa: E402
import qkfuse  # noqa: E402

BACKENDS = bm.BACKENDS
ALLOC_KEYS = ("num_device_alloc", "num_device_free", "num_alloc_retries", "num_sync_all_streams")
BLOCKING = ("cudaMalloc", "cudaFree", "cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize",
            "cudaMemcpyAsync", "cudaMemcpy", "cudaHostAlloc", "cudaStreamWaitEvent")
LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC")


def sync(cuda):
    if cuda:
        torch.cuda.synchronize()


def timed(fn, calls, cuda):
    """(host ms per call, wall ms per call) for `calls` back-to-back calls."""
    sync(cuda)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = time.perf_counter()
    sync(cuda)
    end = time.perf_counter()
    return 1e3 * (host - start) / calls, 1e3 * (end - start) / calls


def alloc_counters(cuda):
    if not cuda:
        return dict.fromkeys(ALLOC_KEYS, 0)
    stats = torch.cuda.memory_stats()
    return {k: stats.get(k, 0) for k in ALLOC_KEYS}


def interleaved(fns, calls, rounds, cuda):
    """A B, B A, ... rounds: per backend host and wall ms lists and allocator counter deltas."""
    out = {b: {"host_ms": [], "wall_ms": [], "alloc": dict.fromkeys(ALLOC_KEYS, 0)} for b in fns}
    for r in range(rounds):
        for b in (BACKENDS if r % 2 == 0 else BACKENDS[::-1]):
            before = alloc_counters(cuda)
            host, wall = timed(fns[b], calls, cuda)
            after = alloc_counters(cuda)
            out[b]["host_ms"].append(host)
            out[b]["wall_ms"].append(wall)
            for k in ALLOC_KEYS:
                out[b]["alloc"][k] += after[k] - before[k]
    for b in out:
        out[b]["host_ms_median"] = statistics.median(out[b]["host_ms"])
        out[b]["wall_ms_median"] = statistics.median(out[b]["wall_ms"])
    return out


def peak_mib(fn, cuda):
    if not cuda:
        return None
    sync(cuda)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    sync(cuda)
    return round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)


def trace_summary(fn, cuda, calls=2):
    """Runtime calls, launches, GPU busy and idle time per call from one profiler trace."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync(cuda)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        sync(cuda)
    runtime, kernels = {}, []
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            kernels.append((e.time_range.start, e.time_range.end, e.name))
        elif e.name in BLOCKING or e.name in LAUNCHES:
            n, us = runtime.get(e.name, (0, 0.0))
            runtime[e.name] = (n + 1, us + e.time_range.elapsed_us())
    summary = {"runtime_calls_per_forward": {k: [n / calls, round(us / calls, 1)] for k, (n, us) in runtime.items()}}
    if kernels:
        kernels.sort()
        busy, gaps, end = 0.0, [], kernels[0][0]
        prev_name = None
        for start, stop, name in kernels:
            if start > end:
                gaps.append((start - end, prev_name, name))
            busy += max(0.0, stop - max(start, end))
            end = max(end, stop)
            prev_name = name
        span = end - kernels[0][0]
        gaps.sort(reverse=True)
        summary.update(
            kernels_per_forward=len(kernels) / calls,
            gpu_busy_ms_per_forward=round(busy / calls / 1e3, 3),
            gpu_span_ms=round(span / 1e3, 3),
            gpu_idle_ms_per_forward=round((span - busy) / calls / 1e3, 3),
            largest_gaps_us=[[round(g, 1), a[:70] if a else None, b[:70]] for g, a, b in gaps[:6]],
        )
    return summary


def prefill(args, model, cuda):
    batch, seq = (int(v) for v in args.shape.split("x"))
    gen = torch.Generator(device=args.device).manual_seed(1234)
    inputs = torch.randint(0, model.config.vocab_size, (batch, seq), device=args.device, generator=gen)
    compiled = {b: torch.compile(model, backend=b, dynamic=False) for b in BACKENDS}
    fns = {b: (lambda b=b: bm.lm_forward(compiled[b], inputs)) for b in BACKENDS}
    result = {"case": f"prefill {args.shape}", "compile_s": {}}
    for b in BACKENDS:
        start = time.perf_counter()
        fns[b]()
        sync(cuda)
        result["compile_s"][b] = round(time.perf_counter() - start, 1)
        print(f"  compiled {b}: {result['compile_s'][b]} s", flush=True)
    one_ms = timed(fns["inductor"], 1, cuda)[1]
    calls = max(1, min(20, round(250 / max(one_ms, 1e-3))))
    result["timing"] = interleaved(fns, calls, args.rounds, cuda)
    result["calls_per_measurement"] = calls
    result["peak_mib"] = {b: peak_mib(fns[b], cuda) for b in BACKENDS}
    result["trace"] = {b: trace_summary(fns[b], cuda) for b in BACKENDS}
    return result


def decode(args, model, cuda):
    from transformers import DynamicCache

    kw = bm.cache_kwarg(model)
    gen = torch.Generator(device=args.device).manual_seed(4321)
    compiled = {b: torch.compile(model, backend=b) for b in BACKENDS}
    cache0 = DynamicCache(config=model.config)
    prompt = torch.randint(0, model.config.vocab_size, (1, args.prompt), device=args.device, generator=gen)
    model(input_ids=prompt, use_cache=True, **{kw: cache0})
    for layer in cache0.layers:
        torch._dynamo.maybe_mark_dynamic(layer.keys, 2)
        torch._dynamo.maybe_mark_dynamic(layer.values, 2)
    token = torch.randint(0, model.config.vocab_size, (1, 1), device=args.device, generator=gen)
    caches = {b: copy.deepcopy(cache0) for b in BACKENDS}
    step = {b: 0 for b in BACKENDS}

    def one(b):
        # Each backend decodes on its own cache; positions grow, the cache is rewound every 32 steps so
        # both backends time the same lengths.
        if step[b] == 32:
            caches[b] = copy.deepcopy(cache0)
            step[b] = 0
        pos = torch.full((1, 1), args.prompt + step[b], device=args.device)
        step[b] += 1
        return compiled[b](input_ids=token, position_ids=pos, use_cache=True, **{kw: caches[b]}).logits

    result = {"case": "decode_eager bs1 (DynamicCache, no CUDA graphs)", "compile_s": {}}
    for b in BACKENDS:
        start = time.perf_counter()
        for _ in range(3):
            one(b)
        sync(cuda)
        result["compile_s"][b] = round(time.perf_counter() - start, 1)
        print(f"  compiled decode {b}: {result['compile_s'][b]} s", flush=True)
    fns = {b: (lambda b=b: one(b)) for b in BACKENDS}
    result["timing"] = interleaved(fns, 16, args.rounds * 2, cuda)
    result["trace"] = {b: trace_summary(fns[b], cuda, calls=4) for b in BACKENDS}
    return result


def report(results):
    lines = []
    for res in results:
        t = res["timing"]
        ind, qk = t["inductor"], t["qkfuse"]
        lines.append(f"{res['case']}: wall ms inductor {ind['wall_ms_median']:.3f} / qkfuse {qk['wall_ms_median']:.3f} "
                     f"({ind['wall_ms_median'] / qk['wall_ms_median']:.3f}x); host ms {ind['host_ms_median']:.3f} / "
                     f"{qk['host_ms_median']:.3f} ({ind['host_ms_median'] / qk['host_ms_median']:.3f}x)")
        for b in BACKENDS:
            tr = res["trace"][b]
            lines.append(f"  {b}: alloc {t[b]['alloc']}; peak {res.get('peak_mib', {}).get(b)} MiB; "
                         f"kernels {tr.get('kernels_per_forward')}, busy {tr.get('gpu_busy_ms_per_forward')} ms, "
                         f"idle {tr.get('gpu_idle_ms_per_forward')} ms")
            lines.append(f"    runtime calls per forward [n, us]: {tr['runtime_calls_per_forward']}")
            lines.append(f"    largest GPU gaps [us, before, after]: {tr.get('largest_gaps_us')}")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=36)
    p.add_argument("--shape", default="1x4096")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--decode", action="store_true")
    p.add_argument("--no-prefill", action="store_true")
    p.add_argument("--tiny", action="store_true", help="tiny dims (a CPU smoke run)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    bm.configure_torch()
    qkfuse.register()  # the "qkfuse" backend name where the package is not pip-installed (no entry point)
    cuda = args.device == "cuda"
    model = bm.build("qwen3", args.layers, args.tiny, args.device, torch.bfloat16)
    results = []
    with torch.no_grad():
        if not args.no_prefill:
            results.append(prefill(args, model, cuda))
            print(report(results[-1:]), flush=True)
        if args.decode:
            torch._dynamo.reset()
            results.append(decode(args, model, cuda))
            print(report(results[-1:]), flush=True)
    meta = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if cuda else "cpu",
            "layers": args.layers, "tiny": args.tiny}
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "diag-wall-gap.json"), "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)
        with open(os.path.join(args.out, "diag-wall-gap.txt"), "w") as f:
            f.write(json.dumps(meta) + "\n" + report(results) + "\n")


if __name__ == "__main__":
    main()
