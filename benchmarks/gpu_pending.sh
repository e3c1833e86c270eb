#!/usr/bin/env bash
# The device checks still owed, in one call (GPU time is scarce; a machine takes minutes to start):
#   run(command="bash benchmarks/gpu_pending.sh", timeout_s=600)
# Outputs go to $OUT (at most 8 files come back) and are committed under benchmarks/results/.
# Owed after the device run of 2026-12-03 (H200: benchmarks/results/2026-12-03-h200-*; 3 GPU tests failed and
# both benchmarks ran out of memory in their float64 SDPA reference, now float32 there):
# - RoPE on a slice of a norm output's rows (norm_slice_rope: HunyuanVideo's cat, CogView4's slice
#   assignment; one launch per part reading its rows of the one input): tests/gpu/test_slice_gpu.py (in
#   the GPU tests below) and its device time against Inductor (benchmarks/bench_slice.py, in the same
#   call), which decides whether kernels="auto" keeps fusing it on CUDA;
# - RoPE then norm (rope_norm: Llama4, HunYuan; Recipe.rope_first): tests/gpu/test_rope_norm_gpu.py and
#   benchmarks/bench_rope_norm.py (in the same call), which decides whether kernels="auto" fuses it
#   on CUDA (held until then);
# - issue 6's whole-model rows on the H200 again: bash benchmarks/gpu_models_pending.sh A, then D.
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
if [ "${1:-}" = llama4 ]; then  # rope_norm with Llama4's graph on torch 2.11 (keep_rope_dtype), then generate
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$L"
  timeout 100 python -m pytest -q -m gpu tests/gpu/test_rope_norm_gpu.py tests/gpu/test_deinterleave_gpu.py \
    -p no:cacheprovider -p no:logging --tb=short -rfE 2>&1 | grep -v DEBUG | tail -40 > "$OUT/gpu-tests.txt"
  tail -3 "$OUT/gpu-tests.txt" | tee -a "$L"
  timeout 130 python benchmarks/bench_rope_norm.py --only llama4 --out "$OUT" 2>&1 | grep -v "Warning\|warn" | tail -12 >> "$L"
  timeout 300 python benchmarks/bench_models.py --out "$OUT" --budget 290 --models qwen3 --layers 36 --cases generate \
    --batches 1,16 --tag qwen3-36l-generate-15 2>&1 | grep -v "Warning\|warn(" | grep "generate\|fn64" | tail -8 >> "$L"
  tail -40 "$L"
  exit 0
fi
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$L"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$L"
# 1. The GPU tests (the export test last, it skips where torch alone cannot), then bench_slice.
timeout 260 python -m pytest -q -m gpu tests/gpu -p no:cacheprovider -p no:logging --tb=short -rfE \
  -k "not fuzz_error" > /tmp/gpu-tests.txt 2>&1; echo "rc $?" >> /tmp/gpu-tests.txt
grep -v DEBUG /tmp/gpu-tests.txt | tail -200 > "$OUT/gpu-tests.txt"; tail -3 "$OUT/gpu-tests.txt" | tee -a "$L"
timeout 170 python benchmarks/bench_slice.py --out "$OUT" 2>&1 | grep -v "Warning\|warn" | tail -20 >> "$L"
timeout 150 python benchmarks/bench_rope_norm.py --out "$OUT" 2>&1 | grep -v "Warning\|warn" | tail -20 >> "$L"
tail -60 "$L"
