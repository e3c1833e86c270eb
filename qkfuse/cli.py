"""Command line: ``python -m qkfuse demo`` (or the ``qkfuse`` console script).

The demo builds tiny Qwen3 / Gemma3 causal LMs from embedded configs (random weights, nothing is
downloaded), prints what ``qkfuse.explain`` finds, checks the ``"qkfuse"`` backend against eager
and times eager / Inductor / qkfuse. Exit status 0 when every check passes.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings

import torch

# Tiny decoders: 2 layers, 4 query heads sharing 2 kv heads, head_dim 16 (Inductor on CPU compiles
# these in seconds). The sequence is short for the same reason.
_TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=128, use_cache=False,
             attn_implementation="sdpa")
MODELS = {
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", _TINY),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(_TINY, sliding_window=8)),
}
SEQ_LEN = 16
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# max |compiled - eager| allowed, relative to max |eager logits|: 1e-5 in float32; in 16-bit
# dtypes eager rounds every intermediate where Inductor keeps float32, so a few units of the dtype.
REL_TOL = {torch.float32: 1e-5, torch.float16: 8 * 2.0**-10, torch.bfloat16: 8 * 2.0**-7}


class DemoError(Exception):
    """A failed check: printed as one line, exit status 1."""


def build(name: str, dtype: torch.dtype, device: str) -> torch.nn.Module:
    import transformers

    config_cls, model_cls, config = MODELS[name]
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**config))
    return model.to(device=device, dtype=dtype).eval()


def time_ms(models: dict, input_ids, iters: int, device: str) -> dict:
    """{label: (median ms, noise ms)} per call, the models timed alternately (one call each in
    turn, so that load changes on the machine hit all of them alike); noise is half the
    interquartile range."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for m in models.values():
        for _ in range(3):  # warm-up (the compiled models are already compiled)
            m(input_ids)
    sync()
    times = {label: [] for label in models}
    for _ in range(iters):
        for label, m in models.items():
            start = time.perf_counter()
            m(input_ids)
            sync()
            times[label].append((time.perf_counter() - start) * 1e3)
    out = {}
    for label, t in times.items():
        q = statistics.quantiles(t, n=4) if len(t) > 1 else [t[0]] * 3
        out[label] = (statistics.median(t), (q[2] - q[0]) / 2)
    return out


def demo_one(name: str, dtype: torch.dtype, device: str, iters: int) -> None:
    import qkfuse
    from torch._dynamo.utils import counters

    model = build(name, dtype, device)
    input_ids = torch.randint(0, model.config.vocab_size, (1, SEQ_LEN), device=device)
    layers = model.config.num_hidden_layers
    print(f"\n=== {name}: {type(model).__name__}, {layers} layers, {str(dtype).replace('torch.', '')}, {device}")

    print(qkfuse.explain(model, input_ids).table())

    eager = model(input_ids).logits
    counters.clear()
    fused = torch.compile(copy.deepcopy(model), backend=qkfuse.qkfuse_backend)
    # The pass, and so its counters, runs when Inductor compiles, not on an FX graph cache hit.
    with torch._inductor.config.patch(fx_graph_cache=False):
        logits = fused(input_ids).logits
    stats = counters["qkfuse"]
    err = (logits.float() - eager.float()).abs().max().item()
    tol = REL_TOL[dtype] * eager.float().abs().max().item()
    print(f"max |logits - eager| = {err:.3g} (tolerance {tol:.3g})")
    print(f"fused sites: {stats['norm_rope_sites']} ({stats['norm_rope_calls']} fused calls, "
          f"{stats['norm_rope_refused']} refused)")
    if stats["norm_rope_sites"] != 2 * layers:
        raise DemoError(f"{name}: expected q and k of all {layers} layers fused ({2 * layers} sites), "
                        f"got {stats['norm_rope_sites']}")
    if not err <= tol:
        raise DemoError(f"{name}: max |logits - eager| = {err:.3g} exceeds the tolerance {tol:.3g}")

    inductor = torch.compile(copy.deepcopy(model), backend="inductor")
    rows = time_ms({"eager": model, "inductor": inductor, "qkfuse": fused}, input_ids, iters, device)
    print(f"\n{'backend':<10} {'median ms':>10} {'+-':>7} {'vs inductor':>12}")
    for label, (ms, noise) in rows.items():
        print(f"{label:<10} {ms:>10.3f} {noise:>7.3f} {rows['inductor'][0] / ms:>11.2f}x")
    if device == "cpu":
        print("(on CPU the fused sites are spliced as plain torch ops that Inductor compiles with the rest of "
              "the graph: no speed-up is expected there, and none lost; the fused kernel is the CUDA path, "
              "see benchmarks/results/)")


def demo(args: argparse.Namespace) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        print("qkfuse demo: --device cuda asked for, but CUDA is not available here "
              "(torch.cuda.is_available() is False); use --device cpu", file=sys.stderr)
        return 2
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("qkfuse demo: needs transformers (pip install 'qkfuse[hf]')", file=sys.stderr)
        return 2
    names = list(MODELS) if args.model == "all" else [args.model]
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # qkfuse.explain compiles without caches; torch warns that this also turns off PGO.
            warnings.filterwarnings("ignore", message="dynamo_pgo force disabled")
            for name in names:
                demo_one(name, DTYPES[args.dtype], args.device, args.iters)
    except DemoError as e:
        print(f"\nqkfuse demo: FAILED: {e}", file=sys.stderr)
        return 1
    print(f"\nqkfuse demo: ok ({', '.join(names)})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qkfuse", description="qkfuse: fuse QK-norm + RoPE in torch.compile graphs")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="fuse, check and time tiny Qwen3 / Gemma3 models (random weights)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    p.add_argument("--model", choices=(*MODELS, "all"), default="all")
    p.add_argument("--iters", type=int, default=20, help="timed calls per backend (median reported)")
    from . import scan
    scan.add_arguments(sub.add_parser("scan", help="coverage: fuse, check and report every RoPE / QK-norm "
                                                   "architecture built from a tiny config"))
    args = parser.parse_args(argv)
    if args.command == "scan":
        return scan.run(args)
    if args.iters < 1:
        p.error("--iters must be at least 1")
    return demo(args)
