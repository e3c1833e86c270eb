"""The coverage scan again, through the pass's CUDA path, on a machine without a GPU.

For every architecture that ``docs/coverage.json`` lists with fused sites, the tiny model is built
(bfloat16), compiled once with ``qkfuse.explain`` (the CPU path: inline torch ops) and once with the
post-grad graphs' values made fake CUDA tensors (``tests/graph_harness.py::cuda_pass_runs``: the
Triton kernel traced through ``wrap_triton``, its TTIR generated for a stand-in sm_90 target, then
Inductor's reinplace pass). A site that fuses on CPU must fuse on CUDA too (or be left to Inductor
for a stated policy reason), each fused call must be one kernel launch, and no kernel argument may
be cloned. Each architecture runs in a subprocess with a timeout.

    python tests/scan_cuda_path.py [--only a,b] [--jobs 2] [--out docs/coverage-cuda-path.md]
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
# tests/ off the path (run as a script it is sys.path[0]: its kernels/ package would shadow the
# `kernels` library that transformers imports), the repository root on it
sys.path[:] = [str(ROOT)] + [p for p in sys.path if pathlib.Path(p or os.curdir).resolve() != ROOT / "tests"]
# What the kernel policy says of a site it leaves to Inductor because its kernel mode has no GPU
# measurement yet (kernels/policy.py): counted as "policy", not as a CUDA-path failure.
POLICY_HOLD = "not yet measured against Inductor"


def _decode_step(model, inputs: dict):
    """(forward, inputs) of one decode step after an eager prefill into a fresh HF StaticCache
    (the graph whose KV-cache writes the k sites absorb); raises if the model has no such step."""
    import torch
    import transformers

    ids = inputs["input_ids"]
    cache = transformers.StaticCache(config=model.config, max_cache_len=ids.shape[1] + 4)
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True)

    def forward(**kw):
        return model(**kw, past_key_values=cache, use_cache=True)

    return forward, {"input_ids": ids[:, -1:]}


def scan_one(kind: str, name: str, kernels: str = "auto", decode: bool = False) -> dict:
    import warnings

    import torch

    import qkfuse
    from qkfuse.options import Options
    from qkfuse.scan import build_diffusers, build_transformers
    from tests.graph_harness import cuda_pass_runs

    warnings.filterwarnings("ignore")
    row = dict(kind=kind, name=name, cpu_sites=0, cpu_fused=0, cuda_sites=0, cuda_fused=0, launches=0, cloned=0,
               policy=0, reasons={}, status="", error="", cpu_cache=0, cuda_cache=0)
    try:
        model, inputs, _ = (build_transformers if kind == "transformers" else build_diffusers)(name, torch.bfloat16)
    except Exception as e:
        row.update(status="build error", error=f"{type(e).__name__}: {str(e)[:200]}")
        return row

    def forward(**kw):
        return model(**kw)

    if decode:
        try:
            forward, inputs = _decode_step(model, inputs)
        except Exception as e:
            row.update(status="no decode step", error=f"{type(e).__name__}: {str(e)[:200]}")
            return row
    with torch.no_grad():
        report = qkfuse.explain(forward, **inputs)
    row["cpu_sites"], row["cpu_fused"] = len(report.sites), len(report.fused)
    cpu_cache = {r.node for r in report.fused if "cache write" in r.recipe}
    # counted per site (a node name can recur in another graph: step3p7's two layers' add_7)
    row["cpu_cache"] = sum("cache write" in r.recipe for r in report.fused)
    try:
        runs = cuda_pass_runs(forward, options=Options(kernels=kernels), **inputs)
    except Exception as e:
        row.update(status="cuda-path error", error=f"{type(e).__name__}: {str(e)[:300]}")
        return row
    records = [r for run in runs for r in run.records]
    calls = [c for run in runs for c in run.kernel_calls()]
    row["cuda_sites"] = len(records)
    row["cuda_fused"] = sum(r.fused for r in records)
    row["cuda_cache"] = sum(r.fused and "cache write" in r.recipe for r in records)
    row["launches"] = len(calls)
    row["cloned"] = sum(len(c.kwargs["tensors_to_clone"]) for c in calls)
    left = [r for r in records if not r.fused]
    row["policy"] = sum(POLICY_HOLD in r.reason for r in left)
    row["reasons"] = dict(collections.Counter(r.reason[:160] for r in left if POLICY_HOLD not in r.reason))
    # one launch per fused call: a q+k pair shares one, a lone site has its own
    launches_ok = row["launches"] == 0 if row["cuda_fused"] == 0 else 1 <= row["launches"] <= row["cuda_fused"]
    # the KV-cache writes absorbed on CPU are absorbed on CUDA (or their site left by the policy)
    cuda_cache = {r.node for r in records if r.fused and "cache write" in r.recipe or POLICY_HOLD in r.reason}
    ok = (row["cuda_fused"] + row["policy"] >= row["cpu_fused"] and row["cloned"] == 0 and launches_ok
          and cpu_cache <= cuda_cache)
    row["status"] = "ok" if ok else "differs"
    return row


def targets(only: set) -> list[tuple[str, str]]:
    rows = json.loads((ROOT / "docs" / "coverage.json").read_text())["rows"]
    out = [(r["kind"], r["name"]) for r in rows if r.get("fused")]
    return [t for t in out if not only or t[1] in only]


def run_worker(kind: str, name: str, timeout: float, decode: bool = False) -> dict:
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, __file__, "--one", kind, name, *(["--decode"] if decode else [])],
                              capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return dict(kind=kind, name=name, status="timeout", error=f"> {timeout:.0f} s")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("ROW ")]
    if not lines:
        return dict(kind=kind, name=name, status="crash", error=(proc.stderr or proc.stdout)[-300:])
    row = json.loads(lines[-1][4:])
    row["wall_s"] = time.perf_counter() - t0
    return row


def previous_header(md_path: pathlib.Path) -> list[str]:
    """A resumed scan keeps the earlier runs' header lines (their command, note and history)."""
    if not md_path.exists():
        return []
    lines = [ln[2:] for ln in md_path.read_text().splitlines() if ln.startswith("- ") and not ln.startswith("- **")]
    if lines and lines[0].startswith("torch "):
        lines[0] = "before that: " + lines[0]
    return lines


def render(rows: list[dict], command: str, note: str = "", decode: bool = False,
           history: list[str] = ()) -> str:
    import torch
    import triton

    ok = sum(r["status"] == "ok" for r in rows)
    skipped = sum(r["status"] == "no decode step" for r in rows)
    what = "one decode step with an HF StaticCache, " if decode else ""
    md = [f"# qkfuse coverage through the CUDA path ({what}fake CUDA tensors, no GPU)", "",
          "Generated by `tests/scan_cuda_path.py`: each architecture that `docs/coverage.md` lists with fused "
          "sites, built tiny in bfloat16, compiled through the CPU path (`qkfuse.explain`) and through the "
          "pass's CUDA path on fake CUDA tensors (the Triton kernel traced with `wrap_triton`, its TTIR "
          "generated for a stand-in sm_90 target, then Inductor's reinplace pass). `ok`: every site fused on "
          "CPU is fused on CUDA or left to Inductor by the kernel policy (a kernel mode not yet measured "
          "against Inductor on a GPU), each fused call is one launch, no kernel argument is cloned.", "",
          f"- torch {torch.__version__}, triton {triton.__version__}; command: `{command}`",
          *([f"- {note}"] if note else []),
          *[f"- {line}" for line in history],
          f"- **{ok} of {len(rows) - skipped} architectures ok**"
          + (f" ({skipped} more have no decode step this scan can build: listed)" if skipped else ""), "",
          "| kind | architecture | sites | fused (CPU) | fused (CUDA path) | policy: left to Inductor | launches | "
          "cloned args | KV writes absorbed (CPU / CUDA) | status | other reasons / error |",
          "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
    for r in sorted(rows, key=lambda r: (r["kind"], r["name"])):
        why = r.get("error") or "; ".join(f"{n}x {k}" for k, n in r.get("reasons", {}).items())
        md.append(f"| {r['kind']} | {r['name']} | {r.get('cuda_sites', '-')} | {r.get('cpu_fused', '-')} | "
                  f"{r.get('cuda_fused', '-')} | {r.get('policy', '-')} | {r.get('launches', '-')} | "
                  f"{r.get('cloned', '-')} | {r.get('cpu_cache', '-')} / {r.get('cuda_cache', '-')} | {r['status']} | "
                  f"{why.replace('|', '/')} |")
    return "\n".join(md) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--one", nargs=2, metavar=("KIND", "NAME"))
    ap.add_argument("--only", default="")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--out", default=str(ROOT / "docs" / "coverage-cuda-path.md"))
    ap.add_argument("--resume", action="store_true", help="keep the other rows of --out's .json")
    ap.add_argument("--note", default="", help="a line added to the header")
    ap.add_argument("--decode", action="store_true",
                    help="one decode step with an HF StaticCache (transformers only): the KV-cache writes")
    a = ap.parse_args()
    if a.one:
        print("ROW " + json.dumps(scan_one(*a.one, decode=a.decode)), flush=True)
        return 0
    todo = targets(set(filter(None, a.only.split(","))))
    if a.decode:
        todo = [t for t in todo if t[0] == "transformers"]
    rows = []
    kept, history = [], []
    old_json = pathlib.Path(a.out).with_suffix(".json")
    if a.resume and old_json.exists():
        kept = [r for r in json.loads(old_json.read_text()) if (r["kind"], r["name"]) not in set(todo)]
        history = previous_header(pathlib.Path(a.out))
    with concurrent.futures.ThreadPoolExecutor(a.jobs) as pool:
        for f in concurrent.futures.as_completed([pool.submit(run_worker, k, n, a.timeout, a.decode)
                                                  for k, n in todo]):
            r = f.result()
            rows.append(r)
            print(f"[{len(rows)}/{len(todo)}] {r['kind']:<12} {r['name']:<24} {r['status']:<10} "
                  f"cpu {r.get('cpu_fused', '-')} cuda {r.get('cuda_fused', '-')} policy {r.get('policy', '-')} "
                  f"cache {r.get('cpu_cache', '-')}/{r.get('cuda_cache', '-')} "
                  f"launches {r.get('launches', '-')} cloned {r.get('cloned', '-')} {r.get('error', '')[:80]}",
                  flush=True)
    argv = sys.argv[1:]
    if "--note" in argv:  # (the note is printed on its own line)
        i = argv.index("--note")
        argv = argv[:i] + argv[i + 2:]
    command = "python tests/scan_cuda_path.py " + " ".join(argv)
    rows = kept + rows
    pathlib.Path(a.out).write_text(render(rows, command, a.note, a.decode, history))
    pathlib.Path(a.out).with_suffix(".json").write_text(json.dumps(rows, indent=1))
    print(f"wrote {a.out}")
    return 0 if all(r["status"] in ("ok", "no decode step") for r in rows) else 1


if __name__ == "__main__":
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    sys.exit(main())
