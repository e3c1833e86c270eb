"""``python -m qkfuse scan``: which model architectures qkfuse fuses, measured.

For every transformers architecture whose modeling source uses RoPE or a q/k norm (and, with
``--diffusers``, a list of diffusers DiT transformers with RoPE), the scanner builds the model from a
tiny config (random weights, nothing downloaded), runs it eagerly and through
``torch.compile(backend="qkfuse")`` via :func:`qkfuse.explain` (caches bypassed, so the pass runs and
reports every candidate site) under ``torch.no_grad()``, and compares the compiled output with the
eager one. Each architecture runs in its own subprocess with a timeout, so a hang or a crash costs
one row, not the scan.

Rows: sites found, fused sites per family, refused sites with their reasons (deduplicated), max
relative error vs eager, status (fused / partly fused / refused / no sites / build error / compile
error / timeout). Architectures that cannot be built from a tiny config are listed with the error.

    python -m qkfuse scan [--diffusers] [--dtype float32|bfloat16] [--only NAME,...] [--timeout S]
                          [--jobs N] [--out docs/coverage.md] [--select rope|qknorm|popular|all] [--resume]

The worker (one architecture) is ``python -m qkfuse.scan --worker KIND NAME``; it prints one JSON
line prefixed with ``RESULT_TAG``.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import datetime
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
import time

from .options import DEFAULT_FAMILIES

RESULT_TAG = "QKFUSE_SCAN_RESULT "
STAGE_TAG = "QKFUSE_SCAN_STAGE "
SEQ_LEN = 12
BATCH = 2

# Tiny dims, applied to every config field of that name (aliases included: configs spell the same
# size several ways). Only fields the config class has are passed.
TINY = dict(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=128, use_cache=False,
    n_embd=64, n_layer=2, n_head=4, n_inner=128, n_positions=128, d_model=64, num_layers=2, num_heads=4,
    n_heads=4, n_layers=2, d_ff=128, ffn_dim=128, ffn_hidden_size=128, d_kv=16, kv_channels=16,
    multi_query_group_num=2, num_kv_heads=2, n_kv_heads=2, num_key_value_groups=2,
    decoder_layers=2, encoder_layers=2, decoder_attention_heads=4, encoder_attention_heads=4,
    decoder_ffn_dim=128, encoder_ffn_dim=128, num_decoder_layers=2, num_encoder_layers=2,
    # mixture of experts
    num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
    n_shared_experts=1, shared_expert_intermediate_size=32, first_k_dense_replace=1, n_group=1, topk_group=1,
    num_shared_experts=1, moe_num_experts=4, moe_topk=2, moe_k=2,
    # multi-head latent attention
    kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
    index_num_heads=2, index_layers=[1],  # sparse-attention indexers (Kolibri): within the tiny heads, layers
    rotary_dim=8,  # GPT-J / CodeGen: partial rotary, as in the real configs
    # windows / sharing / vision towers
    sliding_window=8, attention_chunk_size=8, num_kv_shared_layers=0, depth=2, image_size=32, patch_size=8,
    out_hidden_size=64, projection_dim=64,
    pad_token_id=0, bos_token_id=1, eos_token_id=2,
    # q/k norms that configs leave off by default (Persimmon, Phi, StableLM: LayerNorm; Cohere:
    # CohereLayerNorm; GLM4-MoE: RMSNorm): the scan is of the q/k-norm path
    qk_layernorm=True, use_qk_norm=True,
)

# The popular RoPE families (used by --select popular together with every QK-norm architecture).
POPULAR_ROPE = ["llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "phi3", "phi", "gemma", "gemma2", "cohere",
                "cohere2", "starcoder2", "olmo", "granite", "granitemoe", "gpt_neox", "falcon", "deepseek_v3",
                "glm4", "gptj", "stablelm", "persimmon", "helium", "gpt_oss", "smollm3", "ernie4_5"]

_ROPE_RE = re.compile(r"rotary|apply_rotary_pos_emb")
_QKNORM_RE = re.compile(r"q_norm|qk_norm|q_layernorm|query_layernorm")
STATUSES = ("fused", "partly fused", "refused", "no sites", "build error", "compile error", "timeout")


@dataclasses.dataclass
class Target:
    kind: str  # "transformers" | "diffusers"
    name: str
    rope: bool
    qk_norm: bool


# ---- enumeration -----------------------------------------------------------------------------------


def transformers_targets() -> list[Target]:
    """Every architecture with a config, a causal-LM head or a base model, and a modeling file; the
    RoPE / q-k-norm flags come from grepping that modeling source."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES, model_type_to_module_name
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES

    root = pathlib.Path(transformers.__file__).parent / "models"
    out = []
    for mt in CONFIG_MAPPING_NAMES:
        if mt not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and mt not in MODEL_MAPPING_NAMES:
            continue
        files = sorted((root / model_type_to_module_name(mt)).glob("modeling_*.py"))
        src = "".join(f.read_text(errors="replace") for f in files)
        out.append(Target("transformers", mt, bool(_ROPE_RE.search(src)), bool(_QKNORM_RE.search(src))))
    return out


def diffusers_targets() -> list[Target]:
    import diffusers

    root = pathlib.Path(diffusers.__file__).parent / "models" / "transformers"
    out = []
    for name, spec in DIFFUSERS.items():
        path = root / spec["file"]
        src = path.read_text(errors="replace") if path.exists() else ""
        out.append(Target("diffusers", name, bool(re.search(r"rotary|rope", src, re.I)),
                          bool(re.search(r"norm_q|qk_norm|q_norm|q_rms_norm|query_norm", src))))
    return out


def select_targets(args) -> list[Target]:
    targets = []
    if not args.no_transformers:
        targets += transformers_targets()
    if args.diffusers or args.only:
        try:
            targets += diffusers_targets()
        except ImportError:
            if args.diffusers:
                raise
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        by_name = {t.name: t for t in targets}
        unknown = [n for n in wanted if n not in by_name]
        if unknown:
            raise SystemExit(f"qkfuse scan: unknown architecture(s) {unknown}")
        return [by_name[n] for n in wanted]
    if not args.diffusers:
        targets = [t for t in targets if t.kind == "transformers"]
    if args.select == "all":
        return targets
    if args.select == "qknorm":
        return [t for t in targets if t.qk_norm]
    if args.select == "popular":
        return [t for t in targets if t.qk_norm or t.name in POPULAR_ROPE or t.kind == "diffusers"]
    return [t for t in targets if t.rope or t.qk_norm]


# ---- the worker: one architecture --------------------------------------------------------------------


class BuildError(Exception):
    pass


def _stage(name: str) -> None:
    print(STAGE_TAG + name, file=sys.stderr, flush=True)


def _config_fields(cls) -> set:
    if dataclasses.is_dataclass(cls):
        return {f.name for f in dataclasses.fields(cls)}
    import inspect

    names = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is not None:
            names.update(p for p in inspect.signature(init).parameters if p not in ("self", "kwargs"))
    return names


def _get(obj, name):
    """getattr that never raises (configs with per-layer attributes raise on the global one)."""
    try:
        return getattr(obj, name, None)
    except Exception:
        return None


_MROPE_DEFAULT_RE = re.compile(r"""get\(\s*["']mrope_section["']\s*,\s*\[([\d,\s]+)\]""")


def _mrope_section_in_code(cls) -> list[int] | None:
    """The mRoPE sections a model's code falls back to when its config has none (a default the tiny
    head_dim has to be scaled to as well), read from the modeling files beside the config's module."""
    module = sys.modules.get(cls.__module__)
    path = getattr(module, "__file__", None)
    if not path:
        return None
    for f in sorted(pathlib.Path(path).parent.glob("modeling_*.py")):
        m = _MROPE_DEFAULT_RE.search(f.read_text(errors="replace"))
        if m:
            return [int(x) for x in m.group(1).split(",") if x.strip()]
    return None


def _tiny_kwargs(cls, default, depth: int = 0, parts: list | None = None) -> dict:
    """Constructor kwargs for a tiny `cls` config: TINY on the fields `cls` has, per-layer lists cut
    to the tiny layer count, mRoPE sections scaled to the tiny head_dim, sub-configs (text, vision,
    audio) made tiny the same way. `parts` collects (kwargs dict, its fields) for every level."""
    from transformers import PretrainedConfig

    fields = _config_fields(cls)
    # a scalar where the default is per-layer list (or the reverse) would fail the config's type check
    kw = {k: v for k, v in TINY.items() if k in fields and
          isinstance(_get(default, k), (list, tuple)) == isinstance(v, (list, tuple))}
    if parts is not None:
        parts.append((kw, fields))
    layers = _get(default, "num_hidden_layers")
    if isinstance(layers, int) and layers > 0:
        for f in fields:
            v = _get(default, f)
            if isinstance(v, (list, tuple)) and len(v) == layers and layers != TINY["num_hidden_layers"] \
                    and not f.endswith("_config"):
                kw[f] = list(v[: TINY["num_hidden_layers"]])
                kinds = list(dict.fromkeys(v)) if all(isinstance(x, str) for x in v) else []
                if kinds and set(kinds) != set(kw[f]) and len(kinds) <= 4:
                    # hybrid stacks (e.g. linear attention with a full-attention layer every 4th):
                    # one layer of each kind, so that the tiny model has its attention layers
                    kw[f] = kinds
                    kw["num_hidden_layers"] = max(TINY["num_hidden_layers"], len(kinds))
    if "kv_lora_rank" in fields and "num_attention_heads" in kw:
        kw["num_key_value_heads"] = kw["num_attention_heads"]  # multi-head latent attention: no GQA
    rope = _get(default, "rope_parameters")
    head_dim = kw.get("head_dim") or (kw["hidden_size"] // kw["num_attention_heads"]
                                      if {"hidden_size", "num_attention_heads"} <= kw.keys() else None)
    if isinstance(rope, dict) and "mrope_section" not in rope and head_dim:
        in_code = _mrope_section_in_code(cls)  # (GLM-OCR: rope_parameters.get("mrope_section", [8, 12, 12]))
        if in_code:
            rope = dict(rope, mrope_section=in_code)
    if isinstance(rope, dict) and isinstance(rope.get("mrope_section"), (list, tuple)) and head_dim:
        sec = list(rope["mrope_section"])
        rotary = int(head_dim * rope.get("partial_rotary_factor", 1.0))
        half, total = rotary // 2, sum(sec)
        scaled = [max(1, round(x * half / total)) for x in sec]
        scaled[0] += half - sum(scaled)
        kw["rope_parameters"] = dict(rope, mrope_section=scaled)
    if depth < 2:
        for name, sub_cls in (getattr(cls, "sub_configs", None) or {}).items():
            sub = _get(default, name)
            if isinstance(sub, PretrainedConfig):
                d = _tiny_kwargs(type(sub), sub, depth + 1, parts)
                if not (isinstance(sub_cls, type) and issubclass(sub_cls, PretrainedConfig)):
                    d["model_type"] = sub.model_type  # an AutoConfig slot
                kw[name] = d
    return kw


_MUST_EQUAL = re.compile(r"`?(\w+)`?(?: \([^)]*\))? must (?:equal|match|be equal to) `?(\w+)`?")


def _repair(parts: list, message: str) -> bool:
    """Change the tiny kwargs after a config error: "a must equal b" sets a to b's tiny value;
    otherwise the tiny fields the message names fall back to the defaults. False: nothing to change."""
    changed = False
    for a, b in _MUST_EQUAL.findall(message):
        for kw, fields in parts:
            if b in kw and a in fields and kw.get(a) != kw[b]:
                kw[a] = kw[b]
                changed = True
            elif a in kw and b in fields and b not in kw and kw.get(b) != kw[a]:
                kw[b] = kw[a]
                changed = True
    if changed:
        return True
    for kw, _fields in parts:
        for k in [k for k in kw if k in TINY and re.search(rf"\b{re.escape(k)}\b", message)]:
            kw.pop(k)
            changed = True
    return changed


def build_transformers(name: str, dtype):
    """(model, inputs, class name) for a tiny `name` model; raises BuildError."""
    import torch
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES

    cfg_cls = CONFIG_MAPPING[name]
    try:
        default = cfg_cls()
    except Exception as e:
        raise BuildError(f"default config: {_short(e)}") from None
    parts: list = []
    kw = _tiny_kwargs(cfg_cls, default, parts=parts)
    cls_name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(name) or MODEL_MAPPING_NAMES[name]
    if isinstance(cls_name, (list, tuple)):
        cls_name = cls_name[0]
    model_cls = getattr(transformers, cls_name, None)
    if model_cls is None:
        raise BuildError(f"transformers has no {cls_name}")
    errors, model = [], None
    for _attempt in range(10):
        try:
            config = cfg_cls(**kw)
            torch.manual_seed(0)
            wanted = getattr(model_cls, "config_class", None)
            if isinstance(wanted, type) and not isinstance(config, wanted) and hasattr(config, "get_text_config"):
                config = config.get_text_config()  # a causal-LM head over a composite (multimodal) config
            model = model_cls(config)
            break
        except Exception as e:
            errors.append(_short(e))
            if not _repair(parts, str(e)):
                break
    if model is None:
        raise BuildError(f"tiny config: {errors[0]}" + (f" (last: {errors[-1]})" if len(errors) > 1 else ""))
    params = sum(p.numel() for p in model.parameters())
    if params > 200e6:
        raise BuildError(f"tiny config still has {params / 1e6:.0f}M parameters (fields not shrunk)")
    model = model.to(dtype).eval()
    try:
        inputs = _transformers_inputs(model, config)
    except BuildError:
        raise
    except Exception as e:
        raise BuildError(f"tiny input: {_short(e)}") from None
    return model, inputs, cls_name


def _transformers_inputs(model, config) -> dict:
    import inspect

    import torch

    g = torch.Generator().manual_seed(0)
    main = getattr(model, "main_input_name", "input_ids")
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    params = inspect.signature(model.forward).parameters
    inputs = {}
    if main == "input_ids":
        vocab = int(getattr(text, "vocab_size", None) or TINY["vocab_size"])
        inputs["input_ids"] = torch.randint(3, max(vocab, 4), (BATCH, SEQ_LEN), generator=g)
        if getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" in params:
            inputs["decoder_input_ids"] = torch.randint(3, max(vocab, 4), (BATCH, SEQ_LEN // 2), generator=g)
    elif main == "pixel_values":
        vision = getattr(config, "vision_config", config)
        size = getattr(vision, "image_size", 32)
        size = size[0] if isinstance(size, (list, tuple)) else size
        channels = getattr(vision, "num_channels", 3)
        dtype = next(model.parameters()).dtype
        inputs["pixel_values"] = torch.randn(BATCH, channels, size, size, generator=g).to(dtype)
    else:
        raise BuildError(f"no tiny input for main input {main!r}")
    if "use_cache" in params:
        inputs["use_cache"] = False
    return inputs


def build_diffusers(name: str, dtype):
    import diffusers
    import torch

    spec = DIFFUSERS[name]
    cls = getattr(diffusers, spec["cls"], None)
    if cls is None:
        raise BuildError(f"diffusers has no {spec['cls']}")
    try:
        torch.manual_seed(0)
        model = cls(**spec["init"]).to(dtype).eval()
        g = torch.Generator().manual_seed(0)
        inputs = {k: (v(g).to(dtype) if callable(v) and k not in spec.get("exact", ()) else
                      v(g) if callable(v) else v) for k, v in spec["inputs"].items()}
    except Exception as e:
        raise BuildError(_short(e)) from None
    return model, inputs, spec["cls"]


def main_tensor(out):
    """The output a row compares: logits / last_hidden_state / sample, else the first tensor."""
    import torch

    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state", "sample"):
        v = getattr(out, key, None)
        if isinstance(v, torch.Tensor):
            return v
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        for v in out:
            t = main_tensor(v)
            if t is not None:
                return t
    return None


def normalize_reason(reason: str) -> str:
    """A refusal reason with node names and shapes abstracted, so that the same cause in two
    graphs (or two architectures) counts once."""
    r = re.sub(r"\b[a-z][a-z0-9]*(?:_[a-z0-9]+)*_\d+\b", "<node>", reason)
    r = re.sub(r"\b(intermediate|user outside the chain \(?)(?:[a-z][a-z0-9_]*)\b", r"\1<node>", r)
    r = re.sub(r"\((?:[\w.]+, )*[\w.]+,?\)", "<shape>", r)
    r = re.sub(r"\[(?:[\w.]+, )*[\w.]+\]", "<shape>", r)
    return r


def _short(e: BaseException, limit: int = 300) -> str:
    """One line for a table cell: the exception type and first line, plus, for Dynamo's wrapped
    errors, the line that names the real cause."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    text = f"{type(e).__name__}: {lines[0] if lines else ''}"
    if len(lines) > 1 and lines[0].endswith(":"):  # e.g. a config validator: the cause is on the next line
        text += " " + lines[1]
    cause = next((ln for ln in lines[1:] if ln.startswith(("Explanation:", "got ")) or " got " in ln), None)
    if cause:
        m = re.search(r"got (\w+\(.*)", cause)
        text += " ... " + (m.group(1) if m else cause)
    return text[:limit]


def run_one(kind: str, name: str, dtype_name: str, families: str | None) -> dict:
    """Build, run eagerly, compile through qkfuse.explain, compare: the row for one architecture."""
    import warnings

    import torch

    import qkfuse
    from qkfuse.cli import DTYPES, REL_TOL

    warnings.filterwarnings("ignore")
    dtype = DTYPES[dtype_name]
    row = dict(kind=kind, name=name, dtype=dtype_name, cls="", status="", error="", sites=0, fused={},
               refused=0, reasons=[], rel_err=None, tol=REL_TOL[dtype], graphs=0, params=0)
    t0 = time.perf_counter()
    _stage("build")
    try:
        model, inputs, row["cls"] = (build_transformers if kind == "transformers" else build_diffusers)(name, dtype)
        row["params"] = sum(p.numel() for p in model.parameters())
        _stage("eager")
        with torch.no_grad():
            ref = main_tensor(model(**inputs))
        if ref is None:
            raise BuildError("the output has no tensor to compare")
    except BuildError as e:
        row.update(status="build error", error=str(e))
        return _done(row, t0)
    except Exception as e:
        row.update(status="build error", error=f"eager forward: {_short(e)}")
        return _done(row, t0)

    _stage("compile")
    box = []

    def forward(**kw):
        out = model(**kw)
        box.append(out)
        return out

    options = {"qkfuse.families": families} if families else None
    try:
        with torch.no_grad():
            report = qkfuse.explain(forward, options=options, **inputs)
    except Exception as e:
        row.update(status="compile error", error=_short(e))
        return _done(row, t0)
    row["graphs"] = report.graphs
    row["sites"] = len(report.sites)
    row["fused"] = dict(collections.Counter(s.family for s in report.fused))
    row["refused"] = len(report.refused)
    reasons = collections.Counter(normalize_reason(s.reason) for s in report.refused)
    row["reasons"] = sorted(reasons.items(), key=lambda kv: -kv[1])
    out = main_tensor(box[-1]) if box else None
    if out is not None and out.shape == ref.shape:
        den = float(ref.float().abs().max())
        err = float((out.float() - ref.float()).abs().max())
        row["rel_err"] = err / den if den > 0 else err
    else:
        row["error"] = "compiled output not comparable with eager"
    n_fused = len(report.fused)
    if not report.sites:
        row["error"] = no_site_hint(model)
    row["status"] = ("no sites" if not report.sites else "fused" if n_fused == len(report.sites)
                     else "partly fused" if n_fused else "refused")
    return _done(row, t0)


_HINTS = (
    (r"view_as_complex|torch\.polar", "RoPE as a complex multiply (view_as_complex)"),
    (r"\[\s*\.\.\.\s*,\s*[01]::2\s*\]\s*=|\[:, :, :, [01]::2\]\s*=", "RoPE by slice assignment (out[..., 0::2] = ...)"),
    (r"\w+\s*\*\s*cos\s*-\s*\w+\s*\*\s*sin", "RoPE as cat(x1*cos - x2*sin, x2*cos + x1*sin) (no rotate_half)"),
    (r"addcmul", "RoPE through addcmul"),
)


def no_site_hint(model) -> str:
    """Why the compiled graphs have no RoPE candidate, as far as the model's own source tells
    (its modeling package in transformers, its transformer file in diffusers)."""
    import inspect

    def source_file(cls):
        try:
            return inspect.getsourcefile(cls)
        except (TypeError, OSError):
            return None

    if not any(type(m).__name__.endswith(("Attention", "Attn")) for m in model.modules()):
        return "no attention module in the tiny model (a hybrid stack whose tiny layers are all of another kind?)"
    own = source_file(type(model))
    if own is None:
        return "no x*cos + rotate_half(x)*sin in the graphs"
    if "diffusers" in own:
        files = {own}
    else:
        files = {f for f in (source_file(type(m)) for m in model.modules())
                 if f and os.path.dirname(f) == os.path.dirname(own)}
    src = "".join(pathlib.Path(f).read_text(errors="replace") for f in sorted(files))
    found = [hint for pattern, hint in _HINTS if re.search(pattern, src)]
    if found:
        return "no x*cos + rotate_half(x)*sin in the graphs; the model's source has " + " and ".join(found)
    if not re.search(r"rotary|rope", src, re.I):
        return "no RoPE in the model's source"
    return "no x*cos + rotate_half(x)*sin in the graphs"


def _done(row: dict, t0: float) -> dict:
    row["time_s"] = round(time.perf_counter() - t0, 1)
    return row


def worker_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m qkfuse.scan --worker")
    ap.add_argument("kind", choices=("transformers", "diffusers"))
    ap.add_argument("name")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--families", default=None)
    a = ap.parse_args(argv)
    row = run_one(a.kind, a.name, a.dtype, a.families)
    print(RESULT_TAG + json.dumps(row), flush=True)
    return 0


# ---- the driver ----------------------------------------------------------------------------------------


def run_worker(target: Target, args, procs: dict) -> dict:
    """One architecture in a subprocess (its own process group, killed as a whole on timeout)."""
    cmd = [sys.executable, "-m", "qkfuse.scan", "--worker", target.kind, target.name, "--dtype", args.dtype]
    if args.families:
        cmd += ["--families", args.families]
    threads = str(max(1, (os.cpu_count() or 1) // max(1, args.jobs)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
           "TORCHINDUCTOR_COMPILE_THREADS": "1", "OMP_NUM_THREADS": threads, "PYTHONWARNINGS": "ignore",
           "DIFFUSERS_VERBOSITY": "error"}
    root = str(pathlib.Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    base = dict(kind=target.kind, name=target.name, dtype=args.dtype, cls="", error="", sites=0, fused={},
                refused=0, reasons=[], rel_err=None, graphs=0, params=0)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    procs[proc.pid] = proc
    try:
        out, err = proc.communicate(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out, err = proc.communicate()
        stage = _last_stage(err)
        row = dict(base, status="timeout", error=f"no result after {args.timeout:.0f} s (stage: {stage})")
    else:
        row = None
        for line in out.splitlines():
            if line.startswith(RESULT_TAG):
                row = json.loads(line[len(RESULT_TAG):])
        if row is None:
            stage = _last_stage(err)
            last = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(STAGE_TAG)][-1:]
            what = f"worker exited with status {proc.returncode}" + (f": {last[0][:240]}" if last else "")
            row = dict(base, status="build error" if stage in ("build", "eager", "start") else "compile error",
                       error=f"{what} (stage: {stage})")
    finally:
        procs.pop(proc.pid, None)
    row.update(rope=target.rope, qk_norm=target.qk_norm)
    row.setdefault("time_s", round(time.perf_counter() - t0, 1))
    row["wall_s"] = round(time.perf_counter() - t0, 1)
    return row


def _kill_group(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the worker's own session: it and what it started
    except (ProcessLookupError, PermissionError):
        proc.kill()


def _last_stage(err: str) -> str:
    stages = [ln[len(STAGE_TAG):].strip() for ln in (err or "").splitlines() if ln.startswith(STAGE_TAG)]
    return stages[-1] if stages else "start"


def versions() -> dict:
    import platform

    import torch

    v = {"torch": torch.__version__, "python": platform.python_version(),
         "date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores"}
    for mod in ("transformers", "diffusers"):
        try:
            v[mod] = __import__(mod).__version__
        except ImportError:
            v[mod] = "not installed"
    try:
        import qkfuse

        from qkfuse.passes.manager import source_hash

        v["qkfuse"] = f"{qkfuse.__version__} (pass source hash {source_hash()[:12]})"
    except ImportError:  # pragma: no cover
        pass
    return v


def summary(rows: list[dict], kind: str = "transformers") -> str:
    rows = [r for r in rows if r["kind"] == kind]
    ok = lambda r: r["status"] in ("fused", "partly fused")  # noqa: E731
    qk = [r for r in rows if r.get("qk_norm")]
    rope = [r for r in rows if r.get("rope")]
    return (f"fused {sum(map(ok, qk))} of {len(qk)} architectures with QK-norm; "
            f"{sum(map(ok, rope))} of {len(rope)} with RoPE")


def _fmt_err(r: dict) -> str:
    if r.get("rel_err") is None:
        return "-"
    flag = "" if r.get("tol") is None or r["rel_err"] <= r["tol"] else " (!)"
    return f"{r['rel_err']:.1e}{flag}"


def _fmt_fused(r: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(r.get("fused", {}).items())) or "0"


def _fmt_reasons(r: dict, md: bool = True) -> str:
    if r["status"] in ("build error", "compile error", "timeout", "no sites"):
        text = r.get("error", "")
    else:
        text = "; ".join(f"{n}x {reason}" for reason, n in r.get("reasons", []))
        if r.get("error"):
            text = f"{text}; {r['error']}" if text else r["error"]
    if md:
        text = text.replace("|", "\\|").replace("\n", " ")
    return text


COLUMNS = ("architecture", "class", "RoPE", "QK-norm", "sites", "fused", "refused", "max rel err", "graphs",
           "status", "refusal reasons / error")


def row_cells(r: dict, md: bool = True) -> list[str]:
    return [r["name"], r.get("cls", ""), "yes" if r.get("rope") else "", "yes" if r.get("qk_norm") else "",
            str(r.get("sites", 0)), _fmt_fused(r), str(r.get("refused", 0)), _fmt_err(r), str(r.get("graphs", 0)),
            r["status"], _fmt_reasons(r, md)]


def top_reasons(rows: list[dict], n: int = 15) -> list[tuple[str, int, int]]:
    """(reason, architectures, sites), most architectures first."""
    archs, sites = collections.Counter(), collections.Counter()
    for r in rows:
        for reason, count in r.get("reasons", []):
            archs[reason] += 1
            sites[reason] += count
    return [(reason, a, sites[reason]) for reason, a in archs.most_common(n)]


def _previous_header(old_meta: dict, out_md: pathlib.Path) -> list[str]:
    """The header lines a resumed scan keeps: the previous run's versions and command, then its note
    and history (from its JSON, or read from the markdown of a scan that predates the field)."""
    v = old_meta.get("versions", {})
    lines = [f"before that: torch {v.get('torch')}, transformers {v.get('transformers')}, diffusers "
             f"{v.get('diffusers')}; command: `{old_meta.get('command', '')}`"]
    if "history" in old_meta:
        return lines + list(old_meta.get("note_lines", [])) + list(old_meta["history"])
    if out_md.exists():  # the lines after the fixed header, up to the first blank line
        md = out_md.read_text().splitlines()
        start = next((i + 1 for i, ln in enumerate(md) if ln.startswith("- RoPE / QK-norm:")), len(md))
        for ln in md[start:]:
            if not ln.startswith("- "):
                break
            lines.append(ln[2:])
    return lines


def render_markdown(rows: list[dict], meta: dict, note: str = "") -> str:
    rows = sorted(rows, key=lambda r: (r["kind"], r["name"]))
    v = meta["versions"]
    out = ["# qkfuse coverage", "",
           "Generated by `python -m qkfuse scan` (qkfuse/scan.py): each architecture built from a tiny config "
           "(random weights, nothing downloaded), run eagerly and through `torch.compile(backend=\"qkfuse\")` "
           "(via `qkfuse.explain`, caches bypassed) under `torch.no_grad()`, the compiled output compared "
           "with eager.", "",
           f"- versions: torch {v.get('torch')}, transformers {v.get('transformers')}, "
           f"diffusers {v.get('diffusers')}, qkfuse {v.get('qkfuse')}, python {v.get('python')}; {v.get('machine')}; "
           f"date {v.get('date')}",
           f"- command: `{meta.get('command', '')}`",
           f"- dtype {meta.get('dtype')}, batch {BATCH}, sequence {SEQ_LEN} (transformers), "
           f"families {meta.get('families') or 'default (' + ','.join(DEFAULT_FAMILIES) + ')'}, "
           f"timeout {meta.get('timeout')} s per architecture",
           "- status: fused (every candidate site fused) / partly fused / refused (candidates found, none fused) / "
           "no sites (no RoPE candidate in the compiled graphs) / build error (no tiny config, model or input; "
           "the error is listed) / compile error / timeout. `max rel err` = max |compiled - eager| / max |eager| of "
           "the main output (logits, last_hidden_state or sample); (!) marks a value above the tolerance "
           f"({meta.get('tol')}). `graphs`: Dynamo graphs compiled (graph breaks + 1).",
           "- RoPE / QK-norm: the modeling source mentions `rotary`/`apply_rotary_pos_emb` / "
           "`q_norm`/`qk_norm`/`q_layernorm` (diffusers: `rope`/`rotary` / `norm_q`/`qk_norm`/`q_norm`/`q_rms_norm`/`query_norm`)."]
    if note:
        out += [f"- {note}"]
    out += [f"- {line}" for line in meta.get("history", [])]
    out.append("")
    for kind in ("transformers", "diffusers"):
        krows = [r for r in rows if r["kind"] == kind]
        if not krows:
            continue
        counts = collections.Counter(r["status"] for r in krows)
        out += [f"## {kind}", "", f"**{summary(krows, kind)}**", "",
                "status counts: " + ", ".join(f"{s} {counts[s]}" for s in STATUSES if counts[s]), ""]
        reasons = top_reasons(krows)
        if reasons:
            out += ["Top refusal reasons (architectures, sites):", "", "| reason | architectures | sites |",
                    "| --- | ---: | ---: |"]
            out += [f"| {reason.replace('|', chr(92) + '|')} | {a} | {s} |" for reason, a, s in reasons]
            out.append("")
        out += ["| " + " | ".join(COLUMNS) + " |", "| " + " | ".join("---" for _ in COLUMNS) + " |"]
        out += ["| " + " | ".join(row_cells(r)) + " |" for r in krows]
        out.append("")
    return "\n".join(out)


def _print_table(rows: list[dict], console) -> None:
    rows = sorted(rows, key=lambda r: (r["kind"], r["name"]))
    head = ("architecture", "status", "sites", "fused", "refused", "max rel err", "reasons / error")
    pick = lambda r: [row_cells(r, md=False)[i] for i in (0, 9, 4, 5, 6, 7, 10)]  # noqa: E731
    if console is not None:
        from rich.table import Table

        table = Table(*head)
        for col in table.columns[:-1]:
            col.no_wrap = True
        for r in rows:
            table.add_row(*pick(r))
        console.print(table)
    else:
        for r in rows:
            c = pick(r)
            print(f"{c[0]:<28} {c[1]:<13} sites {c[2]:>3}  fused {c[3]:<14} refused {c[4]:>3}  err {c[5]:<10} {c[6]}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--diffusers", action="store_true", help="also scan diffusers DiT transformers with RoPE")
    p.add_argument("--no-transformers", action="store_true", help="skip the transformers architectures")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--only", default="", help="comma-separated architecture names (transformers model_type or "
                                              "the diffusers names in qkfuse/scan.py)")
    p.add_argument("--select", choices=("rope", "qknorm", "popular", "all"), default="rope",
                   help="rope (default): modeling source has RoPE or a q/k norm; qknorm: a q/k norm; popular: "
                        "q/k norm plus the popular RoPE families; all: every architecture")
    p.add_argument("--families", default=None, help="qkfuse.families for the compile (default: the pass's default)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per architecture (default 300)")
    p.add_argument("--jobs", type=int, default=1, help="parallel subprocesses (default 1)")
    p.add_argument("--out", default="docs/coverage.md", help="markdown output (a .json with the rows beside it)")
    p.add_argument("--resume", action="store_true", help="keep the rows already in the .json of --out")
    p.add_argument("--retry-failed", action="store_true",
                   help="with --resume: scan again the rows that ended in a build error, compile error or timeout")
    p.add_argument("--note", default="", help="a line added to the markdown header")


def run(args: argparse.Namespace) -> int:
    if args.jobs < 1:
        raise SystemExit("qkfuse scan: --jobs must be at least 1")
    targets = select_targets(args)
    out_md = pathlib.Path(args.out)
    out_json = out_md.with_suffix(".json")
    rows: dict = {}
    history: list[str] = []
    if args.resume and out_json.exists():
        old = json.loads(out_json.read_text())
        named = {n for n in (args.only or "").split(",") if n}  # --only with --resume: those rows again
        rows = {(r["kind"], r["name"]): r for r in old.get("rows", []) if r.get("dtype") == args.dtype
                and r["name"] not in named
                and not (args.retry_failed and r["status"] in ("build error", "compile error", "timeout"))}
        history = _previous_header(old.get("meta", {}), out_md)
    todo = [t for t in targets if (t.kind, t.name) not in rows]
    meta = dict(versions=versions(), dtype=args.dtype, families=args.families, timeout=args.timeout,
                command="python -m qkfuse scan " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["scan"] else
                                                            sys.argv[1:]),
                tol=_tol(args.dtype), note_lines=[args.note] if args.note else [], history=history)
    try:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        console = Console(width=None if sys.stdout.isatty() else 200)
    except ImportError:
        console = None
    lock = threading.Lock()
    procs: dict = {}

    def save():
        out_md.parent.mkdir(parents=True, exist_ok=True)
        all_rows = list(rows.values())
        out_json.write_text(json.dumps({"meta": meta, "rows": all_rows}, indent=1))
        out_md.write_text(render_markdown(all_rows, meta, args.note))

    def finished(row, advance):
        with lock:
            rows[(row["kind"], row["name"])] = row
            save()
            line = (f"{row['name']:<28} {row['status']:<13} sites {row.get('sites', 0):>3}  fused "
                    f"{_fmt_fused(row):<14} refused {row.get('refused', 0):>3}  err {_fmt_err(row):<10} "
                    f"{row.get('wall_s', 0):>6.1f} s  {_fmt_reasons(row, md=False)[:90]}")
            (console.print(line, markup=False, highlight=False) if console else print(line, flush=True))
            advance()

    start = time.perf_counter()
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs)
    futs: list = []

    def on_term(signum, frame):  # kill -TERM of the driver: stop its workers too
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_term)
    try:
        if console is not None:
            with Progress(TextColumn("scan"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                          TextColumn("{task.description}"), console=console) as progress:
                task = progress.add_task("", total=len(todo))
                futs = [pool.submit(run_worker, t, args, procs) for t in todo]
                for f in concurrent.futures.as_completed(futs):
                    finished(f.result(), lambda: progress.advance(task))
        else:
            futs = [pool.submit(run_worker, t, args, procs) for t in todo]
            for i, f in enumerate(concurrent.futures.as_completed(futs), 1):
                finished(f.result(), lambda: print(f"[{i}/{len(todo)}]", flush=True))
    except KeyboardInterrupt:
        for f in futs:
            f.cancel()
        for proc in list(procs.values()):
            _kill_group(proc)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    save()
    _print_table([r for r in rows.values() if any((r["kind"], r["name"]) == (t.kind, t.name) for t in targets)],
                 console)
    for kind in ("transformers", "diffusers"):
        if any(r["kind"] == kind for r in rows.values()):
            print(f"{kind}: {summary(list(rows.values()), kind)}")
    print(f"wrote {out_md} and {out_json} ({len(todo)} scanned in {time.perf_counter() - start:.0f} s)")
    return 0


def _tol(dtype_name: str) -> float:
    from qkfuse.cli import DTYPES, REL_TOL

    return REL_TOL[DTYPES[dtype_name]]


# ---- diffusers: tiny DiT transformers (init kwargs, inputs built from a generator) -----------------------


def _randn(*shape):
    import torch

    return lambda g: torch.randn(*shape, generator=g)


def _const(value, dtype_name="float32"):
    import torch

    return lambda g: torch.tensor(value, dtype=getattr(torch, dtype_name))


def _full(value, *shape):
    import torch

    return lambda g: torch.full(shape, value)


def _ones_long(*shape):
    import torch

    return lambda g: torch.ones(*shape, dtype=torch.long)


def _arange(*shape):
    """Positions 0..shape[-1]-1 along the last dim (long; list the key in ``exact``)."""
    import torch

    return lambda g: torch.arange(shape[-1]).repeat(*shape[:-1], 1)


def _aranges(*ns):
    """A tuple of position vectors, one per axis (Kandinsky5's visual_rope_pos; list the key in ``exact``)."""
    import torch

    return lambda g: tuple(torch.arange(n) for n in ns)


class _Tensors(list):
    """A list-of-tensors input (Z-Image's x / cap_feats, OmniGen's input_img_latents): ``.to(dtype)`` casts each
    tensor, as build_diffusers casts a tensor input, and gives a plain list."""

    def to(self, dtype):
        return [t.to(dtype) for t in self]


def _randn_list(*shapes):
    import torch

    return lambda g: _Tensors(torch.randn(*s, generator=g) for s in shapes)


_FLUXLIKE_IN = dict(hidden_states=_randn(1, 16, 16), encoder_hidden_states=_randn(1, 8, 32),
                    timestep=_const([0.5]), img_ids=_randn(16, 3), txt_ids=_full(0.0, 8, 3))
_WANLIKE = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                text_dim=16, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
_WANLIKE_IN = dict(hidden_states=_randn(1, 4, 2, 16, 16), encoder_hidden_states=_randn(1, 12, 16),
                   timestep=_const([500.0]))

DIFFUSERS = {
    "flux": dict(cls="FluxTransformer2DModel", file="transformer_flux.py",
                 init=dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
                           num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                           axes_dims_rope=(4, 6, 6)),
                 inputs=dict(_FLUXLIKE_IN, pooled_projections=_randn(1, 32))),
    "chroma": dict(cls="ChromaTransformer2DModel", file="transformer_chroma.py",
                   init=dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
                             num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6),
                             approximator_num_channels=8, approximator_hidden_dim=32, approximator_layers=1),
                   inputs=dict(_FLUXLIKE_IN)),
    "wan": dict(cls="WanTransformer3DModel", file="transformer_wan.py", init=dict(_WANLIKE), inputs=dict(_WANLIKE_IN)),
    "skyreels_v2": dict(cls="SkyReelsV2Transformer3DModel", file="transformer_skyreels_v2.py", init=dict(_WANLIKE),
                        inputs=dict(_WANLIKE_IN)),
    "qwenimage": dict(cls="QwenImageTransformer2DModel", file="transformer_qwenimage.py",
                      init=dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
                                num_attention_heads=2, joint_attention_dim=16, guidance_embeds=False,
                                axes_dims_rope=(8, 4, 4)),
                      inputs=dict(hidden_states=_randn(1, 16, 16), encoder_hidden_states=_randn(1, 8, 16),
                                  encoder_hidden_states_mask=_ones_long(1, 8), timestep=_const([1.0]),
                                  img_shapes=[(1, 4, 4)]),
                      exact=("encoder_hidden_states_mask",)),
    "hunyuan_video": dict(cls="HunyuanVideoTransformer3DModel", file="transformer_hunyuan_video.py",
                          init=dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
                                    num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=1,
                                    patch_size_t=1, guidance_embeds=False, text_embed_dim=16,
                                    pooled_projection_dim=8, rope_axes_dim=(4, 6, 6)),
                          inputs=dict(hidden_states=_randn(1, 4, 1, 8, 8), timestep=_const([500.0]),
                                      encoder_hidden_states=_randn(1, 8, 16),
                                      encoder_attention_mask=_ones_long(1, 8), pooled_projections=_randn(1, 8)),
                          exact=("encoder_attention_mask",)),
    "hunyuanimage": dict(cls="HunyuanImageTransformer2DModel", file="transformer_hunyuanimage.py",
                         init=dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
                                   num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=(1, 1),
                                   text_embed_dim=16, rope_axes_dim=(8, 8)),
                         inputs=dict(hidden_states=_randn(1, 4, 8, 8), timestep=_const([500.0]),
                                     encoder_hidden_states=_randn(1, 8, 16), encoder_attention_mask=_ones_long(1, 8)),
                         exact=("encoder_attention_mask",)),
    "ltx": dict(cls="LTXVideoTransformer3DModel", file="transformer_ltx.py",
                init=dict(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2,
                          attention_head_dim=16, cross_attention_dim=32, num_layers=2, caption_channels=16),
                inputs=dict(hidden_states=_randn(1, 2 * 4 * 4, 8), encoder_hidden_states=_randn(1, 8, 16),
                            timestep=_const([500.0]), encoder_attention_mask=_ones_long(1, 8), num_frames=2,
                            height=4, width=4),
                exact=("encoder_attention_mask",)),
    "cosmos": dict(cls="CosmosTransformer3DModel", file="transformer_cosmos.py",
                   init=dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
                             mlp_ratio=2.0, text_embed_dim=16, adaln_lora_dim=4, max_size=(4, 32, 32),
                             patch_size=(1, 2, 2), rope_scale=(2.0, 1.0, 1.0), concat_padding_mask=True,
                             extra_pos_embed_type="learnable", encoder_hidden_states_channels=16,
                             crossattn_proj_in_channels=16),
                   inputs=dict(hidden_states=_randn(1, 4, 1, 16, 16), timestep=_const([500.0]),
                               encoder_hidden_states=_randn(1, 12, 16), fps=30,
                               condition_mask=_full(1.0, 1, 1, 1, 16, 16),
                               padding_mask=_full(0.0, 1, 1, 16, 16))),
    "mochi": dict(cls="MochiTransformer3DModel", file="transformer_mochi.py",
                  init=dict(patch_size=2, num_attention_heads=2, attention_head_dim=16, num_layers=2,
                            pooled_projection_dim=16, in_channels=4, text_embed_dim=16, time_embed_dim=4,
                            max_sequence_length=16),
                  inputs=dict(hidden_states=_randn(1, 4, 2, 16, 16), encoder_hidden_states=_randn(1, 16, 16),
                              timestep=_const([500.0]), encoder_attention_mask=_ones_long(1, 16)),
                  exact=("encoder_attention_mask",)),
    "lumina2": dict(cls="Lumina2Transformer2DModel", file="transformer_lumina2.py",
                    init=dict(sample_size=16, patch_size=2, in_channels=4, hidden_size=32, num_layers=2,
                              num_refiner_layers=1, num_attention_heads=2, num_kv_heads=1, multiple_of=16,
                              cap_feat_dim=16, axes_dim_rope=(4, 6, 6), axes_lens=(32, 32, 32)),
                    inputs=dict(hidden_states=_randn(1, 4, 16, 16), timestep=_const([0.5]),
                                encoder_hidden_states=_randn(1, 8, 16),
                                encoder_attention_mask=_full(True, 1, 8)),
                    exact=("encoder_attention_mask",)),
    "cogview4": dict(cls="CogView4Transformer2DModel", file="transformer_cogview4.py",
                     init=dict(patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=16,
                               num_attention_heads=2, text_embed_dim=16, time_embed_dim=8, condition_dim=4,
                               pos_embed_max_size=16, sample_size=16, rope_axes_dim=(16, 16)),
                     inputs=dict(hidden_states=_randn(1, 4, 16, 16), encoder_hidden_states=_randn(1, 8, 16),
                                 timestep=_const([500.0]), original_size=_const([[16.0, 16.0]]),
                                 target_size=_const([[16.0, 16.0]]), crop_coords=_const([[0.0, 0.0]]))),
    "sd3": dict(cls="SD3Transformer2DModel", file="transformer_sd3.py",
                init=dict(sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16,
                          num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=32,
                          pooled_projection_dim=16, out_channels=4, pos_embed_max_size=16, qk_norm="rms_norm"),
                inputs=dict(hidden_states=_randn(1, 4, 16, 16), encoder_hidden_states=_randn(1, 8, 16),
                            pooled_projections=_randn(1, 16), timestep=_const([500.0]))),
    "ovis_image": dict(cls="OvisImageTransformer2DModel", file="transformer_ovis_image.py",
                       init=dict(patch_size=1, in_channels=16, out_channels=16, num_layers=1, num_single_layers=2,
                                 attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                 axes_dims_rope=(4, 6, 6)),
                       inputs=dict(_FLUXLIKE_IN)),
    "longcat_image": dict(cls="LongCatImageTransformer2DModel", file="transformer_longcat_image.py",
                          init=dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2,
                                    attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                    pooled_projection_dim=32, axes_dims_rope=[4, 6, 6]),
                          inputs=dict(_FLUXLIKE_IN)),
    "z_image": dict(cls="ZImageTransformer2DModel", file="transformer_z_image.py",
                    init=dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2,
                              n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=16, axes_dims=[8, 4, 4],
                              axes_lens=[64, 32, 32]),
                    inputs=dict(x=_randn_list((4, 1, 16, 16)), t=_const([0.5]), cap_feats=_randn_list((8, 16)))),
    "wan_animate": dict(cls="WanAnimateTransformer3DModel", file="transformer_wan_animate.py",
                        init=dict(_WANLIKE, in_channels=12, latent_channels=4, image_dim=None,
                                  motion_encoder_channel_sizes={"4": 16, "8": 16, "16": 16}, motion_encoder_size=16,
                                  motion_style_dim=8, motion_dim=4, motion_encoder_dim=16, face_encoder_hidden_dim=16,
                                  face_encoder_num_heads=2, inject_face_latents_blocks=2),
                        inputs=dict(_WANLIKE_IN, hidden_states=_randn(1, 12, 2, 16, 16),
                                    pose_hidden_states=_randn(1, 4, 1, 16, 16),
                                    face_pixel_values=_randn(1, 3, 1, 16, 16))),
    "wan_vace": dict(cls="WanVACETransformer3DModel", file="transformer_wan_vace.py",
                     init=dict(_WANLIKE, vace_layers=[0, 1], vace_in_channels=12),
                     inputs=dict(_WANLIKE_IN, control_hidden_states=_randn(1, 12, 2, 16, 16))),
    "flux2": dict(cls="Flux2Transformer2DModel", file="transformer_flux2.py",
                  init=dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
                            num_attention_heads=2, joint_attention_dim=32, timestep_guidance_channels=32,
                            axes_dims_rope=(4, 4, 4, 4)),
                  inputs=dict(hidden_states=_randn(1, 16, 16), encoder_hidden_states=_randn(1, 8, 32),
                              timestep=_const([0.5]), img_ids=_randn(1, 16, 4), txt_ids=_full(0.0, 1, 8, 4),
                              guidance=_const([1.0]))),
    "hidream": dict(cls="HiDreamImageTransformer2DModel", file="transformer_hidream_image.py",
                    init=dict(patch_size=2, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1,
                              attention_head_dim=16, num_attention_heads=2, caption_channels=[16, 8], text_emb_dim=8,
                              num_routed_experts=2, num_activated_experts=2, axes_dims_rope=(8, 4, 4),
                              max_resolution=(16, 16), llama_layers=(0, 1), force_inference_output=True),
                    inputs=dict(hidden_states=_randn(1, 4, 16, 16), timesteps=_const([500.0]),
                                encoder_hidden_states_t5=_randn(1, 8, 16),
                                encoder_hidden_states_llama3=_randn(2, 1, 8, 8), pooled_embeds=_randn(1, 8))),
    "kandinsky5": dict(cls="Kandinsky5Transformer3DModel", file="transformer_kandinsky.py",
                       init=dict(in_visual_dim=4, in_text_dim=16, in_text_dim2=8, time_dim=16, out_visual_dim=4,
                                 patch_size=(1, 2, 2), model_dim=32, ff_dim=64, num_text_blocks=1, num_visual_blocks=2,
                                 axes_dims=(4, 6, 6)),
                       inputs=dict(hidden_states=_randn(1, 1, 8, 8, 4), encoder_hidden_states=_randn(1, 8, 16),
                                   timestep=_const([500.0]), pooled_projections=_randn(1, 8),
                                   visual_rope_pos=_aranges(1, 4, 4), text_rope_pos=_arange(8)),
                       exact=("visual_rope_pos", "text_rope_pos")),
    "hunyuan_video15": dict(cls="HunyuanVideo15Transformer3DModel", file="transformer_hunyuan_video15.py",
                            init=dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
                                      num_layers=2, num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1,
                                      text_embed_dim=16, text_embed_2_dim=8, image_embed_dim=12,
                                      rope_axes_dim=(4, 6, 6), target_size=16, task_type="t2v"),
                            inputs=dict(hidden_states=_randn(1, 4, 1, 8, 8), timestep=_const([500.0]),
                                        encoder_hidden_states=_randn(1, 6, 16), encoder_attention_mask=_ones_long(1, 6),
                                        encoder_hidden_states_2=_randn(1, 4, 8),
                                        encoder_attention_mask_2=_ones_long(1, 4), image_embeds=_full(0.0, 1, 3, 12)),
                            exact=("encoder_attention_mask", "encoder_attention_mask_2")),
    "ltx2": dict(cls="LTX2VideoTransformer3DModel", file="transformer_ltx2.py",
                 init=dict(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2,
                           attention_head_dim=16, cross_attention_dim=32, audio_in_channels=4, audio_out_channels=4,
                           audio_num_attention_heads=2, audio_attention_head_dim=8, audio_cross_attention_dim=16,
                           num_layers=2, caption_channels=16),
                 inputs=dict(hidden_states=_randn(1, 2 * 4 * 4, 8), audio_hidden_states=_randn(1, 9, 4),
                             encoder_hidden_states=_randn(1, 8, 16), audio_encoder_hidden_states=_randn(1, 8, 16),
                             timestep=_const([500.0]), encoder_attention_mask=_ones_long(1, 8), num_frames=2, height=4,
                             width=4, audio_num_frames=9, fps=25.0),
                 exact=("encoder_attention_mask",)),
    "sana": dict(cls="SanaTransformer2DModel", file="sana_transformer.py",
                 init=dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
                           num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=32,
                           caption_channels=16, sample_size=16, patch_size=1, qk_norm="rms_norm_across_heads"),
                 inputs=dict(hidden_states=_randn(1, 4, 16, 16), encoder_hidden_states=_randn(1, 8, 16),
                             timestep=_const([500.0]))),
    "bria": dict(cls="BriaTransformer2DModel", file="transformer_bria.py",
                 init=dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
                           num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=[4, 6, 6]),
                 inputs=dict(_FLUXLIKE_IN)),
    "omnigen": dict(cls="OmniGenTransformer2DModel", file="transformer_omnigen.py",
                    init=dict(in_channels=4, patch_size=2, hidden_size=32, num_attention_heads=2, num_key_value_heads=2,
                              intermediate_size=64, num_layers=2, pad_token_id=0, vocab_size=128, time_step_dim=8,
                              rope_scaling={"long_factor": [1.0] * 8, "short_factor": [1.0] * 8},
                              pos_embed_max_size=16),
                    inputs=dict(hidden_states=_randn(1, 4, 8, 8), timestep=_const([0.5]), input_ids=_ones_long(1, 20),
                                input_img_latents=_randn_list((1, 4, 8, 8)), input_image_sizes={0: [[0, 16]]},
                                attention_mask=_full(1.0, 1, 37, 37), position_ids=_arange(1, 37)),
                    exact=("input_ids", "position_ids")),
}


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        sys.exit(worker_main(sys.argv[2:]))
    ap = argparse.ArgumentParser(prog="python -m qkfuse.scan")
    add_arguments(ap)
    sys.exit(run(ap.parse_args()))
