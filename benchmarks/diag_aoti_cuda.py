"""Why the AOTInductor CUDA package of the test attention segfaults in a fresh process (2026-12-02).

Variants, each exported, compiled with aoti_compile_and_package and run in a fresh process with
faulthandler on: plain Inductor (no pass); the pass with static shapes; the pass with Dim.AUTO; the
pass with every None kernel argument replaced by a dummy tensor (q). Prints rc and stderr's tail;
copies the generated wrapper's kernel-launch lines to $OUT.

    python benchmarks/diag_aoti_cuda.py
"""
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import qkfuse  # noqa: E402
from tests.test_backend import Attention  # noqa: E402
from tests.test_export import LOADER, attn_inputs  # noqa: E402

OUT = os.environ.get("OUT", "/tmp/qkfuse-out")
os.makedirs(OUT, exist_ok=True)
REAL_WRAP = torch.library.wrap_triton


def none_to_dummy(kernel):
    wrapped = REAL_WRAP(kernel)

    class Dummy:
        def __getitem__(self, grid):
            def call(*args, **kwargs):
                args = [args[0] if a is None else a for a in args]
                return wrapped[grid](*args, **kwargs)
            return call
    return Dummy()


def native_backtrace(cmd, env, cwd):
    """The loader re-run under gdb (when the machine has it): the C++ frames faulthandler cannot show."""
    if not shutil.which("gdb"):
        return "(no gdb on this machine)"
    p = subprocess.run(["gdb", "-batch", "-ex", "run", "-ex", "bt 30", "--args", *cmd], capture_output=True, text=True,
                       timeout=300, env=env, cwd=cwd)
    frames = [ln for ln in p.stdout.splitlines() if ln.startswith("#") or "SIGSEGV" in ln]
    return "\n".join(frames[:32]) or p.stdout[-1500:]


def variant(name, dynamic, with_pass, dummy=False, device="cuda"):
    tmp = tempfile.mkdtemp(prefix=name)
    torch.manual_seed(0)
    m = Attention().eval().to(device)
    auto = torch.export.Dim.AUTO
    dims = {"h": {0: auto, 1: auto}, "cos": {0: auto, 1: auto}, "sin": {0: auto, 1: auto}} if dynamic else None
    torch.library.wrap_triton = none_to_dummy if dummy else REAL_WRAP
    try:
        with torch.no_grad():
            example = tuple(t.to(device) for t in attn_inputs(2, 7))
            ep = torch.export.export(m, example, dynamic_shapes=dims)
            cfg = {"post_grad_custom_pre_pass": qkfuse.pass_()} if with_pass else {}
            pkg = torch._inductor.aoti_compile_and_package(ep, package_path=f"{tmp}/p.pt2", inductor_configs=cfg)
            shapes = ((2, 7), (3, 12), (5, 33)) if dynamic else ((2, 7),)
            cases = [(x, m(*(t.to(device) for t in x)).cpu()) for x in (attn_inputs(b, s, i) for i, (b, s) in enumerate(shapes))]
    except Exception as e:  # noqa: BLE001
        print(f"[{name}] compile failed: {type(e).__name__}: {str(e)[:800]}", flush=True)
        return
    finally:
        torch.library.wrap_triton = REAL_WRAP
    with zipfile.ZipFile(pkg) as z:
        for n in z.namelist():
            if n.endswith(".cpp"):
                src = z.read(n).decode(errors="replace")
                lines = [ln for ln in src.splitlines() if "qk_norm_rope" in ln or "launchKernel" in ln or "void* kernel_args_" in ln]
                open(f"{OUT}/{name}-wrapper-lines.txt", "a").write(f"{n}\n" + "\n".join(lines[:80]))
    torch.save(cases, f"{tmp}/io.pt")
    env = {**os.environ, "PYTHONFAULTHANDLER": "1"}
    loaders = {"": LOADER}
    if not with_pass:  # does importing qkfuse in the loading process matter?
        loaders[" (no qkfuse import)"] = LOADER.replace("import qkfuse\n", "")
    for label, loader in loaders.items():
        cmd = [sys.executable, "-c", loader, pkg, f"{tmp}/io.pt", device]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp)
        print(f"[{name}{label}] rc {p.returncode} stdout {p.stdout.strip()[-400:]!r}\n  stderr tail: "
              f"{p.stderr[-700:]}", flush=True)
        if p.returncode < 0:
            print(f"[{name}{label}] native backtrace:\n{native_backtrace(cmd, env, tmp)}", flush=True)


if __name__ == "__main__":
    which = sys.argv[1:] or ["plain", "static", "auto", "auto-dummy"]
    spec = {"plain": (True, False), "plain-cpu": (True, False, False, "cpu"), "static": (False, True), "auto": (True, True), "auto-dummy": (True, True, True)}
    for n in which:
        variant(n, *spec[n])
