#!/usr/bin/env bash
# The device checks still owed, in one call (GPU time is scarce; a machine takes minutes to start):
#   run(command="bash benchmarks/gpu_pending.sh", timeout_s=600)
# Outputs go to $OUT (at most 8 files come back) and are committed under benchmarks/results/.
# Owed after the third device session of 2026-12-02 (benchmarks/results/2026-12-02-h200-checks-3.md):
# - the 64-token compiled call after the launcher passes the graph's buffers (no reinterpret_tensor
#   per launch): diag_fn64_code.py, then bench_models.py --cases fn64;
# - the GPU tests on that launcher (decode codegen and cache writes first);
# - DeepSeek's de-interleaved RoPE (Recipe.deinterleave_input): tests/gpu/test_deinterleave_gpu.py (in
#   the GPU tests below), and in a call of its own its device time against Inductor
#   (python benchmarks/bench_deinterleave.py --out $OUT), which decides the policy's hold under
#   kernels="auto"; neither has run on a GPU yet.
# - norms concatenated before the RoPE (norm_cat_rope, Flux's double-stream blocks: one launch per
#   part into one output): tests/gpu/test_concat_gpu.py (in the GPU tests below), and in a call of its
#   own with the deinterleave benchmark (bash benchmarks/gpu_pending.sh bench) its device time against
#   Inductor, which decides the policy's hold of that family under kernels="auto".
set -uo pipefail
OUT=${OUT:-/tmp/qkfuse-out}
mkdir -p "$OUT"
export TRITON_DEFAULT_FP_FUSION=1 QKFUSE_STRICT=1 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
L="$OUT/log.txt"
if [ "${1:-}" = bench ]; then
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$L"
  timeout 330 python benchmarks/bench_concat.py --out "$OUT" 2>&1 | grep -v "Warning\|warn" | tail -30 >> "$L"
  timeout 230 python benchmarks/bench_deinterleave.py --out "$OUT" 2>&1 | grep -v "Warning\|warn" | tail -20 >> "$L"
  tail -60 "$L"
  exit 0
fi
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$L"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$L"
# 1. The fn64 code and profile, then the GPU tests (the export test last, it skips where torch alone cannot).
timeout 120 python benchmarks/diag_fn64_code.py 2>&1 | grep -v "Warning\|warn" | tail -40 >> "$L"
timeout 260 python -m pytest -q -m gpu tests/gpu -p no:cacheprovider -p no:logging --tb=short -rfE \
  -k "not fuzz_error" > /tmp/gpu-tests.txt 2>&1; echo "rc $?" >> /tmp/gpu-tests.txt
grep -v DEBUG /tmp/gpu-tests.txt | tail -200 > "$OUT/gpu-tests.txt"; tail -3 "$OUT/gpu-tests.txt" | tee -a "$L"
timeout 90 python benchmarks/bench_models.py --cases fn64 --out /tmp/bm --tag fn64 2>&1 | grep "fn64" | tail -3 >> "$L"
tail -60 "$L"
