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


def median_ms(model, input_ids, iters: int, device: str) -> float:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(3):  # warm-up (the compiled models are already compiled)
        model(input_ids)
    sync()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        model(input_ids)
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


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
    rows = [(label, median_ms(m, input_ids, iters, device))
            for label, m in (("eager", model), ("inductor", inductor), ("qkfuse", fused))]
    print(f"\n{'backend':<10} {'median ms':>10} {'vs eager':>9}")
    for label, ms in rows:
        print(f"{label:<10} {ms:>10.3f} {rows[0][1] / ms:>8.2f}x")
    if device == "cpu":
        print("(on CPU the fused op is the plain-torch reference kernel: it shows the pass works, it is not "
              "a speed-up; the fast path is the Triton kernel on CUDA, see benchmarks/results/)")


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
    args = parser.parse_args(argv)
    if args.iters < 1:
        p.error("--iters must be at least 1")
    return demo(args)
