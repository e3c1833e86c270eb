#!/usr/bin/env bash
# The device checks still owed, in one call (GPU time is scarce; a machine takes minutes to start):
#   run(command="bash benchmarks/gpu_pending.sh", timeout_s=600)
# Outputs go to $OUT (copied back) and are committed under benchmarks/results/.
set -uo pipefail
OUT=${OUT:-/tmp/qkfuse-out}
mkdir -p "$OUT"
export TRITON_DEFAULT_FP_FUSION=1 QKFUSE_STRICT=1
pip install -q -e . --no-deps >/dev/null 2>&1 || true
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
# 1. GPU tests: decode codegen, functional API (the across-heads kernel included), compile modes
#    (reduce-overhead / max-autotune: issue 8.3). The long CUDA bad-input fuzz is left out (it ran before).
timeout 270 python -m pytest -q -m gpu tests/gpu -p no:cacheprovider -k "not fuzz_error" 2>&1 | tail -40 | tee "$OUT/gpu-tests.txt"
# 2. The norm-across-heads kernel against Inductor (OLMo2 / OLMoE / MiniMax-M2 shapes): decides
#    whether kernels="auto" may fuse these sites on CUDA (qkfuse/kernels/policy.py, ACROSS_UNMEASURED).
timeout 130 python benchmarks/bench_qk_norm_rope.py --shapes across --no-flashinfer --tag across 2>&1 | tail -20 \
  | tee "$OUT/bench-across.txt"
cp benchmarks/results/*-h200-across.* "$OUT/" 2>/dev/null || true
# 3. Re-check the per-head kernel after the refactors since the last GPU run (one _weight helper,
#    ACROSS / NORM_SUM constexprs): the main shapes against Inductor.
timeout 150 python benchmarks/bench_qk_norm_rope.py --shapes main --no-flashinfer --tag recheck 2>&1 | tail -14 \
  | tee "$OUT/bench-recheck.txt"
cp benchmarks/results/*-h200-recheck.* "$OUT/" 2>/dev/null || true
