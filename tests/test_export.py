"""torch.export + AOTInductor on CPU: ``aoti_compile_and_package(ep, inductor_configs={
"post_grad_custom_pre_pass": qkfuse.pass_()})`` runs the pass (records, counters), keeps the fused
sites, and the package loads and runs in a fresh process that imports only torch and qkfuse
(``torch._inductor.aoti_load_package``), with the output of eager.

The exported graph has an ``aten._assert_tensor_metadata`` after every ``.to(dtype)``; the pass
erases them first, as Inductor does right after the hook (qkfuse/passes/manager.py), else they
would be users of the chain's intermediates and every site would be refused.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch._dynamo.utils import counters

import qkfuse
from qkfuse.passes.records import collect
from tests.test_backend import D, Attention

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Run in a fresh interpreter: only torch and qkfuse (qkfuse registers the qkfuse:: ops that a
# package compiled with kernels="reference" calls), then the package, on each saved input. What it
# counts as ours: qkfuse:: op calls on CPU, launches of the Triton kernel on CUDA.
LOADER = r"""
import json, sys
import torch
import qkfuse
package, io_path, device = sys.argv[1], sys.argv[2], sys.argv[3]
if device == "cuda":  # a CUDA context first, as in any CUDA program (torch 2.11 segfaulted loading without one?)
    torch.zeros(1, device="cuda")
runner = torch._inductor.aoti_load_package(package)
cases = torch.load(io_path)
cuda = device == "cuda"
activity = torch.profiler.ProfilerActivity.CUDA if cuda else torch.profiler.ProfilerActivity.CPU
ours = (lambda name: "qk_norm_rope_kernel" in name) if cuda else (lambda name: name.startswith("qkfuse::"))
errs, our_calls = [], []
for args, ref in cases:
    args = [a.to(device) for a in args]
    if cuda:
        runner(*args)  # warm-up: the first call loads the kernels
    with torch.profiler.profile(activities=[activity]) as prof:
        out = runner(*args)
        if cuda:
            torch.cuda.synchronize()
    out = (out[0] if isinstance(out, (list, tuple)) else out).cpu()
    assert out.shape == ref.shape, (out.shape, ref.shape)
    errs.append(float((out - ref).abs().max()) / float(ref.abs().max()))
    our_calls.append(sum(1 for e in prof.events() if ours(e.name)))
watch = ("transformers", "diffusers", "tests", "hypothesis")
print(json.dumps({"rel_errs": errs, "our_calls": our_calls,
                  "imported": sorted(m for m in watch if m in sys.modules)}))
"""


def compile_package(ep, path, **pass_options):
    with collect() as records:
        package = torch._inductor.aoti_compile_and_package(
            ep, package_path=str(path), inductor_configs={"post_grad_custom_pre_pass": qkfuse.pass_(**pass_options)})
    return package, records


def run_fresh(package, cases, tmp_path, device="cpu"):
    """The package run on `cases` ((args, reference output) on CPU) in a fresh process."""
    io_path = tmp_path / "io.pt"
    torch.save(cases, io_path)
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", LOADER, str(package), str(io_path), device], cwd=str(tmp_path),
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def attn_inputs(batch, seq, seed=0):
    g = torch.Generator().manual_seed(seed)
    ang = torch.rand(batch, seq, D // 2, generator=g) * 6.3
    return (torch.randn(batch, seq, 64, generator=g), torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1))


def test_export_aoti_attention_dynamic_batch_and_seq(tmp_path):
    """The hand-written attention, exported with symbolic batch and sequence: fused in the package
    (inline torch ops, the CPU default: no qkfuse op left at run time), one package for every shape."""
    torch.manual_seed(0)
    m = Attention().eval()
    b, s = torch.export.Dim("b", min=2, max=64), torch.export.Dim("s", min=2, max=512)
    dims = {"h": {0: b, 1: s}, "cos": {0: b, 1: s}, "sin": {0: b, 1: s}}
    with torch.no_grad():
        ep = torch.export.export(m, attn_inputs(2, 7), dynamic_shapes=dims)
        package, records = compile_package(ep, tmp_path / "attn.pt2")
        cases = [(x, m(*x)) for x in (attn_inputs(2, 7, 1), attn_inputs(3, 12, 2), attn_inputs(5, 33, 3))]
    assert [r.fused for r in records] == [True, True], [(r.fused, r.reason) for r in records]
    assert counters["qkfuse"]["norm_rope_calls"] == 1 and counters["qkfuse"]["norm_rope_sites"] == 2
    assert any(not isinstance(d, int) for d in records[0].shape)  # symbolic batch / seq in the pass
    r = run_fresh(package, cases, tmp_path)
    assert r["imported"] == [], r
    assert all(e <= 1e-5 for e in r["rel_errs"]), r


class Logits(torch.nn.Module):
    """HF causal LM -> logits tensor (the package's output spec must not need transformers' pytree
    registrations to load)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids).logits


@pytest.mark.slow  # ~20 s each on 2 CPU cores (AOTInductor compiles and links a .so)
@pytest.mark.parametrize("kernels", ["auto", "reference"])
def test_export_aoti_hf_qwen3(kernels, tmp_path):
    """Unmodified HF Qwen3 (2 layers): both layers' q and k fused in the package; with
    kernels="reference" the package calls qkfuse::qk_norm_rope, once per layer, in the fresh process."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.Qwen3Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=128, use_cache=False)
    model = Logits(transformers.Qwen3ForCausalLM(cfg).eval())
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ep = torch.export.export(model, (ids,))
        package, records = compile_package(ep, tmp_path / "qwen3.pt2", kernels=kernels)
        ref = model(ids)
    assert len(records) == 4 and all(r.fused for r in records), [(r.fused, r.reason) for r in records]
    assert counters["qkfuse"]["norm_rope_calls"] == 2
    r = run_fresh(package, [((ids,), ref)], tmp_path)
    assert r["imported"] == [], r
    assert r["rel_errs"][0] <= 1e-5, r
    assert r["our_calls"] == [2 if kernels == "reference" else 0], r
