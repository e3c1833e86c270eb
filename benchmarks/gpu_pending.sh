#!/usr/bin/env bash
# The device checks still owed, in one call (GPU time is scarce; a machine takes minutes to start):
#   run(command="bash benchmarks/gpu_pending.sh", timeout_s=600)
# Outputs go to $OUT (at most 8 files come back) and are committed under benchmarks/results/.
# Owed after the third device session of 2026-12-02 (benchmarks/results/2026-12-02-h200-checks-3.md):
# - whether an AOTInductor CUDA package loads on this machine at all, with no qkfuse anywhere
#   (Inductor's own package segfaulted at load in a fresh process);
# - where the 64-token compiled call's host time goes, Inductor vs qkfuse (the generated code);
# - the GPU tests again, now that the policy fuses half_table RoPE under auto.
set -uo pipefail
OUT=${OUT:-/tmp/qkfuse-out}
mkdir -p "$OUT"
export TRITON_DEFAULT_FP_FUSION=1 QKFUSE_STRICT=1 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
L="$OUT/log.txt"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$L"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$L"
# 1. AOTInductor with torch alone (the script imports no qkfuse), then the fn64 code and profile.
(unset PYTHONPATH; timeout 200 python benchmarks/diag_aoti_pure.py 2>&1 | grep "^\[\|^torch\|stderr\|File \"") >> "$L"
timeout 120 python benchmarks/diag_fn64_code.py 2>&1 | grep -v "Warning\|warn" | tail -40 >> "$L"
# 2. GPU tests (the export test excluded: step 1 decides whether this machine can load a package).
timeout 200 python -m pytest -q -m gpu tests/gpu -p no:cacheprovider -p no:logging --tb=short -rfE \
  -k "not fuzz_error and not export" > /tmp/gpu-tests.txt 2>&1; echo "rc $?" >> /tmp/gpu-tests.txt
grep -v DEBUG /tmp/gpu-tests.txt | tail -200 > "$OUT/gpu-tests.txt"; tail -3 "$OUT/gpu-tests.txt" | tee -a "$L"
tail -60 "$L"
