#!/usr/bin/env bash
# The device checks still owed, in one call (GPU time is scarce; a machine takes minutes to start):
#   run(command="bash benchmarks/gpu_pending.sh", timeout_s=600)
# Outputs go to $OUT (at most 8 files come back) and are committed under benchmarks/results/.
# Still owed after 2026-12-02: AOTInductor on CUDA, the eager launch-plan cache on a GPU, the
# LayerNorm kernel mode against Inductor (decides qkfuse/kernels/policy.py's LAYER_UNMEASURED).
set -uo pipefail
OUT=${OUT:-/tmp/qkfuse-out}
mkdir -p "$OUT"
export TRITON_DEFAULT_FP_FUSION=1 QKFUSE_STRICT=1 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
L="$OUT/log.txt"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$L"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$L"
# 1. GPU tests: decode codegen, functional API (its launch-plan cache), compile modes, AOTInductor.
timeout 300 python -m pytest -q -m gpu tests/gpu -p no:cacheprovider -p no:logging --tb=short -k "not fuzz_error" \
  2>&1 | grep -v DEBUG | tail -60 >> "$L"
tail -3 "$L"
# 2. The LayerNorm mode against Inductor (Persimmon / Phi shapes).
timeout 120 python benchmarks/bench_qk_norm_rope.py --shapes layer --no-flashinfer --tag layer 2>&1 | grep "^\[" >> "$L"
# 3. The eager functional call's cost on the GPU host (after the launch-plan cache).
timeout 90 python benchmarks/bench_eager_op.py --out "$OUT/eager-op.json" 2>&1 | tail -12 >> "$L"
tail -20 "$L"
