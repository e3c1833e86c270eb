"""GPU checks of the decode path, Inductor and qkfuse in one run: what the generated code launches,
whether the KV-cache write happens in place inside our kernel, cache contents, device time of one
decode step (CUDA-graph replay), host time per call without CUDA graphs, and where it goes.

    python benchmarks/gpu_check_decode.py [--layers 2] [--batches 1,16,64] [--out DIR]

An HF Qwen3 built from a Qwen3-8B-shaped config (random weights, a few layers, bf16), a StaticCache
filled by an eager prefill, then one decode step compiled with each backend (fullgraph, no CUDA
graphs). Writes DIR/decode_check.json, the generated code (DIR/decode_code.txt)
and cProfile tables of the host path (DIR/decode_host_profile.txt).
"""

from __future__ import annotations

import argparse
import cProfile
import inspect
import io
import json
import os
import pstats
import re
import statistics
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import qkfuse  # noqa: E402

DEV = "cuda"
BACKENDS = ("inductor", "qkfuse")
REPORT: dict = {}


def say(msg: str) -> None:
    print(msg, flush=True)


def build(layers: int):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=layers,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=4096,
                      rope_theta=1e6, attn_implementation="sdpa")
    torch.manual_seed(0)
    return Qwen3ForCausalLM(cfg).to(DEV, torch.bfloat16).eval(), cfg


def backend_fn(name):
    return qkfuse.qkfuse_backend if name == "qkfuse" else "inductor"


class DecodeStep:
    """A StaticCache prefilled eagerly with `prompt` tokens and a compiled one-token step on it."""

    def __init__(self, model, cfg, backend: str, batch: int, prompt: int = 32, max_len: int = 512):
        from transformers import StaticCache

        self.model, self.prompt = model, prompt
        self.cache = StaticCache(config=cfg, max_cache_len=max_len)
        g = torch.Generator(device=DEV).manual_seed(batch)
        ids = torch.randint(0, cfg.vocab_size, (batch, prompt), device=DEV, generator=g)
        self.next_ids = torch.randint(0, cfg.vocab_size, (batch, 1), device=DEV, generator=g)
        self.kw = dict(past_key_values=self.cache, use_cache=True)
        if "cache_position" in inspect.signature(model.forward).parameters:
            self.kw["cache_position"] = torch.tensor([prompt], device=DEV)
        with torch.no_grad():
            model(ids, past_key_values=self.cache, use_cache=True)
        self.before = self.snapshot()
        self.fn = torch.compile(model, backend=backend_fn(backend), fullgraph=True)

    def __call__(self):
        with torch.no_grad():
            return self.fn(self.next_ids, **self.kw).logits

    def snapshot(self):
        return [t.clone() for layer in self.cache.layers for t in (layer.keys, layer.values)]

    def restore(self):
        """The caches as the prefill left them, and the write position back at the prompt's end
        (each step advances it; a CUDA-graph replay does too)."""
        for t, saved in zip((t for layer in self.cache.layers for t in (layer.keys, layer.values)), self.before):
            t.copy_(saved)
        self.rewind()

    def rewind(self):
        for layer in self.cache.layers:  # the 0-d integer counters (cumulative_length in transformers 5.x)
            for name, value in vars(layer).items():
                if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_floating_point():
                    value.fill_(self.prompt)
                elif name == "cumulative_length_int":
                    setattr(layer, name, self.prompt)


def launches(code: str) -> list[str]:
    """Kernel launches in the generated call(): Triton kernels (.run) and extern kernels."""
    body = code[code.find("def call("):]
    out = re.findall(r"^\s+(\w+)\.run\(", body, flags=re.M)
    out += ["extern:" + m for m in re.findall(r"extern_kernels\.(\w+)\(", body)]
    out += ["aten:" + m for m in re.findall(r"torch\.ops\.aten\.(\w+)\.", body)]
    return out


def check_decode(model, cfg, batches, out_dir):
    """Per batch: compile the step with each backend (recording the generated code), compare the
    caches it wrote, then time it A/B alternating: CUDA-graph replay and host time per call."""
    from torch._dynamo.utils import counters
    from torch._inductor.utils import run_and_get_code

    code_dump = []
    for batch in batches:
        rows, caches, steps = {}, {}, {}
        for name in BACKENDS:
            torch._dynamo.reset()
            counters.clear()
            step = steps[name] = DecodeStep(model, cfg, name, batch)
            with torch._inductor.config.patch(fx_graph_cache=False):
                logits, codes = run_and_get_code(step)
            code = "\n".join(codes)
            ks = launches(code)
            call = code.split("def call(")[-1]
            caches[name] = (step.snapshot(), logits.float(), step.before)
            rows[name] = dict(launches=len(ks), counts={k: ks.count(k) for k in sorted(set(ks))},
                              qkfuse_counters=dict(counters["qkfuse"]),
                              input_copy_or_clone=bool(re.search(r"\.copy_\(|\.clone\(", call)))
            code_dump.append(f"#### backend={name} batch={batch}\n{code}")
            with open(os.path.join(out_dir, "decode_code.txt"), "w") as f:
                f.write("\n\n".join(code_dump))
            step.restore()
        (k_ind, l_ind, before), (k_fused, l_fused, _) = caches["inductor"], caches["qkfuse"]
        diffs = []
        for i, (a, b, pre) in enumerate(zip(k_ind, k_fused, before)):
            changed = (a != pre).any(dim=-1)  # rows written this step
            scale = float(a.float().abs().max())
            diffs.append(dict(tensor=("k" if i % 2 == 0 else "v") + str(i // 2), rows_written=int(changed.sum()),
                              untouched_equal=bool(torch.equal(a[~changed], b[~changed])),
                              max_err_bf16_units=float((a.float() - b.float()).abs().max()) / (scale * 2.0**-8),
                              bit_equal=bool(torch.equal(a, b))))
        logit_err = float((l_ind - l_fused).abs().max() / l_ind.abs().max())
        for name in BACKENDS:
            r = rows[name]
            say(f"b{batch} {name}: {r['launches']} launches {r['counts']} counters {r['qkfuse_counters']} "
                f"copy_/clone in call(): {r['input_copy_or_clone']}")
        say(f"b{batch} caches: " + "; ".join(f"{d['tensor']} rows {d['rows_written']} bit_equal {d['bit_equal']} "
                                             f"err {d['max_err_bf16_units']:.2f}u untouched_eq {d['untouched_equal']}"
                                             for d in diffs) + f"; logits rel err {logit_err:.2e}")
        res = {n: {"graph_us": [], "host_us": []} for n in BACKENDS}
        for _ in range(3):  # alternate A/B
            for name in BACKENDS:
                res[name]["graph_us"].append(graph_replay_us(steps[name]))
                steps[name].rewind()
                res[name]["host_us"].append(host_us(steps[name], iters=30, rounds=3, rewind=steps[name].rewind))
        med = {n: {k: statistics.median(v) for k, v in d.items()} for n, d in res.items()}
        i, q = med["inductor"], med["qkfuse"]
        say(f"b{batch} decode step device (graph replay) inductor {i['graph_us']:.1f} us qkfuse {q['graph_us']:.1f} us "
            f"-> {i['graph_us'] / q['graph_us']:.3f}x; host (no graphs) inductor {i['host_us']:.1f} us "
            f"qkfuse {q['host_us']:.1f} us -> {i['host_us'] / q['host_us']:.3f}x")
        REPORT.setdefault("decode", {})[batch] = dict(backends=rows, caches=diffs, logits_rel_err=logit_err,
                                                      time_raw=res, time_median=med)
        for st in steps.values():
            st.restore()
        del steps


def graph_replay_us(fn, iters=200) -> float:
    """Median over 5 batches of `iters` replays of one captured step (fn.rewind() between them)."""
    fn.rewind()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    fn.rewind()
    for _ in range(10):
        g.replay()
    times = []
    for _ in range(5):
        fn.rewind()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(iters):
            g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / iters)
    return statistics.median(times)


def host_us(fn, iters=100, rounds=5, rewind=None) -> float:
    """Per call, back-to-back calls (host-bound at decode), median of rounds."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        if rewind is not None:
            rewind()
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e6 / iters)
    return statistics.median(times)


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def qwen_fn(q, k, qw, kw, cos, sin):
    def norm(x, w):
        dt = x.dtype
        x = x.float()
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dt)

    q, k = norm(q, qw).transpose(1, 2), norm(k, kw).transpose(1, 2)
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * c + rotate_half(q) * s, k * c + rotate_half(k) * s


def fn64(out_dir):
    """The QK-norm+RoPE function alone at 64 tokens, per call, no CUDA graphs; cProfile of both."""
    from torch._inductor.utils import run_and_get_code

    T, Hq, Hk, D = 64, 32, 8, 128
    g = torch.Generator(device=DEV).manual_seed(0)
    r = lambda *s: torch.randn(*s, device=DEV, dtype=torch.bfloat16, generator=g)  # noqa: E731
    args = (r(1, T, Hq, D), r(1, T, Hk, D), r(D), r(D), r(1, T, D), r(1, T, D))
    fns = {}
    codes = {}
    for name in BACKENDS:
        torch._dynamo.reset()
        fns[name] = torch.compile(qwen_fn, backend=backend_fn(name))
        with torch._inductor.config.patch(fx_graph_cache=False):
            _, c = run_and_get_code(fns[name], *args)
        codes[name] = "\n".join(c)
    res = {n: [] for n in BACKENDS}
    for _ in range(5):
        for name in BACKENDS:
            res[name].append(host_us(lambda: fns[name](*args), iters=200, rounds=1))
    med = {n: statistics.median(v) for n, v in res.items()}
    REPORT["fn64_host_us"] = dict(raw=res, median=med)
    say(f"fn64 per call: inductor {med['inductor']:.1f} us qkfuse {med['qkfuse']:.1f} us "
        f"-> {med['inductor'] / med['qkfuse']:.3f}x")
    text = []
    for name in BACKENDS:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(500):
            fns[name](*args)
        prof.disable()
        torch.cuda.synchronize()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
        text.append(f"#### {name}: 500 calls\n{buf.getvalue()}")
        call = codes[name][codes[name].find("def call("):]
        text.append(f"#### {name}: generated call()\n{call[:4000]}")
    with open(os.path.join(out_dir, "decode_host_profile.txt"), "w") as f:
        f.write("\n".join(text))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--skip", default="")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    a = ap.parse_args()
    import transformers
    import triton

    os.makedirs(a.out, exist_ok=True)
    REPORT["versions"] = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                              transformers=transformers.__version__, layers=a.layers)
    say(str(REPORT["versions"]))
    batches = [int(b) for b in a.batches.split(",")]
    model, cfg = build(a.layers)
    t0 = time.time()
    for name, fn in (("fn64", lambda: fn64(a.out)), ("decode", lambda: check_decode(model, cfg, batches, a.out))):
        if name in a.skip.split(","):
            continue
        try:
            fn()
        except Exception:
            traceback.print_exc()
            REPORT.setdefault("failed", []).append(name)
            say(f"{name}: FAILED")
        say(f"[{name} done at {time.time() - t0:.0f}s]")
        with open(os.path.join(a.out, "decode_check.json"), "w") as f:
            json.dump(REPORT, f, indent=1, default=str)


if __name__ == "__main__":
    main()
