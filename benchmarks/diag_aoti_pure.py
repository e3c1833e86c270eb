"""Does an AOTInductor CUDA package load on this machine at all? No qkfuse anywhere (2026-12-02).

diag_aoti_cuda.py found Inductor's own package (no qkfuse pass) segfaulting at load in a fresh
process, but the compiling process had imported qkfuse. This script imports only torch: a tiny MLP
and a tiny attention, each exported, packaged with aoti_compile_and_package, then loaded (a) in the
same process and (b) in a fresh process that imports nothing but torch. CPU packages too, for
comparison. Prints one line per variant: rc, and stderr's tail when it fails.

    python benchmarks/diag_aoti_pure.py
"""
import subprocess
import sys
import tempfile

import torch

LOAD = r"""
import sys, torch
pkg, device = sys.argv[1], sys.argv[2]
if device == "cuda":
    torch.zeros(1, device="cuda")
runner = torch._inductor.aoti_load_package(pkg)
x = torch.load(sys.argv[3]).to(device)
out = runner(x)
out = out[0] if isinstance(out, (list, tuple)) else out
ref = torch.load(sys.argv[4])
print("max err", float((out.cpu() - ref).abs().max()))
"""


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class Attn(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(64, 192)

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, 2, 32).unbind(2)
        q = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + 1e-6)
        o = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return o.transpose(1, 2).reshape(b, s, 64)


def variant(name, module, device, dynamic):
    tmp = tempfile.mkdtemp(prefix=name)
    torch.manual_seed(0)
    m = module().eval().to(device)
    x = torch.randn(2, 7, 64, device=device)
    try:
        with torch.no_grad():
            dims = ({0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO},) if dynamic else None
            ep = torch.export.export(m, (x,), dynamic_shapes=dims)
            pkg = torch._inductor.aoti_compile_and_package(ep, package_path=f"{tmp}/p.pt2")
            ref = m(x).cpu()
    except Exception as e:  # noqa: BLE001
        print(f"[{name}] compile failed: {type(e).__name__}: {str(e)[:600]}", flush=True)
        return
    torch.save(x.cpu(), f"{tmp}/x.pt")
    torch.save(ref, f"{tmp}/ref.pt")
    try:  # (a) the same process
        out = torch._inductor.aoti_load_package(pkg)(x)
        out = out[0] if isinstance(out, (list, tuple)) else out
        print(f"[{name}] same process: max err {float((out.cpu() - ref).abs().max()):.3g}", flush=True)
    except Exception as e:  # noqa: BLE001
        print(f"[{name}] same process failed: {type(e).__name__}: {str(e)[:400]}", flush=True)
    # (b) a fresh process, torch only
    p = subprocess.run([sys.executable, "-X", "faulthandler", "-c", LOAD, pkg, device, f"{tmp}/x.pt", f"{tmp}/ref.pt"],
                       capture_output=True, text=True, timeout=300, cwd=tmp)
    tail = "" if p.returncode == 0 else "\n  stderr: " + "\n  ".join(
        ln for ln in p.stderr.splitlines() if "File " in ln or "Error" in ln or "Fatal" in ln)[-1200:]
    print(f"[{name}] fresh process: rc {p.returncode} {p.stdout.strip()[-200:]}{tail}", flush=True)


if __name__ == "__main__":
    print("torch", torch.__version__, "qkfuse imported:", "qkfuse" in sys.modules, flush=True)
    for device in ("cuda", "cpu") if torch.cuda.is_available() else ("cpu",):
        variant(f"mlp-{device}-static", MLP, device, False)
        variant(f"attn-{device}-auto", Attn, device, True)
