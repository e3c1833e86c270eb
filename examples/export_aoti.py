"""torch.export + AOTInductor with the qkfuse pass: an ahead-of-time compiled package (.pt2) whose
q and k norm + RoPE are fused, loaded and run in a fresh process that imports only torch and qkfuse.

    ep = torch.export.export(model, args, dynamic_shapes=...)
    torch._inductor.aoti_compile_and_package(ep, inductor_configs={"post_grad_custom_pre_pass": qkfuse.pass_()})
    torch._inductor.aoti_load_package(path)(*args)      # anywhere torch (and qkfuse) is installed

Batch and sequence are exported symbolic: one package serves every shape in the given ranges.
"""

import json
import os
import subprocess
import sys
import tempfile

import torch

import qkfuse
from _attention import Attention, inputs
from qkfuse.passes.records import collect

LOADER = """
import json, sys, torch, qkfuse
runner = torch._inductor.aoti_load_package(sys.argv[1])
errs = []
for args, ref in torch.load(sys.argv[2]):
    out = runner(*args)
    errs.append(float((out - ref).abs().max()) / float(ref.abs().max()))
print(json.dumps(errs))
"""

torch.manual_seed(0)
model = Attention().eval()
batch, seq = torch.export.Dim("batch", min=2, max=64), torch.export.Dim("seq", min=2, max=1024)
dims = {"x": {0: batch, 1: seq}, "cos": {0: seq}, "sin": {0: seq}}  # cos/sin: [seq, head_dim]

with torch.no_grad(), tempfile.TemporaryDirectory() as tmp:
    ep = torch.export.export(model, inputs(2, 16), dynamic_shapes=dims)
    with collect() as records:  # what the pass decided, site by site (as qkfuse.explain shows it)
        package = torch._inductor.aoti_compile_and_package(
            ep, package_path=os.path.join(tmp, "attention.pt2"),
            inductor_configs={"post_grad_custom_pre_pass": qkfuse.pass_()})
    fused = [r for r in records if r.fused]
    if len(records) != 2 or len(fused) != 2:
        raise SystemExit(f"FAILED: expected q and k fused, got {[(r.node, r.fused, r.reason) for r in records]}")

    cases = [(x, model(*x)) for x in (inputs(2, 16), inputs(3, 40), inputs(8, 128))]
    torch.save(cases, os.path.join(tmp, "io.pt"))
    proc = subprocess.run([sys.executable, "-c", LOADER, package, os.path.join(tmp, "io.pt")],
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise SystemExit(f"FAILED: loading the package in a fresh process:\n{proc.stderr[-3000:]}")
    errs = json.loads(proc.stdout.strip().splitlines()[-1])

if not all(e <= 1e-5 for e in errs):
    raise SystemExit(f"FAILED: package output differs from eager: relative errors {errs}")
print(f"ok export_aoti: q and k fused ({fused[0].reason}) in one AOTInductor package; run in a fresh "
      f"process on 3 shapes (batch 2-8, seq 16-128), max relative error vs eager {max(errs):.1e}")
